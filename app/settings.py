"""Settings from the environment (``VMFARM_*``), one object shared by every process.

With no ``VMFARM_BROKER_URL`` vmfarm runs embedded: SQLite files under ``VMFARM_HOME`` for the
ledger, the broker and the result backend (each its own file: SQLite has one writer).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VMFARM_", extra="ignore")

    home: Path = Path(".vmfarm")
    database_url: str | None = None
    broker_url: str | None = None
    result_backend: str | None = None
    # Seconds a deploy task may wait in a region queue before it expires (no live worker).
    dispatch_expires: int = 3600
    # Default command timeout for a step without ``timeout`` (Harness's default is 10m).
    step_timeout: float = 600.0
    user: str | None = None
    # Who may approve: {groups: {name: [user, ...]}} (HarnessApproval userGroups).
    users_file: Path = Path("configs/users.yaml")
    # A running host step renews its heartbeat this often; the reconciler calls a step whose
    # heartbeat is older than heartbeat_timeout lost (its worker died: DelegateRestart).
    heartbeat_interval: float = 10.0
    heartbeat_timeout: float = 90.0
    # How often the periodic reconciler runs (`vmfarm worker --control --beat`).
    reconcile_interval: float = 30.0
    # Celery task events from every worker and publisher (VMFARM_TASK_EVENTS=1). Off by default:
    # they are three to four Redis messages per task for nobody. `vmfarm flower` (Flower's
    # --enable_events, on by default) switches them on in the running workers while it watches.
    task_events: bool = False
    # Prometheus for verification gates (a `prometheus` check without its own url).
    prometheus_url: str | None = None
    # Benchmarks and tests only: every host of the workers a no-op (app.connectors.pool reads
    # VMFARM_TEST_CONNECTION itself); with it set, the coordinator records no deployment.
    test_connection: str | None = None

    @property
    def embedded(self) -> bool:
        return not self.broker_url

    @property
    def home_dir(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        return self.home.resolve()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'vmfarm.db'}"

    @property
    def celery_broker(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.home_dir / 'broker.sqlite'}"

    @property
    def celery_backend(self) -> str:
        if self.result_backend:
            return self.result_backend
        if self.broker_url and self.broker_url.startswith(("redis://", "rediss://")):
            # Same Redis, next database: chords get Redis's native counters.
            base, _, db = self.broker_url.rpartition("/")
            nxt = int(db) + 1 if db.isdigit() else 1
            return f"{base}/{nxt}" if db.isdigit() else f"{self.broker_url.rstrip('/')}/1"
        return f"db+sqlite:///{self.home_dir / 'results.sqlite'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
