"""Harness's SSH vocabulary for services and infrastructures (app.definitions.harness_vocab
is the pass; this is its part for artifacts' ``sources``, PDC connectors' hosts, host filters
and SSH credentials given by ``credentialsRef``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from app.definitions.harness_vocab import (
    ARTIFACT_TYPES,
    _at,
    _mapping,
    _Rewrite,
    _set_at,
)
from app.definitions.yamlload import Document, Path

# --- services ------------------------------------------------------------------------------------


def service(rw: _Rewrite) -> None:
    base: Path = ("spec", "serviceDefinition", "spec", "artifacts", "primary")
    try:
        primary = _at(rw.data, base)
    except (KeyError, TypeError, IndexError):
        return
    if not isinstance(primary, dict) or "sources" not in primary:
        return
    sources = primary.get("sources")
    ref = primary.get("primaryArtifactRef")
    if not isinstance(sources, list) or not sources:
        rw.error("sources must list at least one artifact source", (*base, "sources"), key=False)
        return
    ids = [s.get("identifier") if isinstance(s, dict) else None for s in sources]
    if ref is None or (isinstance(ref, str) and ref.strip() == "<+input>"):
        if len(sources) > 1:
            rw.error(
                "primaryArtifactRef chosen at run time among several sources is not supported: "
                f"give it one of {', '.join(map(str, ids))} (or keep one source)",
                (*base, "primaryArtifactRef") if ref is not None else base,
            )
            return
        index = 0
    elif ref in ids:
        index = ids.index(ref)
    else:
        rw.error(
            f"primaryArtifactRef {ref!r} names no source (sources: {', '.join(map(str, ids))})",
            (*base, "primaryArtifactRef"),
            key=False,
        )
        return
    for k in primary:
        if k not in ("primaryArtifactRef", "sources"):
            rw.error(f"'{k}' next to sources: write it in the source", (*base, k))
            return
    source = sources[index]
    if not isinstance(source, dict):
        rw.error("a source is a mapping with identifier, type and spec", (*base, "sources", index))
        return
    chosen = dict(source)
    if chosen.get("type") in ARTIFACT_TYPES:
        chosen["type"] = ARTIFACT_TYPES[chosen["type"]]
    _set_at(rw.data, base, chosen)
    rw.move(base, (*base, "sources", index))


# --- infrastructures -----------------------------------------------------------------------------

Secrets = dict[str, tuple[Document, dict[str, Any]]]


def infrastructure(rw: _Rewrite, base: Path, secrets: Secrets, pdc: dict[str, Document]) -> None:
    """``base``: the path of the body that holds ``type`` and ``spec`` (and
    ``allowSimultaneousDeployments``) of an infrastructure."""
    body = _at(rw.data, base)
    inner = body.get("spec")
    if not isinstance(inner, dict):
        return
    at: Path = (*base, "spec")
    for key, how in (
        (
            "hostGroups",
            "list the hosts under spec.hosts (or a PDC connector's hosts) and keep "
            "the ones to deploy to with hostFilter type HostNames or HostAttributes",
        ),
        ("targetedHosts", "keep the hosts to deploy to with hostFilter type HostNames"),
        ("instanceType", "vmfarm deploys to every instance its hostFilter finds"),
        (
            "provisioner",
            "vmfarm does not provision hosts: create them first (terraform) and "
            "list or filter them",
        ),
    ):
        if key in inner:
            rw.error(f"{key} is not supported: {how}", (*at, key))
    if "awsInstanceFilter" in inner:
        f = inner.pop("awsInstanceFilter")
        if "hostFilter" in inner:
            rw.error("write either awsInstanceFilter or hostFilter", (*at, "hostFilter"))
        elif isinstance(f, dict):
            inner["hostFilter"] = {"type": "AwsInstanceFilter", "spec": f}
            rw.move((*at, "hostFilter", "spec"), (*at, "awsInstanceFilter"))
            rw.move((*at, "hostFilter"), (*at, "awsInstanceFilter"))
    ref = inner.get("connectorRef")
    if isinstance(ref, str) and ref in pdc:
        _pdc_connector(rw, at, inner, pdc[ref])
    if isinstance(inner.get("hosts"), list):
        for i, h in enumerate(inner["hosts"]):
            if isinstance(h, str):
                inner["hosts"][i] = {"hostname": h}
                rw.move((*at, "hosts", i, "hostname"), (*at, "hosts", i))
        _host_filter(rw, at, inner)
    cred = inner.get("credentialsRef")
    if isinstance(cred, str):
        _credentials(rw, at, inner, cred, secrets)


def _pdc_connector(rw: _Rewrite, at: Path, inner: dict[str, Any], doc: Document) -> None:
    conn = doc.data["spec"]
    cspec = conn.get("spec") if isinstance(conn.get("spec"), dict) else {}
    for k in cspec:
        if k not in ("hosts", "delegateSelectors", "credentialsRef"):
            rw.errors.append(
                doc.error(
                    f"{k} is not supported on a PDC connector (vmfarm reads hosts, "
                    "delegateSelectors and credentialsRef)",
                    ("spec", "spec", k),
                    key=True,
                )
            )
            return
    if inner.get("hosts"):
        rw.error(
            "hosts are both here and in the PDC connector this infrastructure names; keep one",
            (*at, "hosts"),
        )
        return
    del inner["connectorRef"]
    rw.changed = True
    for key in ("hosts", "delegateSelectors", "credentialsRef"):
        if key in cspec and key not in inner:
            inner[key] = copy.deepcopy(cspec[key])
            rw.move((*at, key), ("spec", "spec", key), doc)
            if isinstance(cspec[key], list):
                for i in range(len(cspec[key])):
                    rw.move((*at, key, i), ("spec", "spec", key, i), doc)


def _host_filter(rw: _Rewrite, at: Path, inner: dict[str, Any]) -> None:
    hf = inner.get("hostFilter")
    if not isinstance(hf, dict):
        return
    ftype, fspec = hf.get("type"), hf.get("spec") or {}
    where: Path = (*at, "hostFilter")
    if ftype == "All" and not fspec:
        del inner["hostFilter"]
        rw.changed = True
        return
    keep: Callable[[dict[str, Any]], bool]
    if ftype == "HostNames":
        names = fspec.get("value") if isinstance(fspec, dict) else None
        if not isinstance(names, list) or not names:
            rw.error("a HostNames filter lists the host names in spec.value", (*where, "spec"))
            return
        known = {str(h.get("hostname")) for h in inner["hosts"] if isinstance(h, dict)}
        for n, name in enumerate(names):
            if str(name) not in known:
                rw.error(
                    f"host {name!r} is not among this infrastructure's hosts",
                    (*where, "spec", "value", n),
                    key=False,
                )
                return
        wanted = {str(n) for n in names}

        def keep(h: dict[str, Any]) -> bool:
            return str(h.get("hostname")) in wanted

    elif ftype == "HostAttributes":
        attrs = fspec.get("value") if isinstance(fspec, dict) else None
        if not isinstance(attrs, dict) or not attrs:
            rw.error(
                "a HostAttributes filter gives the attributes in spec.value (name: value)",
                (*where, "spec"),
            )
            return

        def keep(h: dict[str, Any]) -> bool:
            have = {**(h.get("hostAttributes") or {}), **(h.get("attributes") or {})}
            return all(
                str(have.get(k)) in [s.strip() for s in str(v).split(",")] for k, v in attrs.items()
            )

    else:
        return  # a cloud filter (or a wrong one): the schema names it
    kept = [(i, h) for i, h in enumerate(inner["hosts"]) if isinstance(h, dict) and keep(h)]
    if not kept:
        rw.error("this host filter keeps none of the hosts", where)
        return
    inner["hosts"] = [h for _, h in kept]
    del inner["hostFilter"]
    old = {n: rw.source((*at, "hosts", i)) for n, (i, _) in enumerate(kept)}
    rw.changed = True
    for n, origin in old.items():
        rw.moves[(*at, "hosts", n)] = origin


def _credentials(rw: _Rewrite, at: Path, inner: dict[str, Any], ref: str, secrets: Secrets) -> None:
    """``credentialsRef`` -> the connection's user, port and secret ids."""
    existed = "connection" in inner
    conn = inner.setdefault("connection", {})
    if not isinstance(conn, dict):
        return
    clash = [k for k in ("privateKeySecret", "passwordSecret", "privateKeyFile") if k in conn]
    if clash:
        rw.error(
            f"credentialsRef and connection.{clash[0]} both say how to log in; keep one",
            (*at, "credentialsRef"),
        )
        return
    del inner["credentialsRef"]
    rw.changed = True
    if ref not in secrets:  # a secret id: the SSH private key, read on the worker
        conn["privateKeySecret"] = ref
        rw.move((*at, "connection", "privateKeySecret"), (*at, "credentialsRef"))
        if not existed:
            rw.move((*at, "connection"), (*at, "credentialsRef"))
        return
    doc, body = secrets[ref]
    spec = _mapping(body.get("spec"))
    auth = _mapping(spec.get("auth"))
    aspec = _mapping(auth.get("spec"))
    if auth.get("type") != "SSH":
        rw.errors.append(
            doc.error(
                f"auth type {auth.get('type')!r} is not supported: vmfarm logs in over SSH with a "
                "key or a password (auth.type: SSH)",
                ("secret", "spec", "auth", "type"),
                key=False,
            )
        )
        return
    ctype = aspec.get("credentialType")
    cred = _mapping(aspec.get("spec"))
    p: Path = ("secret", "spec", "auth", "spec", "spec")
    fields = {
        "KeyReference": {
            "userName": "user",
            "key": "privateKeySecret",
            "encryptedPassphrase": "passphraseSecret",
        },
        "KeyPath": {
            "userName": "user",
            "keyPath": "privateKeyFile",
            "encryptedPassphrase": "passphraseSecret",
        },
        "Password": {"userName": "user", "password": "passwordSecret"},
    }.get(str(ctype))
    if fields is None:
        rw.errors.append(
            doc.error(
                f"credentialType {ctype!r} is not supported: write KeyReference (a secret with the "
                "private key), KeyPath (a key file on the worker) or Password",
                ("secret", "spec", "auth", "spec", "credentialType"),
                key=False,
            )
        )
        return
    for k, v in cred.items():
        if k not in fields:
            rw.errors.append(
                doc.error(
                    f"{k} is not supported in a {ctype} credential (vmfarm reads "
                    f"{', '.join(fields)})",
                    (*p, k),
                )
            )
            return
        conn[fields[k]] = v
        rw.move((*at, "connection", fields[k]), (*p, k), doc)
    if "port" in spec:
        conn["port"] = spec["port"]
        rw.move((*at, "connection", "port"), ("secret", "spec", "port"), doc)
    if not existed:
        rw.move((*at, "connection"), (*at, "credentialsRef"))
