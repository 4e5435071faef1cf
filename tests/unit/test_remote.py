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


def test_the_event_stream_is_read_as_events_and_keepalives_are_skipped() -> None:
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
