"""The states of executions, stages, phases and host steps (no SQL here: the CLI and the
server's clients name them without importing the ledger)."""

from __future__ import annotations


class Status:
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    ABORTED = "ABORTED"
    PENDING = "PENDING"
    WAITING = "WAITING"  # for people (an approval); no work is in flight
    IGNORED = "IGNORED"  # a step failed and a failure strategy said Ignore: the host goes on
    ROLLING_BACK = "ROLLING_BACK"  # rollback phases run; the execution is not over
    ROLLED_BACK = "ROLLED_BACK"  # a stage (or host) is back on its previous version
    ROLLBACK_FAILED = "ROLLBACK_FAILED"  # a rollback step failed somewhere: a person must look

    TERMINAL = frozenset(
        {"SUCCEEDED", "FAILED", "SKIPPED", "ABORTED", "IGNORED", "ROLLED_BACK", "ROLLBACK_FAILED"}
    )
    # A host may go on after these.
    PASSED = frozenset({"SUCCEEDED", "IGNORED"})
    # A step or stage its ``when`` left out starts its error with this (the reason follows):
    # such a step does not make its host fail.
    WHEN = "skipped by when: "

    @staticmethod
    def passed(status: str | None, error: str | None = None) -> bool:
        """Did a host step pass, counting a step its ``when`` left out?"""
        return status in Status.PASSED or (
            status == Status.SKIPPED and (error or "").startswith(Status.WHEN)
        )

    # The statuses an Execution takes (what `vmfarm executions --status` accepts).
    EXECUTION = (
        "QUEUED",
        "RUNNING",
        "WAITING",
        "ROLLING_BACK",
        "SUCCEEDED",
        "FAILED",
        "ABORTED",
        "ROLLED_BACK",
        "ROLLBACK_FAILED",
    )
