"""The issuer rotates its keys: a token naming a key id the server has not seen makes it fetch
the key set again (once per cooldown, so unknown key ids cannot make it hammer the issuer);
known keys come from the cache. A small real HTTP issuer whose key set the test changes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from app.auth import AuthError
from app.auth.oidc import OidcVerifier


class Issuer:
    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}
        self.published: list[str] = []
        self.jwks_fetches = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks"}
                elif self.path == "/jwks":
                    issuer.jwks_fetches += 1
                    body = {
                        "keys": [
                            {
                                **json.loads(
                                    jwt.algorithms.RSAAlgorithm.to_jwk(issuer.keys[k].public_key())
                                ),
                                "kid": k,
                                "use": "sig",
                            }
                            for k in issuer.published
                        ]
                    }
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def new_key(self, kid: str, *, publish: bool = True) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if publish:
            self.published.append(kid)

    def token(self, kid: str, sub: str = "alice") -> str:
        now = int(time.time())
        return jwt.encode(
            {"iss": self.url, "aud": "vmfarm", "sub": sub, "iat": now, "exp": now + 300},
            self.keys[kid],
            algorithm="RS256",
            headers={"kid": kid},
        )


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    it = Issuer()
    yield it
    it.http.shutdown()


def test_a_rotated_key_is_fetched_when_a_token_names_it(issuer: Issuer) -> None:
    issuer.new_key("k1")
    verifier = OidcVerifier(issuer.url, "vmfarm", jwks_cooldown=0)
    assert verifier.verify(issuer.token("k1")).subject == "alice"
    assert issuer.jwks_fetches == 1
    # the issuer rotates: k2 is published and signs new tokens
    issuer.new_key("k2")
    assert verifier.verify(issuer.token("k2")).subject == "alice"
    assert issuer.jwks_fetches == 2
    # known keys come from the cache
    verifier.verify(issuer.token("k1"))
    verifier.verify(issuer.token("k2"))
    assert issuer.jwks_fetches == 2


def test_unknown_key_ids_refetch_at_most_once_per_cooldown(issuer: Issuer) -> None:
    issuer.new_key("k1")
    issuer.new_key("rogue", publish=False)  # an attacker's key, never published
    verifier = OidcVerifier(issuer.url, "vmfarm", jwks_cooldown=30)
    verifier.verify(issuer.token("k1"))
    for _ in range(5):
        with pytest.raises(AuthError, match="no key of issuer"):
            verifier.verify(issuer.token("rogue", sub="mallory"))
    assert issuer.jwks_fetches == 1  # within the cooldown: no fetch per forged token
