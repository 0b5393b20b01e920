"""A throwaway PostgreSQL server for the console's tests: Debian's `postgresql` binaries, a cluster in a temporary
folder, listening on 127.0.0.1 and a socket in that folder only, trust authentication inside it, stopped and
removed when the tests end. Root cannot run PostgreSQL, so as root the cluster belongs to the `postgres` user
the Debian package creates."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def binaries() -> Path | None:
    """The folder of initdb and pg_ctl (the newest installed major version), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def scratch_server(bin_dir: Path) -> Iterator[str]:
    """Start a cluster; yield its base URL (postgresql+psycopg://postgres@127.0.0.1:PORT); stop and remove it."""
    as_root = os.geteuid() == 0
    folder = Path(tempfile.mkdtemp(prefix="medfusion-pg-"))
    run_as = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", _free_port()
    try:
        _run([*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
              "--no-sync"])
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        _run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-o", options, "-w",
              "-t", "60", "start"], log=folder / "log")
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
        finally:
            subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(command: list[str], log: Path | None = None) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        server = log.read_text(errors="replace")[-2000:] if log is not None and log.is_file() else ""
        raise RuntimeError(f"the scratch PostgreSQL could not start: {' '.join(command)} exited "
                           f"{done.returncode}: {done.stderr.strip()[-2000:]} {server}")


def fresh_database(base: str) -> str:
    """A new empty database on the server of `base`; its URL."""
    import psycopg

    name = f"console_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{base}/{name}"
