"""Fixtures of the service lane: a cluster whose messages are signed and whose region workers
connect to PostgreSQL as the worker role; an OpenID Connect provider process; a real HTTP
receiver and a real SMTP server on 127.0.0.1 (notifications)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message as EmailMessage
from email.policy import default as default_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from tests.alloc import Allocator
from tests.conftest import REDIS_BASE, REPO, Cluster, _stop, _wait_for_workers, base_env

WORKER_LOGIN = "vmfarm_test_worker"


def worker_role_url(pg_url: str) -> str:
    """``pg_url`` as the login role WORKER_LOGIN, a member of vmfarm_worker (created here;
    the lab's PostgreSQL trusts 127.0.0.1, so no password)."""
    import psycopg
    from sqlalchemy import create_engine

    from app.db import migrate, normalise_url

    engine = create_engine(normalise_url(pg_url))
    try:
        migrate(engine)  # as the owner: creates the tables, the roles and their grants
    finally:
        engine.dispose()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            f"DO $$ BEGIN CREATE ROLE {WORKER_LOGIN} LOGIN IN ROLE vmfarm_worker; "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        )
    scheme, rest = pg_url.split("://", 1)
    return f"{scheme}://{WORKER_LOGIN}@{rest.split('@', 1)[1]}"


@dataclass
class Keys:
    root: Path

    def env(self, name: str) -> dict[str, str]:
        return {
            "VMFARM_SECURITY_KEY": str(self.root / f"{name}.key"),
            "VMFARM_SECURITY_CERTIFICATE": str(self.root / f"{name}.pem"),
            "VMFARM_SECURITY_CERT_STORE": str(self.root / "certs"),
        }


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    from app.signing import init_keys

    root = tmp_path_factory.mktemp("keys")
    for name in ("server", "control", "region-r1", "region-r2"):
        init_keys(root, name)
    return Keys(root)


@pytest.fixture(scope="module")  # its workers leave the registry before other modules count
def secure_cluster(
    pg_url: str,
    lab: Any,
    signing_keys: Keys,
    alloc: Allocator,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    """Region workers r1 and r2 (each its own signing key, connected as the worker role) and
    a control worker (its own key, the owner's connection), on Redis databases of their own;
    ``env`` is the CLI's: the server's key and the owner's connection."""
    with alloc.redis_db(REDIS_BASE) as b, alloc.redis_db(REDIS_BASE) as r:
        yield from _secure_cluster(pg_url, signing_keys, tmp_path_factory, b.url, r.url)


def _secure_cluster(
    pg_url: str,
    signing_keys: Keys,
    tmp_path_factory: pytest.TempPathFactory,
    broker: str,
    results: str,
    *,
    region_broker: tuple[str, str] | None = None,
    worker_env: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """``region_broker``: the region workers' own broker and result URLs (another Redis
    user), when they differ from the control plane's; ``worker_env``: more variables for
    every worker (not the CLI's ``env``)."""
    worker_url = worker_role_url(pg_url)
    home = tmp_path_factory.mktemp("secure-home")
    common = base_env(
        VMFARM_BROKER_URL=broker, VMFARM_RESULT_BACKEND=results, VMFARM_HOME=str(home)
    )
    env = {**common, "VMFARM_DATABASE_URL": pg_url, **signing_keys.env("server")}
    regions = (
        {"VMFARM_BROKER_URL": region_broker[0], "VMFARM_RESULT_BACKEND": region_broker[1]}
        if region_broker
        else {}
    )
    specs = [
        (
            "s-r1@test",
            ["--region", "r1", "-c", "4"],
            {"VMFARM_DATABASE_URL": worker_url, **regions, **signing_keys.env("region-r1")},
        ),
        (
            "s-r2@test",
            ["--region", "r2", "-c", "4"],
            {"VMFARM_DATABASE_URL": worker_url, **regions, **signing_keys.env("region-r2")},
        ),
        (
            "s-control@test",
            ["--control", "-c", "2"],
            {"VMFARM_DATABASE_URL": pg_url, **signing_keys.env("control")},
        ),
    ]
    workers, logs = [], []
    for name, args, extra in specs:
        log = home / f"{name.split('@')[0]}.log"
        logs.append(log)
        with log.open("wb") as fh:
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "cli.main", "worker", "-n", name, "-l", "INFO", *args],
                    env={**common, **(worker_env or {}), **extra},
                    cwd=REPO,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    cl = Cluster(env=env, home=home, workers=workers, logs=logs)
    try:
        _wait_for_workers(env, [n for n, _, _ in specs])
    except AssertionError:
        _stop(workers)
        raise AssertionError(cl.worker_logs()) from None
    yield cl
    _stop(workers)


# --- an OpenID Connect provider -------------------------------------------------------------


@dataclass
class Provider:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


def start_provider(
    tmp: Path, users: list[dict[str, Any]], *, port: int, max_age: int | None = None
) -> Provider:
    """A real ``oidc-provider-mock`` process on 127.0.0.1:``port`` (leased), with ``users``."""
    import httpx

    args = [sys.executable, "-m", "oidc_provider_mock", "-p", str(port), "-H", "127.0.0.1"]
    for u in users:
        args += ["--user-claims", json.dumps(u)]
    if max_age is not None:
        args += ["-e", str(max_age)]
    log = tmp / f"oidc-{port}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/.well-known/openid-configuration", timeout=1).status_code == 200:
                return Provider(url, proc, log)
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    _stop([proc])
    raise AssertionError(f"the OIDC provider did not start: {log.read_text()}")


