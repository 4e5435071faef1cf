# vmfarm image: the CLI, the control worker and the region workers all run from it.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends openssh-client \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /srv/vmfarm
COPY pyproject.toml README.md ./
COPY app ./app
COPY tasks ./tasks
COPY strategies ./strategies
COPY cli ./cli
COPY configs ./configs
RUN pip install --no-cache-dir .
ENTRYPOINT ["vmfarm"]
