"""Outputs across stages on the lab (embedded): a later stage's step reads, on every host, that
host's own output from an earlier stage, every host's as a list, and the delegate's output
of a Custom stage (tests/data/stage_outputs/pipeline.yaml)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import DATA, base_env, run_vmfarm


def test_a_later_stage_reads_each_hosts_output_the_list_of_them_and_the_delegates(
    lab: Any, tmp_path: Path
) -> None:
    env = base_env(VMFARM_HOME=str(tmp_path / "home"))
    res = run_vmfarm(
        "run",
        str(DATA / "rollback" / "service.yaml"),
        str(DATA / "stage_outputs" / "pipeline.yaml"),
        str(lab.infrastructure_file),
        "--set",
        "tag=1.0",
        "-o",
        "json",
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    report = json.loads(res.stdout)
    names = [h["host"] for h in report["stages"][0]["hosts"]]
    assert len(names) == 6

    def on(host: Any, name: str) -> str:
        return (Path(host.host_dir) / "opt" / "xs" / name).read_text().strip()

    tokens = set()
    for h in lab.hosts:
        # Then each host got its own value from stage first
        assert on(h, "who") == f"seen-{h.address}"
        # and all of them as a JSON list, in stage first's host order
        assert json.loads(on(h, "all")) == [f"seen-{n}" for n in names]
        tokens.add(on(h, "token"))
    # and the one value the Custom stage's delegate recorded
    assert tokens == {f"tok-{report['id']}"}


def test_a_host_whose_earlier_step_did_not_run_fails_naming_the_hosts_that_have_a_value(
    lab: Any, tmp_path: Path
) -> None:
    # Given stage first's step runs on the first host only (its when)
    first = lab.hosts[0].address
    text = (DATA / "stage_outputs" / "pipeline.yaml").read_text()
    anchor = "                  identifier: mark\n"
    assert text.count(anchor) == 1
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        text.replace(
            anchor,
            f"{anchor}                  when: {{stageStatus: Success, condition: '<+instance.hostName> == \"{first}\"'}}\n",
        )
    )
    env = base_env(VMFARM_HOME=str(tmp_path / "home"))
    res = run_vmfarm(
        "run",
        str(DATA / "rollback" / "service.yaml"),
        str(pipeline),
        str(lab.infrastructure_file),
        "--set",
        "tag=1.0",
        "-o",
        "json",
        env=env,
        timeout=300,
    )
    # Then stage second fails on the other hosts, saying which host has a value and how to
    # read them all; the first host read its own
    assert res.returncode == 1, res.stdout[-3000:]
    report = json.loads(res.stdout)
    second = report["stages"][2]
    errors = {
        h["host"]: next(s for s in h["steps"] if s["step"] == "use").get("error") or ""
        for h in second["hosts"]
        if h["status"] == "FAILED"
    }
    assert errors, second
    assert first not in errors
    for host, error in errors.items():
        assert (
            f"<+pipeline.stages.first.spec.execution.steps.mark.output.outputVariables.who> has "
            f"no value for host {host}: step mark of stage first recorded who on 1 host(s) "
            f"({first}), not on this one; <+pipeline.stages.first.spec.execution.steps.mark."
            "output.outputVariables.who.list> gathers them all"
        ) in error
