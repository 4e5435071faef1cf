"""Every map is a schema: the fields of the file format's free-form maps, per type.

An artifact's ``spec``, a ``hostFilter.spec`` and a reference phase's fields are maps whose keys
depend on a type written next to them (the artifact's type, the filter's type and the
infrastructure's provider, the stage they sit in). Each table below lists the keys the code that
carries them out reads (app/artifacts/sources.py, app/providers/*); a key that is not there
would be dropped in silence (``sha256sum:`` instead of ``sha256:``, and the intended checksum is
never verified), so it is an error naming the key, with the nearest known key as a suggestion.
A key vmfarm knows but does not carry out in that place is refused as "not supported", with
the vmfarm way to write it.

The checks return ``Problem`` records (a message and where it points, relative to the map);
the loader turns them into ``file:line:col`` errors.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.definitions import models as m
from app.errors import SpecError

Where = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """What is wrong and where: ``path`` below the checked map; ``key`` points at the key."""

    message: str
    path: Where
    key: bool = True


def unknown(name: str, allowed: Sequence[str], what: str) -> str:
    """``unknown field 'x' in <what>; did you mean 'y'? (allowed: ...)``."""
    close = difflib.get_close_matches(name, list(allowed), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    shown = f" (allowed: {', '.join(sorted(allowed))})" if allowed else ""
    return f"unknown field '{name}' in {what}{hint}{shown}"


# --- artifacts -----------------------------------------------------------------------------------

_CHECKSUM = ("sha256", "checksum")
# Credentials: secrets by reference (passwordRef, tokenRef: a secret id; password, token:
# <+secrets.getValue("id")>), resolved on the worker that fetches (app.artifacts.sources).
_AUTH = ("username", "password", "token", "passwordRef", "tokenRef")
_SECRET_VALUED = ("password", "token")
_URL = ("url", "artifactUrl")
_SERVER_URLS = (
    "url",
    "artifactUrl",
    "baseUrl",
    "serverUrl",
    "artifactoryServerUrl",
    "nexusServerUrl",
    "jenkinsUrl",
)
# A remote artifact with no checksum anywhere deploys only with allowUnverified: true.
_UNVERIFIED = ("allowUnverified",)
# The path inside an Artifactory or Nexus repository (sources._repo_path).
_REPO_PATH = (
    "groupId",
    "artifactId",
    "version",
    "extension",
    "classifier",
    "artifactDirectory",
    "group",
    "directory",
    "artifactPath",
    "fileName",
)
_REPOSITORY = ("repository", "repositoryName", "repositoryFormat", "connectorRef")

ARTIFACT_FIELDS: dict[str, tuple[str, ...]] = {
    "Local": ("path", "filePath", "tag", *_CHECKSUM),
    "Http": (*_URL, "connectorRef", "artifactPath", "tag", *_CHECKSUM, *_UNVERIFIED, *_AUTH),
    "Artifactory": (
        *_URL,
        "baseUrl",
        "serverUrl",
        "artifactoryServerUrl",
        *_REPOSITORY,
        *_REPO_PATH,
        "tag",
        *_CHECKSUM,
        *_UNVERIFIED,
        *_AUTH,
    ),
    # Harness writes a Nexus repository's maven or raw fields in a nested ``spec``.
    "Nexus3Registry": (
        *_URL,
        "baseUrl",
        "serverUrl",
        "nexusServerUrl",
        *_REPOSITORY,
        *_REPO_PATH,
        "spec",
        "tag",
        *_CHECKSUM,
        *_UNVERIFIED,
        *_AUTH,
    ),
    "Jenkins": (
        *_URL,
        "baseUrl",
        "serverUrl",
        "jenkinsUrl",
        "connectorRef",
        "jobName",
        "artifactPath",
        "build",
        "tag",
        *_CHECKSUM,
        *_UNVERIFIED,
        *_AUTH,
    ),
    "AmazonS3": (
        "bucket",
        "bucketName",
        "key",
        "filePath",
        "artifactPath",
        "region",
        "connectorRef",
        "tag",
        *_CHECKSUM,
        *_UNVERIFIED,
    ),
}
NEXUS_NESTED_FIELDS = _REPO_PATH
# Artifact types whose connectorRef names a server connector (app.definitions.connectors).
CONNECTOR_ARTIFACTS = ("Artifactory", "Nexus3Registry", "Http")
# repositoryFormat: the layouts app/artifacts/sources.py builds paths for.
REPOSITORY_FORMATS = {"Artifactory": ("generic", "maven"), "Nexus3Registry": ("raw", "maven")}


def artifact_problems(atype: str, spec: Mapping[str, Any]) -> list[Problem]:
    """Unknown or unsupported keys of an artifact's ``spec`` (paths below ``spec``)."""
    allowed = ARTIFACT_FIELDS.get(atype)
    if allowed is None:  # CustomArtifact is refused where it is fetched; a bad type by the model
        return []
    what = f"a {atype} artifact's spec"
    out = [Problem(unknown(k, allowed, what), (k,)) for k in spec if k not in allowed]
    nested = spec.get("spec")
    if isinstance(nested, Mapping):
        out += [
            Problem(unknown(k, NEXUS_NESTED_FIELDS, f"{what}.spec"), ("spec", k))
            for k in nested
            if k not in NEXUS_NESTED_FIELDS
        ]
    elif "spec" in spec and atype in ARTIFACT_FIELDS and "spec" in allowed:
        out.append(
            Problem("'spec' must be a mapping (groupId, artifactId, ...)", ("spec",), key=False)
        )
    fields = {**(nested if isinstance(nested, Mapping) else {}), **spec}
    fmt = spec.get("repositoryFormat")
    formats = REPOSITORY_FORMATS.get(atype, ("generic",))
    if fmt is not None and "<+" not in str(fmt):
        maven = bool(fields.get("groupId")) and bool(fields.get("artifactId"))
        if str(fmt) not in formats:
            out.append(
                Problem(
                    f"repositoryFormat {fmt!r} is not supported for {atype}: vmfarm fetches "
                    f"{' or '.join(formats)} repositories (write repositoryFormat: {formats[0]} with "
                    "artifactPath, or maven with groupId and artifactId), or give the file's "
                    "spec.url",
                    ("repositoryFormat",),
                    key=False,
                )
            )
        elif fmt == "maven" and not maven:
            out.append(
                Problem(
                    "repositoryFormat maven needs groupId and artifactId",
                    ("repositoryFormat",),
                    key=False,
                )
            )
        elif fmt != "maven" and maven:
            out.append(
                Problem(
                    f"repositoryFormat {fmt}, but groupId and artifactId make a maven path: write "
                    "repositoryFormat: maven, or remove them",
                    ("repositoryFormat",),
                    key=False,
                )
            )
    if spec.get("connectorRef") and atype in CONNECTOR_ARTIFACTS:
        out += [
            Problem(
                f"'{k}' next to connectorRef: the connector names the server; remove "
                f"{k}, or remove connectorRef",
                (k,),
            )
            for k in (
                *_URL,
                "baseUrl",
                "serverUrl",
                "artifactoryServerUrl",
                "nexusServerUrl",
                "jenkinsUrl",
            )
            if spec.get(k)
        ]
        out += [
            Problem(
                f"'{k}' next to connectorRef: the connector gives the credentials "
                "(auth, by secret reference); remove it",
                (k,),
            )
            for k in _AUTH
            if spec.get(k)
        ]
    if atype == "Http" and spec.get("artifactPath") and not spec.get("connectorRef"):
        out.append(
            Problem(
                "an Http artifact's artifactPath is read below its connector's URL "
                "(connectorRef); without a connector write the whole spec.url",
                ("artifactPath",),
            )
        )
    out += credential_problems(atype, spec)
    return out


