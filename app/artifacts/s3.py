"""AmazonS3 sources: one object, downloaded with boto3's ``download_file``.

Credentials are an Aws connector's keys when the artifact names one (resolved on the worker),
else boto3's usual chain on the worker (environment, profile, instance role); the
endpoint is ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` when set (path-style addressing
then, as S3-compatible stores and moto need). The object's sha256 is known before downloading
when S3 has one: a full-object ``ChecksumSHA256`` (uploaded with ``ChecksumAlgorithm=SHA256``),
user metadata ``sha256`` (``x-amz-meta-sha256``), or a sibling object ``<key>.sha256``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from pathlib import Path
from typing import Any

from app.artifacts.errors import (
    ArtifactAccessError,
    ArtifactAuthError,
    ArtifactError,
    ArtifactUnavailableError,
)
from app.artifacts.httpfetch import checksum_token

log = logging.getLogger("vmfarm.artifacts")

MAX_ATTEMPTS = 5
_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "UnrecognizedClientException",
    "AuthFailure",
    "InvalidClientTokenId",
}
_MISSING_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


class S3Source:
    """``s3://bucket/key`` in ``region``; ``what`` names it in errors."""

    def __init__(
        self,
        bucket: str,
        key: str,
        region: str | None,
        what: str,
        *,
        keys: tuple[str, str] | None = None,
    ) -> None:
        self.bucket = bucket
        self.keys = keys  # an Aws connector's (access key, secret key); None: the worker's
        self.key = key
        self.region = region
        self.what = what
        self._client_obj: Any = None
        self._version: str | None = None

    def _client(self) -> Any:
        if self._client_obj is None:
            import boto3
            from botocore.config import Config

            endpoint = endpoint_url()
            config = Config(
                retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
                connect_timeout=10,
                read_timeout=60,
                s3={"addressing_style": "path"} if endpoint else None,
            )
            try:
                session = boto3.session.Session(
                    **(
                        {"aws_access_key_id": self.keys[0], "aws_secret_access_key": self.keys[1]}
                        if self.keys
                        else {}
                    )
                )
                self._client_obj = session.client(
                    "s3", region_name=self.region, endpoint_url=endpoint, config=config
                )
            except Exception as exc:  # e.g. a profile that does not exist
                raise ArtifactAuthError(
                    f"artifact {self.what}: cannot set up AWS credentials: {type(exc).__name__}",
                    artifact=self.what,
                ) from None
        return self._client_obj

    def _error(self, exc: Exception, doing: str) -> ArtifactError:
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return ArtifactAuthError(
                f"artifact {self.what}: no AWS credentials on this worker "
                "(environment, profile or instance role)",
                artifact=self.what,
            )
        if isinstance(exc, EndpointConnectionError | ConnectionError):
            return ArtifactUnavailableError(
                f"artifact {self.what}: cannot reach S3 while {doing}: {type(exc).__name__}",
                artifact=self.what,
            )
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in _AUTH_CODES:
                return ArtifactAuthError(
                    f"artifact {self.what}: S3 refused the credentials ({code})", artifact=self.what
                )
            if code in _MISSING_CODES:
                what = "bucket" if code == "NoSuchBucket" else "object"
                return ArtifactError(
                    f"artifact {self.what}: the {what} does not exist ({code});"
                    " check spec.bucket, spec.key and the tag",
                    artifact=self.what,
                )
            if code in ("403", "AccessDenied", "Forbidden") or status == 403:
                return ArtifactAccessError(
                    f"artifact {self.what}: access denied ({code or 403});"
                    " the object may also not exist",
                    artifact=self.what,
                )
            if status >= 500:
                return ArtifactUnavailableError(
                    f"artifact {self.what}: S3 error {code} (HTTP {status}) while {doing}",
                    artifact=self.what,
                )
            return ArtifactError(
                f"artifact {self.what}: S3 error {code or status} while {doing}", artifact=self.what
            )
        return ArtifactError(
            f"artifact {self.what}: {doing} failed: {type(exc).__name__}", artifact=self.what
        )

    def checksum(self) -> tuple[str | None, str | None]:
        """(sha256, where it came from) as S3 knows it before the download, or (None, None)."""
        try:
            head = self._client().head_object(
                Bucket=self.bucket, Key=self.key, ChecksumMode="ENABLED"
            )
        except ArtifactError:
            raise
        except Exception as exc:
            raise self._error(exc, "reading the object's metadata") from None
        version = head.get("VersionId")
        self._version = str(version) if version and version != "null" else None
        b64 = head.get("ChecksumSHA256")
        if b64 and "-" not in str(b64) and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
            try:
                raw = base64.b64decode(str(b64), validate=True)
                if len(raw) == 32:
                    return raw.hex(), "S3 ChecksumSHA256"
            except (binascii.Error, ValueError):
                pass
        meta = {str(k).lower(): str(v) for k, v in (head.get("Metadata") or {}).items()}
        if meta.get("sha256") and (digest := checksum_token(meta["sha256"])):
            return digest, "S3 metadata sha256"
        try:
            body = self._client().get_object(
                Bucket=self.bucket, Key=self.key + ".sha256", Range="bytes=0-4095"
            )["Body"]
            with body:
                text = body.read().decode("utf-8", "replace")
        except Exception as exc:
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError):
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in _MISSING_CODES or code in ("403", "AccessDenied"):
                    return None, None
            raise self._error(exc, "reading <key>.sha256") from None
        digest = checksum_token(text)
        return (digest, "<key>.sha256") if digest else (None, None)

    def download(self, tmp: Path) -> None:
        extra = {"VersionId": self._version} if self._version else None
        try:
            self._client().download_file(self.bucket, self.key, str(tmp), ExtraArgs=extra)
        except ArtifactError:
            raise
        except Exception as exc:
            raise self._error(exc, "downloading") from None

    def objects(self, prefix: str, limit: int) -> list[tuple[str, str]]:
        """(key, last modified as ISO 8601) of up to ``limit`` objects whose key starts with
        ``prefix`` (an artifact trigger's poll); ArtifactError as for a download."""
        out: list[tuple[str, str]] = []
        try:
            pages = self._client().get_paginator("list_objects_v2")
            for page in pages.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents") or []:
                    modified = obj.get("LastModified")
                    out.append((str(obj["Key"]), modified.isoformat() if modified else ""))
                    if len(out) >= limit:
                        return out
        except ArtifactError:
            raise
        except Exception as exc:
            raise self._error(exc, "listing the bucket") from None
        return out
