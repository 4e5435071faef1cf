"""Blue-green: deploy to the standby set, verify it, switch traffic to it.

```yaml
strategy:
  type: BlueGreen
  traffic: {type: Local, listen: "127.0.0.1:18080", port: 8080}
  verification: {healthCheck: {url: "http://<+instance.hostName>:8080/health"}}
```

Hosts belong to two sets: by their ``slot`` attribute (``blue``/``green``) when the
infrastructure gives one, else the first and second half of the inventory. The set that does
not receive traffic now is the standby set; the old live set keeps the old version, so a
traffic rollback is one switch back.

The reference's ``blueGreenDeployment`` (``productionSlots: 1``, ``stagingSlots: 1`` and an
``AWS_AMI_SWITCH_ROUTES`` step) is this plan: production is the live set, staging the standby
set, and the switch step's load balancers are the traffic (app.definitions.models.strategy
.ReferenceBlueGreen).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from strategies.basic import Phase


def slots_of(hosts: Sequence[str], slots: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """The two sets, by slot attribute or by halves of the inventory."""
    if slots and all(slots.get(h) for h in hosts):
        out: dict[str, list[str]] = {}
        for h in hosts:
            out.setdefault(str(slots[h]), []).append(h)
        return out
    half = (len(hosts) + 1) // 2
    return {"blue": list(hosts[:half]), "green": list(hosts[half:])}


def plan_blue_green(
    hosts: Sequence[str],
    *,
    live: Collection[str],
    slots: Mapping[str, str] | None = None,
    switch_name: str | None = None,
) -> list[Phase]:
    """Deploy to the standby set (verified), then switch traffic to it; ``switch_name`` names
    the switch phase (the reference's switch step name)."""
    sets = slots_of(hosts, slots)
    if len(sets) != 2 or not all(sets.values()):
        got = ", ".join(f"{k}: {len(v)}" for k, v in sets.items())
        raise ValueError(
            "blue-green needs two non-empty sets of hosts (slot blue/green, or at "
            f"least two hosts); got {got}"
        )
    live_set = set(live)
    names = sorted(sets)
    # The standby set is the one not taking traffic; the first time, the second set.
    current = next((n for n in names if live_set & set(sets[n])), None)
    standby = next(n for n in names if n != current) if current else names[-1]
    target = tuple(sets[standby])
    return [
        Phase(index=0, name=f"Deploy to {standby}", hosts=target, verify=True),
        Phase(
            index=1,
            name=f"{switch_name or 'Switch traffic'} to {standby}",
            hosts=target,
            kind="switch",
        ),
    ]