def credential_problems(atype: str, spec: Mapping[str, Any]) -> list[Problem]:
    """Secrets written into the file (they would be stored with every plan, in SQL),
    credentials over plain http, and an allowUnverified that is not a boolean."""
    from urllib.parse import urlsplit

    from app.secrets import REF_RE

    out: list[Problem] = []
    if atype not in ARTIFACT_FIELDS or atype == "Local":
        return out
    for name in _SECRET_VALUED:
        value = spec.get(name)
        if value is not None and not REF_RE.fullmatch(str(value).strip()):
            out.append(
                Problem(
                    f"a {name} written in the file is refused: it would be stored with every plan "
                    f"(in SQL); name a secret instead: {name}Ref: <secret id>, or {name}: "
                    '<+secrets.getValue("<secret id>")> (resolved on the worker that fetches)',
                    (name,),
                    key=False,
                )
            )
    urls = [(k, str(spec[k])) for k in _SERVER_URLS if spec.get(k) is not None]
    for key, url in urls:
        try:
            parts = urlsplit(url)
            password = parts.password
        except ValueError:
            continue
        if password is not None:
            out.append(
                Problem(
                    f"a password in {key} is refused: it would be stored with every plan (in SQL); "
                    "write username: and passwordRef: <secret id> instead",
                    (key,),
                    key=False,
                )
            )
    named = any(spec.get(k) for k in _AUTH) or any(
        "@" in url.partition("://")[2].partition("/")[0] for _, url in urls
    )
    plain = [k for k, url in urls if url.lower().startswith("http://")]
    if named and plain:
        out.append(
            Problem(
                f"credentials are sent over https only, and {plain[0]} is plain http (anyone on "
                "the way could read them): use an https:// URL",
                (plain[0],),
                key=False,
            )
        )
    flag = spec.get("allowUnverified")
    if flag is not None and not isinstance(flag, bool):
        out.append(
            Problem(
                f"allowUnverified must be true or false, not {flag!r}",
                ("allowUnverified",),
                key=False,
            )
        )
    return out


