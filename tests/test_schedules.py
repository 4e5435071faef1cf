"""Pipeline schedules: the cron parser and next-run computation (checked against a brute-force
minute scan), the schedules file, the tick's once-per-slot claims (file lock and Redis SET NX),
`vmfarm schedules`, and the tick as a Celery task on a real control worker submitting a real
execution (Redis databases 14 and 15, the session's PostgreSQL).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from app.errors import ConfigError
from app.schedules import (
    Cron,
    FileClaims,
    RedisClaims,
    Schedule,
    describe,
    load_schedules,
    schedules_file,
    tick,
)
from tests.conftest import REPO, _stop, base_env
from tests.waiting import wait_for

VMFARM = [sys.executable, "-c", "import sys; from cli.main import main; "
          "from cli import service_cmd; service_cmd.register(main); sys.argv[0] = 'vmfarm'; "
          "main()"]
BERLIN = ZoneInfo("Europe/Berlin")


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0,
       tz: Any = UTC) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=tz)


# --- cron expressions ----------------------------------------------------------------------------


def test_fields_lists_ranges_steps_and_names_parse() -> None:
    c = Cron.parse("*/15 9-17/4 1,15 jan-mar,DEC mon-fri")
    assert c.minutes == {0, 15, 30, 45} and c.hours == {9, 13, 17}
    assert c.days == {1, 15} and c.months == {1, 2, 3, 12} and c.weekdays == {1, 2, 3, 4, 5}
    assert Cron.parse("5/20 * * * 7").minutes == {5, 25, 45}
    assert Cron.parse("0 0 * * 7").weekdays == {0} == Cron.parse("0 0 * * sun").weekdays
    assert Cron.parse("@daily") == Cron.parse("@daily")
    assert Cron.parse("@hourly").minutes == {0} and len(Cron.parse("@hourly").hours) == 24
    assert Cron.parse("@weekly").weekdays == {0}
    assert Cron.parse("@yearly").months == {1} == Cron.parse("@annually").months


@pytest.mark.parametrize("text, says", [
    ("* * * *", "has 4 fields"), ("* * * * * *", "has 6 fields"),
    ("60 * * * *", "minute: 60 is out of range 0-59"), ("* 24 * * *", "hour: 24"),
    ("* * 0 * *", "day of month: 0"), ("* * * 13 *", "month: 13"),
    ("* * * * 8", "day of week: 8"), ("5-1 * * * *", "goes backwards"),
    ("*/0 * * * *", "step '0' must be a positive number"), ("1,,2 * * * *", "empty item"),
    ("* * * foo *", "is not a number or a name"), ("@reboot", "unknown macro"),
    ("0 0 30 2 *", "never fires"), ("0 0 31 4,6 *", "never fires"),
])
def test_bad_expressions_are_refused_naming_the_field(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        Cron.parse(text)


def test_next_runs_in_utc() -> None:
    c = Cron.parse("0 2 * * *")
    assert c.next_after(at(2025, 1, 1, 1, 59)) == at(2025, 1, 1, 2, 0)
    assert c.next_after(at(2025, 1, 1, 2, 0)) == at(2025, 1, 2, 2, 0)  # strictly after
    weekdays = Cron.parse("0 8 * * 1-5")
    assert weekdays.next_after(at(2025, 1, 3, 9, 0)) == at(2025, 1, 6, 8, 0)  # Fri -> Mon
    assert Cron.parse("0 0 29 2 *").next_after(at(2025, 3, 1)) == at(2028, 2, 29)
    # Both day fields restricted: either matches (cron's rule) -- the 13th or any Friday.
    either = Cron.parse("0 0 13 * fri")
    assert either.next_after(at(2025, 6, 1)) == at(2025, 6, 6)  # a Friday
    assert either.next_after(at(2025, 6, 10)) == at(2025, 6, 13)
    # A star day-of-month keeps AND: Fridays only.
    assert Cron.parse("0 0 */1 * fri").next_after(at(2025, 6, 10)) == at(2025, 6, 13)
    assert Cron.parse("*/15 * * * *").last_at_or_before(at(2025, 1, 1, 10, 14, 59)) == \
        at(2025, 1, 1, 10, 0)
    assert Cron.parse("0 0 1 1 *").last_at_or_before(at(2025, 1, 1)) == at(2025, 1, 1)


@pytest.mark.parametrize("text", ["*/7 * * * *", "0 */5 * * *", "30 4 1,15 * 5",
                                  "15 10 * * mon-fri", "0 0 * * 0", "59 23 31 * *",
                                  "0,30 8-18 * jan,jul *"])
@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Asia/Kolkata"])
def test_next_and_last_agree_with_a_brute_force_minute_scan(text: str, tz: str) -> None:
    c, zone = Cron.parse(text), ZoneInfo(tz)
    start = at(2025, 6, 27, 13, 7, 30)  # a summer week: no daylight-saving change in it
    expected: list[datetime] = []
    t = start.replace(second=0)
    while len(expected) < 6 and t < start + timedelta(days=200):
        t += timedelta(minutes=1)
        if c.matches(t.astimezone(zone).replace(tzinfo=None)):
            expected.append(t)
    got: list[datetime] = []
    t = start
    for _ in range(len(expected)):
        nxt = c.next_after(t, zone)
        assert nxt is not None
        got.append(nxt)
        assert c.last_at_or_before(nxt, zone) == nxt
        assert c.last_at_or_before(nxt - timedelta(seconds=1), zone) in (
            None, *([got[-2]] if len(got) > 1 else []), c.last_at_or_before(t, zone))
        t = nxt
    assert got == expected and expected


def test_daylight_saving_gaps_run_late_once_and_repeats_run_once() -> None:
    c = Cron.parse("30 2 * * *")
    # 2025-03-30 02:30 does not exist in Berlin: the slot runs at 03:30 CEST (01:30 UTC).
    spring = c.next_after(at(2025, 3, 29, 12), BERLIN)
    assert spring == at(2025, 3, 30, 1, 30)
    assert c.next_after(spring, BERLIN) == at(2025, 3, 31, 0, 30)
    # 2025-10-26 02:30 happens twice: the first one (CEST, 00:30 UTC) only.
    fall = c.next_after(at(2025, 10, 25, 12), BERLIN)
    assert fall == at(2025, 10, 26, 0, 30)
    assert c.next_after(fall, BERLIN) == at(2025, 10, 27, 1, 30)
    # Every 15 minutes through the spring gap: increasing instants, none twice.
    q = Cron.parse("*/15 * * * *")
    t, seen = at(2025, 3, 30, 0, 0), []
    for _ in range(8):
        nxt = q.next_after(t, BERLIN)
        assert nxt is not None and nxt > t
        seen.append(nxt)
        t = nxt
    assert seen == [at(2025, 3, 30, 0, 15) + timedelta(minutes=15 * i) for i in range(8)]


# --- the schedules file --------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_schedules_file_loads_with_paths_relative_to_it(tmp_path: Path) -> None:
    f = write(tmp_path / "conf" / "schedules.yaml", """
