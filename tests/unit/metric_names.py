"""What vmfarm exports and what PromQL asks for: shared by the tests of the alert rules and of
the Grafana dashboard (both must only name metrics that exist)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_NAME = re.compile(r"\b(vmfarm_[a-z0-9_]+)\b")
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
    "summary": ("", "_sum", "_count"),
}


def exported_names(home: Path) -> set[str]:
    """Every series name a vmfarm scrape can give, from the collector's families, in
    embedded mode with an empty ledger under ``home`` (a family is there without rows)."""
    from app.db import reset_engines
    from app.metrics import build_registry
    from app.settings import get_settings

    saved = {k: v for k, v in os.environ.items() if k.startswith("VMFARM_")}
    for key in saved:
        del os.environ[key]
    os.environ["VMFARM_HOME"] = str(home)
    get_settings.cache_clear()
    reset_engines()
    try:
        names: set[str] = set()
        for family in build_registry().collect():
            base = family.name.removesuffix("_total") if family.type == "counter" else family.name
            names.update(base + s for s in _SUFFIXES.get(family.type, ("",)))
        return names
    finally:
        del os.environ["VMFARM_HOME"]
        os.environ.update(saved)
        get_settings.cache_clear()
        reset_engines()


def promql_names(expr: str) -> set[str]:
    """The vmfarm metric names a PromQL expression names."""
    return set(_NAME.findall(expr))


def tool(name: str) -> str:
    """The path of a command-line tool; a missing one fails the test under CI=true (the CI
    installs it), else skips it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI must install it)")
        pytest.skip(message)
    return path
