"""Console sessions kept in Redis: two `vmfarm server` processes on one broker (as behind a load
balancer) know each other's sessions, a server restarted keeps its users signed in, signing
out on one signs out on both, and Redis holds no cookie a copy of it could be used with."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.alloc import Allocator
from tests.conftest import REDIS_BASE
from tests.console_signin import ConsoleUser, console_sign_in
from tests.service.conftest import SERVER_RBAC, SERVER_USERS, Provider, Server, _server


@dataclass
class Pair:
    first: Server
    second: Server
    broker: str
    root: Path
    port: int


@pytest.fixture
def pair(pg_url: str, oidc: Provider, alloc: Allocator, tmp_path: Path) -> Iterator[Pair]:
    (tmp_path / "rbac.yaml").write_text(SERVER_RBAC)
    (tmp_path / "users.yaml").write_text(SERVER_USERS)
    rbac = tmp_path / "rbac.yaml"
    with alloc.port() as p1, alloc.port() as p2, alloc.redis_db(REDIS_BASE) as broker:
        one = _server(pg_url, oidc, tmp_path, rbac, p1.port, broker.url)
        two = _server(pg_url, oidc, tmp_path, rbac, p2.port, broker.url)
        first, second = next(one), next(two)
        try:
            yield Pair(first, second, broker.url, tmp_path, p1.port)
        finally:
            for gen in (one, two):
                gen.close()  # stops the server


def _signed_in(base: str, cookie: str) -> str:
    """The page's 'Signed in as' line for ``cookie`` at ``base`` (empty: sent to sign in)."""
    page = ConsoleUser(base, "", cookie, "").get("/console/signed-out")
    marker = "Signed in as <strong>"
    if marker not in page.text:
        return ""
    return page.text.split(marker, 1)[1].split("<", 1)[0]


def test_a_session_opened_on_one_server_is_known_to_the_other(pair: Pair) -> None:
    carol = console_sign_in(pair.first.url, "carol")  # a viewer
    assert _signed_in(pair.first.url, carol.cookie) == "carol"
    # the same cookie on the other process: the same person, with her permissions
    assert _signed_in(pair.second.url, carol.cookie) == "carol"
    on_second = ConsoleUser(pair.second.url, "carol", carol.cookie, carol.csrf)
    assert on_second.get("/console/executions").status_code == 200
    # and bob, who may not list executions, may not there either
    bob = console_sign_in(pair.first.url, "bob")
    assert (
        ConsoleUser(pair.second.url, "bob", bob.cookie, bob.csrf)
        .get("/console/executions")
        .status_code
        == 403
    )
    # a cookie nobody was given is nobody's session on either
    assert _signed_in(pair.second.url, carol.cookie[:-2] + "xx") == ""


def test_signing_out_on_one_server_signs_out_on_both(pair: Pair) -> None:
    bob = console_sign_in(pair.first.url, "bob")
    assert (
        ConsoleUser(pair.second.url, "bob", bob.cookie, bob.csrf)
        .post("/console/logout")
        .status_code
        == 303
    )
    assert bob.get("/console/executions").status_code == 303  # back to the sign-in
    assert _signed_in(pair.first.url, bob.cookie) == ""


def test_a_restarted_server_keeps_its_users_signed_in(pair: Pair, pg_url: str) -> None:
    erin = console_sign_in(pair.first.url, "erin")
    pair.first.proc.terminate()
    pair.first.proc.wait(30)
    again = _server(
        pg_url, pair.first.oidc, pair.root, pair.root / "rbac.yaml", pair.port, pair.broker
    )
    restarted = next(again)
    try:
        assert restarted.proc.pid != pair.first.proc.pid
        assert _signed_in(restarted.url, erin.cookie) == "erin"
    finally:
        again.close()


def test_redis_holds_no_usable_cookie(pair: Pair) -> None:
    """What Redis keeps names each session by a hash of its cookie: a copy of Redis (a
    backup, a replica) gives nobody a way in."""
    bob = console_sign_in(pair.first.url, "bob")
    client = redis.Redis.from_url(pair.broker)
    keys = [k.decode() for k in client.scan_iter("vmfarm:console:*")]
    assert any(k.startswith("vmfarm:console:session:") for k in keys), keys
    for k in keys:
        assert bob.cookie not in k
        value = client.get(k) or b""
        assert bob.cookie.encode() not in value
        # and every session ends on its own: Redis expires it with the session
        assert 0 < client.ttl(k) <= 8 * 3600
    client.close()