schedules:
  - name: nightly
    cron: "0 2 * * *"
    files: [pipes/app.yaml, ../shared]
    pipeline: app
    inputs: {tag: 1.2.3, n: 4}
    timezone: Europe/Berlin
    startingDeadline: 90s
  - name: paused
    cron: "@hourly"
    files: x.yaml
    enabled: false
""")
    nightly, paused = load_schedules(f)
    assert nightly.files == (str(tmp_path / "conf" / "pipes" / "app.yaml"),
                             str(tmp_path / "shared"))
    assert (nightly.pipeline, dict(nightly.inputs), nightly.timezone, nightly.deadline) == (
        "app", {"tag": "1.2.3", "n": "4"}, "Europe/Berlin", 90.0)
    assert paused.enabled is False and paused.files == (str(tmp_path / "conf" / "x.yaml"),)
    assert paused.due_slot(at(2025, 1, 1, 10, 0)) is None
    assert write(tmp_path / "empty.yaml", "") and load_schedules(tmp_path / "empty.yaml") == []


@pytest.mark.parametrize("body, says", [
    ("- {cron: '* * * * *', files: [a]}", "'name' must be a name"),
    ("- {name: a, cron: '* * *', files: [a]}", "(a): cron: '* * *' has 3 fields"),
    ("- {name: a, cron: '* * * * *'}", "'files' must list"),
    ("- {name: a, cron: '* * * * *', files: [a], timezone: Mars/Base}", "unknown timezone"),
    ("- {name: a, cron: '* * * * *', files: [a], when: now}", "unknown field(s) when"),
    ("- {name: a, cron: '* * * * *', files: [a], inputs: [x]}", "'inputs' must map"),
    ("- {name: a, cron: '* * * * *', files: [a], startingDeadline: soon}", "startingDeadline"),
    ("- {name: a, cron: '* * * * *', files: [a]}\n- {name: a, cron: '@daily', files: [b]}",
     "two schedules are named 'a'"),
    ("schedules: {a: 1}", "'schedules' must be a list"),
    ("- [unclosed", "cannot read the schedules file"),
])
def test_bad_schedules_files_are_refused_naming_the_entry(tmp_path: Path, body: str,
                                                         says: str) -> None:
    f = write(tmp_path / "s.yaml", body)
    with pytest.raises(ConfigError, match=re.escape(says)) as info:
        load_schedules(f)
    assert str(f) in str(info.value)


def test_the_file_comes_from_the_environment_or_the_default_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VMFARM_SCHEDULES_FILE", raising=False)
    assert schedules_file() is None and load_schedules() == []
    write(tmp_path / "configs" / "schedules.yaml", "schedules: []\n")
    assert schedules_file() == Path("configs/schedules.yaml")
    monkeypatch.setenv("VMFARM_SCHEDULES_FILE", "")
    assert schedules_file() is None  # empty: schedules off
    monkeypatch.setenv("VMFARM_SCHEDULES_FILE", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="no such schedules file"):
        load_schedules()


# --- the tick ------------------------------------------------------------------------------------


class FakeSubmit:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, files: list[str], *, pipeline: str | None, inputs: dict[str, str],
                 user: str) -> str:
        with self.lock:
            self.calls.append({"files": files, "pipeline": pipeline, "inputs": inputs,
                               "user": user})
            n = len(self.calls)
        if self.fail:
            raise ConfigError("no live worker serves region r1")
        return f"exec{n}"


def sched(name: str = "nightly", cron: str = "0 2 * * *", **kw: Any) -> Schedule:
    return Schedule(name=name, cron=Cron.parse(cron), files=("/p/pipe.yaml",), **kw)


@pytest.fixture
def claims_url(redis_db: Callable[[], str]) -> str:
    """A Redis database leased for the test (emptied when leased), for the claims."""
    return redis_db()


@pytest.fixture
def redis_claims(claims_url: str) -> Iterator[RedisClaims]:
    store = RedisClaims(claims_url)
    yield store
    store.client.flushdb()


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_a_due_schedule_is_submitted_once_however_often_the_tick_runs(
        kind: str, tmp_path: Path, redis_claims: RedisClaims) -> None:
    store = FileClaims(tmp_path) if kind == "file" else redis_claims
    submit = FakeSubmit()
    plan = [sched(pipeline="app", inputs={"tag": "2"}), sched("hourly", "@hourly")]
    first = tick(at(2025, 5, 1, 2, 0, 3), schedules=plan, submit=submit, store=store)
    assert first == [
        {"name": "nightly", "slot": "2025-05-01T02:00:00Z", "execution": "exec1",
         "at": "2025-05-01T02:00:03Z"},
        {"name": "hourly", "slot": "2025-05-01T02:00:00Z", "execution": "exec2",
         "at": "2025-05-01T02:00:03Z"}]
    assert submit.calls[0] == {"files": ["/p/pipe.yaml"], "pipeline": "app",
                               "inputs": {"tag": "2"}, "user": "scheduler"}
    # Again in the same minute, and from a second "beat": nothing new.
    again = tick(at(2025, 5, 1, 2, 0, 40), schedules=plan, submit=submit, store=store)
    assert [r.get("claimed") for r in again] == [False, False] and len(submit.calls) == 2
    # The next hour's slot is new for the hourly schedule only.
    later = tick(at(2025, 5, 1, 3, 0, 1), schedules=plan, submit=submit, store=store)
    assert [(r["name"], r.get("execution")) for r in later] == [("hourly", "exec3")]
    assert store.last("nightly") == {"slot": "2025-05-01T02:00:00Z", "execution": "exec1",
                                     "at": "2025-05-01T02:00:03Z"}
    assert store.last("never") is None


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_concurrent_ticks_claim_a_slot_once(kind: str, tmp_path: Path, claims_url: str) -> None:
    submit = FakeSubmit()
    plan = [sched(f"s{i}", "*/5 * * * *") for i in range(5)]
    barrier = threading.Barrier(8)

    def one() -> None:
        store = FileClaims(tmp_path) if kind == "file" else RedisClaims(claims_url)
        barrier.wait()
        tick(at(2025, 5, 1, 2, 5, 9), schedules=plan, submit=submit, store=store)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(c["files"][0] for c in submit.calls) == ["/p/pipe.yaml"] * 5


def test_late_slots_are_skipped_and_failures_are_kept_not_retried(tmp_path: Path) -> None:
    store = FileClaims(tmp_path)
    submit = FakeSubmit(fail=True)
    plan = [sched(deadline=120)]
    assert tick(at(2025, 5, 1, 2, 2, 1), schedules=plan, submit=submit, store=store) == []
    [res] = tick(at(2025, 5, 1, 2, 1, 59), schedules=plan, submit=submit, store=store)
    assert res["error"] == "no live worker serves region r1"
    assert tick(at(2025, 5, 1, 2, 1, 59), schedules=plan, submit=submit,
                store=store) == [{"name": "nightly", "slot": "2025-05-01T02:00:00Z",
                                  "claimed": False}]
    assert len(submit.calls) == 1
    assert store.last("nightly")["error"] == "no live worker serves region r1"  # type: ignore[index]
    # A slot older than the one kept is never claimed (the state only moves forward).
    assert not store.claim("nightly", at(2025, 4, 30, 2, 0))
    rows = describe(plan, at(2025, 5, 1, 12, 0), store=store)
    assert rows[0]["next_run"] == "2025-05-02T02:00:00Z" and rows[0]["in_seconds"] == 50400
    assert rows[0]["last"]["slot"] == "2025-05-01T02:00:00Z"


def test_the_tick_is_a_task_on_the_beat_every_minute() -> None:
    from celery.schedules import crontab

    from app.celery import app, build_config

    entry = build_config()["beat_schedule"]["vmfarm-schedules"]
    assert entry["task"] == "vmfarm.schedules_tick" and entry["schedule"] == crontab()
    assert "app.schedules" in app.conf.include
    app.loader.import_default_modules()
    assert "vmfarm.schedules_tick" in app.tasks
    assert app.amqp.router.route({}, "vmfarm.schedules_tick", (), {})["queue"].name == \
        "vmfarm.control"


# --- vmfarm schedules -----------------------------------------------------------------------------


def test_vmfarm_schedules_lists_them_with_their_next_run(tmp_path: Path) -> None:
    f = write(tmp_path / "s.yaml", """
