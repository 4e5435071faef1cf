"""OIDC tokens from a real provider process (oidc-provider-mock), verified as an attacker
would try to get past the verifier: expired, for another client, from another issuer,
tampered, signed by a key of their own, or with an algorithm of their choosing."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt
import pytest

from app.auth import AuthError
from app.auth.oidc import OidcVerifier
from tests.service.conftest import Provider, sign_in

AUDIENCE = "vmfarm"


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_a_signed_in_person_is_their_subject_with_their_groups(oidc: Provider) -> None:
    # Given alice signed in through the authorization-code flow with PKCE
    tokens = sign_in(oidc.url, "alice", client_id=AUDIENCE)
    # When the server verifies her ID token against the issuer's discovery document and JWKS
    who = OidcVerifier(oidc.url, AUDIENCE).verify(tokens["id_token"])
    # Then she is alice, in the deployers group
    assert (who.subject, who.kind, who.groups) == ("alice", "oidc", frozenset({"deployers"}))
    # and the name of the groups claim is the server's to choose
    assert (
        OidcVerifier(oidc.url, AUDIENCE, groups_claim="roles").verify(tokens["id_token"]).groups
        == frozenset()
    )


def test_an_expired_token_is_refused(oidc: Provider) -> None:
    token = sign_in(oidc.url, "alice", client_id=AUDIENCE)["id_token"]
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    just_before = OidcVerifier(oidc.url, AUDIENCE, leeway=0, clock=lambda: exp - 1)
    assert just_before.verify(token).subject == "alice"
    after = OidcVerifier(oidc.url, AUDIENCE, leeway=0, clock=lambda: exp)
    with pytest.raises(AuthError, match="expired"):
        after.verify(token)


def test_a_token_issued_to_another_client_is_refused(oidc: Provider) -> None:
    token = sign_in(oidc.url, "alice", client_id="some-other-app")["id_token"]
    with pytest.raises(AuthError, match="not for this server"):
        OidcVerifier(oidc.url, AUDIENCE).verify(token)


def test_a_token_of_another_issuer_is_refused(oidc: Provider) -> None:
    # The provider names itself after the host it is asked through: asked as localhost, its
    # discovery document and keys are the same, but its issuer is another one.
    token = sign_in(oidc.url, "alice", client_id=AUDIENCE)["id_token"]
    other = oidc.url.replace("127.0.0.1", "localhost")
    with pytest.raises(AuthError, match="not issued by"):
        OidcVerifier(other, AUDIENCE).verify(token)


def test_a_tampered_token_is_refused(oidc: Provider) -> None:
    # bob edits his token's claims to be alice, in every group, and keeps the signature
    token = sign_in(oidc.url, "bob", client_id=AUDIENCE)["id_token"]
    header, _, signature = token.split(".")
    claims = jwt.decode(token, options={"verify_signature": False})
    claims.update(sub="alice", groups=["deployers", "admins"])
    with pytest.raises(AuthError, match="signature does not verify"):
        OidcVerifier(oidc.url, AUDIENCE).verify(f"{header}.{_b64(claims)}.{signature}")


def test_a_token_signed_by_a_key_the_issuer_does_not_hold_is_refused(oidc: Provider) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    claims = jwt.decode(
        sign_in(oidc.url, "bob", client_id=AUDIENCE)["id_token"],
        options={"verify_signature": False},
    )
    mine = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(
        {**claims, "sub": "alice"}, mine, algorithm="RS256", headers={"kid": "attackers-key"}
    )
    verifier = OidcVerifier(oidc.url, AUDIENCE)
    with pytest.raises(AuthError, match="no key of issuer"):
        verifier.verify(forged)
    # and without a kid, the issuer's one key is tried: the signature does not verify
    forged = jwt.encode({**claims, "sub": "alice"}, mine, algorithm="RS256")
    with pytest.raises(AuthError, match="signature does not verify"):
        verifier.verify(forged)


@pytest.mark.parametrize("alg", ["HS256", "none"])
def test_an_algorithm_chosen_by_the_caller_is_refused(oidc: Provider, alg: str) -> None:
    import httpx

    claims = jwt.decode(
        sign_in(oidc.url, "bob", client_id=AUDIENCE)["id_token"],
        options={"verify_signature": False},
    )
    jwk = httpx.get(oidc.url + "/jwks").json()["keys"][0]
    header = _b64({"alg": alg, "typ": "JWT"})
    body = _b64({**claims, "sub": "alice"})
    if alg == "HS256":  # the issuer's public key as an HMAC secret (key confusion)
        import hashlib
        import hmac

        mac = hmac.new(
            json.dumps(jwk).encode(), f"{header}.{body}".encode(), hashlib.sha256
        ).digest()
        token = f"{header}.{body}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    else:
        token = f"{header}.{body}."
    with pytest.raises(AuthError, match="algorithm"):
        OidcVerifier(oidc.url, AUDIENCE).verify(token)


def test_an_opaque_access_token_is_refused(oidc: Provider) -> None:
    access = sign_in(oidc.url, "alice", client_id=AUDIENCE)["access_token"]
    with pytest.raises(AuthError, match="not a JWT"):
        OidcVerifier(oidc.url, AUDIENCE).verify(access)
