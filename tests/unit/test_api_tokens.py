"""API tokens: shown once, stored as a hash, refused once revoked or expired."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from app.auth import AuthError
from app.auth.tokens import create_token, list_tokens, revoke_token, verify_token
from app.models import utcnow


def _raw_rows() -> list[tuple[object, ...]]:
    from app.db import session_scope

    with session_scope() as s:
        return [tuple(r) for r in s.execute(text("SELECT * FROM apitoken")).all()]


def test_the_ledger_holds_the_tokens_hash_never_the_token(ledger: Path) -> None:
    # Given a token made for CI
    token, _ = create_token(name="ci", roles=["deployer"], created_by="alice")
    # Then the caller got a vmf_ token, and no column of any row holds it
    assert token.startswith("vmf_") and len(token) > 40
    rows = _raw_rows()
    assert len(rows) == 1
    assert not any(token in str(v) for v in rows[0])
    assert hashlib.sha256(token.encode()).hexdigest() in rows[0]
    # and nor does the ledger file itself
    db = (ledger / "vmfarm.db").read_bytes()
    assert token.encode() not in db


def test_a_valid_token_proves_its_own_identity_and_roles(ledger: Path) -> None:
    token, row = create_token(name="ci", roles=["deployer"], created_by="alice")
    who = verify_token(token)
    assert (who.subject, who.kind, who.roles, who.token_id) == (
        "token:ci",
        "token",
        ("deployer",),
        row.id,
    )
    # the list shows when it was last used
    [listed] = list_tokens()
    assert listed.last_used_at is not None and listed.name == "ci"


def test_a_revoked_token_is_refused(ledger: Path) -> None:
    token, row = create_token(name="ci", roles=["deployer"], created_by="alice")
    assert revoke_token(row.id, by="alice") is not None
    with pytest.raises(AuthError, match="revoked"):
        verify_token(token)


def test_an_expired_token_is_refused(ledger: Path) -> None:
    token, _ = create_token(
        name="ci", roles=["deployer"], created_by="alice", lifetime=timedelta(hours=1)
    )
    assert verify_token(token, now=utcnow() + timedelta(minutes=59)).subject == "token:ci"
    with pytest.raises(AuthError, match="expired"):
        verify_token(token, now=utcnow() + timedelta(hours=1, seconds=1))


@pytest.mark.parametrize(
    "forged",
    [
        "vmf_" + "A" * 43,  # well formed, never issued
        "",  # nothing
        "vmf_",  # the prefix alone
    ],
)
def test_a_token_the_server_never_issued_is_refused(ledger: Path, forged: str) -> None:
    create_token(name="ci", roles=["deployer"], created_by="alice")
    with pytest.raises(AuthError):
        verify_token(forged)


def test_a_token_lives_at_most_a_year(ledger: Path) -> None:
    with pytest.raises(ValueError, match="366"):
        create_token(
            name="ci", roles=["deployer"], created_by="alice", lifetime=timedelta(days=400)
        )
