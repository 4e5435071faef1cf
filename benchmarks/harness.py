"""vmfarm against Ansible, pyinfra and raw asyncssh: the same deployment on the same lab hosts.

Run it through ``benchmarks/run`` (see README.md there). For every host count N:

1. ``vmfarm lab up --hosts N --first K --regions r1,r2`` (lab root: ``<work>/home/lab``);
2. a control worker and one worker per region (``vmfarm worker``), on Redis (databases 8/9 by
   default) and their own PostgreSQL database (``vmfarm_bench``), with VMFARM_HOME ``<work>/home``;
3. one untimed asyncssh deployment (every host then runs an app that "stop" really stops), one
   vmfarm run right after the workers started (reported apart: its connection pools are empty),
   then ``--repeat`` rounds of every tool, interleaved so drift hits all tools alike. Before each
   timed run the artifact is deleted on the hosts (so the copy really happens); after it, outside
   the timing, every host is checked: one app, the new version, the right address, the artifact
   byte-identical;
4. the table (median/min/max wall, CPU split, vmfarm/peer ratio, the anchors' numbers) is printed
   and written between the result markers of benchmarks/README.md.

Everything started is stopped in a ``finally`` (lab, workers, Ansible's ControlPersist masters,
the database), also on Ctrl-C and SIGTERM. A tool that fails is a row marked failed with its
error, never a crash of the whole run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import io
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROJECT_PY = REPO / ".venv" / "bin" / "python"
PEERS_VENV = HERE / ".peers-venv"
PEER_PACKAGES = ["ansible-core", "pyinfra", "asyncssh"]
README = HERE / "README.md"
MARK_START = "<!-- results:start (written by benchmarks/run; edits here are overwritten) -->"
MARK_END = "<!-- results:end -->"
APP_DIR_ON_HOST = "opt/bench"  # /opt/bench inside each host = <lab>/hosts/hK/opt/bench here
TICK = os.sysconf("SC_CLK_TCK")
ALL_PEERS = ("ansible", "pyinfra", "asyncssh")
# What each peer name runs (asyncssh: the one-channel lower bound and the per-step variant).
PEER_TOOLS = {
    "ansible": ["ansible"],
    "pyinfra": ["pyinfra"],
    "asyncssh": ["asyncssh-1chan", "asyncssh-steps"],
}
# ../shared/research/performance-anchors.md section 3: wall median (s) per tool and N.
ANCHORS = {
    "asyncssh-1chan": {10: 0.58, 50: 1.83, 100: 3.92},
    "asyncssh-steps": {10: 0.68, 50: 2.27, 100: 4.72},
    "pyinfra": {10: 1.53, 50: 4.39, 100: 7.71},
    "ansible": {10: 13.52, 50: 70.43, 100: 134.89},
}
LABELS = {
    "vmfarm": "vmfarm run (warm workers)",
    "vmfarm-cold": "vmfarm run, 1st after a worker restart",
    "ansible": "ansible-playbook (pipelining, ControlPersist, -f N)",
    "pyinfra": "pyinfra --parallel N",
    "asyncssh-1chan": "asyncssh, 1 channel/host (lower bound)",
    "asyncssh-steps": "asyncssh, 1 channel/step",
}


class Interrupted(Exception):
    """SIGTERM, turned into an exception so that every ``finally`` runs."""


def shielded(fn: Callable[..., Any], *args: Any) -> Callable[[], None]:
    """``fn(*args)`` with Ctrl-C and SIGTERM held off: a second Ctrl-C must not cut a teardown
    short (the signals are restored afterwards; one that came in between is dropped)."""

    def call() -> None:
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            fn(*args)
        except Exception as exc:  # report and go on: the next teardown step must still run
            log(f"teardown step {getattr(fn, '__name__', fn)} failed: {exc}")
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    return call


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------- processes


def run_cmd(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 600,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run a command in its own session; on timeout or Ctrl-C its whole group is killed."""
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            exc.output, exc.stderr = out, err  # what it said before it was stopped
        raise
    res = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {proc.returncode}: {tail(err or out)}")
    return res


def tail(text: str, n: int = 400) -> str:
    text = " ".join((text or "").strip().split())
    return text if len(text) <= n else "..." + text[-n:]


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def all_procs() -> dict[int, list[str]]:
    """pid -> /proc/pid/stat fields after the command name (field 3 on)."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            f = _stat(int(name))
            if f is not None:
                out[int(name)] = f
    return out


def tree_cpu(roots: list[int], procs: dict[int, list[str]] | None = None) -> float:
    """CPU seconds of the live processes under ``roots`` (roots included), each with the CPU of
    the children it reaped: a delta of two calls is what the trees burnt in between, as long as
    nothing in them was reparented away."""
    procs = procs if procs is not None else all_procs()
    kids: dict[int, list[int]] = {}
    for pid, f in procs.items():
        kids.setdefault(int(f[1]), []).append(pid)
    total, seen, todo = 0, set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in procs:
            continue
        seen.add(pid)
        f = procs[pid]
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        todo += kids.get(pid, [])
    return total / TICK


def machine_cpu() -> float:
    """Busy CPU seconds of the whole machine since boot (user, nice, system, irq, softirq)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / TICK


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


# ----------------------------------------------------------------------------------- settings


@dataclass
class Config:
    hosts: list[int]
    repeat: int
    first: int
    peers: list[str]
    regions: list[str]
    work: Path
    redis: str
    broker_db: int
    result_db: int
    pg: str
    database: str
    timeout: float
    profile: int | None
    write_readme: bool
    keep_db: bool

    @property
    def home(self) -> Path:
        return self.work / "home"

    @property
    def lab_root(self) -> Path:
        return self.home / "lab"

    @property
    def artifact(self) -> Path:
        return self.work / "artifact.tgz"

    def tool_env(self, **extra: str) -> dict[str, str]:
        """The environment of every measured command. This machine sets
        PYTHONDONTWRITEBYTECODE=1, so an editable install (vmfarm's own modules) would be
        compiled from source on every start while pip-installed packages (Ansible, pyinfra)
        have their .pyc: bytecode is written, to a cache outside the source tree, for all."""
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(self.work / "pycache")
        env.update(extra)
        return env

    def vmfarm_env(self) -> dict[str, str]:
        env = {k: v for k, v in self.tool_env().items() if not k.startswith("VMFARM_")}
        env.update(
            PYTHONPATH=str(REPO),
            VMFARM_HOME=str(self.home),
            VMFARM_BROKER_URL=f"{self.redis}/{self.broker_db}",
            VMFARM_RESULT_BACKEND=f"{self.redis}/{self.result_db}",
            VMFARM_DATABASE_URL=f"{self.pg}/{self.database}",
        )
        return env


