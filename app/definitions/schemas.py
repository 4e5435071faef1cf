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
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

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


# --- the reference's phases ----------------------------------------------------------------------

# computeProviderType (Harness FirstGen) -> the provider vmfarm finds for the infrastructure.
COMPUTE_PROVIDERS = {
    "AWS": "aws",
    "AZURE": "azure",
    "GCP": "gcp",
    "PHYSICAL_DATA_CENTER": "static",
    "PDC": "static",
}
_PROVIDER_WORD = {"aws": "AWS", "azure": "AZURE", "gcp": "GCP", "static": "PHYSICAL_DATA_CENTER"}


def phase_problems(
    phase: Mapping[str, Any],
    *,
    service: str,
    deployment_type: str,
    infrastructures: Mapping[str, str],
) -> list[Problem]:
    """The reference phase's own copy of what the stage already says (serviceId,
    infraDefinitionId, computeProviderType, deploymentType) must agree with the stage;
    ``infrastructures`` maps each of the stage's infrastructures to its provider (paths
    below ``phase``)."""
    out: list[Problem] = []
    dtype = phase.get("deploymentType")
    if dtype is not None and str(dtype).lower() != deployment_type.lower():
        out.append(
            Problem(
                f"deploymentType {dtype} contradicts the stage's deploymentType "
                f"{deployment_type}; remove it from the phase",
                ("deploymentType",),
                key=False,
            )
        )
    sid = phase.get("serviceId")
    if sid is not None and str(sid) != service:
        out.append(
            Problem(
                f"serviceId '{sid}' is not the stage's service '{service}': every "
                "phase deploys the stage's service; remove it or write "
                f"serviceId: {service}",
                ("serviceId",),
                key=False,
            )
        )
    iid = phase.get("infraDefinitionId")
    if iid is not None:
        names = ", ".join(sorted(infrastructures))
        if str(iid) not in infrastructures:
            out.append(
                Problem(
                    f"infraDefinitionId '{iid}' is not an infrastructure of this stage ({names})",
                    ("infraDefinitionId",),
                    key=False,
                )
            )
        elif len(infrastructures) > 1:
            out.append(
                Problem(
                    "infraDefinitionId is not supported when the stage has several infrastructures "
                    f"({names}): each phase deploys to hosts of all of them; remove it",
                    ("infraDefinitionId",),
                    key=False,
                )
            )
    cpt = phase.get("computeProviderType")
    if cpt is not None:
        want = COMPUTE_PROVIDERS.get(str(cpt).upper())
        chosen = (
            {infrastructures[str(iid)]}
            if iid is not None and str(iid) in infrastructures
            else set(infrastructures.values())
        )
        if want is None:
            out.append(
                Problem(
                    f"unknown computeProviderType '{cpt}' (expected one of "
                    f"{', '.join(_PROVIDER_WORD.values())})",
                    ("computeProviderType",),
                    key=False,
                )
            )
        elif chosen and want not in chosen:
            real = " and ".join(sorted(_PROVIDER_WORD[p] for p in chosen))
            out.append(
                Problem(
                    f"computeProviderType {cpt} contradicts the stage's "
                    f"infrastructure, which is {real}: write computeProviderType: "
                    f"{real} or remove it",
                    ("computeProviderType",),
                    key=False,
                )
            )
    return out


VERIFICATION_KEYS = ("healthCheck", "probe", "successCriteria", "prometheus")


def phase_step_problems(step: Mapping[str, Any]) -> list[Problem]:
    """A reference phase step: only ``type: VERIFICATION`` with vmfarm's verification keys
    and a canary analysis vmfarm runs (paths below the step)."""
    stype = step.get("type")
    if isinstance(stype, str) and stype.upper() != "VERIFICATION":
        return [
            Problem(
                f"phase step type {stype} is not supported: a reference phase's steps "
                "are VERIFICATION gates; write deployment steps under "
                "execution.steps",
                ("type",),
                key=False,
            )
        ]
    props = step.get("properties")
    if not isinstance(props, Mapping):
        return []
    known = (*VERIFICATION_KEYS, *m.ANALYSIS_KEYS)
    out = [
        Problem(
            f"'{k}' is not supported: vmfarm verifies a phase with "
            f"{', '.join(known)} (see StrategySpec.verification)",
            ("properties", k),
        )
        for k in props
        if k not in known
    ]
    analysis = {k: props[k] for k in m.ANALYSIS_KEYS if k in props}
    return out + (analysis_problems(analysis, ("properties",)) if analysis else [])


def analysis_problems(analysis: Mapping[str, Any], base: Where) -> list[Problem]:
    """A canary analysis (m.CanaryAnalysisSpec), field by field: an analysisType or
    comparisonStrategy vmfarm does not run is refused by name (paths below ``base``)."""
    out: list[Problem] = []
    try:
        m.CanaryAnalysisSpec.model_validate(dict(analysis))
    except ValidationError as exc:
        for err in exc.errors():
            where = tuple(p for p in err["loc"] if p not in ("int", "str"))
            message = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "missing":
                message = (
                    f"a canary analysis needs {where[-1]} (analysisType: Prometheus, "
                    "comparisonStrategy: COMPARE_WITH_CURRENT, timeDuration: minutes)"
                )
                where = where[:-1]
            elif err["type"] == "extra_forbidden":
                message = f"unknown field '{where[-1]}' in a canary analysis metric"
            out.append(Problem(message, (*base, *where), key=err["type"] == "extra_forbidden"))
    return out