schedules:
  - {name: nightly, cron: "0 2 * * *", files: [p.yaml], pipeline: app}
  - {name: paris, cron: "30 8 * * mon-fri", timezone: Europe/Paris, files: [p.yaml]}
  - {name: paused, cron: "@hourly", files: [p.yaml], enabled: false}
""")
    write(tmp_path / "p.yaml", "")
    env = base_env(VMFARM_HOME=str(tmp_path / "home"), VMFARM_SCHEDULES_FILE=str(f))
    before = datetime.now(UTC)
    res = subprocess.run([*VMFARM, "schedules", "-o", "json"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["file"] == str(f)
    rows = {r["name"]: r for r in data["schedules"]}
    assert list(rows) == ["nightly", "paris", "paused"]
    for name, tz in (("nightly", UTC), ("paris", ZoneInfo("Europe/Paris"))):
        cron = Cron.parse(rows[name]["cron"])
        expect = cron.next_after(before, tz)
        assert expect is not None
        got = datetime.fromisoformat(rows[name]["next_run"].replace("Z", "+00:00"))
        assert got in (expect, cron.next_after(expect, tz))  # a minute may have passed
        assert datetime.fromisoformat(rows[name]["next_run_local"]) == got
    assert rows["paris"]["timezone"] == "Europe/Paris" and rows["paris"]["pipeline"] is None
    assert rows["nightly"]["files"] == [str(tmp_path / "p.yaml")]
    assert rows["paused"]["enabled"] is False and rows["paused"]["next_run"] is None
    assert rows["nightly"]["last"] is None and rows["nightly"]["missing_files"] == []

    text = subprocess.run([*VMFARM, "schedules"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "nightly" in text.stdout and "0 2 * * *" in text.stdout
    assert "disabled" in text.stdout and "Europe/Paris" in text.stdout

    write(f, "- {name: a, cron: '61 * * * *', files: [p.yaml]}\n")
    bad = subprocess.run([*VMFARM, "schedules"], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "minute: 61 is out of range" in bad.stderr
    none = subprocess.run([*VMFARM, "schedules", "-o", "json"],
                          env={**env, "VMFARM_SCHEDULES_FILE": ""}, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert none.returncode == 0 and json.loads(none.stdout) == {"file": None, "schedules": []}


# --- the tick on a real control worker ------------------------------------------------------------

PIPELINE = """
apiVersion: v1
kind: Service
metadata: {name: sched-svc, identifier: sched_svc}
spec:
  serviceDefinition: {type: SSH}
