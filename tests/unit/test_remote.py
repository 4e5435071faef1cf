"""The CLI's server mode without a server: where the sign-in is kept (and how private it is),
when and how it is renewed, and what each kind of answer becomes (message and exit code).
The server and the identity provider are httpx's MockTransport (tests/service drives the
real ones)."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from cli import login as flows
from cli import remote
from cli.main import main

SERVER = "http://vmfarm.test"
TOKEN_ENDPOINT = "http://idp.test/token"


def jwt_of(**claims: Any) -> str:
    """An unsigned JWT-shaped token (the CLI reads claims; the server verifies)."""

    def part(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


@pytest.fixture(autouse=True)
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for key in list(os.environ):
        if key.startswith("VMFARM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    yield tmp_path / "config" / "vmfarm"


def stored(token: str, **extra: Any) -> dict[str, Any]:
    return {
        "server": SERVER,
        "client_id": "vmfarm",
        "token_endpoint": TOKEN_ENDPOINT,
        "token": token,
        "refresh_token": "r1",
        **extra,
    }


def idp(answer: Callable[[dict[str, str]], httpx.Response], seen: list[dict[str, str]]) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        form = dict(httpx.QueryParams(request.content.decode()))
        seen.append(form)
        return answer(form)

    return httpx.Client(transport=httpx.MockTransport(handler))


# --- where the sign-in is kept ---------------------------------------------------------------


def test_the_sign_in_is_kept_readable_by_its_owner_only_whatever_the_umask(
    config_home: Path,
) -> None:
    old = os.umask(0)
    try:
        path = remote.write_login(stored("t1"))
        remote.write_login(stored("t2"))  # replaced, still private
    finally:
        os.umask(old)
    assert path == config_home / "login.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(config_home.stat().st_mode) == 0o700
    assert remote.read_login() == stored("t2")
    assert [p.name for p in config_home.iterdir()] == ["login.json"]  # no temporary left


def test_without_xdg_config_home_it_is_under_dot_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert remote.login_path() == tmp_path / "home" / ".config" / "vmfarm" / "login.json"


def test_server_mode_is_on_with_a_sign_in_or_vmfarm_server_and_off_after_logout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert not remote.server_mode()
    remote.write_login(stored("t"))
    assert remote.server_url() == SERVER
    monkeypatch.setenv("VMFARM_SERVER", "http://other.test/")
    assert remote.server_url() == "http://other.test"  # the variable wins
    monkeypatch.delenv("VMFARM_SERVER")
    res = CliRunner().invoke(main, ["logout"])
    assert res.exit_code == 0 and "signed out" in res.output
    assert not remote.server_mode()


# --- renewing it -----------------------------------------------------------------------------


def test_a_token_is_renewed_when_it_has_expired_or_is_about_to() -> None:
    now = time.time()
    assert not remote.needs_refresh(jwt_of(exp=now + 600), now=now)
    assert remote.needs_refresh(jwt_of(exp=now + 10), now=now)  # inside the margin
    assert remote.needs_refresh(jwt_of(exp=now - 1), now=now)
    assert not remote.needs_refresh("vmf_opaque", now=now)  # the server decides


def test_an_expired_sign_in_is_renewed_stored_and_used(config_home: Path) -> None:
    fresh = jwt_of(sub="alice", exp=time.time() + 3600)
    remote.write_login(stored(jwt_of(sub="alice", exp=time.time() - 5)))
    seen: list[dict[str, str]] = []
    http = idp(
        lambda _: httpx.Response(
            200, json={"id_token": fresh, "access_token": "opaque", "refresh_token": "r2"}
        ),
        seen,
    )
    assert remote.credentials(SERVER, http=http) == fresh
    assert seen == [{"grant_type": "refresh_token", "refresh_token": "r1", "client_id": "vmfarm"}]
    kept = remote.read_login()
    assert kept is not None and kept["token"] == fresh and kept["refresh_token"] == "r2"
    assert stat.S_IMODE((config_home / "login.json").stat().st_mode) == 0o600
    # a token still valid is used as it is: no second call
    assert remote.credentials(SERVER, http=http) == fresh and len(seen) == 1


def test_a_refused_renewal_says_to_sign_in_again_and_keeps_nothing_new() -> None:
    old = stored(jwt_of(exp=time.time() - 5))
    remote.write_login(old)
    http = idp(lambda _: httpx.Response(400, json={"error": "invalid_grant"}), [])
    with pytest.raises(remote.LoginError, match=f"invalid_grant.*vmfarm login {SERVER}"):
        remote.credentials(SERVER, http=http)
    assert remote.read_login() == old


def test_a_renewal_without_an_id_token_is_not_taken_for_one() -> None:
    remote.write_login(stored(jwt_of(exp=time.time() - 5)))
    http = idp(lambda _: httpx.Response(200, json={"access_token": "opaque-value"}), [])
    with pytest.raises(remote.LoginError, match="without an ID token"):
        remote.credentials(SERVER, http=http)


def test_an_api_token_in_vmfarm_token_comes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    remote.write_login(stored(jwt_of(exp=time.time() + 600)))
    monkeypatch.setenv("VMFARM_TOKEN", "vmf_abc")
    assert remote.credentials(SERVER) == "vmf_abc"


def test_a_sign_in_to_another_server_is_not_sent_to_this_one() -> None:
    remote.write_login(stored(jwt_of(exp=time.time() + 600)))
    with pytest.raises(remote.LoginError, match=r"not signed in to http://evil\.test"):
        remote.credentials("http://evil.test")


# --- answers as exit codes -------------------------------------------------------------------


def server_answering(
    monkeypatch: pytest.MonkeyPatch, status: int, body: Any
) -> list[httpx.Request]:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(status, json=body)

    monkeypatch.setenv("VMFARM_SERVER", SERVER)
    monkeypatch.setattr(
        "cli.thin.connect",
        lambda: remote.Remote(SERVER, token="vmf_t", transport=httpx.MockTransport(handler)),
    )
    return calls


@pytest.mark.parametrize(
    ("status", "body", "args", "code", "says"),
    [
        (403, {"detail": "bob may not pipeline:approve"}, ["approve", "e1"], 3, "refused: bob may"),
        (401, {"detail": "expired"}, ["status", "e1"], 3, "refused: the server did not accept"),
        (404, {"detail": "no execution 'e1'"}, ["logs", "e1"], 2, "error: no execution 'e1'"),
        (409, {"detail": "not waiting"}, ["reject", "e1"], 2, "error: not waiting"),
        (
            422,
            {"detail": [{"loc": ["body", "files"], "msg": "Field required"}]},
            ["apply", "-f", "."],
            2,
            "error: files: Field required",
        ),
        (500, {"detail": "boom"}, ["executions"], 1, "error: the server answered 500: boom"),
    ],
)
def test_each_kind_of_answer_has_its_exit_code_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    status: int,
    body: Any,
    args: list[str],
    code: int,
    says: str,
) -> None:
    (tmp_path / "env.yaml").write_text("kind: Environment\n")
    monkeypatch.chdir(tmp_path)
    calls = server_answering(monkeypatch, status, body)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == code, res.output
    assert says in res.output
    assert len(calls) == 1 and calls[0].headers["authorization"] == "Bearer vmf_t"


def test_a_refused_submission_says_nothing_ran(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "p.yaml").write_text("kind: Pipeline\n")
    calls = server_answering(monkeypatch, 422, {"detail": "p.yaml:1:1: spec: required"})
    res = CliRunner().invoke(main, ["run", str(tmp_path / "p.yaml"), "--set", "tag=1"])
    assert res.exit_code == 2
    assert "error: p.yaml:1:1: spec: required" in res.output and "nothing was run." in res.output
    assert json.loads(calls[0].content) == {
        "files": {"p.yaml": "kind: Pipeline\n"},
        "set": {"tag": "1"},
    }


def test_an_option_the_server_would_not_carry_out_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "p.yaml").write_text("kind: Pipeline\n")
    calls = server_answering(monkeypatch, 201, {"id": "e1"})
    res = CliRunner().invoke(main, ["run", str(tmp_path / "p.yaml"), "--override-freeze"])
    assert res.exit_code == 2 and "--override-freeze is not carried out" in res.output
    assert calls == []


def test_local_commands_without_a_server_equivalent_say_so_in_server_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VMFARM_SERVER", SERVER)
    res = CliRunner().invoke(main, ["audit", "--limit", "3"])
    assert res.exit_code == 2
    assert "'vmfarm audit' has no server equivalent" in res.output


def test_server_commands_say_they_need_a_server_in_local_mode() -> None:
    res = CliRunner().invoke(main, ["tokens", "list"])
    assert res.exit_code == 2 and "needs a vmfarm server" in res.output


def test_the_event_stream_is_read_as_events_and_keepalives() -> None:
    lines = [
        "id: 1",
        "event: status",
        'data: {"status": "RUNNING"}',
        "",
        ": still following",
        "",
        "event: end",
        'data: {"status": "SUCCEEDED"}',
        "",
    ]
    assert list(remote.iter_events(iter(lines))) == [
        ("status", {"status": "RUNNING"}),
        ("keepalive", {}),
        ("end", {"status": "SUCCEEDED"}),
    ]


# --- the device flow (the test provider has none: RFC 8628's answers, mocked) ------------------


def test_the_device_flow_waits_while_pending_slows_down_when_told_and_returns_the_tokens() -> None:
    answers = iter(
        [
            httpx.Response(
                200,
                json={
                    "device_code": "dc",
                    "user_code": "ABCD-EFGH",
                    "verification_uri": "http://idp.test/device",
                    "interval": 1,
                    "expires_in": 600,
                },
            ),
            httpx.Response(400, json={"error": "authorization_pending"}),
            httpx.Response(400, json={"error": "slow_down"}),
            httpx.Response(200, json={"id_token": "jwt", "refresh_token": "r"}),
        ]
    )
    seen: list[dict[str, str]] = []
    http = idp(lambda _: next(answers), seen)
    shown: list[str] = []
    slept: list[float] = []
    tokens = flows.device_code(
        http,
        {"client_id": "vmfarm", "scopes": ["openid"]},
        {
            "device_authorization_endpoint": "http://idp.test/device_authorization",
            "token_endpoint": TOKEN_ENDPOINT,
        },
        show=shown.append,
        sleep=slept.append,
    )
    assert tokens == {"id_token": "jwt", "refresh_token": "r"}
    assert "ABCD-EFGH" in " ".join(shown) and "http://idp.test/device" in " ".join(shown)
    assert slept == [1.0, 1.0, 6.0]
    assert seen[-1] == {
        "grant_type": flows.DEVICE_GRANT,
        "device_code": "dc",
        "client_id": "vmfarm",
    }


def test_the_device_flow_is_refused_when_the_provider_does_not_offer_it() -> None:
    with pytest.raises(remote.LoginError, match="does not offer the device flow"):
        flows.device_code(
            idp(lambda _: httpx.Response(500), []),
            {"client_id": "vmfarm"},
            {"token_endpoint": TOKEN_ENDPOINT},
            show=print,
        )


# --- following a run over server-sent events ---------------------------------------------------


class FakeServer:
    """A server that takes a submission (e1), streams ``progress`` as status events, then
    ``end``; ``breaks`` event requests fail first (a restart)."""

    def __init__(self, progress: list[str], *, breaks: int = 0) -> None:
        self.progress = progress
        self.breaks = breaks
        self.shown = 0  # how many statuses the stream has sent (GET follows it)
        self.streams = 0

    def report(self) -> dict[str, Any]:
        status = self.progress[max(self.shown - 1, 0)]
        return {"id": "e1", "status": status, "stages": []}

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and path == "/api/v1/executions":
            return httpx.Response(201, json={"id": "e1"})
        if path == "/api/v1/executions/e1/events":
            self.streams += 1
            if self.breaks:
                self.breaks -= 1
                raise httpx.ReadError("connection reset")
            return httpx.Response(
                200,
                headers={"content-type": "text/event-stream"},
                content=self.stream(),
            )
        if path == "/api/v1/executions/e1":
            return httpx.Response(200, json=self.report())
        return httpx.Response(404, json={"detail": "no such route"})

    def stream(self) -> Iterator[bytes]:
        for n, status in enumerate(self.progress, 1):
            self.shown = n
            yield f"id: {n}\nevent: status\ndata: {json.dumps({'status': status})}\n\n".encode()
            yield b": still following\n\n"
        yield f"event: end\ndata: {json.dumps({'status': self.progress[-1]})}\n\n".encode()


def following(monkeypatch: pytest.MonkeyPatch, fake: FakeServer) -> None:
    monkeypatch.setenv("VMFARM_SERVER", SERVER)
    monkeypatch.setattr(
        "cli.thin.connect",
        lambda: remote.Remote(SERVER, token="vmf_t", transport=httpx.MockTransport(fake.handler)),
    )
    monkeypatch.setattr("cli.thin.time.sleep", lambda _: None)


@pytest.mark.parametrize(("final", "code"), [("SUCCEEDED", 0), ("FAILED", 1)])
def test_run_follows_the_events_says_when_it_waits_and_exits_with_the_outcome(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, final: str, code: int
) -> None:
    (tmp_path / "p.yaml").write_text("kind: Pipeline\n")
    fake = FakeServer(["RUNNING", "WAITING", "WAITING", "RUNNING", final])
    following(monkeypatch, fake)
    res = CliRunner().invoke(main, ["run", str(tmp_path / "p.yaml"), "-o", "json"])
    assert res.exit_code == code, res.output
    assert json.loads(res.stdout) == {"id": "e1", "status": final, "stages": []}
    assert res.stderr.count("execution e1 is waiting for approval: vmfarm approve e1") == 1


def test_a_broken_event_stream_is_followed_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "p.yaml").write_text("kind: Pipeline\n")
    fake = FakeServer(["RUNNING", "SUCCEEDED"], breaks=2)
    following(monkeypatch, fake)
    res = CliRunner().invoke(main, ["run", str(tmp_path / "p.yaml"), "--watch"])
    assert res.exit_code == 0, res.output
    assert fake.streams == 3
    assert "execution e1 SUCCEEDED" in res.stdout  # the summary after the live view


def test_a_stream_that_stays_broken_ends_the_follow_with_exit_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "p.yaml").write_text("kind: Pipeline\n")
    fake = FakeServer(["RUNNING"], breaks=100)
    following(monkeypatch, fake)
    res = CliRunner().invoke(main, ["run", str(tmp_path / "p.yaml"), "-o", "json"])
    assert res.exit_code == 1
    assert "lost the event stream" in res.stderr


def test_following_quietly_says_once_when_a_watch_after_deployment_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    class Watching(FakeServer):
        def stream(self) -> Iterator[bytes]:
            # the server's status events name the watch that holds the run open
            for n, status in enumerate(self.progress, 1):
                self.shown = n
                data: dict[str, Any] = {"status": status}
                if 1 < n < len(self.progress):
                    data["watching"] = {"stage": "deploy", "ends_at": "12:00:00Z"}
                yield f"event: status\ndata: {json.dumps(data)}\n\n".encode()
            yield f"event: end\ndata: {json.dumps({'status': 'SUCCEEDED'})}\n\n".encode()

    (tmp_path / "p.yaml").write_text("kind: Pipeline\n")
    following(monkeypatch, Watching(["RUNNING", "RUNNING", "RUNNING", "SUCCEEDED"]))
    res = CliRunner().invoke(main, ["run", str(tmp_path / "p.yaml"), "-o", "json"])
    assert res.exit_code == 0, res.output
    told = "execution e1: stage deploy passed its last phase; watching it until 12:00:00Z"
    assert res.stderr.count(told) == 1


def test_run_with_only_pipeline_names_a_stored_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = server_answering(monkeypatch, 201, {"id": "e9"})
    res = CliRunner().invoke(main, ["run", "--pipeline", "web", "--set", "tag=2", "--detach"])
    assert res.exit_code == 0 and res.stdout.strip() == "e9", res.output
    assert json.loads(calls[0].content) == {"set": {"tag": "2"}, "pipeline": "web"}


def test_run_without_files_or_pipeline_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = server_answering(monkeypatch, 201, {"id": "e9"})
    res = CliRunner().invoke(main, ["run"])
    assert res.exit_code == 2 and "--pipeline ID" in res.output and calls == []


def test_a_sign_in_the_server_refuses_is_renewed_once_and_the_request_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old, new = (
        jwt_of(sub="alice", exp=time.time() + 600),
        jwt_of(sub="alice", exp=time.time() + 3600),
    )
    remote.write_login(stored(old))
    renewals: list[dict[str, str]] = []
    real_refresh = remote.refresh

    def refresh(login: dict[str, Any], *, http: Any = None) -> dict[str, Any]:
        return real_refresh(
            login,
            http=idp(lambda _: httpx.Response(200, json={"id_token": new}), renewals),
        )

    monkeypatch.setattr(remote, "refresh", refresh)
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        ok = request.headers["authorization"] == f"Bearer {new}"
        return httpx.Response(200 if ok else 401, json=[] if ok else {"detail": "bad key"})

    client = remote.Remote(SERVER, transport=httpx.MockTransport(handler))
    assert client.get("/api/v1/executions") == []
    assert seen == [f"Bearer {old}", f"Bearer {new}"] and len(renewals) == 1
    # renewed once only: a second refusal is the answer
    seen.clear()
    client.token = old
    with pytest.raises(remote.ServerRefused, match="bad key"):
        client.get("/api/v1/executions")
    assert seen == [f"Bearer {old}"]


def test_an_api_token_the_server_refuses_is_not_renewed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMFARM_TOKEN", "vmf_gone")
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(401, json={"detail": "API token 'ci' was revoked"})

    with pytest.raises(remote.ServerRefused, match="revoked"):
        remote.Remote(SERVER, transport=httpx.MockTransport(handler)).get("/api/v1/tokens")
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("offered", "device", "no_browser", "browser", "flow"),
    [
        (True, False, False, True, "code"),  # a desktop: the browser
        (True, False, False, False, "device"),  # over SSH, no browser: a code
        (False, False, False, False, "code"),  # no device flow: print the address
        (True, False, True, False, "code"),  # --no-browser: the address, as asked
        (True, True, False, True, "device"),  # --device
        (False, True, False, True, "device"),  # --device, refused later by name
    ],
)
def test_login_chooses_the_device_flow_when_asked_or_when_there_is_no_browser(
    offered: bool, device: bool, no_browser: bool, browser: bool, flow: str
) -> None:
    disc = {"device_authorization_endpoint": "http://idp.test/device"} if offered else {}
    chosen = flows.choose_flow(disc, device=device, no_browser=no_browser, browser=lambda: browser)
    assert chosen == flow
