"""Terraform steps checked at load and made plain data for the plan.

At load: a Git store's connector exists and is a Git connector (without ``connectorRef``, the
files' only Git connector); ``repoName`` goes with an Account connector; an
``InheritFromPlan`` names the provisionerIdentifier of a TerraformPlan earlier in the
pipeline, with the matching command (Apply for TerraformApply, Destroy for TerraformDestroy).

In the plan a Terraform step's ``repositories`` give each Git store's repository ( url, auth type and
secret ids, never a value), so that the worker needs nothing but the plan.
"""

from __future__ import annotations

from typing import Any

from app.definitions import models as m
from app.definitions.bundle import Bundle, Collector, Loaded

TERRAFORM_STEPS = (
    m.TerraformPlanStep,
    m.TerraformApplyStep,
    m.TerraformDestroyStep,
    m.TerraformRollbackStep,
)


def git_stores(step: Any) -> list[tuple[tuple[str | int, ...], m.GitStore]]:
    """Every Git store of a Terraform step, with its path under the step."""
    conf = step.spec.configuration if hasattr(step.spec, "configuration") else None
    if conf is None:
        return []
    base: tuple[str | int, ...] = ("spec", "configuration")
    if isinstance(conf, m.terraform.InlineConfiguration):
        if conf.spec is None:
            return []
        base, conf = (*base, "spec"), conf.spec
    out: list[tuple[tuple[str | int, ...], m.GitStore]] = []
    if isinstance(conf.config_files.store, m.GitStore):
        out.append(((*base, "configFiles", "store"), conf.config_files.store))
    for i, vf in enumerate(conf.var_files):
        if isinstance(vf.var_file, m.terraform.RemoteVarFile):
            out.append(((*base, "varFiles", i, "varFile", "spec", "store"), vf.var_file.spec.store))
    return out


def _git_connector(bundle: Bundle, store: m.GitStore) -> tuple[Loaded | None, str | None]:
    """The store's Git connector, or (None, why)."""
    from app.definitions.connectors import find

    ref = store.spec.connector_ref
    if ref is not None and "<+" in ref:
        return None, "connectorRef of a Terraform store must be written, not an expression"
    if ref is None:
        gits = sorted(k for k, c in bundle.connectors.items() if c.model.spec.type == "Git")
        if len(gits) != 1:
            return None, (
                "the store names no connectorRef and the files define "
                + (f"several Git connectors ({', '.join(gits)})" if gits else "no Git connector")
                + ": write connectorRef"
            )
        return bundle.connectors[gits[0]], None
    return find(bundle, ref, ("Git",), "a Terraform Git store")


def repository(bundle: Bundle, store: m.GitStore) -> dict[str, Any] | None:
    """What the worker clones: the url, and the auth's type and secret ids."""
    found, _ = _git_connector(bundle, store)
    if found is None:
        return None
    git = found.model.spec.spec
    url = git.url.rstrip("/")
    if git.connection_type == "Account":
        url = f"{url}/{store.spec.repo_name}"
    auth = git.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    return {"connector": found.ident, "url": url, "type": git.type, **auth}


def check_terraform(bundle: Bundle, errs: Collector) -> None:
    """The load-time checks of the module docstring, for every pipeline."""
    for pipe in bundle.pipelines.values():
        plans: dict[str, str] = {}  # provisionerIdentifier -> the plan's command
        for i, el in enumerate(pipe.model.spec.stages):
            stage = el.stage
            if not isinstance(stage, m.CustomStageSpec):
                continue
            for k, sel in enumerate(stage.spec.execution.steps):
                step = sel.step
                if not isinstance(step, TERRAFORM_STEPS):
                    continue
                where = ("spec", "stages", i, "stage", "spec", "execution", "steps", k, "step")
                for path, store in git_stores(step):
                    _check_store(bundle, pipe, store, (*where, *path), errs)
                if isinstance(step, m.TerraformPlanStep):
                    plans[step.provisioner] = step.spec.configuration.command
                    continue
                if isinstance(step, m.TerraformRollbackStep):
                    continue
                prov = step.spec.provisioner_identifier
                if step.spec.configuration.type != "InheritFromPlan":
                    continue
                want = "Apply" if isinstance(step, m.TerraformApplyStep) else "Destroy"
                if prov not in plans:
                    errs.add(
                        pipe.error(
                            f"{step.type} '{step.identifier}' inherits from the plan of "
                            f"provisionerIdentifier '{prov}', and no TerraformPlan before it "
                            "has that provisionerIdentifier (a TerraformPlan's is its "
                            "spec.provisionerIdentifier, else its identifier)",
                            (*where, "spec", "provisionerIdentifier"),
                        )
                    )
                elif plans[prov] != want:
                    errs.add(
                        pipe.error(
                            f"{step.type} '{step.identifier}' inherits a plan made with "
                            f"command {plans[prov]}: a {plans[prov]} plan is carried out by "
                            + ("TerraformApply" if plans[prov] == "Apply" else "TerraformDestroy"),
                            (*where, "spec", "configuration", "type"),
                        )
                    )


