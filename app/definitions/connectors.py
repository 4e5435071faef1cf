"""``connectorRef`` resolved: which connector a reference names, whether it fits where it is
used, and what it puts into the plan (server URLs and secret ids, never a secret's value).

Users of a connector (app.definitions.models.connector says which types each takes):

- an artifact (``artifacts.primary.spec.connectorRef``): the connector's server URL becomes the
  artifact's ``baseUrl`` (Artifactory, Nexus3Registry; the repository fields build the path as
  app.artifacts.sources does) or ``url`` (Http: the server URL joined with ``artifactPath``);
  its credentials become ``username`` (or ``<+secrets.getValue("usernameRef")>``) and
  ``passwordRef``, resolved by the worker that fetches; an AmazonS3 artifact's Aws connector
  (ManualConfig) gives ``accessKey`` and ``secretKeyRef`` the same way;
- an infrastructure (``spec.connectorRef`` or ``spec.cloudProviderRef``): the plan's
  infrastructure gets ``connector: {identifier, type, credential}`` with the credential's type
  and secret ids; app.providers resolves them on the region worker that discovers.

A reference that names no connector of the files is an error at load, where it is written,
with the nearest identifier as a suggestion; so is one whose connector has the wrong type.
"""

from __future__ import annotations

from typing import Any

from app.definitions import models as m
from app.definitions.bundle import Bundle, Collector, Loaded, missing, provider_of

ART = ("spec", "serviceDefinition", "spec", "artifacts", "primary", "spec")
# An infrastructure's fields that name a connector (both spellings the reference uses).
INFRA_REFS = (("connectorRef", "connector_ref"), ("cloudProviderRef", "cloud_provider_ref"))
_NAMES = {
    "Artifactory": "an Artifactory",
    "Nexus": "a Nexus",
    "Http": "an Http",
    "HttpHelmRepo": "an HttpHelmRepo",
    "Aws": "an Aws",
    "Azure": "an Azure",
    "Gcp": "a Gcp",
    "Git": "a Git",
}
_INFRA_USER = {
    "aws": "an AWS infrastructure",
    "azure": "an Azure infrastructure",
    "gcp": "a GCP infrastructure",
}


def _a(word: str) -> str:
    return "an" if word[:1].upper() in "AEIOU" else "a"


def _fixed(ref: Any) -> str | None:
    """The reference as a string, or None when it is not one yet (a runtime input)."""
    if ref is None or "<+" in str(ref):
        return None
    return str(ref)


def find(
    bundle: Bundle, ref: str, want: tuple[str, ...], user: str
) -> tuple[Loaded | None, str | None]:
    """The connector ``ref`` names and fits ``want``; else (None, error message)."""
    found = bundle.connectors.get(m.connector_id(ref))
    if found is None:
        return None, missing("Connector", m.connector_id(ref), bundle.connectors)
    ctype = found.model.spec.type
    if ctype not in want:
        return None, (
            f"connector '{found.ident}' is {_NAMES.get(ctype, ctype)} connector; "
            f"{user} takes {' or '.join(_NAMES[w] for w in want)} connector"
        )
    return found, None


