"""Connectors (``kind: Connector``, or Harness's ``connector:``): where an artifact server or a
cloud account is, and the secrets that open it, named by reference only.

    kind: Connector                           connector:
    metadata: {name: art, identifier: art}      name: art
    spec:                                       identifier: art
      type: Artifactory                 <=>     type: Artifactory
      spec:                                     spec:
        artifactoryServerUrl: https://...         artifactoryServerUrl: https://...
        auth:                                     auth: {type: UsernamePassword,
          type: UsernamePassword                         spec: {username: ci,
          spec: {username: ci,                                  passwordRef: art_pw}}
                 passwordRef: art_pw}

Types and what reads them:

    Artifactory, Nexus,      an artifact's ``connectorRef`` (Artifactory, Nexus3Registry, Http):
    Http, HttpHelmRepo       the server URL and the credentials' secret ids go into the plan's
                             artifact; app.artifacts.sources resolves the secrets on the worker
                             that fetches
    Aws, Azure, Gcp          an infrastructure's ``connectorRef`` / ``cloudProviderRef``:
                             ``InheritFromDelegate`` = the discovering worker's own credentials;
                             ``ManualConfig`` = secret ids resolved by app.providers on the
                             region worker that discovers
    Git                      checked here; nothing reads it yet (no field takes a Git connector)

A secret written in the file (``password:``, ``secretKey:`` ...) is refused: only ``...Ref``
fields, holding a secret id (``[account.|org.]name``, app.secrets), are read. Every model
forbids unknown fields.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from app.definitions.base import Model
from app.definitions.models.service import Metadata

# A secret id as app.secrets reads it: [account.|org.|project.][env:|file:|aws:|vault:]NAME[#KEY]
# (checked here by shape; the definitions never import the secrets backends).
_SECRET_ID_RE = re.compile(r"^(?:(?:account|org|project)\.)?(?:[a-z]+:)?[^\s#<>]+(?:#[^\s#<>]+)?$")


def _secret_id(v: str) -> str:
    if "<+" in v:
        raise ValueError(
            f"{v!r}: a ...Ref field names a secret by its id (e.g. "
            "account.artifactory_password), not an expression"
        )
    if not _SECRET_ID_RE.match(v.strip()):
        raise ValueError(
            f"{v!r} is not a secret id ([account.|org.]name, e.g. account.artifactory_password)"
        )
    return v.strip()


def _refuse_plaintext(v: Any, info: ValidationInfo) -> Any:
    if v is not None:
        name = info.field_name or "secret"
        ref = {
            "secret_key": "secretKeyRef",
            "client_secret": "secretRef",
            "private_key": "sshKeyRef",
        }.get(name, f"{_camel(name)}Ref")
        raise ValueError(
            f"a secret written in the file is refused: it would be stored with "
            f"the files and every plan; name a secret instead: {ref}: <secret id> "
            "(resolved on the worker that uses it)"
        )
    return v


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


# A secret id (app.secrets.parse_id), never a value.
SecretId = Annotated[str, AfterValidator(_secret_id)]
# A field that would hold a secret's value: refused, with the ...Ref field to write instead.
# (``refused``: not listed among a model's allowed fields in unknown-field messages)
Plaintext = Annotated[
    Any, AfterValidator(_refuse_plaintext), Field(json_schema_extra={"refused": True})
]


def _server_url(v: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(v.strip())
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{v!r} is not an http(s) URL")
    if parts.username or parts.password:
        raise ValueError(
            "a user or password in the URL is refused: write auth: {type: "
            "UsernamePassword, spec: {username: ..., passwordRef: <secret id>}}"
        )
    return v.strip()


ServerUrl = Annotated[str, AfterValidator(_server_url)]


def _on_delegate(v: bool) -> bool:
    if v is not True:
        raise ValueError(
            "executeOnDelegate: false is not supported: vmfarm always reaches a "
            "connector from a worker (the one that fetches or discovers)"
        )
    return v


OnDelegate = Annotated[bool, AfterValidator(_on_delegate)]


def _no_selectors(v: list[str]) -> list[str]:
    if v:
        raise ValueError(
            "delegateSelectors on a connector are not supported: the worker that "
            "fetches (the host's) or discovers (the region's) uses it; put "
            "delegateSelectors on the infrastructure or the stage"
        )
    return v


NoSelectors = Annotated[list[str], AfterValidator(_no_selectors)]


# --- artifact servers ----------------------------------------------------------------------------


class UsernamePassword(Model):
    username: str | None = None
    username_ref: SecretId | None = None
    password_ref: SecretId
    password: Plaintext = None

    @model_validator(mode="after")
    def _one_username(self) -> UsernamePassword:
        if (self.username is None) == (self.username_ref is None):
            raise ValueError("give one of username or usernameRef")
        return self


class ServerAuth(Model):
    """``auth: {type: UsernamePassword, spec: {...}}`` or ``{type: Anonymous}``."""

    type: Literal["UsernamePassword", "Anonymous"]
    spec: UsernamePassword | None = None

    @model_validator(mode="after")
    def _spec_matches(self) -> ServerAuth:
        if self.type == "UsernamePassword" and self.spec is None:
            raise ValueError("auth type UsernamePassword needs spec: {username, passwordRef}")
        if self.type == "Anonymous" and self.spec is not None:
            raise ValueError("auth type Anonymous takes no spec")
        return self


class _ServerSpec(Model):
    auth: ServerAuth = Field(default_factory=lambda: ServerAuth(type="Anonymous"))
    delegate_selectors: NoSelectors = Field(default_factory=list)
    execute_on_delegate: OnDelegate = True

    def url(self) -> str:  # pragma: no cover - each type overrides it
        raise NotImplementedError

    @model_validator(mode="after")
    def _https_for_credentials(self) -> _ServerSpec:
        if self.auth.type != "Anonymous" and self.url().lower().startswith("http://"):
            raise ValueError(
                "credentials are sent over https only, and this server URL is "
                "plain http (anyone on the way could read them): use an https:// "
                "URL"
            )
        return self


class ArtifactorySpec(_ServerSpec):
    artifactory_server_url: ServerUrl

    def url(self) -> str:
        return self.artifactory_server_url


class NexusSpec(_ServerSpec):
    nexus_server_url: ServerUrl
    version: Literal["3.x"] = "3.x"

    def url(self) -> str:
        return self.nexus_server_url


class HttpSpec(_ServerSpec):
    url_: ServerUrl = Field(alias="url")

    def url(self) -> str:
        return self.url_


class HelmRepoSpec(_ServerSpec):
    helm_repo_url: ServerUrl

    def url(self) -> str:
        return self.helm_repo_url


class ArtifactoryConnector(Model):
    type: Literal["Artifactory"]
    spec: ArtifactorySpec


class NexusConnector(Model):
    type: Literal["Nexus"]
    spec: NexusSpec


class HttpConnector(Model):
    type: Literal["Http"]
    spec: HttpSpec


class HelmRepoConnector(Model):
    type: Literal["HttpHelmRepo"]
    spec: HelmRepoSpec


# --- cloud accounts ------------------------------------------------------------------------------


class AwsManual(Model):
    access_key: str | None = None
    access_key_ref: SecretId | None = None
    secret_key_ref: SecretId
    secret_key: Plaintext = None

    @model_validator(mode="after")
    def _one_access_key(self) -> AwsManual:
        if (self.access_key is None) == (self.access_key_ref is None):
            raise ValueError("give one of accessKey or accessKeyRef")
        return self


class AwsCredential(Model):
    type: Literal["ManualConfig", "InheritFromDelegate"]
    spec: AwsManual | None = None
    cross_account_access: None = None

    @field_validator("cross_account_access", mode="before")
    @classmethod
    def _no_cross_account(cls, v: Any) -> None:
        if v is not None:
            raise ValueError(
                "crossAccountAccess (assuming a role) is not supported yet: give "
                "the role's credentials with ManualConfig, or let the worker "
                "assume it (InheritFromDelegate, AWS_PROFILE with role_arn)"
            )
        return None

    @model_validator(mode="after")
    def _spec_matches(self) -> AwsCredential:
        if self.type == "ManualConfig" and self.spec is None:
            raise ValueError(
                "credential type ManualConfig needs spec: {accessKey (or "
                "accessKeyRef), secretKeyRef}"
            )
        if self.type == "InheritFromDelegate" and self.spec is not None:
            raise ValueError(
                "credential type InheritFromDelegate takes no spec: the worker's "
                "own AWS credentials are used"
            )
        return self


class AwsSpec(Model):
    credential: AwsCredential
    delegate_selectors: NoSelectors = Field(default_factory=list)
    execute_on_delegate: OnDelegate = True


class AwsConnector(Model):
    type: Literal["Aws"]
    spec: AwsSpec


class AzureSecretAuth(Model):
    secret_ref: SecretId


class AzureAuth(Model):
    type: Literal["Secret"]
    spec: AzureSecretAuth


class AzureManual(Model):
    application_id: str
    tenant_id: str
    auth: AzureAuth
    client_secret: Plaintext = None


class AzureCredential(Model):
    type: Literal["ManualConfig", "InheritFromDelegate"]
    spec: AzureManual | None = None

    @model_validator(mode="after")
    def _spec_matches(self) -> AzureCredential:
        if self.type == "ManualConfig" and self.spec is None:
            raise ValueError(
                "credential type ManualConfig needs spec: {applicationId, tenantId, "
                "auth: {type: Secret, spec: {secretRef}}}"
            )
        if self.type == "InheritFromDelegate" and self.spec is not None:
            raise ValueError(
                "credential type InheritFromDelegate takes no spec: the worker's "
                "own Azure credentials (AZURE_TENANT_ID, AZURE_CLIENT_ID, "
                "AZURE_CLIENT_SECRET) are used"
            )
        return self


class AzureSpec(Model):
    credential: AzureCredential
    azure_environment_type: Literal["AZURE"] = "AZURE"
    delegate_selectors: NoSelectors = Field(default_factory=list)
    execute_on_delegate: OnDelegate = True


class AzureConnector(Model):
    type: Literal["Azure"]
    spec: AzureSpec


class GcpManual(Model):
    secret_key_ref: SecretId  # the service account's JSON key
    secret_key: Plaintext = None


class GcpCredential(Model):
    type: Literal["ManualConfig", "InheritFromDelegate"]
    spec: GcpManual | None = None

    @model_validator(mode="after")
    def _spec_matches(self) -> GcpCredential:
        if self.type == "ManualConfig" and self.spec is None:
            raise ValueError(
                "credential type ManualConfig needs spec: {secretKeyRef} (a "
                "secret holding the service account's JSON key)"
            )
        if self.type == "InheritFromDelegate" and self.spec is not None:
            raise ValueError(
                "credential type InheritFromDelegate takes no spec: the worker's "
                "Application Default Credentials are used"
            )
        return self


class GcpSpec(Model):
    credential: GcpCredential
    delegate_selectors: NoSelectors = Field(default_factory=list)
    execute_on_delegate: OnDelegate = True


class GcpConnector(Model):
    type: Literal["Gcp"]
    spec: GcpSpec


# --- Git -----------------------------------------------------------------------------------------


class GitAuth(Model):
    """``type: Http``: username (or usernameRef) and passwordRef (a token); ``type: Ssh``:
    sshKeyRef."""

    username: str | None = None
    username_ref: SecretId | None = None
    password_ref: SecretId | None = None
    ssh_key_ref: SecretId | None = None
    password: Plaintext = None
    private_key: Plaintext = None


class GitSpec(Model):
    url: str
    connection_type: Literal["Repo", "Account"] = "Repo"
    validation_repo: str | None = None
    branch_name: str | None = None
    type: Literal["Http", "Ssh"]
    spec: GitAuth
    delegate_selectors: NoSelectors = Field(default_factory=list)
    execute_on_delegate: OnDelegate = True

    @model_validator(mode="after")
    def _auth_matches(self) -> GitSpec:
        a = self.spec
        if self.type == "Http":
            if a.ssh_key_ref is not None:
                raise ValueError(
                    "sshKeyRef goes with type: Ssh; type Http takes username and passwordRef"
                )
            if a.password_ref is not None and (a.username is None) == (a.username_ref is None):
                raise ValueError("give one of username or usernameRef with passwordRef")
            if a.password_ref is not None and self.url.lower().startswith("http://"):
                raise ValueError(
                    "credentials are sent over https only, and this url is plain "
                    "http: use an https:// URL"
                )
            local = self.url.lower().startswith("file://")
            if local and (a.password_ref is not None or a.username_ref is not None):
                raise ValueError("a file:// repository takes no credentials")
            if not local and not self.url.lower().startswith(("https://", "http://")):
                raise ValueError(
                    f"type Http needs an http(s) url (or file:// for a repository on the "
                    f"delegate's disk), got {self.url!r}"
                )
        else:
            if a.ssh_key_ref is None:
                raise ValueError("type Ssh needs spec.sshKeyRef (a secret holding the key)")
            if a.password_ref is not None or a.username_ref is not None:
                raise ValueError("type Ssh takes sshKeyRef (and username), not passwordRef")
        if self.connection_type == "Account" and not self.validation_repo:
            raise ValueError(
                "connectionType Account needs validationRepo (a repository "
                "name under the account's url)"
            )
        if self.connection_type == "Repo" and self.validation_repo:
            raise ValueError(
                "validationRepo goes with connectionType Account; a Repo "
                "connector's url is the repository"
            )
        return self


class GitConnector(Model):
    type: Literal["Git"]
    spec: GitSpec


AnyConnector = Annotated[
    ArtifactoryConnector
    | NexusConnector
    | HttpConnector
    | HelmRepoConnector
    | AwsConnector
    | AzureConnector
    | GcpConnector
    | GitConnector,
    Field(discriminator="type"),
]

# Which connector types each user of ``connectorRef`` takes.
ARTIFACT_CONNECTORS = {
    "Artifactory": ("Artifactory",),
    "Nexus3Registry": ("Nexus",),
    "Http": ("Http", "HttpHelmRepo"),
    "AmazonS3": ("Aws",),
}
CLOUD_CONNECTORS = {"aws": "Aws", "azure": "Azure", "gcp": "Gcp"}


class ConnectorSpec(Model):
    api_version: Literal["v1"] = "v1"
    kind: Literal["Connector"]
    metadata: Metadata
    spec: AnyConnector


def connector_id(ref: str) -> str:
    """A connectorRef without Harness's scope prefix (``account.art`` -> ``art``)."""
    ref = ref.strip()
    for scope in ("account.", "org.", "project."):
        if ref.startswith(scope):
            return ref[len(scope) :]
    return ref
