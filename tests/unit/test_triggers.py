"""Webhook triggers without a server: the document (what loads, what is refused by name with
file:line and the field), signatures, conditions, delivery ids and the inputs a delivery
fills (its values stay values: nothing in a payload changes the input set's shape)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.errors import SpecError, SpecErrors
from app.triggers import DeliveryError, delivery_id, inputs_of, load_text, signature, signed, unmet

DATA = Path(__file__).resolve().parents[1] / "data" / "triggers"
GOOD = (DATA / "on_publish.yaml").read_text()
HEADERS = {"x-build-event": "published"}


def trigger():  # type: ignore[no-untyped-def]
    return load_text(GOOD, "on_publish.yaml")[0]


def errors_of(text: str) -> list[SpecError]:
    with pytest.raises((SpecError, SpecErrors)) as info:
        load_text(text, "t.yaml")
    exc = info.value
    return exc.errors if isinstance(exc, SpecErrors) else [exc]  # type: ignore[union-attr]


def test_harness_trigger_loads_with_its_pipeline_secret_and_conditions() -> None:
    t = trigger()
    assert (t.id, t.pipeline, t.secret_ref) == ("on_publish", "webhook_deploy", "publish_hook")
    assert [(where, c.operator) for where, c in t.conditions] == [
        ("payload", "Equals"),
        ("header", "In"),
    ]
    assert t.source == "on_publish.yaml:4"


@pytest.mark.parametrize(
    ("old", "new", "field", "says"),
    [
        (
            "type: Webhook",
            "type: Artifact",
            "trigger.source.spec.type",
            "Custom artifact trigger is not supported",
        ),
        ("type: Webhook", "type: Scheduled", "trigger.source.type", "vmfarm run --pipeline"),
        ("type: Custom", "type: Github", "trigger.source.spec.type", "X-GitHub-Event"),
        (
            "        payloadConditions:",
            "        jexlCondition: <+trigger.payload.a> == 1\n        payloadConditions:",
            "trigger.source.spec.spec.jexlCondition",
            "jexlCondition is not supported",
        ),
        (
            "  enabled: true",
            "  enabled: true\n  inputSetRefs: [prod]",
            "trigger.inputSetRefs",
            "inputSetRefs is not supported",
        ),
        (
            "  encryptedWebhookSecretIdentifier: publish_hook\n",
            "",
            "trigger.encryptedWebhookSecretIdentifier",
            "required",
        ),
        (
            "<+trigger.payload.branch>",
            "<+trigger.body.branch>",
            "trigger.source.spec.spec.payloadConditions[0].key",
            "not a trigger value",
        ),
        ("operator: Equals", "operator: Like", "payloadConditions[0].operator", "Equals"),
    ],
)
def test_what_vmfarm_does_not_carry_out_is_refused_by_name_with_its_line(
    old: str, new: str, field: str, says: str
) -> None:
    assert old in GOOD
    errs = errors_of(GOOD.replace(old, new, 1))
    hit = [e for e in errs if field in e.field]
    assert hit, [str(e) for e in errs]
    assert says in str(hit[0])
    assert hit[0].file == "t.yaml" and hit[0].line > 1


def test_input_yaml_errors_name_the_line_inside_the_block() -> None:
    bad = GOOD.replace("<+trigger.payload.release.version>", "<+trigger.payload.release.version")
    (err,) = errors_of(bad)
    lines = bad.splitlines()
    assert "unterminated" in err.message
    assert "<+trigger.payload.release.version" in lines[err.line - 1]


def test_signature_is_the_hmac_of_the_exact_body() -> None:
    body = b'{"version": "1.2.3"}'
    good = signature("s3cret", body)
    assert good.startswith("sha256=") and signed("s3cret", body, good)
    assert not signed("s3cret", body + b" ", good)  # the body changed
    assert not signed("other", body, good)  # another secret
    assert not signed("s3cret", body, None)  # no header
    assert not signed("s3cret", body, good.replace("sha256=", "sha1="))
    assert not signed("", body, signature("", body))  # an empty secret signs nothing


def test_delivery_id_from_its_header_else_the_body() -> None:
    assert delivery_id({"x-github-delivery": "abc"}, b"{}") == "abc"
    assert delivery_id({"x-delivery-id": "d-1"}, b"{}") == "d-1"
    one, two = delivery_id({}, b'{"a": 1}'), delivery_id({}, b'{"a": 2}')
    assert one.startswith("sha256:") and one != two and one == delivery_id({}, b'{"a": 1}')


@pytest.mark.parametrize(
    ("operator", "value", "actual", "holds"),
    [
        ("Equals", "main", "main", True),
        ("Equals", "main", "mainline", False),
        ("NotEquals", "main", "dev", True),
        ("In", "main, release", "release", True),
        ("NotIn", "main, release", "dev", True),
        ("NotIn", "main, release", "main", False),
        ("StartsWith", "release/", "release/2.0", True),
        ("EndsWith", "-rc", "2.0-rc", True),
        ("Contains", "hot", "a-hotfix", True),
        ("DoesNotContain", "hot", "a-hotfix", False),
        ("Regex", r"^v\d+\.\d+$", "v2.10", True),
        ("Regex", r"^v\d+\.\d+$", "v2.10-rc", False),
        ("Regex", "(a+)+$", "a" * 5000 + "b", False),  # RE2: no catastrophic backtracking
    ],
)
def test_conditions(operator: str, value: str, actual: str, holds: bool) -> None:
    text = GOOD.replace("operator: Equals", f"operator: {operator}").replace(
        "value: main", f"value: {json.dumps(value)}"
    )
    t = load_text(text, "t.yaml")[0]
    reason = unmet(t, {"branch": actual}, HEADERS)
    assert (reason is None) is holds, reason


def test_a_condition_on_an_absent_value_or_header_does_not_hold() -> None:
    t = trigger()
    assert "absent" in (unmet(t, {}, HEADERS) or "")
    assert "X-Build-Event" in (unmet(t, {"branch": "main"}, {}) or "")
    assert unmet(t, {"branch": "main"}, HEADERS) is None


def test_inputs_come_from_the_payload_as_runtime_inputs() -> None:
    t = trigger()
    got = inputs_of(t.body.input_yaml, {"release": {"version": "1.4.2"}}, {}, source="x")
    assert got == {"pipeline.webhook_deploy.variables.version": "1.4.2"}


@pytest.mark.parametrize(
    "hostile",
    [
        "1.0\n        - name: other\n          value: x",
        "1.0'; rm -rf / #",
        "$(touch /tmp/pwned)",
        '<+secrets.getValue("db")>',
        "{a: 1}",
    ],
)
def test_a_payload_value_stays_one_value(hostile: str) -> None:
    t = trigger()
    got = inputs_of(t.body.input_yaml, {"release": {"version": hostile}}, {}, source="x")
    assert got == {"pipeline.webhook_deploy.variables.version": hostile}


def test_a_missing_or_structured_payload_value_is_refused() -> None:
    t = trigger()
    with pytest.raises(DeliveryError, match=r"no value for <\+trigger\.payload\.release\.version>"):
        inputs_of(t.body.input_yaml, {"release": {}}, {}, source="x")
    with pytest.raises(DeliveryError, match="is a JSON dict"):
        inputs_of(t.body.input_yaml, {"release": {"version": {"a": 1}}}, {}, source="x")
