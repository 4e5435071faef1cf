"""The Local (HAProxy) traffic spec: what is refused at load. The switch on a real HAProxy is in
tests/service/test_traffic_haproxy.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.errors import SpecError
from app.traffic import traffic_switch_from_spec
from tests.alloc import Allocator

# Set by the module's `backends` fixture from its leases: "address:port" of each server.
V1: list[str] = []
V2: list[str] = []
NOBODY = ""  # a leased address:port where nothing listens


def alive(pid: int) -> bool:
    """Whether /proc still lists ``pid`` (a zombie counts: it must have been reaped)."""
    return Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="module")
def backends(alloc: Allocator) -> Iterator[None]:
    """Lease five addresses and a port for the module's backends (V1, V2, NOBODY)."""
    global NOBODY
    with alloc.addresses(5) as block, alloc.port() as port:
        at = [f"{address}:{port.port}" for address in block.addresses]
        V1[:], V2[:], NOBODY = at[0:2], at[2:4], at[4]
        yield


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "Nginx"}, "not known"),
        ({"type": "Local"}, "needs listen"),
        ({"type": "Local", "listen": "127.0.0.1:1", "port": 1}, "does not take port"),
        ({"type": "Local", "listen": "127.0.0.1:1", "name": "a b"}, "traffic name"),
        ({"type": "Local", "listen": "127.0.0.1:1", "mode": "udp"}, "http or tcp"),
        ({"type": "Local", "listen": "127.0.0.1:1", "healthCheckPath": "health"}, "a path"),
    ],
)
def test_bad_local_specs_are_spec_errors(
    spec: dict[str, object], message: str, tmp_path: Path
) -> None:
    with pytest.raises(SpecError, match=message):
        traffic_switch_from_spec(spec, state_dir=tmp_path)
