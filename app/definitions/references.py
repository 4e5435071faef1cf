"""References between documents: a pipeline's stages name services, environments and
infrastructures that must exist, and variables that must be declared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.definitions import base
from app.definitions import models as m

if TYPE_CHECKING:
    pass

from app.definitions.bundle import Bundle, Collector, Loaded, missing, provider_of


def check_references(bundle: Bundle, errs: Collector) -> None:
    from app.definitions.connectors import check_connector_refs

    check_connector_refs(bundle, errs)
    from app.definitions.terraform import check_terraform

    check_terraform(bundle, errs)
    for infra in bundle.infrastructures.values():
        env_ref = infra.model.spec.environment_ref
        if env_ref not in bundle.environments:
            errs.add(
                infra.error(
                    missing("Environment", env_ref, bundle.environments), ("spec", "environmentRef")
                )
            )
        inner = infra.model.spec.spec
        if provider_of(infra.model) == "static":
            if infra.kind == "Infrastructure" and not inner.hosts and infra.base == ():
                where: tuple[str, ...] = ("spec", "spec", "hosts")
                if where not in infra.doc.values:
                    where = ("spec", "spec")
                errs.add(
                    infra.error(
                        "a static (Pdc) infrastructure needs at least one host in 'hosts'", where
                    )
                )
            seen: dict[tuple[str, int], int] = {}
            for i, h in enumerate(inner.hosts):
                port = h.port or (inner.connection.port if inner.connection else 22)
                if (h.hostname, port) in seen:
                    errs.add(
                        infra.error(
                            f"duplicate host '{h.hostname}:{port}'",
                            ("spec", "spec", "hosts", i, "hostname"),
                        )
                    )
                seen[(h.hostname, port)] = i
                if h.region is not None and not base.REGION_RE.match(h.region):
                    errs.add(
                        infra.error(
                            f"region '{h.region}' must be lower-case letters, digits and '-'",
                            ("spec", "spec", "hosts", i, "region"),
                        )
                    )
    for pipe in bundle.pipelines.values():
        stage_ids: dict[str, int] = {}
        for si, el in enumerate(pipe.model.spec.stages):
            st = el.stage
            sp: tuple[str | int, ...] = ("spec", "stages", si, "stage")
            if st.identifier in stage_ids:
                errs.add(
                    pipe.error(f"duplicate stage identifier '{st.identifier}'", (*sp, "identifier"))
                )
            stage_ids[st.identifier] = si
            if isinstance(st, m.PipelineStageSpec):
                continue  # its child: app.definitions.chaining.check_chains
            if isinstance(st, m.ApprovalStageSpec):
                continue  # approvers' groups are checked when someone approves
            if isinstance(st, m.CustomStageSpec):
                _custom_steps(pipe, st, sp, errs)
                continue
            from app.definitions.loop_refs import iteration_targets

            targets = iteration_targets(pipe, si, errs)
            if targets is None:
                _targets(bundle, pipe, st, sp, errs)
            for it, copy in targets or []:
                _targets(bundle, pipe, copy, sp, errs, note=f" (iteration {it.describe()})")
            # The services the stage deploys (one per iteration when its loop chooses it).
            services = sorted(
                {c.spec.service.service_ref for _, c in targets}
                if targets is not None
                else {st.spec.service.service_ref}
            )
            for section in ("steps", "rollbackSteps"):
                steps = getattr(
                    st.spec.execution, "steps" if section == "steps" else "rollback_steps"
                )
                step_ids: set[str] = set()
                for at, step, _group in m.flat_steps(steps):
                    tp = (*sp, "spec", "execution", section, *at)
                    if step.identifier in step_ids:
                        errs.add(
                            pipe.error(
                                f"duplicate step identifier '{step.identifier}' in "
                                f"stage '{st.identifier}'",
                                (*tp, "identifier"),
                            )
                        )
                    step_ids.add(step.identifier)
                    if not isinstance(step, m.CommandStep):
                        continue
                    unit_ids: set[str] = set()
                    for ui, unit in enumerate(step.spec.command_units):
                        up = (*tp, "spec", "commandUnits", ui)
                        if unit.identifier in unit_ids:
                            errs.add(
                                pipe.error(
                                    f"duplicate command unit identifier "
                                    f"'{unit.identifier}' in step '{step.identifier}'",
                                    (*up, "identifier"),
                                )
                            )
                        unit_ids.add(unit.identifier)
                        for svc in services:
                            _artifact_unit(bundle, pipe, svc, unit, up, errs)
                    for vname in ("environmentVariables", "outputVariables"):
                        attr = (
                            "environment_variables"
                            if vname.startswith("env")
                            else "output_variables"
                        )
                        names: set[str] = set()
                        for vi, var in enumerate(getattr(step.spec, attr)):
                            if var.name in names:
                                errs.add(
                                    pipe.error(
                                        f"duplicate variable '{var.name}'",
                                        (*tp, "spec", vname, vi, "name"),
                                    )
                                )
                            names.add(var.name)
        for vars_owner in [pipe, *bundle.services.values(), *bundle.environments.values()]:
            check_variables(vars_owner, errs)


def _artifact_unit(
    bundle: Bundle,
    pipe: Loaded,
    svc: str,
    unit: object,
    up: tuple[str | int, ...],
    errs: Collector,
) -> None:
    """A command unit that needs the service's artifact, in a stage whose service has none."""
    if svc not in bundle.services:
        return  # reported with the stage's references
    art = bundle.services[svc].model.spec.service_definition.spec
    # (Copy sourceType Config: the service's configFiles, which the loader refuses; with none
    # it copies nothing: app/units/copy.py.)
    if (
        isinstance(unit, m.CopyUnit)
        and unit.spec.source_type == "Artifact"
        and not art.artifacts.primary
    ):
        errs.add(
            pipe.error(
                f"Copy with sourceType Artifact, but service '{svc}' has no artifacts.primary",
                (*up, "spec", "sourceType"),
            )
        )
    if isinstance(unit, m.DownloadArtifactUnit | m.ReleaseUnit) and not art.artifacts.primary:
        errs.add(
            pipe.error(
                f"{unit.type} needs an artifact, but service '{svc}' has no artifacts.primary",
                (*up, "type"),
            )
        )


