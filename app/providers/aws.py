"""AWS EC2 host discovery: the running instances of an ``SshWinRmAws`` infrastructure.

What is read from the file
--------------------------
Either a standalone Infrastructure (``type: SshWinRmAws``, or any type with a ``hostFilter`` of
type ``AwsInstanceFilter``)::

    kind: Infrastructure
    spec:
      environmentRef: prod_vm_env
      type: SshWinRmAws
      spec:
        connectorRef: aws_connector     # an Aws connector (below); cloudProviderRef the same
        region: us-east-1               # used when hostFilter.spec.regions is not given
        hostConnectionType: PrivateIP   # PrivateIP (default) | PublicIP | Hostname
        hostFilter:
          type: AwsInstanceFilter
          spec:
            regions: [us-east-1, eu-west-1]
            vpcs: [vpc-0abc]            # optional: only instances in these VPCs
            tags:
              Environment: production
              App: [web, api]           # a list means "any of these values"
        connection: {user: ubuntu, privateKeyFile: ~/.ssh/prod.pem, port: 22}

or an Environment's inline ``infrastructureDefinitions`` entry with ``cloudProviderType: Aws``
whose ``spec`` holds the same fields (there, ``spec.tags`` is the usual place for the tags).

* **Regions**: ``hostFilter.spec.regions`` if given, else ``spec.region``; one of them is
  required. Each region is searched; a host's ``region`` is the AWS region its instance runs in,
  which is also the vmfarm worker queue that deploys to it.
* **Tags**: ``spec.tags`` and ``hostFilter.spec.tags`` together; an instance must carry every
  tag key, with one of the listed values when the value is a list (lists are accepted in
  ``hostFilter.spec.tags``; the file schema gives ``spec.tags`` single values). EC2 wildcards
  (``*``, ``?``) work in values, so ``Team: "*"`` means "has a Team tag". Naming one key in
  both places with different values is refused as ambiguous. ``true``/``false`` match the tag
  values ``"true"``/``"false"``.
* **VPCs**: ``hostFilter.spec.vpcs``, if given, keeps only instances in those VPCs.
* **Only running instances** are hosts (pending, stopping and stopped ones are not).
* **Address** (``hostConnectionType``): ``PrivateIP`` (the default) uses the private IP address,
  ``PublicIP`` the public one, ``Hostname`` the public DNS name, or the private DNS name when the
  instance has no public one. An instance that matches the filter but has no such address is an
  error naming the instance: silently leaving a tagged production host out of a deployment is
  worse than stopping and saying so (use ``PrivateIP``, or tag that instance differently).
* **Hosts** are named by instance id and sorted by region, then instance id. Their attributes are
  ``instanceId``, ``instanceType``, ``availabilityZone``, ``imageId``, ``vpcId``, ``subnetId``,
  ``privateDnsName``, ``publicDnsName``, ``launchTime``, ``name`` (the Name tag), ``tags`` (a
  dict) and each tag flattened as ``tag:<Key>``. The infrastructure's ``connection`` settings
  (user, port, key, known_hosts, host key policy) apply as for a static host.

Credentials: the connector's (``connectorRef``/``cloudProviderRef``, an Aws connector) when it
is ``ManualConfig``: ``accessKey`` (or ``accessKeyRef``) and ``secretKeyRef``, resolved through
app.secrets here, on the worker doing the discovery (the plan and the task's arguments hold
only the ids). Without a connector, or with ``InheritFromDelegate``, they and the endpoint are
boto3's usual ones on the worker doing the discovery: the
environment (``AWS_ACCESS_KEY_ID`` ...), ``AWS_PROFILE`` and the shared files, an instance role;
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_EC2`` point at another endpoint. Throttled or failed
calls are retried by botocore (``standard`` retry mode, ``MAX_ATTEMPTS`` attempts, with backoff).

Failures raise ``DiscoveryError`` with ``error_class`` ``Authentication`` (credentials missing,
rejected or without ``ec2:DescribeInstances``), ``Connectivity`` (endpoint unreachable, throttled
or AWS failing past the retries) or ``Unknown``; a region botocore does not know that cannot be
reached is reported as probably misspelled. Secrets never appear in messages. Settings missing or
wrong in the file raise ``ConfigError`` naming the field.

boto3 is imported only when hosts are discovered: loading or validating a file never needs it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from app.errors import ConfigError, DiscoveryError
from app.providers.base import Host, cloud_host, connector_credential

log = logging.getLogger(__name__)

# DescribeInstances page size (MaxResults: AWS accepts 5..1000). Tests lower it.
PAGE_SIZE = 1000
# Attempts per API call, first one included (botocore "standard" retry mode, with backoff).
MAX_ATTEMPTS = 5
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0

CONNECTION_TYPES = ("PrivateIP", "PublicIP", "Hostname")
FILTER_TYPES = ("AwsInstanceFilter", "All")
FILTER_FIELDS = ("regions", "tags", "vpcs")
# What botocore itself accepts as a region name, a little stricter (lower case).
REGION_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")

AUTH_CODES = frozenset(
    {
        "AuthFailure",
        "UnauthorizedOperation",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "UnrecognizedClientException",
        "AccessDenied",
        "AccessDeniedException",
        "OptInRequired",
        "Blocked",
        "InvalidAccessKeyId",
        "InvalidToken",
    }
)
THROTTLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "SlowDown",
        "EC2ThrottledException",
        "BandwidthLimitExceeded",
        "PriorRequestNotComplete",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
    }
)
SERVER_CODES = frozenset(
    {
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
        "InsufficientInstanceCapacity",
    }
)


@dataclass(frozen=True)
class AwsQuery:
    """What to ask EC2, read from one resolved infrastructure (no boto3 needed)."""

    regions: list[str]
    filters: list[dict[str, Any]]
    connection_type: str = "PrivateIP"
    tags: dict[str, list[str]] = field(default_factory=dict)


def discover(infra: dict[str, Any]) -> list[Host]:
    """The running EC2 instances that match ``infra``, as hosts sorted by region and id."""
    query = parse_infra(infra)
    ident = str(infra.get("identifier", ""))
    session = _session(ident, connector_credential(infra))
    hosts: list[Host] = []
    for region in query.regions:
        client: Any = None
        try:
            client = _client(session, region)
            instances = _describe(client, query.filters)
        except Exception as exc:
            mapped = discovery_error(
                exc,
                infrastructure=ident,
                region=region,
                endpoint=getattr(getattr(client, "meta", None), "endpoint_url", None),
                credentials_source=_credentials_source(session),
            )
            if mapped is None:
                raise
            raise mapped from exc
        finally:
            close = getattr(client, "close", None)
            if callable(close):
                close()
        found = [_host(infra, query, region, inst) for inst in instances]
        log.info("infrastructure %s: %d running instance(s) in %s", ident, len(found), region)
        hosts.extend(found)
    _refuse_missing_addresses(ident, query, hosts)
    return sorted(hosts, key=lambda h: (h.region, h.name))


# -- reading the file ---------------------------------------------------------------------------


def parse_infra(infra: dict[str, Any]) -> AwsQuery:
    """Regions, EC2 filters and address kind of a resolved infrastructure; ``ConfigError``
    naming the field when one is missing or wrong."""
    where = f"infrastructure '{infra.get('identifier')}' ({infra.get('source', '')})"
    spec = infra.get("spec") or {}
    hf = spec.get("hostFilter") or {}
    if not isinstance(hf, dict):
        raise ConfigError(f"{where}: spec.hostFilter must be a mapping with type and spec")
    if hf and hf.get("type", "AwsInstanceFilter") not in FILTER_TYPES:
        raise ConfigError(
            f"{where}: hostFilter.type {hf.get('type')!r} does not apply to an AWS "
            f"infrastructure (use {' or '.join(FILTER_TYPES)})"
        )
    fspec = hf.get("spec") or {}
    if not isinstance(fspec, dict):
        raise ConfigError(f"{where}: hostFilter.spec must be a mapping")
    unknown = sorted(set(fspec) - set(FILTER_FIELDS))
    if unknown:
        raise ConfigError(
            f"{where}: hostFilter.spec.{unknown[0]} is not a field of an "
            f"AwsInstanceFilter (fields: {', '.join(FILTER_FIELDS)})"
        )
    if spec.get("hosts"):
        raise ConfigError(
            f"{where}: spec.hosts lists static hosts, but this is an AWS "
            "infrastructure whose hosts are discovered; remove spec.hosts or use "
            "type Pdc"
        )

    regions = _regions(where, spec, fspec)
    conn_type = spec.get("hostConnectionType") or "PrivateIP"
    if conn_type not in CONNECTION_TYPES:
        raise ConfigError(
            f"{where}: spec.hostConnectionType {conn_type!r} must be one of "
            f"{', '.join(CONNECTION_TYPES)}"
        )

    tags = _tags(where, "spec.tags", spec.get("tags"))
    for key, values in _tags(where, "hostFilter.spec.tags", fspec.get("tags")).items():
        if key in tags and sorted(tags[key]) != sorted(values):
            raise ConfigError(
                f"{where}: tag {key!r} is given both in spec.tags ({tags[key]}) and in "
                f"hostFilter.spec.tags ({values}) with different values; keep one"
            )
        tags[key] = values

    filters: list[dict[str, Any]] = [{"Name": "instance-state-name", "Values": ["running"]}]
    filters += [{"Name": f"tag:{k}", "Values": v} for k, v in sorted(tags.items())]
    vpcs = fspec.get("vpcs")
    if vpcs is not None:
        if (
            not isinstance(vpcs, list)
            or not vpcs
            or not all(isinstance(v, str) and v for v in vpcs)
        ):
            raise ConfigError(
                f"{where}: hostFilter.spec.vpcs must be a non-empty list of VPC ids (vpc-...)"
            )
        filters.append({"Name": "vpc-id", "Values": list(vpcs)})
    return AwsQuery(regions=regions, filters=filters, connection_type=conn_type, tags=tags)


def _regions(where: str, spec: dict[str, Any], fspec: dict[str, Any]) -> list[str]:
    raw = fspec.get("regions")
    if raw is None:
        region = spec.get("region")
        if not region:
            raise ConfigError(
                f"{where}: spec.region is required (the AWS region to search), "
                "unless hostFilter.spec.regions lists the regions"
            )
        raw, name = [region], "spec.region"
    else:
        name = "hostFilter.spec.regions"
        if not isinstance(raw, list) or not raw:
            raise ConfigError(
                f"{where}: {name} must be a non-empty list of AWS regions "
                "(e.g. [us-east-1, eu-west-1])"
            )
    out: list[str] = []
    for r in raw:
        if not isinstance(r, str) or not REGION_RE.match(r):
            raise ConfigError(
                f"{where}: {name}: {r!r} is not an AWS region name (lower-case "
                "letters, digits and '-', e.g. us-east-1)"
            )
        if r not in out:
            out.append(r)
    return out


def _tags(where: str, name: str, raw: Any) -> dict[str, list[str]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: {name} must be a mapping of tag key to value "
            "(e.g. {Environment: production})"
        )
    out: dict[str, list[str]] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: {name}: tag keys must be non-empty strings")
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ConfigError(f"{where}: {name}.{key} is an empty list; give at least one value")
        texts = []
        for v in values:
            if v is None or isinstance(v, dict | list):
                raise ConfigError(
                    f"{where}: {name}.{key} must be a value or a list of values "
                    '(write "*" to match any value of the tag)'
                )
            texts.append(("true" if v else "false") if isinstance(v, bool) else str(v))
        out[key] = texts
    return out


# -- asking EC2 ---------------------------------------------------------------------------------


def _session(ident: str, manual: dict[str, Any] | None = None) -> Any:
    """A boto3 session of its own (the default one is not thread-safe): with the connector's
    access key and secret key when it has them (ManualConfig), else the worker's own."""
    import boto3
    from botocore.exceptions import BotoCoreError

    try:
        if manual is not None:
            return boto3.session.Session(
                aws_access_key_id=str(manual["accessKey"]),
                aws_secret_access_key=str(manual["secretKey"]),
            )
        return boto3.session.Session()
    except BotoCoreError as exc:  # e.g. AWS_PROFILE names a profile that does not exist
        raise DiscoveryError(
            f"cannot set up AWS credentials: {_scrub(str(exc))}",
            infrastructure=ident,
            error_class="Authentication",
        ) from exc