# --- the reference's blue-green ------------------------------------------------------------------

# The switch step's properties vmfarm carries out (app.traffic.aws), and those of Harness's AMI
# deployments it knows but does not: an Auto Scaling group is created and swapped there, while
# vmfarm deploys to running instances and registers them.
SWITCH_FIELDS = ("targetGroupArns", "classicLoadBalancers")
_ASG = (
    "vmfarm deploys to running instances over SSH and switches traffic by registering them "
    "in the load balancers; it does not create, swap or resize Auto Scaling groups (Harness's "
    "AMI deployments)"
)
SWITCH_REFUSED: dict[str, str] = {
    "useAppAutoScaling": f"{_ASG}; remove useAppAutoScaling (or write false)",
    "autoScalingGroupName": f"{_ASG}; remove autoScalingGroupName",
    "downsizeOldAsg": f"{_ASG}; remove downsizeOldAsg (or write false)",
}
_TG_ARN = re.compile(
    r"arn:aws[a-z-]*:elasticloadbalancing:([a-z0-9-]+):\d{12}:"
    r"targetgroup/[A-Za-z0-9-]{1,32}/[0-9a-f]{16}"
)
_CLB_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,30}[A-Za-z0-9])?")


def _names(
    value: Any, what: str, key: str, pattern: re.Pattern[str], form: str
) -> tuple[list[Problem], list[str]]:
    """A list of names or ARNs (expressions allowed); problems, and the regex groups found."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return [Problem(f"{key} must be a list of {what}", (key,), key=False)], []
    out: list[Problem] = []
    groups: list[str] = []
    for i, v in enumerate(value):
        if "<+" in v:
            continue
        found = pattern.fullmatch(v.strip())
        if found is None:
            out.append(Problem(f"{v!r} is not {form}", (key, i), key=False))
        elif found.groups():
            groups.append(found.group(1))
    return out, groups


def blue_green_problems(
    block: Mapping[str, Any],
    *,
    infrastructures: Mapping[str, str],
    regions: Sequence[str] = (),
    without_ids: Mapping[str, Sequence[str]] | None = None,
) -> list[Problem]:
    """The reference's ``blueGreenDeployment``: one production and one staging slot, one
    AWS_AMI_SWITCH_ROUTES step whose properties vmfarm carries out. ``infrastructures`` maps
    the stage's infrastructures to their providers, ``regions`` are the AWS regions their
    files name, ``without_ids`` the static hosts with no EC2 instance id, per infrastructure
    (paths below the block)."""
    out: list[Problem] = []
    for key in ("productionSlots", "stagingSlots"):
        n = block.get(key, 1)
        if isinstance(n, int) and not isinstance(n, bool) and n != 1:
            out.append(
                Problem(
                    f"{key}: {n} is not supported: vmfarm's blue-green has one production set and "
                    "one staging set (hosts split by their slot attribute or tag, else in halves); "
                    f"write {key}: 1",
                    (key,),
                    key=False,
                )
            )
    steps = block.get("steps")
    steps = steps if isinstance(steps, list) else []
    switches: list[int] = []
    for k, step in enumerate(steps):
        if not isinstance(step, Mapping):
            continue
        stype = step.get("stepType")
        if stype != m.SWITCH_STEP_TYPE:
            out.append(
                Problem(
                    f"stepType {stype} is not supported in blueGreenDeployment: its one step is the "
                    f"load balancer switch, {m.SWITCH_STEP_TYPE}; write deployment steps under "
                    "execution.steps",
                    ("steps", k, "stepType"),
                    key=False,
                )
            )
            continue
        if switches:
            out.append(
                Problem(
                    f"a second {m.SWITCH_STEP_TYPE} step is not supported: one switch moves every "
                    "load balancer; list them all in the first one",
                    ("steps", k),
                    key=False,
                )
            )
            continue
        switches.append(k)
        props = step.get("properties")
        props = props if isinstance(props, Mapping) else {}
        known = (*SWITCH_FIELDS, *SWITCH_REFUSED)
        for key, value in props.items():
            if key in SWITCH_REFUSED:
                if value is False:  # asks for nothing vmfarm would have to do
                    continue
                out.append(
                    Problem(
                        f"'{key}' is not supported: {SWITCH_REFUSED[key]}",
                        ("steps", k, "properties", key),
                    )
                )
            elif key not in known:
                out.append(
                    Problem(
                        unknown(key, known, f"the {m.SWITCH_STEP_TYPE} step's properties"),
                        ("steps", k, "properties", key),
                    )
                )
        where: Where = ("steps", k, "properties")
        arn_regions: list[str] = []
        if "targetGroupArns" in props:
            found, arn_regions = _names(
                props["targetGroupArns"],
                "ELBv2 target group ARNs",
                "targetGroupArns",
                _TG_ARN,
                "an ELBv2 target group ARN (arn:aws:elasticloadbalancing:REGION:ACCOUNT:"
                "targetgroup/NAME/ID)",
            )
            out += [Problem(p.message, (*where, *p.path), p.key) for p in found]
            if len(set(arn_regions)) > 1:
                several = ", ".join(sorted(set(arn_regions)))
                out.append(
                    Problem(
                        f"the target groups are in several regions ({several}): one switch works "
                        "in one region; deploy each region in its own stage",
                        (*where, "targetGroupArns"),
                        key=False,
                    )
                )
        clbs = props.get("classicLoadBalancers")
        if clbs is not None:
            found, _ = _names(
                clbs,
                "classic load balancer names",
                "classicLoadBalancers",
                _CLB_NAME,
                "a classic load balancer name (letters, digits and '-', at most 32)",
            )
            out += [Problem(p.message, (*where, *p.path), p.key) for p in found]
        if not props.get("targetGroupArns") and not clbs:
            out.append(
                Problem(
                    f"the {m.SWITCH_STEP_TYPE} step needs targetGroupArns or classicLoadBalancers: "
                    "they are where vmfarm switches traffic",
                    (*where[:-1],),
                    key=False,
                )
            )
        missing = {i: list(h) for i, h in (without_ids or {}).items() if h}
        if clbs and missing:
            listed = "; ".join(f"{i}: {', '.join(h)}" for i, h in sorted(missing.items()))
            out.append(
                Problem(
                    "classic load balancers register EC2 instance ids, and these static hosts have "
                    f"none ({listed}): give each host attributes.instanceId, or use an AWS "
                    "infrastructure (SshWinRmAws), whose discovered hosts carry their ids",
                    (*where, "classicLoadBalancers"),
                    key=False,
                )
            )
        other = sorted({p for p in infrastructures.values() if p not in ("aws", "static")})
        if other:
            names = ", ".join(
                sorted(i for i, p in infrastructures.items() if p not in ("aws", "static"))
            )
            out.append(
                Problem(
                    "the load balancer switch registers EC2 instances and their addresses, but "
                    f"infrastructure {names} is not AWS ({', '.join(other)}): use an AWS "
                    "infrastructure (SshWinRmAws), or vmfarm's own strategy with traffic type "
                    "Local",
                    ("steps", k, "stepType"),
                    key=False,
                )
            )
        elif (
            not arn_regions
            and not any("<+" in str(a) for a in props.get("targetGroupArns") or [])
            and len(set(regions)) != 1
        ):
            out.append(
                Problem(
                    "the classic load balancers' region is not known: give the AWS "
                    "infrastructure one region (spec.region), or list a target group ARN, which "
                    "names it",
                    (*where, "classicLoadBalancers"),
                    key=False,
                )
            )
    if not switches and not any(isinstance(step, Mapping) for step in steps):
        out.append(
            Problem(
                f"blueGreenDeployment needs a {m.SWITCH_STEP_TYPE} step with targetGroupArns or "
                "classicLoadBalancers: vmfarm's blue-green switches traffic to the staging set",
                ("steps",) if "steps" in block else (),
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
            providers = {
                ref.identifier: provider_of(bundle.infrastructures[ref.identifier].model)
                for ref in st.spec.environment.infrastructure_definitions
                if ref.identifier in bundle.infrastructures
            }
            bg_base: Where = ("spec", "stages", si, "stage", "spec", "blueGreenDeployment")
            block = _at(pipe.raw, bg_base)
            if isinstance(block, Mapping):
                infras = [
                    bundle.infrastructures[ref.identifier].model.spec.spec
                    for ref in st.spec.environment.infrastructure_definitions
                    if providers.get(ref.identifier) == "aws"
                ]
                regions = [r for inner in infras for r in _aws_regions(inner)]
                without_ids = {
                    ref.identifier: [
                        h.hostname
                        for h in bundle.infrastructures[ref.identifier].model.spec.spec.hosts
                        if not (
                            h.attributes.get("instanceId") or h.host_attributes.get("instanceId")
                        )
                    ]
                    for ref in st.spec.environment.infrastructure_definitions
                    if providers.get(ref.identifier) == "static"
                }
                report(
                    pipe,
                    bg_base,
                    blue_green_problems(
                        block, infrastructures=providers, regions=regions, without_ids=without_ids
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
                            service=st.spec.service.service_ref,
                            deployment_type=st.spec.deployment_type,
                            infrastructures=providers,
                        ),
                    )
                    steps = phase.get("steps")
                    for k, step in enumerate(steps if isinstance(steps, list) else []):
                        if isinstance(step, Mapping):
                            report(
                                pipe, (*base, pi, "phase", "steps", k), phase_step_problems(step)
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
    return out