def sign_in(provider: str, subject: str, *, client_id: str) -> dict[str, Any]:
    """The authorization-code flow with PKCE, as a CLI drives it (the provider's sign-in
    form answered with ``subject``); returns the token response (id_token, access_token)."""
    import base64
    import hashlib
    import secrets
    from urllib.parse import parse_qs, urlparse

    import httpx

    verifier = secrets.token_urlsafe(48)
    challenge = (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )
    redirect = "http://127.0.0.1:1/callback"  # never contacted: the code is read from it
    state = secrets.token_urlsafe(16)
    with httpx.Client(base_url=provider, timeout=10) as http:
        conf = http.get("/.well-known/openid-configuration").json()
        params = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect,
            "scope": "openid profile email",
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        resp = http.post(conf["authorization_endpoint"], params=params, data={"sub": subject})
        assert resp.status_code in (302, 303), resp.text
        query = parse_qs(urlparse(resp.headers["location"]).query)
        assert query["state"] == [state]
        token = http.post(
            conf["token_endpoint"],
            data={
                "grant_type": "authorization_code",
                "code": query["code"][0],
                "redirect_uri": redirect,
                "client_id": client_id,
                "code_verifier": verifier,
                # The mock takes any client secret but requires one (no public clients).
                "client_secret": "test-client-secret",
            },
        )
        assert token.status_code == 200, token.text
        return dict(token.json())


@pytest.fixture(scope="session")
def oidc(tmp_path_factory: pytest.TempPathFactory, alloc: Allocator) -> Iterator[Provider]:
    """An OIDC provider whose users are alice (deployers), bob (viewers), carol (none), and
    erin, frank and grace (release_managers)."""
    with alloc.port() as leased:
        p = start_provider(
            tmp_path_factory.mktemp("oidc"),
            [
                {"sub": "alice", "groups": ["deployers"]},
                {"sub": "bob", "groups": ["viewers"]},
                {"sub": "carol"},
                *(
                    {"sub": name, "groups": ["release_managers"]}
                    for name in ("erin", "frank", "grace")
                ),
            ],
            port=leased.port,
        )
        yield p
        _stop([p.proc])


# --- the server -------------------------------------------------------------------------------

