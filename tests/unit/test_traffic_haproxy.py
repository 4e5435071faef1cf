"""The Local (HAProxy) traffic spec: what is refused at load. The switch on a real HAProxy is in
tests/service/test_traffic_haproxy.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.errors import SpecError
from app.traffic import traffic_switch_from_spec


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
