"""NoopConnector: a host that does nothing, instantly (``VMFARM_TEST_CONNECTION=noop``).

For measuring the coordinator and the broker without SSH or processes (benchmarks/scale.py):
every command "runs" and exits 0 with no output, every copy "lands". Nothing on any machine is
touched. Only a worker-side setting turns it on (app.connectors.pool.forced_connection),
never a pipeline file; the coordinator then records no deployment in the Instance ledger.
"""

from __future__ import annotations

from collections.abc import Mapping

from app.connectors.base import CommandResult, Connector, HostTarget, OutputCallback


class NoopConnector(Connector):
    def __init__(self, target: HostTarget) -> None:
        self.target = target

    def connect(self) -> None:
        return None

    def run(
        self,
        script: str,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        workdir: str | None = None,
    ) -> CommandResult:
        return CommandResult(exit_code=0)

    def put(self, local_path: str, remote_path: str, *, mode: int | None = None) -> None:
        return None

    def get(self, remote_path: str, local_path: str) -> None:
        return None

    def close(self) -> None:
        return None
