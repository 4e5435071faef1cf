"""Spans of time read from the ledger (a step's start and end on a host)."""

from __future__ import annotations

from datetime import datetime


def most_in_flight(spans: list[tuple[datetime, datetime]]) -> int:
    """The largest number of spans open at one instant (an end before a start at a tie)."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    most = now = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most
