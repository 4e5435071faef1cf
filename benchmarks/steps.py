"""The benchmark deployment's shell steps, shared by the asyncssh and pyinfra peers.

Per host (``../shared/research/performance-anchors.md`` section 2): D is the app directory
(``/opt/bench``: every lab host has a private /opt), ADDR the host's address, PORT 8000 + the
last octet of ADDR, VERSION a fresh id per run.

(a) stop: kill the pid in D/app.pid, remove the file; (b) copy the artifact to D/artifact.tgz;
(c) replace D/current with the unpacked artifact and write D/app.conf; (d) start
D/current/app-1.0/bin/app.sh detached, pid to D/app.pid; (e) health: the pid is alive and
app.conf has the new version (up to 10 tries, 0.2 s apart).

The vmfarm pipeline (``vmfarm/pipeline.yaml``) and the Ansible playbook (``ansible/deploy.yml``)
spell the same commands in their own files. Standard library only: the peers' venv imports it.
"""

from __future__ import annotations

import shlex

APP_DIR = "/opt/bench"


def port_of(addr: str) -> int:
    return 8000 + int(addr.rsplit(".", 1)[1])


def app_conf(addr: str, version: str) -> str:
    return f"listen={addr}\nport={port_of(addr)}\nversion={version}\n"


def stop(d: str = APP_DIR) -> str:
    q = shlex.quote(d)
    return (
        f'mkdir -p {q} && if [ -f {q}/app.pid ]; then kill "$(cat {q}/app.pid)" '
        f"2>/dev/null || true; rm -f {q}/app.pid; fi"
    )


def extract(d: str = APP_DIR) -> str:
    q = shlex.quote(d)
    return f"rm -rf {q}/current && mkdir -p {q}/current && tar -xzf {q}/artifact.tgz -C {q}/current"


def write_conf(addr: str, version: str, d: str = APP_DIR) -> str:
    return f"printf %s {shlex.quote(app_conf(addr, version))} > {shlex.quote(d + '/app.conf')}"


def start(d: str = APP_DIR) -> str:
    q = shlex.quote(d)
    # `&` on the setsid command alone: a backgrounded `cd && setsid ...` list would be a
    # subshell that keeps the channel's stdout open until the app exits.
    return (
        f"cd {q} || exit 1; setsid nohup {q}/current/app-1.0/bin/app.sh >/dev/null 2>&1 "
        f"</dev/null & echo $! > {q}/app.pid"
    )


def health(version: str, d: str = APP_DIR) -> str:
    q = shlex.quote(d)
    v = shlex.quote(f"version={version}")
    return (
        f"for i in 1 2 3 4 5 6 7 8 9 10; do "
        f'if kill -0 "$(cat {q}/app.pid 2>/dev/null)" 2>/dev/null && '
        f"grep -qx {v} {q}/app.conf; then exit 0; fi; sleep 0.2; done; "
        f"echo 'app not healthy after 10 tries' >&2; exit 1"
    )


def one_channel(addr: str, version: str, d: str = APP_DIR) -> str:
    """All steps as one command; the artifact arrives on its stdin."""
    q = shlex.quote(d)
    return " && ".join(
        [
            "set -e",
            stop(d),
            f"cat > {q}/artifact.tgz",
            extract(d),
            write_conf(addr, version, d),
            f"( {start(d)} )",
            f"( {health(version, d)} )",
        ]
    )
