"""The ``vmfarm`` commands, one module per group of them; each module's ``register(main)``
adds its commands to the root group::

    pipelines    validate, plan, run, retry                 files and new executions
    executions   status, logs, executions, artifacts       reading the ledger
    decisions    approve, reject, abort, intervene, rollback
    fleet        worker, workers, hosts
    lab          lab up|status|down
    service      flower, schedules, autoscale
    ops          metrics serve|show, notify test, reconcile
    secrets      secrets set|list|rm|keygen
    governance   audit, policy check
    server       server (the control plane's HTTP API), server keys, server db-roles

A command takes the shared context with ``@cli.context.pass_cli``, its options from
``cli.options``, and stops through ``cli.console`` (``fail``, ``fail_input``, ``refused``).
A user action goes through ``app.operations`` (RBAC and the audit trail, whoever calls).
Modules import what needs SQL or Celery inside the command: ``vmfarm --help`` loads neither.

A new command goes in the module of its group (a new group: a new module with ``register``,
listed in ``MODULES``); ``tests/unit/test_operations.py`` shows how to drive one with
click's ``CliRunner``.
"""

from __future__ import annotations

import click

from cli.commands import (
    decisions,
    executions,
    fleet,
    governance,
    lab,
    ops,
    pipelines,
    secrets,
    server,
    service,
)

MODULES = (pipelines, executions, decisions, fleet, lab, service, ops, secrets, governance, server)


def register_all(main: click.Group) -> None:
    """Add every command to ``main``."""
    for module in MODULES:
        module.register(main)
