"""Services and their artifacts (``kind: Service``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator

from app.definitions.base import (
    Identifier,
    Model,
    Scalar,
    VariableName,
    identifier_of,
    ssh_only,
)


class Metadata(Model):
    name: str
    identifier: Identifier | None = None
    description: str | None = None
    tags: dict[str, Scalar] = Field(default_factory=dict)
    org_identifier: str | None = None
    project_identifier: str | None = None

    @property
    def ident(self) -> str:
        return self.identifier or identifier_of(self.name)


class Variable(Model):
    """``- name: app_port / type: String / value: "8080"``."""

    name: VariableName
    type: Literal["String", "Number", "Secret"] = "String"
    value: Scalar | None = None
    description: str | None = None
    required: bool = False
    default: Scalar | None = None


class ArtifactSource(Model):
    """``primary: {type: Local, spec: {path: ./app, tag: <+input>}}``.

    ``Local`` (a file or folder next to the pipeline file, packed reproducibly by the worker),
    ``Http``/``Artifactory``/``Nexus3Registry``/``Jenkins`` (a URL template, see
    app.artifacts.sources) and ``AmazonS3`` (bucket and key); a checksum (``spec.sha256``, or
    the repository's) is verified where the file lands; a remote artifact with none anywhere is
    refused unless ``spec.allowUnverified: true``. Credentials are secrets named by
    ``passwordRef``/``tokenRef`` (or ``<+secrets.getValue("id")>``), resolved on the worker that
    fetches, sent over https only. ``CustomArtifact`` is refused.
    """

    type: Literal[
        "Local", "Artifactory", "Nexus3Registry", "AmazonS3", "Jenkins", "CustomArtifact", "Http"
    ]
    spec: dict[str, Any] = Field(default_factory=dict)
    identifier: str | None = None


class Artifacts(Model):
    primary: ArtifactSource | None = None
    sidecars: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("sidecars")
    @classmethod
    def _no_sidecars(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if v:
            raise ValueError(
                "sidecar artifacts are not supported: vmfarm deploys the primary "
                "artifact; fetch others with a Script unit, or make them a service "
                "of their own"
            )
        return v


class ServiceInner(Model):
    artifacts: Artifacts = Field(default_factory=Artifacts)
    variables: list[Variable] = Field(default_factory=list)
    config_files: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("config_files")
    @classmethod
    def _no_config_files(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if v:
            raise ValueError(
                "configFiles are not supported yet: write each file with a Script "
                "unit (a here-document), or ship it in the artifact"
            )
        return v


class ServiceDefinition(Model):
    type: Annotated[Literal["SSH", "Ssh", "WinRm"], AfterValidator(ssh_only)]
    spec: ServiceInner = Field(default_factory=ServiceInner)


class ServiceBody(Model):
    service_definition: ServiceDefinition


class ServiceSpec(Model):
    api_version: Literal["v1"] = "v1"
    kind: Literal["Service"]
    metadata: Metadata
    spec: ServiceBody
