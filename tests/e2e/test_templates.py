"""`vmfarm plan` of the templated pipeline with an input set matches the inline pipeline with
--set values (tests/data/templates), as a user runs it. The loader's side of templates and
input sets is in tests/unit/test_templates.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.definitions.bundle import Bundle
from app.definitions.loader import choose_pipeline, load
from app.definitions.resolve import resolve
from tests.unit.test_spec import GOOD

DATA = Path(__file__).resolve().parents[1] / "data"
TPL = DATA / "templates"
COMMON = [GOOD / "service.yaml", GOOD / "environment.yaml", GOOD / "infrastructure.yaml"]
# What the input set inputs/prod.yaml gives, as --set values for the inline pipeline.
SETS = {
    "release_note": "second release",
    "tag": "1.10",
    "CHANNEL": "beta",
    "destinationPath": "/srv/hello/incoming",
    "PORT": "9090",
}


def templated(
    root: Path = TPL, inputs: dict[str, str] | None = None, *, require: bool = True
) -> Bundle:
    return load(
        [*COMMON, root / "templates", root / "templated"],
        inputs=inputs or {},
        require_inputs=require,
    )


def plan(bundle: Bundle) -> dict[str, Any]:
    return resolve(bundle, choose_pipeline(bundle, None), execution_id="EX1")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- the same plan, written with templates or inline --------------------------------------------


# --- input sets ---------------------------------------------------------------------------------


# --- refusals: file:line and field of what to change --------------------------------------------


def test_vmfarm_plan_with_inputs_matches_the_inline_pipeline_with_set(tmp_path: Path) -> None:
    """The same comparison through the command a user types: `--inputs FILE` and `--set`."""
    from tests.conftest import base_env, run_vmfarm

    env = base_env(VMFARM_HOME=str(tmp_path / "home"))
    files = [str(p) for p in COMMON]
    got = run_vmfarm(
        "plan",
        *files,
        str(TPL / "templates"),
        str(TPL / "templated"),
        "--inputs",
        str(TPL / "inputs" / "prod.yaml"),
        "-o",
        "json",
        env=env,
    )
    sets = [a for k, v in SETS.items() for a in ("--set", f"{k}={v}")]
    want = run_vmfarm("plan", *files, str(TPL / "inline"), *sets, "-o", "json", env=env)
    assert got.returncode == 0 and want.returncode == 0, got.stderr + want.stderr
    assert json.loads(got.stdout) == json.loads(want.stdout)
    # --set wins over the input set
    tagged = run_vmfarm(
        "plan",
        *files,
        str(TPL / "templates"),
        str(TPL / "templated"),
        "--inputs",
        str(TPL / "inputs" / "prod.yaml"),
        "--set",
        "tag=2.0",
        "-o",
        "json",
        env=env,
    )
    assert json.loads(tagged.stdout)["stages"][0]["version"] == "2.0"
    # a broken input set is bad input: exit 2 naming the file
    bad = write(tmp_path / "bad.yaml", "inputSet: [not, a, mapping]\n")
    res = run_vmfarm(
        "plan",
        *files,
        str(TPL / "templates"),
        str(TPL / "templated"),
        "--inputs",
        str(bad),
        env=env,
    )
    assert res.returncode == 2 and "bad.yaml:1" in res.stderr, res.stderr