# --- host filters --------------------------------------------------------------------------------

# hostFilter.spec keys each provider reads, per filter type (app/providers/aws.py, azure.py,
# gcp.py). A type missing for a provider does not apply to it.
_AZURE = ("resourceGroups", "tags")
_GCP = ("zones", "labels", "networkTags", "tags")
HOST_FILTER_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "aws": {"AwsInstanceFilter": ("regions", "tags", "vpcs"), "All": ("regions", "tags", "vpcs")},
    "azure": {
        "AzureVMSSFilter": (*_AZURE, "scaleSets"),
        "AzureVmFilter": _AZURE,
        "HostNames": (*_AZURE, "scaleSets", "hostNames"),
        "All": (*_AZURE, "scaleSets"),
    },
    "gcp": {
        "GcpInstanceFilter": _GCP,
        "GcpInstanceGroupFilter": (*_GCP, "instanceGroups", "instanceGroup"),
        "HostNames": (*_GCP, "hostNames", "names"),
        "All": _GCP,
    },
    "static": {"All": ()},
}
_PROVIDER_NAMES = {"aws": "an AWS", "azure": "an Azure", "gcp": "a GCP", "static": "a static (Pdc)"}


def host_filter_problems(provider: str, host_filter: Mapping[str, Any]) -> list[Problem]:
    """A filter type that does not apply to the provider, and unknown keys of its ``spec``
    (paths below ``hostFilter``)."""
    by_type = HOST_FILTER_FIELDS.get(provider)
    ftype = host_filter.get("type")
    if by_type is None or not isinstance(ftype, str):
        return []
    infra = f"{_PROVIDER_NAMES[provider]} infrastructure"
    if ftype not in by_type:
        if provider == "static":
            how = (
                "list only the hosts to deploy to under spec.hosts (a host filter on static "
                "hosts is not supported)"
            )
        else:
            how = f"use {' or '.join(by_type)}"
        return [
            Problem(
                f"hostFilter type {ftype} does not apply to {infra}: {how}", ("type",), key=False
            )
        ]
    spec = host_filter.get("spec")
    if not isinstance(spec, Mapping):
        return []
    allowed = by_type[ftype]
    return [
        Problem(unknown(k, allowed, f"a {ftype} hostFilter.spec of {infra}"), ("spec", k))
        for k in spec
        if k not in allowed
    ]


