"""Secrets: ``<+secrets.getValue("id")>`` references, backends that resolve them, masking.

Pipelines name secrets the Harness way::

    environmentVariables:
      - name: DB_PASSWORD
        value: <+secrets.getValue("db_password")>          # enabled backends, in order
      - name: API_KEY
        value: <+secrets.getValue('aws:prod/api#key')>     # one backend, one JSON field
      - name: TOKEN
        value: <+secrets.getValue("account.ci_token")>     # Harness scope: stripped

Ids are ``[account.|org.|project.][env:|file:|aws:|vault:]NAME[#KEY]`` (``app.secrets.refs``).
Scopes are stripped for the lookup (vmfarm has one store) but the id as written is the key of
results and what messages show. Backends (``app.secrets.backends``) are ``env``
(``VMFARM_SECRET_<NAME>``), ``file`` (Fernet-encrypted ``$VMFARM_HOME/secrets.enc``, edited
with ``vmfarm secrets``), ``aws`` (Secrets Manager) and ``vault`` (KV v2). ``VMFARM_SECRETS``
lists the enabled ones in lookup order (default ``env,file``); a prefixed id asks that backend
only, and only when it is enabled (``app.secrets.store`` lists every setting).

The API::

    find_refs(text) -> list[str]                      ids referenced, first-seen order
    substitute(text, resolver=resolve, *, bind=None) -> (text, {id: value})
    resolve(ids) -> {id: value}                       cached per process (VMFARM_SECRETS_TTL);
                                                      every value registered for masking
    register(values); global_masker(); mask(text); mask_obj(obj)
    Masker, MaskingFilter (logging), StreamMasker (chunked output)
    SecretError > SecretNotFoundError, SecretAccessError, SecretConfigError

Rendering order: render ordinary ``<+...>`` expressions first, secrets last (one pass, values
never re-scanned); in shell scripts pass ``bind=Binder()`` so values travel in the environment.
"""

from __future__ import annotations

from app.secrets.errors import (
    SecretAccessError,
    SecretConfigError,
    SecretError,
    SecretNotFoundError,
)
from app.secrets.masking import (
    Masker,
    MaskingFilter,
    StreamMasker,
    global_masker,
    mask,
    mask_obj,
    register,
)
from app.secrets.refs import (
    REF_RE,
    SecretRef,
    find_refs,
    find_refs_in,
    has_refs,
    parse_id,
    substitute,
)
from app.secrets.store import (
    SecretsSettings,
    SecretStore,
    default_store,
    get_secret,
    reset,
    resolve,
    resolve_in,
)

__all__ = [
    "REF_RE",
    "Masker",
    "MaskingFilter",
    "SecretAccessError",
    "SecretConfigError",
    "SecretError",
    "SecretNotFoundError",
    "SecretRef",
    "SecretStore",
    "SecretsSettings",
    "StreamMasker",
    "default_store",
    "find_refs",
    "find_refs_in",
    "get_secret",
    "global_masker",
    "has_refs",
    "mask",
    "mask_obj",
    "parse_id",
    "register",
    "reset",
    "resolve",
    "resolve_in",
    "substitute",
]
