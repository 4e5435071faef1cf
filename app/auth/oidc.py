"""OpenID Connect tokens, verified against the issuer's discovery document and JWKS.

``OidcVerifier(issuer, audience)`` reads ``ISSUER/.well-known/openid-configuration`` once (its
``issuer`` must be the configured one, exactly), then checks each token: an RS256 signature
by a key of the issuer's JWKS (PyJWT's ``PyJWKClient``: the key set is cached and fetched
again when a token names a key id it does not hold, at most once per cooldown), the issuer,
the audience, the expiry and not-before (against an injectable clock, with a small leeway),
and a subject. The groups come from the claim named ``groups_claim`` (a dotted path such as
``realm_access.roles`` reaches into an object; a single string is one group).

Access tokens and ID tokens are accepted alike when they are JWTs for this audience: a CLI
signs in and presents what the provider gave it. An opaque token (not a JWT) is refused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import jwt

from app.auth.identity import AuthError, Identity

ALGORITHMS = ("RS256",)
DISCOVERY = "/.well-known/openid-configuration"


class OidcVerifier:
    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        groups_claim: str = "groups",
        leeway: float = 30.0,
        jwks_lifespan: float = 300.0,
        jwks_cooldown: float = 30.0,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not issuer or not audience:
            raise ValueError("an OIDC verifier needs an issuer and an audience")
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self.groups_claim = groups_claim
        self.leeway = leeway
        self.timeout = timeout
        self.clock = clock
        self._lifespan = jwks_lifespan
        self._cooldown = jwks_cooldown
        self._jwks: jwt.PyJWKClient | None = None
        self._lock = threading.Lock()

    # --- the issuer ---------------------------------------------------------------------------

    def discovery(self) -> dict[str, Any]:
        """The issuer's discovery document (fetched once; its issuer checked)."""
        import httpx

        url = self.issuer + DISCOVERY
        try:
            resp = httpx.get(url, timeout=self.timeout, follow_redirects=False)
            resp.raise_for_status()
            doc = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise AuthError(f"cannot read the OIDC discovery document {url}: {exc}") from None
        named = doc.get("issuer") if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or str(named or "").rstrip("/") != self.issuer:
            raise AuthError(f"{url} names issuer {named!r}, not {self.issuer!r}: refusing its keys")
        if not doc.get("jwks_uri"):
            raise AuthError(f"{url} has no jwks_uri")
        return doc

    def _client(self) -> jwt.PyJWKClient:
        with self._lock:
            if self._jwks is None:
                uri = str(self.discovery()["jwks_uri"])
                self._jwks = jwt.PyJWKClient(
                    uri,
                    cache_jwk_set=True,
                    lifespan=self._lifespan,
                    timeout=self.timeout,
                    cooldown_duration=self._cooldown,
                )
            return self._jwks

    # --- a token ------------------------------------------------------------------------------

    def verify(self, token: str) -> Identity:
        """The identity a token proves; AuthError saying why it proves nothing."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("the bearer token is not a JWT") from None
        if header.get("alg") not in ALGORITHMS:
            raise AuthError(
                f"token algorithm {header.get('alg')!r} is not accepted ({', '.join(ALGORITHMS)})"
            )
        key = self._key(header.get("kid"))
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=list(ALGORITHMS),
                audience=self.audience,
                issuer=self.issuer,
                # Time is checked below against the verifier's clock.
                options={
                    "require": ["exp", "iss", "aud", "sub"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidAudienceError:
            raise AuthError(
                f"the token is not for this server (audience {self.audience!r})"
            ) from None
        except jwt.InvalidIssuerError:
            raise AuthError(f"the token was not issued by {self.issuer}") from None
        except jwt.InvalidSignatureError:
            raise AuthError("the token's signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        now = self.clock()
        try:
            exp = float(claims["exp"])
            nbf = float(claims.get("nbf", 0) or 0)
        except (TypeError, ValueError):
            raise AuthError("the token's exp or nbf is not a number") from None
        if now >= exp + self.leeway:
            raise AuthError("the token has expired: sign in again (vmfarm login)")
        if nbf and now < nbf - self.leeway:
            raise AuthError("the token is not valid yet")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise AuthError("the token names no subject")
        return Identity(
            subject=subject,
            kind="oidc",
            groups=self.groups_of(claims),
            token_id=str(claims["jti"]) if claims.get("jti") else None,
            issuer=self.issuer,
            claims=claims,
        )

    def _key(self, kid: Any) -> jwt.PyJWK:
        """The issuer's key named by the token's ``kid`` (the key set is fetched again for a
        kid it does not hold); a token without a kid only when the issuer has one key."""
        client = self._client()
        try:
            if kid:
                return client.get_signing_key(str(kid))
            keys = client.get_signing_keys()
        except jwt.PyJWKClientError as exc:
            raise AuthError(f"no key of issuer {self.issuer} signed this token ({exc})") from None
        if len(keys) != 1:
            raise AuthError(
                f"the token names no key id and issuer {self.issuer} has {len(keys)} keys"
            )
        return keys[0]

    def groups_of(self, claims: dict[str, Any]) -> frozenset[str]:
        value: Any = claims
        for part in self.groups_claim.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str):
            return frozenset({value})
        if isinstance(value, list | tuple):
            return frozenset(str(v) for v in value if isinstance(v, str | int))
        return frozenset()


__all__ = ["ALGORITHMS", "OidcVerifier"]
