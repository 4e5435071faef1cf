"""The ElbV2 traffic spec: what is refused at load. The switch against moto is in
tests/cloud/test_traffic_elbv2.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.errors import SpecError
from app.traffic import traffic_switch_from_spec

REGION = "us-east-1"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "AwsElbV2", "region": REGION}, "needs targetGroupArn"),
        ({"type": "AwsElbV2", "region": REGION, "targetGroupARN": "x"}, "does not take"),
        ({"type": "AwsElbV2", "region": "", "targetGroupArn": "x"}, "non-empty string"),
        (
            {"type": "AwsElbV2", "region": REGION, "targetGroupArn": "x", "timeout": 0},
            "positive number",
        ),
    ],
)
def test_bad_elb_specs_are_spec_errors(
    spec: dict[str, object], message: str, tmp_path: Path
) -> None:
    with pytest.raises(SpecError, match=message):
        traffic_switch_from_spec(spec, state_dir=tmp_path)
