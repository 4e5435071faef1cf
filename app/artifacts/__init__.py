"""Artifacts: where a version comes from, fetched once per execution, verified by sha256.

    from app.artifacts import fetch, verify_remote_command

    got = fetch(stage["artifact"], execution_id=key.execution, credentials=creds)
    conn.put(got.path, remote)
    conn.run(verify_remote_command(remote, got.sha256))

Sources, URL mapping, checksums and caching are described in ``app.artifacts.sources`` and
``app.artifacts.cache``; errors in ``app.artifacts.errors``.
"""

from app.artifacts.errors import (
    ArtifactAccessError,
    ArtifactAuthError,
    ArtifactError,
    ArtifactUnavailableError,
    ChecksumError,
)
from app.artifacts.pack import pack_folder
from app.artifacts.sources import (
    Credentials,
    Fetched,
    Resolved,
    artifact_url,
    check,
    default_cache_dir,
    extension,
    extension_of,
    fetch,
    forget_execution,
    resolve,
    verify_remote_command,
)

__all__ = [
    "ArtifactAccessError",
    "ArtifactAuthError",
    "ArtifactError",
    "ArtifactUnavailableError",
    "ChecksumError",
    "Credentials",
    "Fetched",
    "Resolved",
    "artifact_url",
    "check",
    "default_cache_dir",
    "extension",
    "extension_of",
    "fetch",
    "forget_execution",
    "pack_folder",
    "resolve",
    "verify_remote_command",
]