# --- connections ---------------------------------------------------------------------------------

# Fields only an SSH connection uses: a Local or Sandbox host runs its commands on the worker.
SSH_ONLY_FIELDS = (
    "user",
    "port",
    "privateKeyFile",
    "knownHostsFile",
    "hostKeyPolicy",
    "connectTimeout",
    "privateKeySecret",
    "passphraseSecret",
    "passwordSecret",
)


def connection_problems(
    connection: Mapping[str, Any] | None, hosts: Sequence[Any]
) -> list[Problem]:
    """SSH settings given to a Local or Sandbox connection, and ``sandboxRoot`` on hosts that
    are not sandbox hosts (paths below the infrastructure's inner ``spec``)."""
    out: list[Problem] = []
    ctype = str((connection or {}).get("type", "SSH"))
    if ctype in ("Local", "Sandbox"):
        out += [
            Problem(
                f"'{k}' is not supported by a {ctype} connection: its commands run on "
                "the worker, not over SSH; remove it",
                ("connection", k),
            )
            for k in SSH_ONLY_FIELDS
            if k in (connection or {})
        ]
    for i, h in enumerate(hosts):
        if not isinstance(h, Mapping):
            continue
        if ctype != "Sandbox" and "sandboxRoot" in h:
            out.append(
                Problem(
                    f"'sandboxRoot' is only read with connection type Sandbox (this "
                    f"one is {ctype}); remove it",
                    ("hosts", i, "sandboxRoot"),
                )
            )
        if ctype in ("Local", "Sandbox"):
            out += [
                Problem(
                    f"'{k}' is not supported on a {ctype} host: its commands run on the "
                    "worker, not over SSH; remove it",
                    ("hosts", i, k),
                )
                for k in ("user", "port", "privateKeyFile")
                if k in h
            ]
        if ctype == "Sandbox" and not h.get("sandboxRoot"):
            out.append(
                Problem(
                    "a Sandbox host needs 'sandboxRoot' (the folder that is its "
                    "/opt, /var/log and home)",
                    ("hosts", i),
                    key=False,
                )
            )
    return out


# --- the whole load ------------------------------------------------------------------------------


def _aws_regions(inner: m.InfraInner) -> list[str]:
    """The regions an infrastructure names (hostFilter.spec.regions, else spec.region)."""
    listed = inner.host_filter.spec.get("regions") if inner.host_filter else None
    if isinstance(listed, list) and listed:
        return [str(r) for r in listed]
    return [inner.region] if inner.region else []


def _at(data: Any, path: Where) -> Any:
    for p in path:
        found = (
            (p in data)
            if isinstance(data, Mapping)
            else (isinstance(data, list) and isinstance(p, int) and 0 <= p < len(data))
        )
        if not found:
            return None
        data = data[p]
    return data


