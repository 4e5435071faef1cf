"""Settings from the environment (``VMFARM_*``), one object shared by every process.

With no ``VMFARM_BROKER_URL`` vmfarm runs embedded: SQLite files under ``VMFARM_HOME`` for the
ledger, the broker and the result backend (each its own file: SQLite has one writer).

What vmfarm keeps is private: ``VMFARM_HOME`` is created 0700, and every SQLite file it opens
(ledger, broker, result backend, wherever their URLs point) is 0600 before SQLite opens it, so
its -wal, -shm and -journal files, which SQLite creates with the database's mode, are 0600 too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import threading
from functools import lru_cache
from pathlib import Path

from pydantic import Field
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
    # Terraform steps (app.execution.terraform): the binary (default: terraform or tofu on PATH
    # or in this Python's bin), the folder of states and saved plans (default
    # $VMFARM_HOME/terraform) and a provider mirror folder (filesystem_mirror layout).
    terraform_binary: str | None = None
    terraform_dir: Path | None = None
    terraform_plugins: Path | None = None
    user: str | None = None
    # Who may approve: {groups: {name: [user, ...]}} (HarnessApproval userGroups).
    users_file: Path = Path("configs/users.yaml")
    # A running host step renews its heartbeat this often; the reconciler calls a step whose
    # heartbeat is older than heartbeat_timeout lost (its worker died: DelegateRestart).
    heartbeat_interval: float = 10.0
    heartbeat_timeout: float = 90.0
    # How often the periodic reconciler runs (`vmfarm worker --control --beat`).
    reconcile_interval: float = 30.0
    # How often `vmfarm server` polls each artifact trigger's repository (seconds; 0: never).
    artifact_poll_interval: float = Field(default=60.0, ge=0)
    # Celery task events from every worker and publisher (VMFARM_TASK_EVENTS=1). Off by default:
    # they are three to four Redis messages per task for nobody. `vmfarm flower` (Flower's
    # --enable_events, on by default) switches them on in the running workers while it watches.
    task_events: bool = False
    # Prometheus for verification gates (a `prometheus` check without its own url).
    prometheus_url: str | None = None
    # Celery message signing (app/signing.py): this process's private key and certificate, and
    # the certificates whose signatures it accepts (a directory or a glob). Set all three and
    # every task message is signed and only signed messages are taken; set none and messages
    # are plain JSON. Embedded mode (no broker URL) never signs: it has no broker to attack.
    security_key: Path | None = None
    security_certificate: Path | None = None
    security_cert_store: str | None = None
    # Benchmarks and tests only: every host of the workers a no-op (app.connectors.pool reads
    # VMFARM_TEST_CONNECTION itself); with it set, the coordinator records no deployment.
    test_connection: str | None = None
    # A region worker opens pooled SSH connections, when it starts, to up to this many hosts of
    # its regions that deployments of the last warm_hours used (0: none), so that the first
    # deployment after a worker starts does not pay the SSH handshakes (app/warm.py).
    warm_hosts: int = 256
    warm_hours: float = 24.0

    @property
    def embedded(self) -> bool:
        return not self.broker_url

    @property
    def signing(self) -> bool:
        """Are task messages signed? In service mode, when any security_* path is set (all
        three must then be: app.signing says which is missing)."""
        return not self.embedded and any(
            (self.security_key, self.security_certificate, self.security_cert_store)
        )

    @property
    def home_dir(self) -> Path:
        return private_dir(self.home).resolve()

    @property
    def db_url(self) -> str:
        return private_sqlite(self.database_url or f"sqlite:///{self.home_dir / 'vmfarm.db'}")

    @property
    def celery_broker(self) -> str:
        return private_sqlite(
            self.broker_url or f"sqla+sqlite:///{self.home_dir / 'broker.sqlite'}"
        )

    @property
    def celery_backend(self) -> str:
        if self.result_backend:
            return private_sqlite(self.result_backend)
        if self.broker_url and self.broker_url.startswith(("redis://", "rediss://")):
            # Same Redis, next database: chords get Redis's native counters.
            base, _, db = self.broker_url.rpartition("/")
            nxt = int(db) + 1 if db.isdigit() else 1
            return f"{base}/{nxt}" if db.isdigit() else f"{self.broker_url.rstrip('/')}/1"
        return private_sqlite(f"db+sqlite:///{self.home_dir / 'results.sqlite'}")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


# --- private files -------------------------------------------------------------------------------

log = logging.getLogger("vmfarm.settings")
_SQLITE_URL = re.compile(r"^(?:[a-z0-9]+\+)?sqlite(?:\+[a-z0-9]+)?:///(?P<path>[^?]+)")
# The files of vmfarm's own making: a folder that holds one of them is a vmfarm home.
_STATE_FILES = ("vmfarm.db", "broker.sqlite", "results.sqlite", "secrets.enc")
_checked: set[str] = set()  # paths made private by this process (while they exist)
_checked_lock = threading.Lock()


def _first_time(path: Path) -> bool:
    """True unless this process has made ``path`` private already and it is still there."""
    key = str(path)
    with _checked_lock:
        if key in _checked and os.path.lexists(path):
            return False
        _checked.add(key)
        return True


def private_dir(path: Path, *, tighten: bool = True) -> Path:
    """``path``, created 0700 when missing (with its parents). With ``tighten``, an existing
    folder of ours that is empty or a vmfarm home an earlier version left open to others (it
    holds vmfarm's files) is made 0700; any other folder is left as it is, with a warning
    (VMFARM_HOME=/tmp must not close /tmp to everyone else)."""
    if not _first_time(path):
        return path
    try:
        path.mkdir(mode=0o700, parents=True)
        return path
    except FileExistsError:
        if not tighten:
            return path
    with contextlib.suppress(OSError):
        st = path.stat()
        if not st.st_mode & 0o077 or not stat.S_ISDIR(st.st_mode):
            return path
        ours = st.st_uid == os.getuid() and not st.st_mode & stat.S_ISVTX
        if ours and (not any(path.iterdir()) or any((path / f).exists() for f in _STATE_FILES)):
            os.chmod(path, 0o700)
        else:
            log.warning(
                "%s is open to other users (mode %o); vmfarm's own files in it are 0600",
                path,
                stat.S_IMODE(st.st_mode),
            )
    return path


def private_file(path: Path) -> Path:
    """``path`` as a 0600 file: created empty when missing, else its mode tightened (when it
    is ours); an SQLite database's -wal, -shm and -journal files with it."""
    if not _first_time(path):
        return path
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(OSError):
            os.chmod(f"{path}{suffix}", 0o600)
    return path


def private_sqlite(url: str) -> str:
    """``url`` unchanged; when it names a SQLite file, that file is made private first
    (``private_file``), its folder created 0700 when missing."""
    m = _SQLITE_URL.match(url)
    if m is None or m.group("path") in (":memory:", "") or m.group("path").startswith("file:"):
        return url
    path = Path(m.group("path"))
    private_dir(path.parent, tighten=False)
    private_file(path)
    return url