SERVER_RBAC = """
roles:
  token-admin: [token:create, token:view, token:revoke]
  only-token-create: [token:create]
  only-token-view: [token:view]
  only-token-revoke: [token:revoke]
  only-pipeline-execute: [pipeline:execute]
  only-pipeline-view: [pipeline:view]
  only-pipeline-approve: [pipeline:approve]
  only-pipeline-abort: [pipeline:abort]
  only-pipeline-rollback: [pipeline:rollback]
  viewer: [pipeline:view]
  deployer: ["pipeline:*", "environment:*"]
  only-registry-apply: [registry:apply]
  only-registry-view: [registry:view]
  registry-admin: ["registry:*"]
  console-reader: [fleet:view, audit:view, registry:view]
bindings:
  - role: token-admin
    groups: [deployers]
  - role: deployer
    groups: [deployers, release_managers]
  - role: viewer
    users: [carol]
  - role: registry-admin
    groups: [deployers, release_managers]
  - role: console-reader
    groups: [deployers]
"""
# Groups the identity provider does not send: API tokens named "holder" approve in "ci".
SERVER_USERS = """
groups:
  ci: ["token:holder"]
"""


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    oidc: Provider


@pytest.fixture(scope="session")
def server(
    pg_url: str, oidc: Provider, alloc: Allocator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """``vmfarm server`` as a process: the session's PostgreSQL, Redis, the OIDC provider
    (audience ``vmfarm``), and an RBAC file of its own (SERVER_RBAC)."""

    root = tmp_path_factory.mktemp("server")
    rbac = root / "rbac.yaml"
    rbac.write_text(SERVER_RBAC)
    (root / "users.yaml").write_text(SERVER_USERS)
    with alloc.port() as leased, alloc.redis_db(REDIS_BASE) as broker:
        yield from _server(pg_url, oidc, root, rbac, leased.port, broker.url)


def _server(
    pg_url: str,
    oidc: Provider,
    root: Path,
    rbac: Path,
    port: int,
    broker: str,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Server]:
    import httpx

    env = base_env(
        VMFARM_DATABASE_URL=pg_url,
        VMFARM_BROKER_URL=broker,
        VMFARM_HOME=str(root / "home"),
        VMFARM_SERVER_RBAC_FILE=str(rbac),
        VMFARM_SERVER_USERS_FILE=str(root / "users.yaml"),
        VMFARM_SERVER_ISSUER=oidc.url,
        VMFARM_SERVER_AUDIENCE="vmfarm",
        # The provider takes no public clients: vmfarm login gets this (not secret) secret.
        VMFARM_SERVER_CLI_CLIENT_SECRET="test-client-secret",
        # The mock provider wants a client secret (any) from the console's sign-in.
        VMFARM_SERVER_CONSOLE_CLIENT_SECRET="test-client-secret",
        **(extra_env or {}),
    )
    log = root / "server.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "server", "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"the server stopped: {log.read_text()}")
        time.sleep(0.2)
    else:
        _stop([proc])
        raise AssertionError(f"the server did not become healthy: {log.read_text()}")
    yield Server(url, proc, log, oidc)
    _stop([proc])


@dataclass
class SignedRun:
    execution_id: str
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def signed_run(secure_cluster: Cluster, lab: Any) -> SignedRun:
    """The integration pipeline run once through the signed cluster (tag 3.0.1)."""
    from tests.conftest import DATA

    res = secure_cluster.vmfarm(
        "run",
        str(DATA / "itest" / "pipeline.yaml"),
        str(lab.infrastructure_file),
        "--set",
        "tag=3.0.1",
    )
    assert res.returncode == 0, res.stdout + res.stderr + secure_cluster.worker_logs()
    ex_id = next(
        line.split()[1] for line in res.stderr.splitlines() if line.startswith("execution ")
    )
    return SignedRun(ex_id, res.stdout, res.stderr)


