"""Blue-green on the lab with traffic in an AWS ELBv2 target group: moto server on 127.0.0.1
stands in for AWS (boto3 with endpoint_url, fake credentials); the hosts are real sshd hosts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tests.cloud.test_traffic_elbv2 import (  # noqa: F401  (moto_url is a fixture)
    client,
    moto_url,
    registered,
    target_group,
)
from tests.conftest import DATA, base_env, run_vmfarm

STRAT = DATA / "strategies"


def test_blue_green_registers_and_deregisters_the_right_targets(
    lab8: Any,
    moto_url: str,  # noqa: F811  (fixture)
    tmp_path: Path,
) -> None:
    arn = target_group(moto_url, target_type="ip")
    env = base_env(
        VMFARM_HOME=str(tmp_path / "home"),
        **{k: v for k, v in os.environ.items() if k.startswith("AWS_")},
    )
    files = [
        str(STRAT / "service.yaml"),
        str(STRAT / "bluegreen-aws.yaml"),
        str(lab8.infrastructure_file),
    ]
    blue = [f"{h.address}:8080" for h in lab8.hosts[:4]]
    green = [f"{h.address}:8080" for h in lab8.hosts[4:]]

    def run(tag: str) -> dict[str, Any]:
        res = run_vmfarm(
            "run",
            *files,
            "--set",
            f"tag={tag}",
            "--set",
            f"target_group={arn}",
            "--set",
            f"aws_endpoint={moto_url}",
            "-o",
            "json",
            env=env,
            timeout=300,
        )
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr
        return dict(json.loads(res.stdout))

    # The first deployment goes to green, and green's targets are registered
    run("1.0.0")
    assert registered(moto_url, arn) == sorted(green)
    # The next one goes to blue: blue registered, green deregistered
    report = run("2.0.0")
    assert registered(moto_url, arn) == sorted(blue)
    switch = next(p for p in report["stages"][0]["phases"] if p["kind"] == "switch")
    result = switch["verdict"]["result"]
    assert sorted(result["added"]) == sorted(blue) and sorted(result["removed"]) == sorted(green)
    assert (
        client(moto_url, "elbv2").describe_target_groups(TargetGroupArns=[arn])["TargetGroups"][0][
            "TargetType"
        ]
        == "ip"
    )
