"""A throwaway PostgreSQL cluster on loopback, for trying many workers on one machine (tests, bench).

Debian's server binaries (`apt-get install postgresql`; setup.sh installs them as root); trust
authentication on 127.0.0.1 only; initdb refuses root, so as root the cluster runs as `postgres`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

from search.net import free_port


def server_binaries() -> Path | None:
    """The newest installed PostgreSQL's bin folder, or None."""
    root = Path("/usr/lib/postgresql")
    found = sorted(root.glob("*/bin")) if root.exists() else []
    return found[-1] if found else None


@contextlib.contextmanager
def cluster(base: Path) -> Iterator[str]:
    """Start a cluster in the folder ``base`` (made if missing) and yield its URL; stop it on exit."""
    binaries = server_binaries()
    if binaries is None:
        raise RuntimeError("PostgreSQL server binaries not installed (apt-get install postgresql)")
    base.mkdir(parents=True, exist_ok=True)
    data = base / "data"
    as_postgres = _as_postgres()
    if as_postgres:
        # The postgres user must reach its data folder through every parent.
        os.chmod(base, 0o777)
        for parent in base.parents:
            if parent == Path("/"):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o011)
    port = free_port()
    subprocess.run(as_postgres + [str(binaries / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres"],
                   check=True, capture_output=True)
    _start(base, port)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        _stop(base)


def restart(base: Path, port: int, down_s: float) -> None:
    """Stop the cluster in `base` at once, as a crash would (every connection drops), and start it
    again on the same port after `down_s` seconds."""
    _stop(base)
    time.sleep(down_s)
    _start(base, port)


def _as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _pg_ctl(base: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_as_postgres() + [str(server_binaries() / "pg_ctl"), "-D", str(base / "data"), *args],
                          capture_output=True)


def _start(base: Path, port: int) -> None:
    _pg_ctl(base, "-l", str(base / "log"), "-w", "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1",
            "start").check_returncode()


def _stop(base: Path) -> None:
    _pg_ctl(base, "-m", "immediate", "stop")
