"""A field vmfarm accepts is carried out; one it does not carry out is refused at load, by name,
with the vmfarm way to write it (the user must never believe a setting took effect)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from app.definitions.loader import load
from app.errors import SpecError, SpecErrors

GOOD = Path(__file__).resolve().parents[1] / "data" / "good"

CASES = {
    "tailFiles": (
        "pipeline",
        "name: Prepare\n                        type: Script\n                        spec:\n",
        "name: Prepare\n                        type: Script\n"
        "                        spec:\n"
        "                          tailFiles: [{tailFile: /var/log/app.log, "
        "tailPattern: started}]\n",
        "tailFiles is not supported",
    ),
    "WinRM stage": (
        "pipeline",
        "deploymentType: Ssh",
        "deploymentType: WinRm",
        "deploymentType WinRm is not supported: vmfarm deploys over SSH",
    ),
    "WinRM infrastructure": (
        "infrastructure",
        "deploymentType: Ssh",
        "deploymentType: WinRm",
        "deploymentType WinRm is not supported",
    ),
    "WinRM service": (
        "service",
        "    type: SSH\n",
        "    type: WinRm\n",
        "deploymentType WinRm is not supported",
    ),
    "config files": (
        "service",
        "      variables:\n",
        "      configFiles:\n        - configFile: {name: app.conf}\n      variables:\n",
        "configFiles are not supported yet",
    ),
    "sidecar artifacts": (
        "service",
        "            tag: <+input>\n",
        "            tag: <+input>\n        sidecars:\n"
        "          - sidecar: {identifier: agent, type: Http}\n",
        "sidecar artifacts are not supported",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_setting_vmfarm_does_not_carry_out_is_refused_by_name(case: str, tmp_path: Path) -> None:
    stem, old, new, said = CASES[case]
    folder = tmp_path / "files"
    shutil.copytree(GOOD, folder)
    f = folder / f"{stem}.yaml"
    text = f.read_text()
    assert text.count(old) == 1, old
    f.write_text(text.replace(old, new))
    first = text.count("\n", 0, text.index(old)) + 1  # the changed lines start here
    with pytest.raises((SpecError, SpecErrors)) as info:
        load([folder], inputs={"tag": "1.0"}, require_inputs=True)
    errors = info.value.errors if isinstance(info.value, SpecErrors) else [info.value]
    (err,) = [e for e in errors if said in e.message]
    assert err.file.endswith(f"{stem}.yaml")
    assert first <= err.line <= first + new.count("\n"), (err.line, first)