---
apiVersion: v1
kind: Environment
metadata: {name: sched-env, identifier: sched_env}
spec: {type: PreProduction}
---
apiVersion: v1
kind: Infrastructure
metadata: {name: sched-hosts, identifier: sched_hosts}
spec:
  environmentRef: sched_env
  deploymentType: Ssh
  type: Pdc
  spec:
    region: sc
    connection: {type: SSH, user: root}
    hosts: [{hostname: 127.0.1.209}]
---
apiVersion: v1
kind: Pipeline
metadata: {name: scheduled, identifier: scheduled}
spec:
  stages:
    - stage:
        name: Approve
        identifier: approve
        type: Approval
        spec:
          execution:
            steps:
              - step:
                  type: HarnessApproval
                  name: Approve
                  identifier: approve
                  timeout: 1d
                  spec:
                    approvalMessage: go?
                    approvers: {userGroups: [ops], minimumCount: 1}
    - stage:
        name: Deploy
        identifier: deploy
        type: Deployment
        spec:
          service: {serviceRef: sched_svc}
          environment:
            environmentRef: sched_env
            infrastructureDefinitions: [{identifier: sched_hosts}]
          execution:
            steps:
              - step:
                  type: Command
                  name: Hello
                  identifier: hello
                  spec:
                    commandUnits:
                      - identifier: hi
                        type: Script
                        spec: {source: {type: Inline, spec: {script: echo hi}}}
