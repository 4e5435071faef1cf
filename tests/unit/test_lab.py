"""The local lab's input checks, refused before anything starts. Real lab hosts are in
tests/lab/test_lab.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.errors import LabError
from app.lab import lab_down, lab_up


@pytest.fixture
def lab_root(tmp_path: Path) -> Iterator[Path]:
    """A lab root for one test; whatever lab the test starts there is stopped afterwards."""
    root = tmp_path / "lab"
    yield root
    lab_down(root=root)


def test_up_rejects_hosts_beyond_the_subnet(lab_root: Path) -> None:
    with pytest.raises(LabError, match="do not fit"):
        lab_up(10, root=lab_root, first=250, sandbox=True)
