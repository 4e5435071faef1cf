"""Terraform steps of a Custom stage, in Harness's shape: TerraformPlan, TerraformApply,
TerraformDestroy and TerraformRollback. They run ``terraform`` (or ``tofu``) on the delegate
(app.execution.terraform); the state of each ``provisionerIdentifier`` is kept by vmfarm.

```yaml
- step:
    type: TerraformPlan
    name: Plan
    identifier: plan_infra
    spec:
      provisionerIdentifier: web_infra     # default: the step's identifier
      configuration:
        command: Apply                     # Apply | Destroy
        workspace: production
        configFiles:
          store:
            type: Git                      # Git (a Git connector) | Inline
            spec:
              connectorRef: infra_repo
              gitFetchType: Branch         # Branch | Commit
              branch: main
              folderPath: terraform/
        varFiles:
          - varFile:
              type: Inline
              spec: {content: 'app_name = "web"'}
- step:
    type: TerraformApply
    name: Apply
    identifier: apply_infra
    spec:
      provisionerIdentifier: web_infra
      configuration: {type: InheritFromPlan}
```

A field of Harness's Terraform steps that vmfarm does not carry out is refused by name here,
never ignored.
"""

from __future__ import annotations

import posixpath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationInfo, model_validator

from app.definitions.base import DelegateTag, Identifier, Model
from app.definitions.models.steps import StepVariable, _StepBase

# Harness's fields vmfarm does not carry out, and why (the message names the field).
_REFUSED = {
    "secret_manager_ref": "is not supported: vmfarm keeps the saved plan in its own Terraform "
    "folder on the delegate (VMFARM_TERRAFORM_DIR, mode 0700), not encrypted with a secret "
    "manager; remove it",
    "backend_config": "is not supported: vmfarm keeps each provisionerIdentifier's state "
    "itself (a local backend in VMFARM_TERRAFORM_DIR); remove it, and any backend block of "
    "the configuration",
    "export_terraform_plan_json": "is not supported: the plan is shown in the step's log "
    "(terraform show); remove it",
    "export_terraform_human_readable_plan": "is not supported: the plan is shown in the "
    "step's log (terraform show); remove it",
    "command_flags": "is not supported: vmfarm runs terraform with its own flags "
    "(-input=false, the saved plan); remove it",
    "module_source": "is not supported: modules are fetched by terraform init from the "
    "configuration's own sources; remove it",
    "is_terraform_cloud_cli": "is not supported: vmfarm runs the terraform CLI with a local "
    "backend; remove it",
    "skip_terraform_refresh": "is not supported: write skipRefreshCommand: true",
    "encrypt_output": "is not supported: sensitive outputs are masked and never stored; remove it",
}


def _refuse(v: Any, info: ValidationInfo) -> Any:
    if v is not None:
        name = info.field_name or ""
        raise ValueError(f"{_camel(name)} {_REFUSED[name]}")
    return v


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


# A Harness field refused by name (not listed among the allowed fields of unknown-field
# messages).
Refused = Annotated[Any, AfterValidator(_refuse), Field(json_schema_extra={"refused": True})]


def _relative(v: str) -> str:
    """A path inside the configuration folder: relative, no '..'."""
    norm = posixpath.normpath(v.strip())
    if not v.strip() or norm.startswith(("/", "..")) or norm == ".":
        raise ValueError(f"{v!r} must be a relative path inside the folder (no '/' or '..')")
    return norm


RelativePath = Annotated[str, AfterValidator(_relative)]


class GitStoreSpec(Model):
    """Files from a Git repository: its Git connector (``connectorRef``; with a connector of
    connectionType Account, ``repoName`` under its url), a branch or a commit, and the folder
    (config files) or the files (var files) in it. Without connectorRef, the files' one Git
    connector is used (none or several: an error)."""

    connector_ref: str | None = None
    repo_name: str | None = None
    git_fetch_type: Literal["Branch", "Commit"] = "Branch"
    branch: str | None = None
    commit_id: str | None = None
    folder_path: str | None = None
    paths: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _ref(self) -> GitStoreSpec:
        if self.git_fetch_type == "Branch" and (not self.branch or self.commit_id):
            raise ValueError("gitFetchType Branch takes branch (and no commitId)")
        if self.git_fetch_type == "Commit" and (not self.commit_id or self.branch):
            raise ValueError("gitFetchType Commit takes commitId (and no branch)")
        for p in [self.folder_path or "", *self.paths]:
            if p.strip().startswith("..") or "/../" in f"/{p.strip()}/":
                raise ValueError(f"path {p!r} must stay inside the repository (no '..')")
        return self


class GitStore(Model):
    type: Literal["Git"]
    spec: GitStoreSpec


class InlineFile(Model):
    name: RelativePath
    content: str


class InlineStoreSpec(Model):
    files: list[InlineFile] = Field(min_length=1)


class InlineStore(Model):
    """vmfarm's own store: the configuration written in the pipeline file.

    ```yaml
    store:
      type: Inline
      spec:
        files:
          - name: main.tf
            content: |
              output "hosts" { value = ["127.0.0.1"] }
    ```
    """

    type: Literal["Inline"]
    spec: InlineStoreSpec