@dataclass
class Receiver:
    """An HTTP server that records POSTs and answers with the statuses it is given in turn
    (the last one repeats)."""

    server: ThreadingHTTPServer
    statuses: list[int]
    requests: list[dict[str, Any]] = field(default_factory=list)

    def url(self, path: str = "/hooks/T000/B000/token") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    @property
    def bodies(self) -> list[Any]:
        return [json.loads(r["body"]) for r in self.requests]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec: Receiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            rec.requests.append(
                {"path": self.path, "headers": dict(self.headers), "body": body.decode()}
            )
            status = rec.statuses[min(len(rec.requests), len(rec.statuses)) - 1]
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec = Receiver(server=server, statuses=[200])
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield rec
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@dataclass
class Mailbox:
    port: int
    messages: list[tuple[str, list[str], EmailMessage]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = message_from_bytes(envelope.content, policy=default_policy)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), msg))
        return "250 Message accepted for delivery"


@pytest.fixture
def mailbox(free_port: Callable[[], int]) -> Iterator[Mailbox]:
    box = Mailbox(port=free_port())
    controller = Controller(box, hostname="127.0.0.1", port=box.port)
    controller.start()
    yield box
    controller.stop()


def approval_stage(
    message: str, *, groups: list[str], minimum: int = 1, disallow_executor: bool = False
) -> str:
    """A pipeline's Approval stage ``approve`` (one HarnessApproval step, a day to answer), as
    a line of its ``stages:`` list."""
    return f"""\
    - stage:
        name: Approve
        identifier: approve
        type: Approval
        spec:
          execution:
            steps:
              - step:
                  type: HarnessApproval
                  name: Approve
                  identifier: approve
                  timeout: 1d
                  spec:
                    approvalMessage: {message}
                    approvers:
                      userGroups: {groups}
                      minimumCount: {minimum}
                      disallowPipelineExecutor: {str(disallow_executor).lower()}
"""


def gated_pipeline(
    name: str, *, groups: list[str], minimum: int = 1, disallow_executor: bool = False
) -> str:
    """A pipeline of one Approval stage (no hosts, no worker needed): what the server's
    execution routes are tried on."""
    stage = approval_stage(
        "Release <+pipeline.executionId>?",
        groups=groups,
        minimum=minimum,
        disallow_executor=disallow_executor,
    )
    return f"""\
apiVersion: v1
kind: Pipeline
metadata:
  name: {name}
spec:
  stages:
{stage}"""


def approved_release_pipeline(name: str, *, env: str, infra: str, svc: str, version: str) -> str:
    """A pipeline with a ``version`` input (a value matching the regex ``version``) whose
    release_managers approve (one of them), then a Deploy stage of ``svc`` on ``env``'s ``infra``
    that echoes the version: a triggered run waits at the approval, so no worker is needed."""
    stage = approval_stage("Deploy <+pipeline.variables.version>?", groups=["release_managers"])
    return f"""\
apiVersion: v1
kind: Pipeline
metadata:
  name: {name}
spec:
  variables:
    - name: version
      type: String
      value: <+input>.regex({version})
  stages:
{stage}\
    - stage:
        name: Deploy
        identifier: deploy
        type: Deployment
        spec:
          service:
            serviceRef: {svc}
          environment:
            environmentRef: {env}
            infrastructureDefinitions:
              - identifier: {infra}
          execution:
            steps:
              - step:
                  type: Command
                  name: Work
                  identifier: work
                  spec:
                    commandUnits:
                      - identifier: note
                        type: Script
                        spec:
                          source:
                            type: Inline
                            spec:
                              script: echo <+pipeline.variables.version>
"""


def bearer(server: Server, who: str = "alice") -> dict[str, str]:
    """The Authorization header of ``who`` signed in at the server's identity provider."""
    token = sign_in(server.oidc.url, who, client_id="vmfarm")["id_token"]
    return {"Authorization": f"Bearer {token}"}


def sql(pg_url: str, query: str, **params: Any) -> list[Any]:
    """The rows of one query on the ledger (its own connection, closed after)."""
    from sqlalchemy import create_engine, text

    from app.db import normalise_url

    engine = create_engine(normalise_url(pg_url))
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(query), params).all())
    finally:
        engine.dispose()
