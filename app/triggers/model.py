"""Webhook triggers: Harness's ``trigger:`` document, as Harness writes it.

A trigger names a stored pipeline (the server's registry), the secret that signs its
deliveries, conditions on the payload and the headers, and the runtime inputs it fills from
the payload (``inputYaml``, an input set in Harness's shape whose values may read
``<+trigger.payload.PATH>`` and ``<+trigger.header['NAME']>``)::

    apiVersion: v1                  # optional, as is kind
    kind: Trigger
    trigger:
      name: Deploy on publish
      identifier: on_publish
      enabled: true
      pipelineIdentifier: deploy_web
      encryptedWebhookSecretIdentifier: publish_hook   # a secret's id: signs the deliveries
      source:
        type: Webhook
        spec:
          type: Custom
          spec:
            payloadConditions:
              - key: <+trigger.payload.branch>
                operator: Equals                # Equals NotEquals In NotIn StartsWith EndsWith
                value: main                     # Contains DoesNotContain Regex
            headerConditions:
              - key: <+trigger.header['X-Build-Event']>
                operator: Equals
                value: published
      inputYaml: |
        pipeline:
          identifier: deploy_web
          variables:
            - name: tag
              type: String
              value: <+trigger.payload.version>

The second kind, ``source: {type: Artifact, ...}``, polls a repository for new builds
(``app.triggers.artifact``): it has no secret and takes no delivery.

What vmfarm does not carry out is refused at load by name (never ignored): webhook types other
than ``Custom`` (``Github``/``Gitlab``/``Bitbucket`` webhooks read their repository through a
connector), ``Scheduled`` and ``Manifest`` triggers, ``jexlCondition``, ``inputSetRefs``,
``stagesToExecute``, ``pipelineBranchName``. A webhook trigger without a secret is refused: an
unsigned delivery could start a deployment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator

from app.definitions.base import Identifier, Model
from app.triggers.artifact import ArtifactSource, Operator, refused


class Condition(Model):
    key: str
    operator: Operator
    value: str

    @field_validator("value", mode="before")
    @classmethod
    def _text(cls, v: Any) -> Any:
        return str(v).lower() if isinstance(v, bool) else (str(v) if isinstance(v, int) else v)

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        from app.triggers.webhook import parse_key

        parse_key(v)  # ValueError saying how to write it
        return v


class PayloadCondition(Condition):
    pass


class HeaderCondition(Condition):
    pass


class CustomWebhook(Model):
    payload_conditions: list[PayloadCondition] = Field(default_factory=list)
    header_conditions: list[HeaderCondition] = Field(default_factory=list)
    jexl_condition: Annotated[
        str | None,
        refused(
            "jexlCondition",
            "write the conditions as payloadConditions and headerConditions (all must hold)",
        ),
    ] = None


class WebhookSource(Model):
    type: Literal["Custom"] = Field(
        description="Github, Gitlab and Bitbucket webhooks are refused: see the module docstring"
    )
    spec: CustomWebhook = Field(default_factory=CustomWebhook)

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, v: Any) -> Any:
        if v in ("Github", "Gitlab", "Bitbucket", "AzureRepo", "AwsCodeCommit", "Harness"):
            raise ValueError(
                f"a {v} webhook trigger is not supported (it reads its repository through a "
                "connector): use type: Custom, point the repository's webhook at "
                "/api/v1/webhooks/<trigger id> with the trigger's secret, and write its "
                "filters as payloadConditions and headerConditions "
                "(e.g. key: <+trigger.header['X-GitHub-Event']>, value: push)"
            )
        return v


class Source(Model):
    type: Literal["Webhook"]
    spec: WebhookSource

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, v: Any) -> Any:
        if v in ("Manifest", "Scheduled", "MultiRegionArtifact"):
            raise ValueError(
                f"a {v} trigger is not supported: vmfarm starts pipelines from signed webhooks "
                "(type: Webhook) and new builds in a repository (type: Artifact); "
                "run `vmfarm run --pipeline ID` from a scheduler"
            )
        return v


class _Body(Model):
    name: str
    identifier: Identifier
    enabled: bool = True
    description: str | None = None
    tags: dict[str, Any] = Field(default_factory=dict)
    # One organisation and project in vmfarm: accepted, as a freeze accepts them.
    org_identifier: str | None = None
    project_identifier: str | None = None
    pipeline_identifier: Identifier
    input_yaml: str | None = None
    input_set_refs: Annotated[
        list[Any],
        refused(
            "inputSetRefs",
            "write the inputs in inputYaml (the trigger's own input set)",
        ),
    ] = Field(default_factory=list)
    stages_to_execute: Annotated[
        list[Any],
        refused("stagesToExecute", "a trigger runs the whole pipeline; write []"),
    ] = Field(default_factory=list)
    pipeline_branch_name: Annotated[
        str | None,
        refused(
            "pipelineBranchName",
            "pipelines come from the registry, not from a Git branch",
        ),
    ] = None


class TriggerBody(_Body):
    """A webhook trigger."""

    encrypted_webhook_secret_identifier: str = Field(
        min_length=1,
        description="the id of the secret that signs deliveries (X-Hub-Signature-256)",
    )
    source: Source

    @field_validator("encrypted_webhook_secret_identifier")
    @classmethod
    def _secret(cls, v: str) -> str:
        from app.secrets.errors import SecretError
        from app.secrets.refs import parse_id

        try:
            parse_id(v)
        except SecretError as exc:
            raise ValueError(str(exc)) from None
        return v


class ArtifactTriggerBody(_Body):
    """An artifact trigger: polled, so no secret."""

    source: ArtifactSource
    encrypted_webhook_secret_identifier: Annotated[
        str | None,
        refused(
            "encryptedWebhookSecretIdentifier",
            "an artifact trigger takes no deliveries (the server polls the repository)",
        ),
    ] = None


def _body_tag(v: Any) -> str:
    src = v.get("source") if isinstance(v, dict) else getattr(v, "source", None)
    kind = src.get("type") if isinstance(src, dict) else getattr(src, "type", None)
    return "artifact" if kind == "Artifact" else "webhook"


AnyTrigger = Annotated[
    Annotated[TriggerBody, Tag("webhook")] | Annotated[ArtifactTriggerBody, Tag("artifact")],
    Discriminator(_body_tag),
]


class TriggerSpec(Model):
    """A trigger document: Harness's ``trigger:`` (``kind: Trigger``, ``apiVersion`` optional)."""

    api_version: Literal["v1"] | None = None
    kind: Literal["Trigger"] | None = None
    trigger: AnyTrigger