ConfigStore = Annotated[GitStore | InlineStore, Field(discriminator="type")]


class ConfigFiles(Model):
    store: ConfigStore
    module_source: Refused = None

    @model_validator(mode="after")
    def _folder(self) -> ConfigFiles:
        if isinstance(self.store, GitStore) and self.store.spec.paths:
            raise ValueError(
                "config files are a folder: write store.spec.folderPath (paths are for varFiles)"
            )
        return self


class InlineVarFileSpec(Model):
    content: str


class InlineVarFile(Model):
    identifier: str | None = None
    type: Literal["Inline"]
    spec: InlineVarFileSpec


class RemoteVarFileSpec(Model):
    store: GitStore

    @model_validator(mode="after")
    def _paths(self) -> RemoteVarFileSpec:
        if not self.store.spec.paths or self.store.spec.folder_path:
            raise ValueError("a Remote var file's store names its files in paths (a list)")
        return self


class RemoteVarFile(Model):
    identifier: str | None = None
    type: Literal["Remote"]
    spec: RemoteVarFileSpec


class VarFileElement(Model):
    var_file: Annotated[InlineVarFile | RemoteVarFile, Field(discriminator="type")]


class _Configuration(Model):
    """What the Inline configurations and the plan share."""

    workspace: str | None = None
    config_files: ConfigFiles
    var_files: list[VarFileElement] = Field(default_factory=list)
    environment_variables: list[StepVariable] = Field(default_factory=list)
    targets: list[str] = Field(default_factory=list)
    skip_refresh_command: bool = False
    backend_config: Refused = None
    secret_manager_ref: Refused = None
    command_flags: Refused = None
    is_terraform_cloud_cli: Refused = None
    skip_terraform_refresh: Refused = None
    encrypt_output: Refused = None


class PlanConfiguration(_Configuration):
    command: Literal["Apply", "Destroy"]
    export_terraform_plan_json: Refused = None
    export_terraform_human_readable_plan: Refused = None


class TerraformPlanSpec(Model):
    provisioner_identifier: Identifier | None = None
    configuration: PlanConfiguration
    delegate_selectors: list[DelegateTag] = Field(default_factory=list)


class TerraformPlanStep(_StepBase):
    """``terraform plan`` saved to a plan file under its provisionerIdentifier, for a later
    TerraformApply (or TerraformDestroy) with ``configuration: {type: InheritFromPlan}`` in
    the same execution to apply exactly as planned. The plan is shown in the step's log."""

    type: Literal["TerraformPlan"]
    spec: TerraformPlanSpec

    @property
    def provisioner(self) -> str:
        """The provisionerIdentifier (the step's identifier when none is written)."""
        return self.spec.provisioner_identifier or self.identifier


class InlineConfiguration(Model):
    type: Literal["Inline", "InheritFromPlan", "InheritFromApply"]
    spec: _Configuration | None = None

    @model_validator(mode="after")
    def _spec(self) -> InlineConfiguration:
        if self.type == "Inline" and self.spec is None:
            raise ValueError("configuration type Inline needs spec (configFiles, varFiles...)")
        if self.type != "Inline" and self.spec is not None:
            raise ValueError(
                f"configuration type {self.type} takes no spec: it uses what the "
                f"{'plan' if self.type == 'InheritFromPlan' else 'last apply'} used"
            )
        return self


class TerraformApplySpec(Model):
    provisioner_identifier: Identifier
    configuration: InlineConfiguration
    delegate_selectors: list[DelegateTag] = Field(default_factory=list)


class TerraformApplyStep(_StepBase):
    """``InheritFromPlan``: ``terraform apply PLANFILE``, the plan that the TerraformPlan step
    of this provisionerIdentifier saved in this execution (a plan whose state moved on since
    is refused by terraform: nothing else is applied). ``Inline``: plan and apply its own
    configuration. Outputs (``terraform output``) become the step's outputs."""

    type: Literal["TerraformApply"]
    spec: TerraformApplySpec

    @model_validator(mode="after")
    def _kinds(self) -> TerraformApplyStep:
        if self.spec.configuration.type == "InheritFromApply":
            raise ValueError(
                "a TerraformApply's configuration is Inline or InheritFromPlan "
                "(InheritFromApply is for TerraformDestroy)"
            )
        return self


class TerraformDestroyStep(_StepBase):
    """``terraform destroy`` of the provisionerIdentifier's resources: Inline (its own
    configuration), InheritFromPlan (a plan with command Destroy) or InheritFromApply (the
    configuration that the provisionerIdentifier's last apply used)."""

    type: Literal["TerraformDestroy"]
    spec: TerraformApplySpec


class TerraformRollbackSpec(Model):
    provisioner_identifier: Identifier
    delegate_selectors: list[DelegateTag] = Field(default_factory=list)
    skip_refresh_command: bool = False


class TerraformRollbackStep(_StepBase):
    """Undo what this execution applied to the provisionerIdentifier: apply again the
    configuration of the last apply before this execution (its state comes back), or, when
    there was none, destroy what this execution created."""

    type: Literal["TerraformRollback"]
    spec: TerraformRollbackSpec


TERRAFORM_STEP_TYPES = ("TerraformPlan", "TerraformApply", "TerraformDestroy", "TerraformRollback")
