"""Blue-green traffic switching: ``TrafficSwitch`` and its implementations.

``HAProxySwitch`` (``app.traffic.haproxy``) and ``ElbV2Switch`` (``app.traffic.elbv2``) are
imported lazily by ``traffic_switch_from_spec`` so that loading this package needs neither
HAProxy nor boto3.
"""

from __future__ import annotations

from app.traffic.base import HostIds, SwitchResult, TrafficSwitch, traffic_switch_from_spec

__all__ = ["HostIds", "SwitchResult", "TrafficSwitch", "traffic_switch_from_spec"]