def check_connector_refs(bundle: Bundle, errs: Collector) -> None:
    """Every connectorRef of the files names a connector that fits where it is used."""
    for svc in bundle.services.values():
        art = svc.model.spec.service_definition.spec.artifacts.primary
        if art is None:
            continue
        ref = _fixed(art.spec.get("connectorRef"))
        if ref is None:
            continue
        want = m.ARTIFACT_CONNECTORS.get(art.type)
        if want is None:
            errs.add(
                svc.error(
                    f"connectorRef is not supported for {_a(art.type)} {art.type} artifact: "
                    f"connectors serve {', '.join(m.ARTIFACT_CONNECTORS)} artifacts; name the "
                    "server with "
                    "spec.baseUrl (or spec.url)",
                    (*ART, "connectorRef"),
                )
            )
            continue
        _, problem = find(bundle, ref, want, f"{_a(art.type)} {art.type} artifact")
        if problem:
            errs.add(svc.error(problem, (*ART, "connectorRef")))
    for infra in bundle.infrastructures.values():
        inner = infra.model.spec.spec
        refs = [(name, _fixed(getattr(inner, attr))) for name, attr in INFRA_REFS]
        given = [(name, ref) for name, ref in refs if ref is not None]
        if not given:
            continue
        if len(given) == 2 and m.connector_id(given[0][1]) != m.connector_id(given[1][1]):
            errs.add(
                infra.error(
                    f"connectorRef '{given[0][1]}' and cloudProviderRef "
                    f"'{given[1][1]}' name different connectors: write one",
                    ("spec", "spec", "cloudProviderRef"),
                )
            )
            continue
        name, ref = given[0]
        provider = provider_of(infra.model)
        if provider not in m.CLOUD_CONNECTORS:
            errs.add(
                infra.error(
                    f"{name} is not supported on a static (Pdc) infrastructure: "
                    "its hosts are listed in the file; remove it",
                    ("spec", "spec", name),
                )
            )
            continue
        _, problem = find(bundle, ref, (m.CLOUD_CONNECTORS[provider],), _INFRA_USER[provider])
        if problem:
            errs.add(infra.error(problem, ("spec", "spec", name)))


def artifact_spec(
    bundle: Bundle, svc: Loaded, atype: str, spec: dict[str, Any], errs: Collector
) -> dict[str, Any]:
    """The rendered artifact ``spec`` with its connector's server URL and credentials' secret
    ids written in (``spec`` itself when it names no connector)."""
    ref = _fixed(spec.get("connectorRef"))
    want = m.ARTIFACT_CONNECTORS.get(atype)
    if ref is None or want is None:
        return spec
    found, problem = find(bundle, ref, want, f"{_a(atype)} {atype} artifact")
    if found is None:
        errs.add(svc.error(problem or "", (*ART, "connectorRef")))
        return spec
    out = dict(spec)
    if atype == "AmazonS3":  # an Aws connector: its keys by reference, or the worker's own
        cred = found.model.spec.spec.credential
        if cred.type == "ManualConfig" and cred.spec is not None:
            out["accessKey"] = (
                cred.spec.access_key
                if cred.spec.access_key is not None
                else f'<+secrets.getValue("{cred.spec.access_key_ref}")>'
            )
            out["secretKeyRef"] = cred.spec.secret_key_ref
        return out
    conn = found.model.spec.spec
    server = conn.url().rstrip("/")
    if atype == "Http":
        path = spec.get("artifactPath")
        if not path or str(path).endswith("/"):
            errs.add(
                svc.error(
                    "an Http artifact with a connector needs spec.artifactPath: the "
                    "file's path below the connector's URL",
                    (*ART, "connectorRef"),
                )
            )
            return spec
        out["url"] = f"{server}/{str(path).lstrip('/')}"
        out.pop("artifactPath")
    else:
        out["baseUrl"] = server
    if conn.auth.type == "UsernamePassword" and conn.auth.spec is not None:
        a = conn.auth.spec
        out["username"] = (
            a.username if a.username is not None else f'<+secrets.getValue("{a.username_ref}")>'
        )
        out["passwordRef"] = a.password_ref
    return out


def infra_connector(bundle: Bundle, infra: Loaded) -> dict[str, Any] | None:
    """``{identifier, type, credential}`` of the infrastructure's connector (secret ids only),
    or None when it names none. (An unknown or unfit one is reported by
    check_connector_refs.)"""
    inner = infra.model.spec.spec
    ref = next((r for r in (_fixed(getattr(inner, a)) for _, a in INFRA_REFS) if r), None)
    if ref is None:
        return None
    found = bundle.connectors.get(m.connector_id(ref))
    if found is None:
        return None
    model = found.model.spec
    cred = model.spec.credential
    out: dict[str, Any] = {"type": cred.type}
    if cred.spec is not None:
        out.update(cred.spec.model_dump(mode="json", by_alias=True, exclude_none=True))
        auth = out.pop("auth", None)  # Azure: auth: {type: Secret, spec: {secretRef}}
        if auth:
            out["secretRef"] = auth["spec"]["secretRef"]
    return {"identifier": found.ident, "type": model.type, "credential": out}