def parse_args(argv: list[str]) -> Config:
    p = argparse.ArgumentParser(
        prog="benchmarks/run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--hosts", default="10,50", help="host counts, comma-separated (default 10,50)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per tool and host count")
    p.add_argument(
        "--first",
        type=int,
        default=150,
        help="host K is 127.0.1.(FIRST+K-1); the largest N needs FIRST..FIRST+N-1 "
        "free (default 150)",
    )
    p.add_argument(
        "--peers",
        default=",".join(ALL_PEERS),
        help=f"peer tools, comma-separated, from {','.join(ALL_PEERS)} (empty: vmfarm only)",
    )
    p.add_argument("--regions", default="r1,r2")
    p.add_argument(
        "--work",
        default=str(HERE / "work"),
        help="scratch folder: lab, VMFARM_HOME, inventories, logs, raw results",
    )
    p.add_argument("--redis", default="redis://127.0.0.1:6379")
    p.add_argument("--broker-db", type=int, default=8)
    p.add_argument("--result-db", type=int, default=9)
    p.add_argument(
        "--pg",
        default="postgresql://postgres@127.0.0.1:5432",
        help="PostgreSQL server URL without a database",
    )
    p.add_argument(
        "--database",
        default="vmfarm_bench",
        help="created (dropped first) for the run, dropped at the end",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds per tool run")
    p.add_argument(
        "--profile",
        type=int,
        metavar="N",
        help="after the timed runs at N hosts, one more vmfarm run under py-spy "
        "(region and control workers, and the CLI)",
    )
    p.add_argument(
        "--no-readme", action="store_true", help="print the table only; leave README.md alone"
    )
    p.add_argument("--keep-db", action="store_true", help="do not drop the database at the end")
    a = p.parse_args(argv)
    hosts = [int(x) for x in a.hosts.split(",") if x.strip()]
    peers = [x.strip() for x in a.peers.split(",") if x.strip()]
    bad = [x for x in peers if x not in ALL_PEERS]
    if bad:
        p.error(f"unknown peers {bad}; choose from {', '.join(ALL_PEERS)}")
    if not hosts or min(hosts) < 1:
        p.error("--hosts needs positive host counts")
    if a.first < 1 or a.first + max(hosts) - 1 > 254:
        p.error(f"hosts {a.first}..{a.first + max(hosts) - 1} do not fit in 127.0.1.1-254")
    if a.profile is not None and a.profile not in hosts:
        p.error("--profile N needs N among --hosts")
    if a.repeat < 1:
        p.error("--repeat must be at least 1")
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", a.database):
        p.error("--database: lowercase letters, digits and _ only")
    return Config(
        hosts=hosts,
        repeat=a.repeat,
        first=a.first,
        peers=peers,
        regions=[r for r in a.regions.split(",") if r],
        work=Path(a.work).resolve(),
        redis=a.redis.rstrip("/"),
        broker_db=a.broker_db,
        result_db=a.result_db,
        pg=a.pg.rstrip("/"),
        database=a.database,
        timeout=a.timeout,
        profile=a.profile,
        write_readme=not a.no_readme,
        keep_db=a.keep_db,
    )


# ---------------------------------------------------------------------------------- preparation


def peers_python() -> Path:
    return PEERS_VENV / "bin" / "python"


def ensure_peers_venv(with_pyspy: bool) -> None:
    """benchmarks/.peers-venv with ansible-core, pyinfra, asyncssh (+ py-spy), from PyPI."""
    if not peers_python().exists():
        log(f"creating {PEERS_VENV}")
        run_cmd([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    wanted = PEER_PACKAGES + (["py-spy"] if with_pyspy else [])
    have = run_cmd([str(peers_python()), "-m", "pip", "list", "--format", "json"], check=True)
    names = {d["name"].lower() for d in json.loads(have.stdout)}
    missing = [w for w in wanted if w.lower() not in names]
    if missing:
        log(f"pip install {' '.join(missing)} into {PEERS_VENV}")
        run_cmd(
            [str(peers_python()), "-m", "pip", "install", "-q", *missing], timeout=900, check=True
        )


def make_artifact(path: Path) -> str:
    """~1 MB incompressible tarball (random data + app-1.0/bin/app.sh); its sha256."""
    if not path.exists():
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for name, data, mode in (
                ("app-1.0/bin/app.sh", b"#!/bin/sh\nexec sleep 3600\n", 0o755),
                ("app-1.0/data.bin", os.urandom(1_000_000), 0o644),
            ):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), mode, int(time.time())
                tf.addfile(info, io.BytesIO(data))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return hashlib.sha256(path.read_bytes()).hexdigest()


def psql(cfg: Config, sql: str) -> None:
    run_cmd(
        ["psql", f"{cfg.pg}/postgres", "-v", "ON_ERROR_STOP=1", "-q", "-c", sql],
        check=True,
        timeout=120,
    )


def reset_stores(cfg: Config) -> None:
    """A fresh database and empty Redis databases (only ours)."""
    psql(cfg, f'DROP DATABASE IF EXISTS "{cfg.database}" WITH (FORCE)')
    psql(cfg, f'CREATE DATABASE "{cfg.database}"')
    flush_redis(cfg)


def flush_redis(cfg: Config) -> None:
    for db in (cfg.broker_db, cfg.result_db):
        run_cmd(["redis-cli", "-u", f"{cfg.redis}/{db}", "flushdb"], check=True)


def versions(cfg: Config) -> dict[str, str]:
    """What was measured with (best effort: a missing tool says so)."""

    def first_line(argv: list[str]) -> str:
        try:
            r = run_cmd(argv, timeout=60)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except Exception as exc:  # a missing tool is a row, not a failure
            return f"unavailable ({type(exc).__name__})"

    def pkgs(py: Path, names: list[str]) -> str:
        code = (
            "import importlib.metadata as m, sys\n"
            "for n in sys.argv[1:]:\n"
            "    try: print(n, m.version(n))\n"
            "    except Exception: pass\n"
        )
        try:
            out = run_cmd([str(py), "-c", code, *names], timeout=60).stdout
        except Exception:
            return "unavailable"
        return ", ".join(line for line in out.splitlines() if line)

    rev = run_cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).stdout.strip()
    dirty = run_cmd(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "app", "tasks", "cli", "strategies"]
    ).stdout.strip()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = int(
        next(
            line.split()[1]
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
    )
    osname = next(
        (
            line.split("=", 1)[1].strip('"')
            for line in Path("/etc/os-release").read_text().splitlines()
            if line.startswith("PRETTY_NAME=")
        ),
        "unknown",
    )
    return {
        "machine": f"{os.cpu_count()} vCPU ({cpu}), {mem / 1024 / 1024:.0f} GiB RAM, {osname}, "
        f"Linux {platform.release()}",
        "vmfarm": f"git {rev}"
        + (" + uncommitted changes in app/tasks/cli/strategies" if dirty else ""),
        "python": platform.python_version(),
        "project venv": pkgs(
            PROJECT_PY,
            ["celery", "kombu", "redis", "paramiko", "cryptography", "sqlalchemy", "psycopg"],
        ),
        "peers venv": pkgs(
            peers_python(),
            ["ansible-core", "pyinfra", "paramiko", "gevent", "asyncssh", "cryptography", "py-spy"],
        ),
        "openssh": first_line(["ssh", "-V"]),
        "redis-server": first_line(["redis-server", "--version"]),
        "postgresql": first_line(["psql", "--version"]),
    }


# ------------------------------------------------------------------------------------------ lab


@dataclass
class Lab:
    root: Path
    hosts: list[dict[str, Any]]

    @property
    def addresses(self) -> list[str]:
        return [h["address"] for h in self.hosts]

    @property
    def sshd_pids(self) -> list[int]:
        return [int(h["pid"]) for h in self.hosts if h.get("pid")]

    def host_dir(self, num: int) -> Path:
        return self.root / "hosts" / f"h{num}"

    @property
    def key(self) -> Path:
        return self.root / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def infrastructure(self) -> Path:
        return self.root / "infrastructure.yaml"


def vmfarm_cmd(*args: str) -> list[str]:
    return [str(PROJECT_PY), "-m", "cli.main", *args]


def lab_up(cfg: Config, n: int) -> Lab:
    res = run_cmd(
        vmfarm_cmd(
            "lab",
            "up",
            "--ssh",
            "--hosts",
            str(n),
            "--first",
            str(cfg.first),
            "--regions",
            ",".join(cfg.regions),
            "-o",
            "json",
        ),
        env=cfg.vmfarm_env(),
        cwd=REPO,
        timeout=300,
    )
    if res.returncode != 0:
        raise RuntimeError(f"vmfarm lab up failed: {tail(res.stderr or res.stdout)}")
    state = json.loads((cfg.lab_root / "state.json").read_text())
    if state.get("mode") != "ssh":
        raise RuntimeError(f"the lab is not in ssh mode: {state.get('reason')}")
    return Lab(root=cfg.lab_root, hosts=state["hosts"])


def lab_down(cfg: Config) -> None:
    res = run_cmd(vmfarm_cmd("lab", "down"), env=cfg.vmfarm_env(), cwd=REPO, timeout=300)
    log(f"lab down: {tail(res.stdout or res.stderr, 200)}")


def lab_apps(lab: Lab) -> dict[int, list[int]]:
    """host num -> pids of the benchmark app (``sleep 3600``) running inside that host."""
    homes = {str(lab.host_dir(h["num"]) / "home"): h["num"] for h in lab.hosts}
    out: dict[int, list[int]] = {h["num"]: [] for h in lab.hosts}
    for pid, f in all_procs().items():
        if f[0] in ("Z", "X") or cmdline(pid) != "sleep 3600":
            continue
        num = homes.get(environ(pid).get("HOME", ""))
        if num is not None:
            out[num].append(pid)
    return out


def reset_hosts(lab: Lab) -> None:
    """Delete the artifact on every host, so that every tool really copies it."""
    for h in lab.hosts:
        d = lab.host_dir(h["num"]) / APP_DIR_ON_HOST
        for name in ("artifact.tgz",):
            with contextlib.suppress(FileNotFoundError):
                (d / name).unlink()
        for stray in d.glob("bench_app-*.tar.gz"):
            stray.unlink()


def verify(lab: Lab, version: str, sha256: str) -> list[str]:
    """What is wrong on the hosts after a deployment of ``version`` (empty: all good)."""
    problems = []
    apps = lab_apps(lab)
    for h in lab.hosts:
        num, addr = h["num"], h["address"]
        d = lab.host_dir(num) / APP_DIR_ON_HOST
        want = f"listen={addr}\nport={8000 + int(addr.rsplit('.', 1)[1])}\nversion={version}\n"
        try:
            if (d / "app.conf").read_text() != want:
                problems.append(f"{addr}: app.conf is not version {version}")
            if hashlib.sha256((d / "artifact.tgz").read_bytes()).hexdigest() != sha256:
                problems.append(f"{addr}: artifact.tgz differs")
            pid = int((d / "app.pid").read_text().strip())
        except (OSError, ValueError) as exc:
            problems.append(f"{addr}: {exc}")
            continue
        if apps[num] != [pid]:
            problems.append(f"{addr}: app.pid {pid}, running apps {apps[num]}")
    return problems


def stop_apps(lab: Lab) -> None:
    """Kill every benchmark app on the lab hosts and forget their pid files (after a failure)."""
    for num, pids in lab_apps(lab).items():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            (lab.host_dir(num) / APP_DIR_ON_HOST / "app.pid").unlink()


# -------------------------------------------------------------------------------------- workers


@dataclass
class Workers:
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def log_tails(self) -> str:
        return " | ".join(
            f"{n}: {tail(p.read_text(errors='replace'), 300)}"
            for n, p in self.logs.items()
            if p.exists()
        )

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()


def start_workers(cfg: Config, n: int, logdir: Path) -> Workers:
    """One worker per region (threads: enough for all of its hosts at once) and a control one."""
    per_region = math.ceil(n / len(cfg.regions))
    conc = max(32, per_region)  # 32 is vmfarm's default; more when a region has more hosts
    specs = [(f"w-{r}", ["--region", r, "-c", str(conc)]) for r in cfg.regions]
    specs.append(("w-control", ["--control", "-c", "2"]))
    w = Workers()
    logdir.mkdir(parents=True, exist_ok=True)
    for name, args in specs:
        path = logdir / f"{name}.log"
        w.logs[name] = path
        with path.open("wb") as fh:
            w.procs[name] = subprocess.Popen(
                vmfarm_cmd("worker", "-n", f"{name}@bench", "-l", "INFO", *args),
                env=cfg.vmfarm_env(),
                cwd=REPO,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
    try:
        wait_for_workers(cfg, [f"{name}@bench" for name, _ in specs], w)
    except BaseException:
        w.stop()
        raise
    return w


def wait_for_warm_start(w: Workers, timeout: float = 60) -> str:
    """Wait until every region worker has logged its warm start (app/warm.py); say what each
    one warmed, or that it did not within ``timeout`` (the run then starts anyway)."""
    deadline = time.monotonic() + timeout
    pending = {n: p for n, p in w.logs.items() if n != "w-control"}
    said: dict[str, str] = {}
    while pending and time.monotonic() < deadline:
        for name, path in list(pending.items()):
            text = path.read_text(errors="replace") if path.exists() else ""
            found = re.search(r"warm start: (.*)", text)
            if found:
                said[name] = found.group(1).strip()
                del pending[name]
        if pending:
            time.sleep(0.2)
    said.update({name: f"no warm start within {timeout:.0f} s" for name in pending})
    return "; ".join(f"{name}: {what}" for name, what in sorted(said.items()))


def wait_for_workers(cfg: Config, names: list[str], w: Workers, timeout: float = 90) -> None:
    code = (
        "import json\nfrom app.celery import app\n"
        "r = app.control.ping(timeout=1.0) or []\n"
        "print(json.dumps(sorted(k for d in r for k in d)))\n"
    )
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        dead = [n for n, p in w.procs.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"workers {dead} exited while starting: {w.log_tails()}")
        r = run_cmd([str(PROJECT_PY), "-c", code], env=cfg.vmfarm_env(), cwd=REPO, timeout=60)
        if r.returncode == 0:
            seen = json.loads(r.stdout.strip().splitlines()[-1])
            if all(n in seen for n in names):
                # The run refuses regions without a live worker row: wait for the heartbeats.
                time.sleep(1.0)
                return
        time.sleep(0.5)
    raise RuntimeError(
        f"workers {names} did not answer a ping in {timeout:.0f}s (saw {seen}): {w.log_tails()}"
    )


# ----------------------------------------------------------------------------------- the tools


@dataclass
class RunResult:
    tool: str
    n: int
    round: int
    version: str
    ok: bool
    wall: float | None = None
    ctrl_cpu: float | None = None
    remote_cpu: float | None = None
    db_cpu: float | None = None
    other_cpu: float | None = None
    error: str = ""
    timed: bool = True
    # vmfarm only: where the wall time went, from the ledger (see vmfarm_timeline).
    timeline: dict[str, float] | None = None


@dataclass
class Bench:
    cfg: Config
    lab: Lab
    sha256: str
    n: int
    workers: Workers | None
    logdir: Path
    worker_error: str = ""
    last_execution: str = ""

    # -- one timed run ---------------------------------------------------------------------

    def measure(self, tool: str, rnd: int, *, timed: bool = True) -> RunResult:
        version = f"{tool.replace('-', '')}-n{self.n}-r{rnd}-{int(time.time() * 1000) % 10**8}"
        reset_hosts(self.lab)
        res = RunResult(tool=tool, n=self.n, round=rnd, version=version, ok=False, timed=timed)
        before = self._cpu(tool)
        self.last_execution = ""
        started_epoch = time.time()
        started = time.perf_counter()
        try:
            extra = self._invoke(tool, version)
        except subprocess.TimeoutExpired as exc:
            res.wall = time.perf_counter() - started
            res.error = f"timed out after {exc.timeout:g} s (--timeout)"
            if tool.startswith("vmfarm"):
                self._abort_vmfarm(exc.stderr)
            self._recover()
            return res
        except Exception as exc:
            res.wall = time.perf_counter() - started
            res.error = f"{type(exc).__name__}: {tail(str(exc))}"
            self._recover()
            return res
        res.wall = time.perf_counter() - started
        after = self._cpu(tool)
        res.ctrl_cpu = after["ctrl"] - before["ctrl"] + extra
        res.remote_cpu = after["remote"] - before["remote"]
        res.db_cpu = after["db"] - before["db"] if tool.startswith("vmfarm") else None
        res.other_cpu = (
            after["machine"]
            - before["machine"]
            - res.ctrl_cpu
            - res.remote_cpu
            - (res.db_cpu or 0.0)
        )
        if tool.startswith("vmfarm") and self.last_execution:
            with contextlib.suppress(Exception):
                res.timeline = vmfarm_timeline(
                    self.cfg, self.last_execution, started_epoch, started_epoch + res.wall
                )
        problems = verify(self.lab, version, self.sha256)
        if problems:
            res.error = f"verification: {len(problems)} problem(s): {'; '.join(problems[:3])}"
            self._recover()
        else:
            res.ok = True
        return res

    def _cpu(self, tool: str) -> dict[str, float]:
        procs = all_procs()
        own = resource.getrusage(resource.RUSAGE_CHILDREN)
        ctrl = own.ru_utime + own.ru_stime
        db = 0.0
        if tool.startswith("vmfarm") and self.workers is not None:
            ctrl += tree_cpu(self.workers.pids, procs)
            db = self._pg_cpu(procs)
        return {
            "ctrl": ctrl,
            "remote": tree_cpu(self.lab.sshd_pids, procs),
            "db": db,
            "machine": machine_cpu(),
        }

    def _pg_cpu(self, procs: dict[int, list[str]]) -> float:
        """CPU of the PostgreSQL backends serving our database (backends that exited during
        the run are missed: a lower bound)."""
        total = 0
        for pid, f in procs.items():
            if cmdline(pid).startswith("postgres: ") and f" {self.cfg.database} " in cmdline(pid):
                total += int(f[11]) + int(f[12])
        return total / TICK

    def _abort_vmfarm(self, stderr: str | bytes | None) -> None:
        """A timed-out `vmfarm run` leaves its execution running on the workers: abort it,
        so that it does not deploy behind the next tool's back."""
        text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr or ""
        m = re.search(r"^execution (\w+)", text, re.M)
        if m:
            r = run_cmd(
                vmfarm_cmd("abort", m.group(1)), env=self.cfg.vmfarm_env(), cwd=REPO, timeout=120
            )
            log(f"aborted execution {m.group(1)}: {tail(r.stdout or r.stderr, 200)}")
            time.sleep(2.0)  # running hosts stop at their next command unit

    def _recover(self) -> None:
        """After a failure: no stray apps, then every host back on a running app (untimed)."""
        stop_apps(self.lab)
        with contextlib.suppress(Exception):
            self._invoke("asyncssh-1chan", f"restore-{int(time.time())}")

    def _invoke(self, tool: str, version: str) -> float:
        """Run ``tool`` once; raise with the reason when it fails. Returns CPU seconds spent
        outside the harness's children (Ansible's ControlPersist masters)."""
        if tool.startswith("vmfarm"):
            if self.workers is None:
                raise RuntimeError(self.worker_error or "no workers")
            res = run_cmd(
                vmfarm_cmd(
                    "run",
                    str(HERE / "vmfarm"),
                    str(self.lab.infrastructure),
                    "--set",
                    f"path={self.cfg.artifact}",
                    "--set",
                    f"tag={version}",
                ),
                env=self.cfg.vmfarm_env(),
                cwd=REPO,
                timeout=self.cfg.timeout,
            )
            m = re.search(r"^execution (\w+)", res.stderr or "", re.M)
            self.last_execution = m.group(1) if m else ""
            self._check(res, tool)
            return 0.0
        if tool == "ansible":
            return self._ansible(version)
        if tool == "pyinfra":
            inv = self._pyinfra_inventory()
            env = self.cfg.tool_env(
                BENCH_VERSION=version, BENCH_ARTIFACT=str(self.cfg.artifact), BENCH_ROOT=str(HERE)
            )
            res = run_cmd(
                [
                    str(PEERS_VENV / "bin" / "pyinfra"),
                    "-y",
                    "--parallel",
                    str(self.n),
                    str(inv),
                    str(HERE / "pyinfra" / "deploy.py"),
                ],
                env=env,
                cwd=inv.parent,
                timeout=self.cfg.timeout,
            )
            self._check(res, tool)
            return 0.0
        if tool.startswith("asyncssh"):
            mode = "one" if tool == "asyncssh-1chan" else "steps"
            res = run_cmd(
                [
                    str(peers_python()),
                    str(HERE / "peers" / "raw_asyncssh.py"),
                    mode,
                    "--hosts",
                    ",".join(self.lab.addresses),
                    "--key",
                    str(self.lab.key),
                    "--known-hosts",
                    str(self.lab.known_hosts),
                    "--artifact",
                    str(self.cfg.artifact),
                    "--version",
                    version,
                ],
                env=self.cfg.tool_env(),
                timeout=self.cfg.timeout,
            )
            self._check(res, tool)
            return 0.0
        raise ValueError(f"unknown tool {tool}")

    def _check(self, res: subprocess.CompletedProcess[str], tool: str) -> None:
        log_file = self.logdir / f"{tool}.log"
        with log_file.open("a") as fh:
            fh.write(
                f"=== {time.strftime('%H:%M:%S')} {shlex.join(res.args)} -> "
                f"{res.returncode}\n{res.stdout}\n{res.stderr}\n"
            )
        if res.returncode != 0:
            raise RuntimeError(f"exit {res.returncode}: {tail(res.stderr or res.stdout)}")

    # -- Ansible ---------------------------------------------------------------------------

    def _ansible(self, version: str) -> float:
        inv = self.logdir / "inventory.ini"
        if not inv.exists():
            common = f"-o UserKnownHostsFile={self.lab.known_hosts} -o StrictHostKeyChecking=yes"
            inv.write_text(
                "[lab]\n" + "\n".join(self.lab.addresses) + "\n\n[lab:vars]\n"
                "ansible_user=root\n"
                f"ansible_ssh_private_key_file={self.lab.key}\n"
                f"ansible_ssh_common_args={common}\n"
            )
        cp = self.cfg.work / "cp" / f"{int(time.time() * 1000)}"
        cp.mkdir(parents=True)
        env = self.cfg.tool_env(
            BENCH_VERSION=version,
            BENCH_ARTIFACT=str(self.cfg.artifact),
            ANSIBLE_CONFIG=str(HERE / "ansible" / "ansible.cfg"),
            ANSIBLE_HOME=str(self.cfg.work / "ansible-home"),
            ANSIBLE_LOCAL_TEMP=str(self.cfg.work / "ansible-home" / "tmp"),
            ANSIBLE_SSH_CONTROL_PATH_DIR=str(cp),
            ANSIBLE_NOCOLOR="1",
        )
        try:
            res = run_cmd(
                [
                    str(PEERS_VENV / "bin" / "ansible-playbook"),
                    "-i",
                    str(inv),
                    "-f",
                    str(self.n),
                    str(HERE / "ansible" / "deploy.yml"),
                ],
                env=env,
                cwd=self.logdir,
                timeout=self.cfg.timeout,
            )
        finally:
            master_cpu = self._close_masters(cp)
        self._check(res, "ansible")
        return master_cpu

    def _close_masters(self, cp: Path) -> float:
        """Stop this run's ControlPersist masters (by pid: their command line names ``cp``);
        return the CPU they used."""
        procs = all_procs()
        mine = [pid for pid in procs if cmdline(pid).startswith(f"ssh: {cp}/")]
        cpu = sum(int(procs[p][11]) + int(procs[p][12]) for p in mine) / TICK
        for pid in mine:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        shutil.rmtree(cp, ignore_errors=True)
        return cpu

    # -- pyinfra ---------------------------------------------------------------------------

    def _pyinfra_inventory(self) -> Path:
        inv = self.logdir / "inventory.py"
        if not inv.exists():
            data = {
                "ssh_user": "root",
                "ssh_key": str(self.lab.key),
                "ssh_known_hosts_file": str(self.lab.known_hosts),
                "ssh_strict_host_key_checking": "yes",
            }
            inv.write_text("hosts = " + repr([(a, data) for a in self.lab.addresses]) + "\n")
        return inv


# ------------------------------------------------------------------------------------ profiling


def psql_rows(cfg: Config, sql: str) -> list[list[str]]:
    res = run_cmd(
        ["psql", f"{cfg.pg}/{cfg.database}", "-At", "-F", "|", "-c", sql], check=True, timeout=60
    )
    return [line.split("|") for line in res.stdout.splitlines() if line]


TIMELINE_KEYS = [
    ("submit", "CLI start -> execution row written (start-up, parse, plan)"),
    ("dispatch", "-> first host step started (publish, queue, worker)"),
    ("steps", "first host step started -> last one finished"),
    ("gate", "-> execution finished (gate on control)"),
    ("report", "-> CLI exited (poll, report)"),
]


def vmfarm_timeline(cfg: Config, execution: str, t_start: float, t_end: float) -> dict[str, float]:
    """Where one vmfarm run's wall time went, from the ledger's timestamps (naive UTC)."""
    if not re.fullmatch(r"\w+", execution):
        return {}
    ex = psql_rows(
        cfg,
        "SELECT extract(epoch from created_at), extract(epoch from finished_at)"
        f" FROM execution WHERE id = '{execution}'",
    )[0]
    spread = psql_rows(
        cfg,
        "SELECT extract(epoch from max(started_at) - min(started_at)) "
        f"FROM hoststeprun WHERE execution_id = '{execution}' "
        "AND step_index = 0",
    )
    steps = psql_rows(
        cfg,
        "SELECT step_index, extract(epoch from min(started_at)), "
        "extract(epoch from max(finished_at)), "
        "avg(extract(epoch from finished_at - started_at)), "
        "max(extract(epoch from finished_at - started_at)) "
        f"FROM hoststeprun WHERE execution_id = '{execution}' "
        "GROUP BY step_index ORDER BY step_index",
    )
    hop = psql_rows(
        cfg,
        "SELECT avg(extract(epoch from b.started_at - a.finished_at)) "
        "FROM hoststeprun a JOIN hoststeprun b ON a.execution_id = "
        "b.execution_id AND a.host = b.host AND b.step_index = "
        f"a.step_index + 1 WHERE a.execution_id = '{execution}'",
    )
    created, finished = float(ex[0]), float(ex[1])
    first = min(float(r[1]) for r in steps)
    last = max(float(r[2]) for r in steps)
    out = {
        "submit": created - t_start,
        "dispatch": first - created,
        "steps": last - first,
        "gate": finished - last,
        "report": t_end - finished,
    }
    for r in steps:
        out[f"step{r[0]}_avg"] = float(r[3])
        out[f"step{r[0]}_max"] = float(r[4])
    if hop and hop[0][0]:
        out["chain_hop_avg"] = float(hop[0][0])
    if spread and spread[0][0]:
        out["start_spread"] = float(spread[0][0])
    return out


def _redis_monitor(cfg: Config, counts: dict[str, int], stop: Any) -> None:
    """Count the Redis commands sent to our two databases until ``stop`` is set."""
    import redis  # the project's venv has it

    client = redis.Redis.from_url(f"{cfg.redis}/{cfg.broker_db}")
    ours = {str(cfg.broker_db), str(cfg.result_db)}
    with client.monitor() as mon:
        for ev in mon.listen():
            if stop.is_set():
                return
            if str(ev.get("db")) in ours:
                key = f"db{ev['db']} {str(ev['command']).split(' ', 1)[0].upper()}"
                counts[key] = counts.get(key, 0) + 1


def _pg_counters(cfg: Config) -> dict[str, int]:
    cols = ["xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_fetched"]
    row = psql_rows(
        cfg, f"SELECT {', '.join(cols)} FROM pg_stat_database WHERE datname = '{cfg.database}'"
    )[0]
    return dict(zip(cols, (int(x) for x in row), strict=True))


def profile_vmfarm(bench: Bench, outdir: Path) -> dict[str, Any]:
    """Two more vmfarm runs at this N: one counted (CPU per process, Redis commands on our
    databases, PostgreSQL transactions, the timeline), one sampled by py-spy (``--gil``: the
    samples where a thread held the GIL, i.e. ran Python; ``--nonblocking``: the processes are
    not paused) in the region and control workers and the CLI."""
    import threading

    assert bench.workers is not None
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    summary: dict[str, Any] = {"n": bench.n}

    # 1. Counted.
    counts: dict[str, int] = {}
    stop = threading.Event()
    mon = threading.Thread(target=_redis_monitor, args=(bench.cfg, counts, stop), daemon=True)
    mon.start()
    time.sleep(1.0)
    procs = all_procs()
    before = {n: tree_cpu([bench.workers.pid(n)], procs) for n in bench.workers.procs}
    pg0 = _pg_counters(bench.cfg)
    own0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = bench.measure("vmfarm", 0, timed=False)
    own1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    time.sleep(1.0)  # backends report their counters when idle
    stop.set()
    procs = all_procs()
    summary["counted_run"] = {
        "wall": res.wall,
        "ok": res.ok,
        "error": res.error,
        "timeline": res.timeline,
        "cpu": {
            "vmfarm run (CLI)": (own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime),
            **{n: tree_cpu([bench.workers.pid(n)], procs) - before[n] for n in bench.workers.procs},
            "lab sshd (remote)": res.remote_cpu,
            "PostgreSQL backends": res.db_cpu,
        },
        "postgres": {k: v - pg0[k] for k, v in _pg_counters(bench.cfg).items()},
        "redis_commands": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "redis_total": sum(counts.values()),
    }

    # 2. Sampled.
    pyspy = PEERS_VENV / "bin" / "py-spy"
    sample = ["--gil", "--nonblocking", "--rate", "100", "--format", "raw"]
    recorders = []
    for name in bench.workers.procs:
        out = outdir / f"{name}.txt"
        args = [
            str(pyspy),
            "record",
            "--pid",
            str(bench.workers.pid(name)),
            *sample,
            "--output",
            str(out),
        ]
        if name == "w-control":
            args.append("--subprocesses")
        recorders.append(
            (
                name,
                out,
                subprocess.Popen(
                    args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
                ),
            )
        )
    time.sleep(1.5)  # py-spy attaches
    version = f"profile-n{bench.n}-{int(time.time())}"
    reset_hosts(bench.lab)
    cli_out = outdir / "cli.txt"
    started = time.perf_counter()
    res2 = run_cmd(
        [
            str(pyspy),
            "record",
            *sample,
            "--output",
            str(cli_out),
            "--",
            *vmfarm_cmd(
                "run",
                str(HERE / "vmfarm"),
                str(bench.lab.infrastructure),
                "--set",
                f"path={bench.cfg.artifact}",
                "--set",
                f"tag={version}",
            ),
        ],
        env=bench.cfg.vmfarm_env(),
        cwd=REPO,
        timeout=bench.cfg.timeout,
    )
    wall = time.perf_counter() - started
    time.sleep(0.5)
    for _, _, p in recorders:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGINT)
    for _, _, p in recorders:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    summary["sampled_run"] = {
        "wall": wall,
        "rc": res2.returncode,
        "problems": verify(bench.lab, version, bench.sha256),
        "samples_at_100_hz": {},
    }
    for name, path in [*((n, o) for n, o, _ in recorders), ("cli", cli_out)]:
        if path.exists():
            summary["sampled_run"]["samples_at_100_hz"][name] = {
                "path": str(path),
                **summarize_raw(path),
            }
    (outdir / "summary.json").write_text(json.dumps(summary, indent=2))
    (outdir / "summary.md").write_text(profile_md(summary))
    return summary


def profile_md(summary: dict[str, Any]) -> str:
    """The profile's numbers as text (benchmarks/work/profile/summary.md)."""
    c = summary["counted_run"]
    lines = [
        f"# vmfarm run at N={summary['n']}: counted run",
        "",
        f"wall {fmt(c['wall'])} s, ok {c['ok']} {c['error']}",
        "",
        "timeline (s): " + ", ".join(f"{k} {v:.2f}" for k, v in (c["timeline"] or {}).items()),
        "",
        "CPU (s): " + ", ".join(f"{k} {fmt(v)}" for k, v in c["cpu"].items()),
        "",
        "PostgreSQL (vmfarm_bench): " + ", ".join(f"{k} {v}" for k, v in c["postgres"].items()),
        "",
        f"Redis commands on our databases: {c['redis_total']}: "
        + ", ".join(f"{k} {v}" for k, v in c["redis_commands"].items()),
        "",
    ]
    s = summary["sampled_run"]
    lines += [
        f"# sampled run (py-spy --gil --nonblocking, 100 Hz): wall {fmt(s['wall'])} s, "
        f"rc {s['rc']}, problems {s['problems'][:3]}",
        "",
    ]
    for name, v in s["samples_at_100_hz"].items():
        lines += [f"## {name}: {v['samples']} samples holding the GIL", "", "inclusive:"]
        lines += [f"  {count:6d}  {frame}" for frame, count in v["inclusive"]]
        lines += ["self:"] + [f"  {count:6d}  {frame}" for frame, count in v["self"]] + [""]
    return "\n".join(lines) + "\n"


def summarize_raw(path: Path, top: int = 40) -> dict[str, Any]:
    """py-spy raw (collapsed) stacks -> total samples, top functions by self and inclusive."""
    self_s: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = [re.sub(r":\d+\)$", ")", f.strip()) for f in stack.split(";")]
        frames = [f for f in frames if f]
        if frames:
            self_s[frames[-1]] = self_s.get(frames[-1], 0) + c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c

    def best(d: dict[str, int]) -> list[tuple[str, int]]:
        return sorted(d.items(), key=lambda kv: -kv[1])[:top]

    return {"samples": total, "self": best(self_s), "inclusive": best(incl)}


# ------------------------------------------------------------------------------------- the table


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def summarize(results: list[RunResult], cfg: Config) -> list[dict[str, Any]]:
    rows = []
    tools = ["vmfarm", "vmfarm-cold"] + [t for p in cfg.peers for t in PEER_TOOLS[p]]
    for n in cfg.hosts:
        vm_ok = [r.wall for r in results if r.tool == "vmfarm" and r.n == n and r.ok and r.timed]
        for tool in tools:
            rs = [r for r in results if r.tool == tool and r.n == n and r.timed]
            if not rs:
                continue
            ok = [r for r in rs if r.ok]
            walls = [r.wall for r in ok if r.wall is not None]
            row: dict[str, Any] = {
                "tool": tool,
                "n": n,
                "runs": len(rs),
                "ok": len(ok),
                "errors": sorted({r.error for r in rs if r.error}),
            }
            if walls:
                row.update(
                    median=med(walls),
                    min=min(walls),
                    max=max(walls),
                    ctrl=med([r.ctrl_cpu for r in ok if r.ctrl_cpu is not None]),
                    remote=med([r.remote_cpu for r in ok if r.remote_cpu is not None]),
                    db=med([r.db_cpu for r in ok if r.db_cpu is not None])
                    if tool.startswith("vmfarm")
                    else None,
                    other=med([r.other_cpu for r in ok if r.other_cpu is not None]),
                )
                if vm_ok and not tool.startswith("vmfarm"):
                    row["ratio"] = med(vm_ok) / row["median"]
            row["anchor"] = ANCHORS.get(tool, {}).get(n)
            rows.append(row)
    return rows


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table_md(rows: list[dict[str, Any]]) -> str:
    head = (
        "| tool | N | ok/runs | wall median (s) | min | max | per host (ms) "
        "| vmfarm / this | anchor median (s) | ctrl CPU (s) | remote CPU (s) "
        "| PostgreSQL CPU (s) | other CPU (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        label = LABELS.get(r["tool"], r["tool"])
        if "median" not in r:
            err = "; ".join(r["errors"])[:300].replace("|", "/")
            lines.append(
                f"| {label} | {r['n']} | {r['ok']}/{r['runs']} | **failed**: {err} "
                "| | | | | | | | | |"
            )
            continue
        ratio = (
            "-"
            if not r.get("ratio")
            else (f"{r['ratio']:.1f}x" if r["ratio"] >= 1 else f"{r['ratio']:.2f}x")
        )
        lines.append(
            f"| {label} | {r['n']} | {r['ok']}/{r['runs']} | {fmt(r['median'])} "
            f"| {fmt(r['min'])} | {fmt(r['max'])} | {r['median'] / r['n'] * 1000:.0f} "
            f"| {ratio} | {fmt(r['anchor'])} | {fmt(r['ctrl'])} | {fmt(r['remote'])} "
            f"| {fmt(r.get('db'))} | {fmt(r['other'])} |"
        )
    return head + "\n".join(lines) + "\n"


def timeline_md(results: list[RunResult], cfg: Config) -> str:
    """Medians of where vmfarm's wall time went (warm runs that passed)."""
    lines = []
    for n in cfg.hosts:
        tls = [
            r.timeline for r in results if r.tool == "vmfarm" and r.n == n and r.ok and r.timeline
        ]
        if not tls:
            continue
        cells = [
            fmt(med([t[k] for t in tls if k in t])) if any(k in t for t in tls) else "-"
            for k in [k for k, _ in TIMELINE_KEYS]
            + ["start_spread", "step0_avg", "step0_max", "step1_avg", "step1_max", "chain_hop_avg"]
        ]
        lines.append(f"| {n} | {len(tls)} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    legend = "; ".join(f"*{k}* = {v}" for k, v in TIMELINE_KEYS)
    return (
        "Where vmfarm's wall time went (warm runs, medians in seconds, from the ledger's "
        f"timestamps): {legend}; *spread* = from the first host's deploy step starting to "
        "the last one's (one message per host, published one after another while the first "
        "hosts already run); *step0/step1* = time one host spends in the deploy "
        "step / the health step (claim, SSH commands, log rows; both steps run in one "
        "Celery task per host), average and slowest host; *hop* = from a host's deploy "
        "step ending to its health step starting.\n\n"
        "| N | runs | submit | dispatch | steps | gate | report | spread | step0 avg "
        "| step0 max | step1 avg | step1 max | hop |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n"
    )


def failures_md(results: list[RunResult]) -> str:
    bad = [r for r in results if not r.ok]
    if not bad:
        return "Every run passed the check on every host.\n"
    out = ["Failed runs (tool, N, round: error):", ""]
    out += [f"- {r.tool}, N={r.n}, round {r.round}: {r.error}" for r in bad]
    return "\n".join(out) + "\n"


def results_md(
    cfg: Config,
    rows: list[dict[str, Any]],
    results: list[RunResult],
    info: dict[str, str],
    started: dt.datetime,
    elapsed: float,
    argv: list[str],
    load: str,
) -> str:
    v = "\n".join(f"- {k}: {val}" for k, val in info.items())
    return (
        f"Measured {started:%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} min in all, with "
        f"`benchmarks/run {shlex.join(argv)}`; load average at the start: {load}.\n\n{v}\n\n"
        f"{table_md(rows)}\n"
        f"{timeline_md(results, cfg)}"
        "Columns: wall = from starting the tool's command until it exited, median of the "
        "timed runs that passed the check; *vmfarm / this* = vmfarm's warm median divided by "
        "this tool's median; *anchor* = the same tool and N in "
        "../shared/research/performance-anchors.md (section 3); ctrl CPU = the tool's process "
        "tree (for vmfarm: the `vmfarm run` CLI + the region and control workers; for Ansible "
        "+ its ControlPersist masters); remote CPU = the lab's sshd and everything they ran; "
        "PostgreSQL CPU = the backends of the benchmark database (vmfarm only; Redis is shared "
        "with other suites and not counted); other = the rest of the machine (other tenants: "
        "a noise indicator).\n\n"
        f"{failures_md(results)}"
    )


def write_readme(section: str) -> None:
    text = README.read_text() if README.exists() else f"# Benchmarks\n\n{MARK_START}\n{MARK_END}\n"
    if MARK_START not in text or MARK_END not in text:
        text += f"\n## Results\n\n{MARK_START}\n{MARK_END}\n"
    before, rest = text.split(MARK_START, 1)
    _, after = rest.split(MARK_END, 1)
    README.write_text(f"{before}{MARK_START}\n{section}{MARK_END}{after}")


# ------------------------------------------------------------------------------------------ main


def save_result(cfg: Config, r: RunResult) -> None:
    with (cfg.work / "results.jsonl").open("a") as fh:
        fh.write(json.dumps(asdict(r)) + "\n")


def run_host_count(
    cfg: Config,
    n: int,
    stack: contextlib.ExitStack,
    sha256: str,
    results: list[RunResult],
    tools: list[str],
) -> None:
    logdir = cfg.work / f"n{n}"
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir(parents=True)
    log(f"N={n}: lab up (127.0.1.{cfg.first}-{cfg.first + n - 1}, regions {cfg.regions})")
    try:
        lab = lab_up(cfg, n)
    except Exception as exc:
        shielded(lab_down, cfg)()
        err = f"lab up failed: {tail(str(exc))}"
        log(err)
        results.extend(
            RunResult(tool=t, n=n, round=0, version="", ok=False, error=err) for t in tools
        )
        return
    stack.callback(shielded(lab_down, cfg))
    workers, worker_error = None, ""
    try:
        log(f"N={n}: starting workers")
        workers = start_workers(cfg, n, logdir)
        stack.callback(shielded(workers.stop))
    except Exception as exc:
        worker_error = f"workers did not start: {tail(str(exc))}"
        log(worker_error)
    bench = Bench(
        cfg=cfg,
        lab=lab,
        sha256=sha256,
        n=n,
        workers=workers,
        logdir=logdir,
        worker_error=worker_error,
    )
    # Untimed: every host then runs an app, so the first timed "stop" really stops one.
    if "asyncssh" in cfg.peers:
        warm = bench.measure("asyncssh-1chan", 0, timed=False)
        log(f"N={n}: warm-up asyncssh {fmt(warm.wall)} s {'ok' if warm.ok else warm.error}")
    if workers is not None:
        # The first run after the workers start, as a fleet meets it: workers restarted (an
        # upgrade, a crash, a new machine) on a ledger that knows the hosts from an earlier
        # deployment. Untimed: that earlier deployment, then the restart; the region workers
        # warm themselves once ready (app/warm.py) and the timed run follows.
        prior = bench.measure("vmfarm", 0, timed=False)
        log(f"N={n}: untimed deployment before the restart {fmt(prior.wall)} s")
        workers.stop()
        try:
            workers = start_workers(cfg, n, logdir / "restarted")
            stack.callback(shielded(workers.stop))
            bench.workers = workers
            log(f"N={n}: workers restarted; {wait_for_warm_start(workers)}")
        except Exception as exc:
            bench.workers = None
            bench.worker_error = f"workers did not restart: {tail(str(exc))}"
            log(bench.worker_error)
    cold = bench.measure("vmfarm", 0)
    cold.tool = "vmfarm-cold"
    results.append(cold)
    save_result(cfg, cold)
    log(
        f"N={n}: vmfarm, first run after the workers started: {fmt(cold.wall)} s "
        f"{'ok' if cold.ok else cold.error}"
    )
    for rnd in range(1, cfg.repeat + 1):
        # Rotate the order each round: no tool always runs right after the same one.
        order = tools[rnd % len(tools) :] + tools[: rnd % len(tools)]
        for tool in order:
            r = bench.measure(tool, rnd)
            results.append(r)
            log(
                f"N={n} round {rnd}/{cfg.repeat} {tool}: {fmt(r.wall)} s "
                f"{'ok' if r.ok else 'FAILED ' + r.error}"
            )
            save_result(cfg, r)
    if cfg.profile == n and workers is not None:
        log(f"N={n}: profiling one vmfarm run with py-spy")
        try:
            profile_vmfarm(bench, cfg.work / "profile")
            log(
                f"profile written to {cfg.work / 'profile'} (summary.md, summary.json, raw "
                "py-spy stacks)"
            )
        except Exception as exc:
            log(f"profiling failed: {type(exc).__name__}: {exc}")


def main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    if os.geteuid() != 0:
        print(
            "benchmarks/run needs root (the lab's sshd bind port 22 on 127.0.1.K)", file=sys.stderr
        )
        return 2

    def on_term(signum: int, _frame: Any) -> None:
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    cfg.work.mkdir(parents=True, exist_ok=True)
    (cfg.work / "results.jsonl").unlink(missing_ok=True)
    peers_error = ""
    try:
        ensure_peers_venv(with_pyspy=cfg.profile is not None)
    except Exception as exc:
        peers_error = f"peers venv: {tail(str(exc))}"
        log(peers_error)
    tools = ["vmfarm"] + [t for p in cfg.peers for t in PEER_TOOLS[p]]
    results: list[RunResult] = []
    sha256 = make_artifact(cfg.artifact)
    interrupted = False
    with contextlib.ExitStack() as stack:
        try:
            reset_stores(cfg)
            stack.callback(shielded(flush_redis, cfg))
            if not cfg.keep_db:
                stack.callback(
                    shielded(psql, cfg, f'DROP DATABASE IF EXISTS "{cfg.database}" WITH (FORCE)')
                )
            for n in cfg.hosts:
                with contextlib.ExitStack() as per_n:
                    if peers_error:
                        results.extend(
                            RunResult(tool=t, n=n, round=0, version="", ok=False, error=peers_error)
                            for t in tools
                            if t != "vmfarm"
                        )
                        run_host_count(cfg, n, per_n, sha256, results, ["vmfarm"])
                    else:
                        run_host_count(cfg, n, per_n, sha256, results, tools)
        except (KeyboardInterrupt, Interrupted) as exc:
            interrupted = True
            log(
                f"interrupted ({type(exc).__name__}): tearing down; partial results follow "
                "(README.md is left as it was)"
            )
        finally:
            log("teardown")
    rows = summarize(results, cfg)
    print()
    print(table_md(rows))
    print(timeline_md(results, cfg))
    print(failures_md(results))
    if interrupted:
        return 130
    if cfg.write_readme and results:
        info = versions(cfg)
        write_readme(
            results_md(cfg, rows, results, info, started, time.monotonic() - t0, argv, load)
        )
        log(f"results written to {README}")
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