@dataclass(frozen=True)
class Trigger:
    """A loaded trigger and where it was written (``file:line``)."""

    body: TriggerBody | ArtifactTriggerBody
    source: str
    pipeline_line: int = 0  # where pipelineIdentifier is written
    connector_line: int = 0  # where an artifact trigger's connectorRef is written

    @property
    def kind(self) -> Literal["webhook", "artifact"]:
        return "artifact" if isinstance(self.body, ArtifactTriggerBody) else "webhook"

    @property
    def id(self) -> str:
        return self.body.identifier

    @property
    def pipeline(self) -> str:
        return self.body.pipeline_identifier

    @property
    def secret_ref(self) -> str:
        assert isinstance(self.body, TriggerBody), "an artifact trigger has no secret"
        return self.body.encrypted_webhook_secret_identifier

    @property
    def artifact(self) -> Any:
        """An artifact trigger's source (``S3Artifact`` ...; ``app.triggers.artifact``)."""
        assert isinstance(self.body, ArtifactTriggerBody), "a webhook trigger polls nothing"
        return self.body.source.spec

    @property
    def conditions(self) -> list[tuple[str, Condition]]:
        if not isinstance(self.body, TriggerBody):
            return []
        spec = self.body.source.spec.spec
        return [("payload", c) for c in spec.payload_conditions] + [
            ("header", c) for c in spec.header_conditions
        ]


def load_text(text: str, file: str) -> list[Trigger]:
    """The triggers of one file (every document must be a trigger). Raises SpecError(s)
    naming the file, line and field; the inputYaml is checked as an input set here too."""
    from app.definitions.bundle import Collector
    from app.definitions.validation import validate
    from app.definitions.yamlload import load_documents

    errs = Collector()
    out: list[Trigger] = []
    for doc in load_documents(text, file):
        spec = validate(doc, (), TriggerSpec, doc.data, errs)
        if spec is None:
            continue
        trig = Trigger(
            spec.trigger,
            f"{doc.file}:{doc.pos(('trigger',))[0]}",
            doc.pos(("trigger", "pipelineIdentifier"))[0],
            doc.pos(("trigger", "source", "spec", "spec", "connectorRef"))[0],
        )
        if spec.trigger.input_yaml is not None:
            from app.triggers.webhook import check_input_yaml

            line = doc.pos(("trigger", "inputYaml"))[0]
            try:
                check_input_yaml(
                    spec.trigger.input_yaml,
                    file,
                    line,
                    allowed=("artifact",) if trig.kind == "artifact" else ("payload", "header"),
                )
            except Exception as exc:
                from app.errors import SpecError, SpecErrors

                if isinstance(exc, SpecErrors | SpecError):
                    errs.absorb(exc)
                else:
                    raise
        out.append(trig)
    errs.raise_if_any()
    return out