def _check_store(
    bundle: Bundle,
    pipe: Loaded,
    store: m.GitStore,
    where: tuple[str | int, ...],
    errs: Collector,
) -> None:
    found, problem = _git_connector(bundle, store)
    if found is None:
        at = ("spec", "connectorRef") if store.spec.connector_ref is not None else ("type",)
        errs.add(pipe.error(problem or "", (*where, *at)))
        return
    account = found.model.spec.spec.connection_type == "Account"
    if account and not store.spec.repo_name:
        errs.add(
            pipe.error(
                f"Git connector '{found.ident}' is an Account connector: name the "
                "repository with repoName",
                (*where, "spec"),
            )
        )
    if not account and store.spec.repo_name:
        errs.add(
            pipe.error(
                f"repoName goes with an Account Git connector; '{found.ident}' is a Repo "
                "connector (its url is the repository): remove repoName",
                (*where, "spec", "repoName"),
            )
        )


def dump_step(bundle: Bundle, step: Any) -> dict[str, Any]:
    """A Terraform step as plan data: its Git stores with their repository."""
    d: dict[str, Any] = step.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(step, m.TerraformPlanStep):
        d["spec"]["provisionerIdentifier"] = step.provisioner
    d["repositories"] = {
        dotted(path): repository(bundle, store) for path, store in git_stores(step)
    }
    return d


def dotted(path: tuple[str | int, ...]) -> str:
    """A store's key in the plan's ``repositories``."""
    return ".".join(str(p) for p in path)


def describe(step: dict[str, Any]) -> list[str]:
    """What ``vmfarm plan`` says of a Terraform step (its plan data)."""
    spec = step.get("spec") or {}
    prov = spec.get("provisionerIdentifier")
    repos = step.get("repositories") or {}
    conf = spec.get("configuration") or {}
    kind = step["type"]
    if kind == "TerraformRollback":
        return [
            f"rolls back provisioner {prov}: applies again what stood before this execution, "
            "or destroys what it created"
        ]
    ctype = conf.get("type")
    if ctype == "InheritFromPlan":
        verb = "destroy" if kind == "TerraformDestroy" else "apply"
        return [f"terraform {verb} of the plan saved by provisioner {prov} in this execution"]
    if ctype == "InheritFromApply":
        return [f"terraform destroy with the configuration of provisioner {prov}'s last apply"]
    body = conf if kind == "TerraformPlan" else (conf.get("spec") or {})
    base = "spec.configuration" + ("" if kind == "TerraformPlan" else ".spec")
    what = {
        "TerraformPlan": f"terraform plan ({body.get('command')}), saved for provisioner {prov}",
        "TerraformApply": f"terraform apply, provisioner {prov}",
        "TerraformDestroy": f"terraform destroy, provisioner {prov}",
    }[kind]
    lines = [f"{what}, workspace {body.get('workspace') or 'default'}"]
    store = (body.get("configFiles") or {}).get("store") or {}
    if store.get("type") == "Git":
        repo = repos.get(f"{base}.configFiles.store") or {}
        s = store.get("spec") or {}
        at = s.get("branch") or s.get("commitId")
        lines.append(f"configuration: {repo.get('url')} at {at}, {s.get('folderPath') or '/'}")
    else:
        names = [f.get("name") for f in (store.get("spec") or {}).get("files", [])]
        lines.append(f"configuration: inline ({', '.join(map(str, names))})")
    for i, el in enumerate(body.get("varFiles") or []):
        vf = el.get("varFile") or {}
        if vf.get("type") == "Inline":
            lines.append("var file: inline")
        else:
            repo = repos.get(f"{base}.varFiles.{i}.varFile.spec.store") or {}
            paths = ((vf.get("spec") or {}).get("store") or {}).get("spec", {}).get("paths", [])
            lines.append(f"var files: {', '.join(paths)} of {repo.get('url')}")
    return lines
