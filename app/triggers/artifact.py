"""Artifact triggers: a pipeline starts when a new build appears in a repository.

Harness's ``source: {type: Artifact, spec: {type: ..., spec: {...}}}``, for three sources::

    source:
      type: Artifact
      spec:
        type: AmazonS3                  # every object of the bucket whose key matches
        spec:                           # filePathRegex (RE2, searched from the key's start)
          connectorRef: aws_prod        # an Aws connector (optional: the server's own
          region: eu-west-1             # credentials and AWS_ENDPOINT_URL otherwise)
          bucketName: releases
          filePathRegex: web/web-.*\\.tar\\.gz
    # build: the object's key (web/web-1.4.2.tar.gz)

        type: ArtifactoryRegistry       # the files of a generic repository's folder
        spec:
          connectorRef: artifactory     # an Artifactory connector (its URL and credentials)
          repository: releases
          repositoryFormat: generic
          artifactDirectory: web
    # build: the file's name in the folder (web-1.4.2.tar.gz)

        type: Nexus3Registry            # a maven artifact's versions, or a raw group's files
        spec:
          connectorRef: nexus           # a Nexus connector
          repository: maven-releases
          repositoryFormat: maven       # or raw, with group: /web
          groupId: com.acme
          artifactId: web
          extension: tar.gz             # optional, as is classifier
    # build: the version (1.4.2); raw: the file's path below the group (web-1.4.2.tar.gz)

Every spec may hold ``eventConditions`` on the build (``key: build``, the webhook operators:
Equals, Regex, StartsWith...): a build they do not all hold for starts nothing. The build
reaches the pipeline through ``inputYaml`` as ``<+trigger.artifact.build>`` (Harness's
expression), with the same checks as a runtime input.

Refused by name at load (never ignored): other artifact types (DockerRegistry, Ecr, Gcr,
Jenkins...), Artifactory and Nexus formats other than generic and maven/raw, fields for image
registries (``repositoryUrl``, ``repositoryPort``, ``imagePath``), ``artifactFilter`` (write an
eventCondition on the build), ``metaDataConditions`` and ``jexlCondition``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Discriminator, Field, Tag, field_validator, model_validator

from app.definitions.base import Model

ARTIFACT_TYPES = ("AmazonS3", "ArtifactoryRegistry", "Nexus3Registry")
# What each artifact type's connectorRef must name (app.definitions.models.connector types).
CONNECTOR_TYPES = {
    "AmazonS3": "Aws",
    "ArtifactoryRegistry": "Artifactory",
    "Nexus3Registry": "Nexus",
}
BUILD_EXPRESSION = "<+trigger.artifact.build>"


def refused(what: str, why: str) -> Any:
    """A field vmfarm does not carry out: refused at load, naming it and what to write instead,
    unless it is left empty."""

    def check(v: Any) -> Any:
        if v not in (None, [], {}, ""):
            raise ValueError(f"{what} is not supported: {why}")
        return v

    return AfterValidator(check)


def _check_regex(v: str) -> str:
    from app.definitions.expressions import compile_input_regex

    try:
        compile_input_regex(v)
    except Exception as exc:
        raise ValueError(f"not a regular expression vmfarm reads (RE2): {exc}") from None
    return v


# A condition's operators, for a build here and for a payload or header in a webhook trigger.
Operator = Literal[
    "Equals",
    "NotEquals",
    "In",
    "NotIn",
    "StartsWith",
    "EndsWith",
    "Contains",
    "DoesNotContain",
    "Regex",
]


class EventCondition(Model):
    """A condition on the build: ``{key: build, operator: Regex, value: ^1\\.}``."""

    key: Literal["build"] = Field(
        description="the build (version, file name or key): the only value a poll has"
    )
    operator: Operator
    value: str

    @field_validator("key", mode="before")
    @classmethod
    def _key(cls, v: Any) -> Any:
        if v in ("<+trigger.artifact.build>", "<+trigger.artifact.tag>"):
            return "build"
        if v != "build":
            raise ValueError(
                f"an artifact trigger's condition reads the build only: write key: build "
                f"(got {v!r})"
            )
        return v

    @field_validator("value", mode="before")
    @classmethod
    def _text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _regex(self) -> EventCondition:
        if self.operator == "Regex":
            _check_regex(self.value)
        return self


class _Common(Model):
    connector_ref: str | None = None
    event_conditions: list[EventCondition] = Field(default_factory=list)
    meta_data_conditions: Annotated[
        list[Any],
        refused(
            "metaDataConditions",
            "a poll sees builds, not their metadata: write eventConditions on the build",
        ),
    ] = Field(default_factory=list)
    jexl_condition: Annotated[
        str | None,
        refused("jexlCondition", "write the conditions as eventConditions (all must hold)"),
    ] = None


class S3Spec(_Common):
    region: str | None = None
    bucket_name: str = Field(min_length=1)
    file_path_regex: Annotated[str, AfterValidator(_check_regex)] = Field(min_length=1)

    @field_validator("bucket_name", "file_path_regex", "region")
    @classmethod
    def _fixed(cls, v: str | None) -> str | None:
        if v is not None and "<+" in v:
            raise ValueError("an artifact trigger polls fixed values: write it without <+...>")
        return v


_NO_IMAGE = "vmfarm deploys files to VMs, not images"


class ArtifactorySpec(_Common):
    connector_ref: str = Field(min_length=1)
    repository: str = Field(min_length=1)
    repository_format: Literal["generic"] = "generic"
    artifact_directory: str = "/"
    artifact_path: str | None = None
    repository_url: Annotated[str | None, refused("repositoryUrl", _NO_IMAGE)] = None
    artifact_filter: Annotated[
        str | None,
        refused(
            "artifactFilter",
            "write an eventCondition on the build (key: build, operator: Regex)",
        ),
    ] = None

    @field_validator("repository_format", mode="before")
    @classmethod
    def _format(cls, v: Any) -> Any:
        if v in ("docker", "maven", "npm", "nuget", "helm"):
            raise ValueError(
                f"an Artifactory {v} repository is not polled: vmfarm polls generic "
                "repositories (repositoryFormat: generic)"
            )
        return v

    @field_validator("artifact_path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None and v.strip() not in ("", BUILD_EXPRESSION):
            raise ValueError(
                "the poll lists every file of artifactDirectory: leave artifactPath out (or "
                f"write {BUILD_EXPRESSION}) and choose files with an eventCondition on the build"
            )
        return v


class NexusSpec(_Common):
    connector_ref: str = Field(min_length=1)
    repository: str = Field(min_length=1)
    repository_format: Literal["maven", "raw"]
    group_id: str | None = None
    artifact_id: str | None = None
    classifier: str | None = None
    extension: str | None = None
    group: str | None = None
    tag: str | None = None
    repository_url: Annotated[str | None, refused("repositoryUrl", _NO_IMAGE)] = None
    repository_port: Annotated[str | None, refused("repositoryPort", _NO_IMAGE)] = None
    image_path: Annotated[str | None, refused("imagePath", _NO_IMAGE)] = None
    artifact_path: Annotated[str | None, refused("artifactPath", _NO_IMAGE)] = None
    package_name: Annotated[
        str | None, refused("packageName", "npm and NuGet repositories are not polled")
    ] = None

    @field_validator("repository_format", mode="before")
    @classmethod
    def _format(cls, v: Any) -> Any:
        if v in ("docker", "npm", "nuget"):
            raise ValueError(
                f"a Nexus {v} repository is not polled: vmfarm polls maven and raw "
                "repositories (repositoryFormat: maven or raw)"
            )
        return v

    @field_validator("tag")
    @classmethod
    def _tag(cls, v: str | None) -> str | None:
        if v is not None and v.strip() not in ("", BUILD_EXPRESSION):
            raise ValueError(
                f"the poll finds every version: leave tag out (or write {BUILD_EXPRESSION}) "
                "and choose versions with an eventCondition on the build"
            )
        return v

    @model_validator(mode="after")
    def _fields_of_format(self) -> NexusSpec:
        if self.repository_format == "maven":
            if not self.group_id or not self.artifact_id:
                raise ValueError("a maven repository's trigger needs groupId and artifactId")
            if self.group:
                raise ValueError("group is for raw repositories; maven takes groupId")
        else:
            if not self.group:
                raise ValueError("a raw repository's trigger needs group (e.g. /web)")
            if self.group_id or self.artifact_id or self.classifier or self.extension:
                raise ValueError(
                    "groupId, artifactId, classifier and extension are for maven "
                    "repositories; raw takes group"
                )
        return self


class S3Artifact(Model):
    type: Literal["AmazonS3"]
    spec: S3Spec


class ArtifactoryArtifact(Model):
    type: Literal["ArtifactoryRegistry"]
    spec: ArtifactorySpec


class NexusArtifact(Model):
    type: Literal["Nexus3Registry"]
    spec: NexusSpec


class OtherArtifact(Model):
    """An artifact type vmfarm does not poll: refused with the reason."""

    type: str
    spec: Any = None

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        if v in (
            "DockerRegistry",
            "Ecr",
            "Gcr",
            "Acr",
            "GoogleArtifactRegistry",
            "GithubPackageRegistry",
        ):
            why = f"{_NO_IMAGE}"
        elif v in ("Artifactory", "Nexus", "Nexus3"):
            why = f"write type: {'ArtifactoryRegistry' if v == 'Artifactory' else 'Nexus3Registry'}"
        else:
            why = "vmfarm polls " + ", ".join(ARTIFACT_TYPES)
        raise ValueError(f"a {v} artifact trigger is not supported: {why}")


def _artifact_tag(v: Any) -> str:
    t = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return t if t in ARTIFACT_TYPES else "other"


ArtifactSpec = Annotated[
    Annotated[S3Artifact, Tag("AmazonS3")]
    | Annotated[ArtifactoryArtifact, Tag("ArtifactoryRegistry")]
    | Annotated[NexusArtifact, Tag("Nexus3Registry")]
    | Annotated[OtherArtifact, Tag("other")],
    Discriminator(_artifact_tag),
]


class ArtifactSource(Model):
    type: Literal["Artifact"]
    spec: ArtifactSpec


__all__ = [
    "ARTIFACT_TYPES",
    "BUILD_EXPRESSION",
    "CONNECTOR_TYPES",
    "ArtifactSource",
    "ArtifactorySpec",
    "EventCondition",
    "NexusSpec",
    "S3Spec",
]