def _targets(
    bundle: Bundle,
    pipe: Loaded,
    st: m.StageSpec,
    sp: tuple[str | int, ...],
    errs: Collector,
    *,
    note: str = "",
) -> None:
    """The stage's service, environment and infrastructures exist and belong together
    (``note``: which iteration of a looped stage whose references read its loop)."""
    svc = st.spec.service.service_ref
    if svc not in bundle.services:
        errs.add(
            pipe.error(
                missing("Service", svc, bundle.services) + note,
                (*sp, "spec", "service", "serviceRef"),
            )
        )
    env = st.spec.environment.environment_ref
    if env not in bundle.environments:
        errs.add(
            pipe.error(
                missing("Environment", env, bundle.environments) + note,
                (*sp, "spec", "environment", "environmentRef"),
            )
        )
    _choose_infrastructures(bundle, pipe, st, sp, errs, note=note)
    for ii, ref in enumerate(st.spec.environment.infrastructure_definitions):
        ip = (*sp, "spec", "environment", "infrastructureDefinitions", ii, "identifier")
        target = bundle.infrastructures.get(ref.identifier)
        if target is None:
            errs.add(
                pipe.error(
                    missing("Infrastructure", ref.identifier, bundle.infrastructures) + note, ip
                )
            )
        elif (
            env in bundle.environments
            and target.model.spec.environment_ref in bundle.environments
            and target.model.spec.environment_ref != env
        ):
            # (an infrastructure naming an unknown environment is reported above)
            errs.add(
                pipe.error(
                    f"infrastructure '{ref.identifier}' belongs to environment "
                    f"'{target.model.spec.environment_ref}', not '{env}'{note}",
                    ip,
                )
            )


def _custom_steps(
    pipe: Loaded, st: m.CustomStageSpec, sp: tuple[str | int, ...], errs: Collector
) -> None:
    """A Custom stage's step identifiers and variable names are unique."""
    step_ids: set[str] = set()
    for k, el in enumerate(st.spec.execution.steps):
        step = el.step
        tp = (*sp, "spec", "execution", "steps", k, "step")
        if step.identifier in step_ids:
            errs.add(
                pipe.error(
                    f"duplicate step identifier '{step.identifier}' in stage '{st.identifier}'",
                    (*tp, "identifier"),
                )
            )
        step_ids.add(step.identifier)
        if not isinstance(step, m.ShellScriptStep):
            continue
        for vname, attr in (
            ("environmentVariables", "environment_variables"),
            ("outputVariables", "output_variables"),
        ):
            names: set[str] = set()
            for vi, var in enumerate(getattr(step.spec, attr)):
                if var.name in names:
                    errs.add(
                        pipe.error(
                            f"duplicate variable '{var.name}'", (*tp, "spec", vname, vi, "name")
                        )
                    )
                names.add(var.name)


def check_variables(owner: Loaded, errs: Collector) -> None:
    base: tuple[str, ...]
    if owner.kind == "Pipeline":
        variables, base = owner.model.spec.variables, ("spec", "variables")
    elif owner.kind == "Service":
        variables = owner.model.spec.service_definition.spec.variables
        base = ("spec", "serviceDefinition", "spec", "variables")
    else:
        variables, base = owner.model.spec.variables, ("spec", "variables")
    seen: set[str] = set()
    for i, v in enumerate(variables):
        if v.name in seen:
            errs.add(owner.error(f"duplicate variable '{v.name}'", (*base, i, "name")))
        seen.add(v.name)


def _choose_infrastructures(
    bundle: Bundle,
    pipe: Loaded,
    st: m.StageSpec,
    sp: tuple[str | int, ...],
    errs: Collector,
    *,
    note: str = "",
) -> None:
    """``deployToAll: true``: every infrastructure of the environment; neither it nor a list:
    the environment's only infrastructure. Fills ``infrastructure_definitions`` in place."""
    target = st.spec.environment
    at = (*sp, "spec", "environment")
    if target.environment_ref not in bundle.environments:
        return  # reported above
    mine = sorted(
        i
        for i, inf in bundle.infrastructures.items()
        if inf.model.spec.environment_ref == target.environment_ref
    )
    if target.deploy_to_all:
        if target.infrastructure_definitions:
            errs.add(
                pipe.error(
                    "deployToAll: true deploys to every infrastructure of the "
                    "environment: leave infrastructureDefinitions out, or set "
                    "deployToAll: false" + note,
                    (*at, "deployToAll"),
                )
            )
        elif not mine:
            errs.add(
                pipe.error(
                    f"deployToAll: environment '{target.environment_ref}' has no "
                    "infrastructure in the given files" + note,
                    (*at, "deployToAll"),
                )
            )
        else:
            target.infrastructure_definitions = [m.InfraRef(identifier=i) for i in mine]
        return
    if target.infrastructure_definitions:
        return
    if len(mine) == 1:
        target.infrastructure_definitions = [m.InfraRef(identifier=mine[0])]
        return
    which = f"it has {len(mine)}: {', '.join(mine)}" if mine else "it has none in the given files"
    errs.add(
        pipe.error(
            f"the stage names no infrastructure of environment "
            f"'{target.environment_ref}' and {which}: list them under "
            "infrastructureDefinitions, or set deployToAll: true" + note,
            at,
        )
    )