"""


def test_the_tick_task_on_a_control_worker_submits_a_real_execution(
        pg_url: str, tmp_path: Path, claims_url: str, redis_claims: RedisClaims,
        redis_db: Callable[[], str]) -> None:
    write(tmp_path / "pipe" / "all.yaml", PIPELINE)
    users = write(tmp_path / "users.yaml", "groups:\n  ops: [alice]\n")
    f = write(tmp_path / "schedules.yaml",
              "schedules:\n  - {name: every-minute, cron: '* * * * *', files: [pipe],\n"
              "     pipeline: scheduled, startingDeadline: 1h}\n")
    # The broker's database is where the tick keeps its claims.
    env = base_env(VMFARM_BROKER_URL=claims_url, VMFARM_RESULT_BACKEND=redis_db(),
                   VMFARM_DATABASE_URL=pg_url, VMFARM_HOME=str(tmp_path / "home"),
                   VMFARM_SCHEDULES_FILE=str(f), VMFARM_USERS_FILE=str(users),
                   VMFARM_HEARTBEAT_INTERVAL="0.5")
    log = tmp_path / "worker.log"
    with log.open("wb") as fh:
        # Control (the tick) and region sc (the pipeline's hosts: submit wants a live worker).
        worker = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker", "--control", "--region", "sc",
             "-n", "w-sched@test", "-c", "2"], env=env, cwd=REPO, stdout=fh,
            stderr=subprocess.STDOUT, start_new_session=True)
    # Two ticks in a row, as two beats would send them.
    send = "from app.celery import app\nfor _ in range(2): app.send_task('vmfarm.schedules_tick')\n"
    def worker_log() -> str:
        return log.read_text(errors="replace")[-4000:]

    def logged(pattern: str, times: int = 1) -> bool:
        assert worker.poll() is None, f"the worker exited:\n{worker_log()}"
        return len(re.findall(pattern, log.read_text(errors="replace"))) >= times

    try:
        wait_for(lambda: logged(r" ready\."), 120, "the worker to start", explain=worker_log)
        subprocess.run([sys.executable, "-c", send], env=env, cwd=REPO, check=True, timeout=60)
        # Both ticks done (the worker logs each task it finished; ticks keep no result).
        wait_for(lambda: logged(r"Task vmfarm\.schedules_tick\[[^\]]+\] succeeded", 2), 120,
                 "both ticks to finish", explain=worker_log)
        last = redis_claims.last("every-minute")
        assert last and "execution" in last, (last, worker_log())
        res = subprocess.run([sys.executable, "-m", "cli.main", "executions", "-o", "json"],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        mine = [e for e in json.loads(res.stdout) if e["pipeline"] == "scheduled"]
        assert last["execution"] in [e["id"] for e in mine]
        assert {(e["created_by"], e["status"]) for e in mine} == {("scheduler", "WAITING")}
        # One execution per claimed slot: two if the minute turned between the two ticks.
        claims = redis_claims.client.keys("vmfarm:schedule:every-minute:*")
        assert len(mine) == len(claims) and len(claims) in (1, 2)
    finally:
        _stop([worker])
