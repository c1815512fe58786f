"""Run a command that must not outlive the process that started it.

The vLLM server and the compression worker run in sessions of their own (so that each is stopped
as one process group, engine and workers included). A study killed with SIGKILL could not stop
them, and they would live on as orphans: on a GPU such a server holds 90% of the card. This script
leads the group: it runs the command as its child, and when its owner is gone (it is re-parented)
it stops the whole group, SIGTERM first, SIGKILL after a grace period.

    python lifeline.py OWNER_PID COMMAND...

It uses the standard library only: it runs as a plain script, outside the project's packages.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5  # how soon after its owner's death the group is stopped
GRACE_S = 5.0  # what the command gets to exit on SIGTERM before the group is killed


def command(owner_pid: int, argv: list[str]) -> list[str]:
    """`argv` wrapped so that it dies with `owner_pid` (start it with start_new_session=True)."""
    return [sys.executable, "-I", os.path.abspath(__file__), str(owner_pid), *argv]


def _stop_group() -> None:
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and _group_has_others():
        time.sleep(0.2)
    os.killpg(0, signal.SIGKILL)


def _group_has_others() -> bool:
    me, group = os.getpid(), os.getpgrp()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            try:
                if os.getpgid(int(entry)) == group:
                    return True
            except ProcessLookupError:
                continue
    return False


def main(argv: list[str]) -> int:
    owner, cmd = int(argv[0]), argv[1:]
    # A stop request (SIGTERM to the group) is for the command; this process waits for it to exit.
    # A handler, unlike SIG_IGN, is not inherited by the command.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    child = subprocess.Popen(cmd)
    while True:
        try:
            code = child.wait(timeout=POLL_S)
            break
        except subprocess.TimeoutExpired:
            if os.getppid() != owner:
                _stop_group()  # ends this process too
    if code < 0:  # the owner reads the command's own end: die of the same signal
        if -code in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(-code, signal.SIG_DFL)  # the handlers above would swallow it
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
