# vmfarm image: the CLI, Flower, the control worker (with beat), the region workers and the
# autoscaler all run from it (ENTRYPOINT vmfarm; the command is vmfarm's arguments).
#   docker build -t vmfarm .                       (--build-arg VMFARM_UID=$(id -u) to match
#                                                   the owner of a mounted deploy key)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ssh-keyscan/ssh for operators; tzdata for schedules in named timezones (zoneinfo); git for
# Terraform steps' configuration from Git connectors.
RUN apt-get update \
    && apt-get install -y --no-install-recommends openssh-client tzdata git \
    && rm -rf /var/lib/apt/lists/*

# Workers run as an unprivileged user; VMFARM_HOME (ledger cache, artifacts, known_hosts,
# beat schedule) is theirs.
ARG VMFARM_UID=1000
RUN useradd --uid "${VMFARM_UID}" --create-home --shell /bin/bash vmfarm \
    && install -d -o vmfarm -g vmfarm -m 0750 /var/lib/vmfarm

WORKDIR /srv/vmfarm

# Dependencies in their own layer: a code change does not reinstall them.
COPY pyproject.toml README.md ./
# (with the terraform extra: the delegates run Terraform steps with its terraform and providers)
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['terraform']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY app ./app
COPY tasks ./tasks
COPY strategies ./strategies
COPY cli ./cli
RUN pip install --no-deps . && vmfarm --version
COPY configs ./configs

USER vmfarm
ENV VMFARM_HOME=/var/lib/vmfarm
# Celery's warm shutdown: SIGTERM lets in-flight tasks finish (give it time: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["vmfarm"]
CMD ["--help"]
