"""Retrying a call after a fixed series of pauses: the storage's calls (search/study.py) and the
MLflow spool's writes (search/track.py) wait the same way, each with its own pauses."""

from __future__ import annotations

from collections.abc import Sequence

import tenacity


def after_pauses(pauses: Sequence[float], retry: tenacity.retry_base) -> tenacity.Retrying:
    """Up to len(pauses) more tries, the pauses apart, while `retry` says so; the last failure is
    raised as it was."""
    return tenacity.Retrying(retry=retry, wait=tenacity.wait_chain(*map(tenacity.wait_fixed, pauses)),
                             stop=tenacity.stop_after_attempt(len(pauses) + 1), reraise=True)