def _client(session: Any, region: str) -> Any:
    """An EC2 client for ``region``; the endpoint follows AWS_ENDPOINT_URL(_EC2) if set."""
    from botocore.config import Config

    return session.client(
        "ec2",
        region_name=region,
        config=Config(
            retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
        ),
    )


def _describe(client: Any, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every instance matching ``filters``, following every page."""
    instances: list[dict[str, Any]] = []
    paginator = client.get_paginator("describe_instances")
    for page in paginator.paginate(Filters=filters, PaginationConfig={"PageSize": PAGE_SIZE}):
        for reservation in page.get("Reservations", []):
            instances.extend(reservation.get("Instances", []))
    return instances


def _credentials_source(session: Any) -> str | None:
    """Where boto3 found credentials (``env``, ``shared-credentials-file``, ...), never them."""
    try:
        creds = session.get_credentials()
    except Exception:
        return None
    return str(creds.method) if creds is not None and getattr(creds, "method", None) else None


# -- building hosts -----------------------------------------------------------------------------


def _host(infra: dict[str, Any], query: AwsQuery, region: str, inst: dict[str, Any]) -> Host:
    iid = str(inst["InstanceId"])
    tags = {str(t["Key"]): str(t.get("Value", "")) for t in inst.get("Tags") or []}
    public_ip = inst.get("PublicIpAddress") or None
    private_ip = inst.get("PrivateIpAddress") or None
    public_dns = inst.get("PublicDnsName") or None
    private_dns = inst.get("PrivateDnsName") or None
    address = {
        "PublicIP": public_ip,
        "PrivateIP": private_ip,
        "Hostname": public_dns or private_dns,
    }[query.connection_type]
    launch: Any = inst.get("LaunchTime")
    attributes: dict[str, Any] = {
        "instanceId": iid,
        "instanceType": inst.get("InstanceType", ""),
        "availabilityZone": (inst.get("Placement") or {}).get("AvailabilityZone", ""),
        "imageId": inst.get("ImageId", ""),
        "vpcId": inst.get("VpcId", ""),
        "subnetId": inst.get("SubnetId", ""),
        "privateDnsName": private_dns or "",
        "publicDnsName": public_dns or "",
        "launchTime": launch.isoformat() if hasattr(launch, "isoformat") else str(launch or ""),
        "name": tags.get("Name", ""),
        "tags": tags,
        **{f"tag:{k}": v for k, v in tags.items()},
    }
    return cloud_host(
        infra,
        name=iid,
        address=address or "",
        region=region,
        public_ip=public_ip,
        private_ip=private_ip,
        attributes=attributes,
    )


def _refuse_missing_addresses(ident: str, query: AwsQuery, hosts: list[Host]) -> None:
    missing = sorted(f"{h.name} ({h.region})" for h in hosts if not h.address)
    if not missing:
        return
    what = {
        "PublicIP": "public IP address",
        "PrivateIP": "private IP address",
        "Hostname": "DNS name",
    }[query.connection_type]
    hint = (
        " (hostConnectionType PublicIP needs a public IP on every matching instance; use "
        "PrivateIP when the workers reach the instances inside the VPC, or tag these "
        "instances differently)"
        if query.connection_type == "PublicIP"
        else ""
    )
    raise DiscoveryError(
        f"{len(missing)} running instance(s) matching the filter have no {what} to connect to: "
        f"{', '.join(missing)}{hint}",
        infrastructure=ident,
        error_class="Unknown",
    )


# -- errors -------------------------------------------------------------------------------------


def discovery_error(
    exc: BaseException,
    *,
    infrastructure: str,
    region: str,
    endpoint: str | None = None,
    credentials_source: str | None = None,
) -> DiscoveryError | None:
    """The ``DiscoveryError`` for a boto3/botocore failure while listing ``region``; ``None``
    for an exception that is not an AWS SDK one (a bug, to be raised as it is)."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        CredentialRetrievalError,
        EndpointConnectionError,
        HTTPClientError,
        InvalidRegionError,
        NoCredentialsError,
        PartialCredentialsError,
        ProfileNotFound,
        SSOError,
        TokenRetrievalError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    doing = f"listing EC2 instances in region {region}"
    at = f" at {_scrub(endpoint)}" if endpoint else ""
    source = f" (credentials from {credentials_source})" if credentials_source else ""

    def err(message: str, error_class: str) -> DiscoveryError:
        return DiscoveryError(message, infrastructure=infrastructure, error_class=error_class)

    if isinstance(exc, ClientError):
        error = exc.response.get("Error") or {}
        code = str(error.get("Code") or "")
        msg = _scrub(str(error.get("Message") or ""))[:300]
        said = f"{code}: {msg}" if msg else code or "no error code"
        if code in AUTH_CODES:
            hint = (
                "the credentials need ec2:DescribeInstances"
                if code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException")
                else f"check the worker's AWS credentials, and that region {region} is "
                "enabled for the account"
            )
            return err(
                f"AWS refused the credentials{source} {doing} ({said}); {hint}", "Authentication"
            )
        if code in THROTTLE_CODES:
            return err(
                f"AWS kept throttling {doing} after {MAX_ATTEMPTS} attempts ({said})",
                "Connectivity",
            )
        if code in SERVER_CODES or _status(exc) >= 500:
            return err(
                f"AWS failed {doing}{at} after {MAX_ATTEMPTS} attempts ({said})", "Connectivity"
            )
        if code in ("InvalidRegion", "InvalidEndpoint", "UnknownEndpoint"):
            return err(f"region {region!r} is not a usable EC2 region ({said})", "Unknown")
        return err(f"AWS refused {doing} ({said})", "Unknown")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return err(
            f"no usable AWS credentials for {doing}: {_scrub(str(exc))}; set "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or give the "
            "worker an instance role",
            "Authentication",
        )
    if isinstance(exc, TokenRetrievalError | SSOError | ProfileNotFound):
        return err(f"AWS credentials unusable for {doing}: {_scrub(str(exc))}", "Authentication")
    if isinstance(exc, EndpointConnectionError) and not _known_region(region):
        return err(
            f"cannot reach the EC2 endpoint for region {region!r}{at}, and {region!r} "
            "is not an AWS region this botocore knows: is it misspelled? "
            f"({type(exc).__name__})",
            "Unknown",
        )
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return err(
            f"cannot reach the EC2 endpoint for region {region}{at} after "
            f"{MAX_ATTEMPTS} attempts ({type(exc).__name__}: {_scrub(str(exc))})",
            "Connectivity",
        )
    if isinstance(exc, InvalidRegionError):
        return err(f"region {region!r} is not a valid AWS region name", "Unknown")
    if isinstance(exc, BotoCoreError):
        return err(f"{doing}{at} failed: {type(exc).__name__}: {_scrub(str(exc))[:300]}", "Unknown")
    return None


def _status(exc: Any) -> int:
    try:
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    except (TypeError, ValueError, AttributeError):
        return 0


def _known_region(region: str) -> bool:
    """Whether botocore's endpoint data lists ``region`` for EC2 in any partition."""
    try:
        import boto3

        session = boto3.session.Session()
        return any(
            region in session.get_available_regions("ec2", partition_name=p)
            for p in session.get_available_partitions()
        )
    except Exception:
        return True  # cannot tell: do not call it misspelled


_USERINFO_RE = re.compile(r"(://)[^/@\s]+@")


def _scrub(text: str) -> str:
    """``text`` without the user:password part of any URL in it."""
    return _USERINFO_RE.sub(r"\1***@", text)
