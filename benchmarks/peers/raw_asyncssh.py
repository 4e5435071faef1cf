"""The practical lower bound: the benchmark deployment with asyncssh, one process, all hosts.

    raw_asyncssh.py one|steps --hosts 127.0.1.150,... --key K --known-hosts F \
        --artifact artifact.tgz --version V

``one``: one connection per host and ONE exec channel running every step, the tarball streamed
on its stdin. ``steps``: one connection per host; stop / SFTP put / extract + configure / start /
health as separate channels on it. Exit 0 when every host succeeded; failures go to stderr.
Runs in the peers' venv (asyncssh is not a vmfarm dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import asyncssh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import steps


async def _check(
    conn: asyncssh.SSHClientConnection, command: str, what: str, stdin: bytes | None = None
) -> None:
    res = await conn.run(
        command, input=stdin, encoding=None if stdin is not None else "utf-8", check=False
    )
    if res.exit_status != 0:
        err = (
            res.stderr.decode(errors="replace")
            if isinstance(res.stderr, bytes)
            else str(res.stderr)
        )
        raise RuntimeError(f"{what} exited {res.exit_status}: {err.strip()[-300:]}")


async def deploy(addr: str, mode: str, args: argparse.Namespace, blob: bytes) -> None:
    async with asyncssh.connect(
        addr, username="root", client_keys=[args.key], known_hosts=args.known_hosts
    ) as conn:
        if mode == "one":
            await _check(conn, steps.one_channel(addr, args.version), "deploy", stdin=blob)
            return
        await _check(conn, steps.stop(), "stop")
        async with conn.start_sftp_client() as sftp:
            await sftp.put(args.artifact, f"{steps.APP_DIR}/artifact.tgz")
        await _check(
            conn, steps.extract() + " && " + steps.write_conf(addr, args.version), "extract"
        )
        await _check(conn, steps.start(), "start")
        await _check(conn, steps.health(args.version), "health")


async def main_async(args: argparse.Namespace) -> int:
    blob = Path(args.artifact).read_bytes()
    hosts = [h for h in args.hosts.split(",") if h]
    results = await asyncio.gather(
        *(deploy(h, args.mode, args, blob) for h in hosts), return_exceptions=True
    )
    failed = [(h, r) for h, r in zip(hosts, results, strict=True) if isinstance(r, BaseException)]
    for h, r in failed:
        print(f"{h}: {type(r).__name__}: {r}", file=sys.stderr)
    return 1 if failed else 0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["one", "steps"])
    p.add_argument("--hosts", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--known-hosts", required=True)
    p.add_argument("--artifact", required=True)
    p.add_argument("--version", required=True)
    sys.exit(asyncio.run(main_async(p.parse_args())))


if __name__ == "__main__":
    main()
