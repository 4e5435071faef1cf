"""Verification checks that decide whether a deployment phase may continue.

Plain synchronous functions (no Celery, no SQL) that run on the region worker next to the hosts:
:func:`http_check` and :func:`tcp_check` (health), :func:`probe` (error rate and latency under
load), :func:`prometheus_query` (one number from PromQL), and :func:`evaluate`, which compares
the numbers with a pipeline's success criteria. Canary analysis, which compares the canary
hosts' Prometheus metrics with the current version's, is :mod:`app.verify.canary`.
"""

from __future__ import annotations

from app.verify.probes import (
    CheckResult,
    ProbeStats,
    body_matches,
    evaluate,
    http_check,
    probe,
    prometheus_query,
    tcp_check,
)

__all__ = [
    "CheckResult",
    "ProbeStats",
    "body_matches",
    "evaluate",
    "http_check",
    "probe",
    "prometheus_query",
    "tcp_check",
]
