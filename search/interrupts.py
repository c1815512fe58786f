"""SIGTERM and SIGHUP end a study the way Ctrl-C does.

A scheduler, `kill`, a CI time-out and a closed terminal stop a process with SIGTERM or SIGHUP,
not SIGINT: each becomes an `Interrupted` (a KeyboardInterrupt), so the running trial is recorded
as failed and retried, and every `finally` stops the servers and the compression worker.

One stop signal is acted on; later ones are ignored, so that the clean-up runs to its end (SIGKILL
still works, and search/lifeline.py then stops the children). Optuna's own bookkeeping (asking
for a trial, telling its result) and the recording of a finished trial run `deferred()`: a signal
that arrives there waits for the block to end, so no trial is left RUNNING and no finished trial
is lost. Inside such a block, `interruptible()` marks the trial's work, which a signal cuts at once.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name


class _State:
    deferred = False  # inside a block where a signal waits
    interruptible = False  # inside that block, in the part a signal may cut
    pending: int | None = None


_state = _State()


def _on_signal(signum: int, _frame) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if _state.deferred and not _state.interruptible:
        _state.pending = signum
        return
    raise Interrupted(signum)


def handle_stop_signals() -> None:
    """Call once, from the main thread, before any work that must be cleaned up."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)


def _raise_pending() -> None:
    if _state.pending is not None and (not _state.deferred or _state.interruptible):
        signum, _state.pending = _state.pending, None
        raise Interrupted(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    outer = (_state.deferred, _state.interruptible)
    _state.deferred, _state.interruptible = True, False
    try:
        yield
    finally:
        _state.deferred, _state.interruptible = outer
    _raise_pending()  # only after a block that ended normally: an exception in flight goes first


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    outer = _state.interruptible
    _state.interruptible = True
    try:
        _raise_pending()
        yield
    finally:
        _state.interruptible = outer


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process a signal ended."""
    return 128 + getattr(exc, "signum", signal.SIGINT)


def signal_name(exc: KeyboardInterrupt) -> str:
    return getattr(exc, "signal_name", "SIGINT")
