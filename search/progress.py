"""A live view of the study on the terminal: current trial and stage, elapsed time, counts, best so far."""

from __future__ import annotations

import sys
import threading
import time

import optuna

from search.summaries import best_feasible, counts, finished


class Progress:
    def __init__(self, stream=sys.stderr, refresh_s: float = 1.0):
        self.stream = stream
        self.live = stream.isatty()
        self.refresh_s = refresh_s
        self.counts = {"complete": 0, "pruned": 0, "failed": 0, "infeasible": 0}
        self.best: float | None = None
        self.total = 0
        self.done = 0
        self.trial: int | None = None
        self.stage_name = ""
        self.stage_started = self.trial_started_at = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _line(self) -> str:
        now = time.monotonic()
        best = f"{self.best:.4g} J/request" if self.best is not None else "none yet"
        c = self.counts
        if self.trial is None:  # before the study: the reference run
            return f"{self.stage_name} {now - self.stage_started:5.1f}s"
        return (f"[{self.done}/{self.total}] trial {self.trial} {self.stage_name} "
                f"{now - self.stage_started:5.1f}s (trial {now - self.trial_started_at:5.1f}s) | "
                f"complete {c['complete']} pruned {c['pruned']} failed {c['failed']} "
                f"infeasible {c['infeasible']} | best feasible {best}")

    def _print(self, text: str, final: bool = False) -> None:
        if self.live:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self._print(self._line())

    def study_started(self, study: optuna.Study, total: int) -> None:
        now = counts(study)
        self.counts = {k: now[k] for k in self.counts}
        best = best_feasible(study)
        self.best = best.values[0] if best else None
        self.total = total
        self.done = finished(study)
        if self.live and self._thread is None:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()

    def trial_started(self, number: int, preset: str | None) -> None:
        self.trial = number
        self.trial_started_at = time.monotonic()
        if preset:
            self._print(f"trial {number}: preset {preset}", final=True)

    def stage(self, name: str) -> None:
        self.stage_name = name
        self.stage_started = time.monotonic()
        if not self.live:
            self._print(self._line())

    def trial_finished(self, state: str, objective: float | None, reason: str = "") -> None:
        self.counts[state] = self.counts.get(state, 0) + 1
        self.done += 1
        if objective is not None and (self.best is None or objective < self.best):
            self.best = objective
        note = f" ({reason if len(reason) <= 240 else reason[:239] + '…'})" if reason else ""
        self._print(f"trial {self.trial} {state} in {time.monotonic() - self.trial_started_at:.1f}s{note}",
                    final=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
            self._print(self._line(), final=True)
