"""Who is calling the server: an ``Identity`` from a verified bearer token.

People sign in through an OpenID Connect provider; the server verifies their tokens against
the issuer's discovery document and JWKS (``oidc``). Machines use API tokens the server issued
and keeps only as hashes (``tokens``). What an identity may do comes from the server's RBAC
configuration and the token's groups or roles (``permissions``), never from anything the
caller sets: no header, environment variable or file names a user.

Errors::

    VmfarmError
    └── AuthError            the token is missing, malformed, expired, revoked, for another
                             audience or issuer, or its signature does not verify (HTTP 401)
"""

from __future__ import annotations

from app.auth.identity import AuthError, Identity

__all__ = ["AuthError", "Identity"]
