"""A throwaway PostgreSQL cluster on loopback, for trying many workers on one machine (tests, bench).

Debian's server binaries (`apt-get install postgresql`; setup.sh installs them as root); trust
authentication on 127.0.0.1 only; initdb refuses root, so as root the cluster runs as `postgres`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

from search.serve import free_port


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
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
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
    subprocess.run(as_postgres + [str(binaries / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-o",
                                  f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_postgres + [str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