def check_maps(bundle: Any, provider_of: Callable[[Any], str]) -> list[SpecError]:
    """Every problem of the free-form maps of a loaded bundle (app.definitions.loader.Bundle),
    as positioned errors; ``provider_of`` tells an infrastructure's provider."""
    from app.definitions.reference_schemas import (  # they import this module's Problem
        blue_green_problems,
        phase_problems,
        phase_step_problems,
    )

    out: list[SpecError] = []

    def report(owner: Any, base: Where, problems: list[Problem]) -> None:
        out.extend(
            owner.doc.error(p.message, (*owner.base, *base, *p.path), key=p.key) for p in problems
        )

    for svc in bundle.services.values():
        art = svc.model.spec.service_definition.spec.artifacts.primary
        if art is not None:
            report(
                svc,
                ("spec", "serviceDefinition", "spec", "artifacts", "primary", "spec"),
                artifact_problems(art.type, art.spec),
            )
    for infra in bundle.infrastructures.values():
        inner = _at(infra.raw, ("spec", "spec"))
        if not isinstance(inner, Mapping):
            continue
        hf = inner.get("hostFilter")
        if isinstance(hf, Mapping):
            report(
                infra,
                ("spec", "spec", "hostFilter"),
                host_filter_problems(provider_of(infra.model), hf),
            )
        conn = inner.get("connection")
        hosts = inner.get("hosts")
        report(
            infra,
            ("spec", "spec"),
            connection_problems(
                conn if isinstance(conn, Mapping) else None,
                hosts if isinstance(hosts, list) else [],
            ),
        )
    for pipe in bundle.pipelines.values():
        for si, el in enumerate(pipe.model.spec.stages):
            st = el.stage
            if not isinstance(st, m.StageSpec):
                continue
            for one in _variants(
                bundle, pipe, si, st
            ):  # a looped stage's targets may read its loop
                providers = {
                    ref.identifier: provider_of(bundle.infrastructures[ref.identifier].model)
                    for ref in one.spec.environment.infrastructure_definitions
                    if ref.identifier in bundle.infrastructures
                }
                bg_base: Where = ("spec", "stages", si, "stage", "spec", "blueGreenDeployment")
                block = _at(pipe.raw, bg_base)
                if isinstance(block, Mapping):
                    infras = [
                        bundle.infrastructures[ref.identifier].model.spec.spec
                        for ref in one.spec.environment.infrastructure_definitions
                        if providers.get(ref.identifier) == "aws"
                    ]
                    regions = [r for inner in infras for r in _aws_regions(inner)]
                    without_ids = {
                        ref.identifier: [
                            h.hostname
                            for h in bundle.infrastructures[ref.identifier].model.spec.spec.hosts
                            if not (
                                h.attributes.get("instanceId")
                                or h.host_attributes.get("instanceId")
                            )
                        ]
                        for ref in one.spec.environment.infrastructure_definitions
                        if providers.get(ref.identifier) == "static"
                    }
                    report(
                        pipe,
                        bg_base,
                        blue_green_problems(
                            block,
                            infrastructures=providers,
                            regions=regions,
                            without_ids=without_ids,
                        ),
                    )
                for form in ("rolloutDeployment", "canaryDeployment"):
                    base: Where = ("spec", "stages", si, "stage", "spec", form, "phases")
                    phases = _at(pipe.raw, base)
                    first: Any = None  # the stage's gate: one verification for all its phases
                    for pi, entry in enumerate(phases if isinstance(phases, list) else []):
                        phase = _at(entry, ("phase",))
                        if not isinstance(phase, Mapping):
                            continue
                        report(
                            pipe,
                            (*base, pi, "phase"),
                            phase_problems(
                                phase,
                                service=one.spec.service.service_ref,
                                deployment_type=one.spec.deployment_type,
                                infrastructures=providers,
                            ),
                        )
                        steps = phase.get("steps")
                        for k, step in enumerate(steps if isinstance(steps, list) else []):
                            if isinstance(step, Mapping):
                                report(
                                    pipe,
                                    (*base, pi, "phase", "steps", k),
                                    phase_step_problems(step),
                                )
                                props = step.get("properties")
                                if first is None:
                                    first = props
                                elif props != first:
                                    report(
                                        pipe,
                                        (*base, pi, "phase", "steps", k),
                                        [
                                            Problem(
                                                "this VERIFICATION step's properties differ from the "
                                                "first one's: vmfarm runs one verification after every "
                                                "gated phase of a stage; write the same properties",
                                                ("properties",),
                                                key=True,
                                            )
                                        ],
                                    )
    said: dict[str, SpecError] = {}  # an iteration's problem is its siblings' too: said once
    for e in out:
        said.setdefault(str(e), e)
    return list(said.values())


def _variants(bundle: Any, pipe: Any, index: int, stage: m.StageSpec) -> list[m.StageSpec]:
    """The stage, or one copy per iteration when its references read its loop (their
    infrastructures chosen; what is wrong with them is reported by check_references)."""
    from app.definitions.bundle import Collector
    from app.definitions.loop_refs import iteration_targets

    found = iteration_targets(pipe, index, Collector(), bundle=bundle)
    return [stage] if found is None else [copy for _, copy in found]
