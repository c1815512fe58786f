"""A live view of the study on the terminal: current trial and stage, elapsed time, counts, best so far.

On a terminal rich redraws the line in place (a `Live` display) and the trials' own lines print above
it; elsewhere (a log file, a pipe) each stage and each trial is a line of its own, written as the stage
begins, so each line says what the stage before it took (a log is read afterwards, for the times).
"""

from __future__ import annotations

import sys
import time

import optuna
from rich.console import Console
from rich.live import Live
from rich.text import Text

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
        self._view: Live | None = None

    def _line(self, stage_time: str | None = None) -> str:
        """The state; `stage_time` replaces the running stage's clock (a log line, written as it begins)."""
        now = time.monotonic()
        best = f"{self.best:.4g} J/request" if self.best is not None else "none yet"
        c = self.counts
        clock = f"{now - self.stage_started:5.1f}s" if stage_time is None else stage_time
        stage = f"{self.stage_name} {clock}".rstrip()
        if self.trial is None:  # before the study: the reference run
            return stage
        return (f"[{self.done}/{self.total}] trial {self.trial} {stage} (trial {now - self.trial_started_at:5.1f}s) | "
                f"complete {c['complete']} pruned {c['pruned']} failed {c['failed']} "
                f"infeasible {c['infeasible']} | best feasible {best}")

    def _stage_took(self) -> str:
        return f"{self.stage_name} took {time.monotonic() - self.stage_started:.1f}s" if self.stage_name else ""

    def _print(self, text: str) -> None:
        if self._view is not None:  # above the live line, which rich draws again below it
            self._view.console.print(Text(text), soft_wrap=True)
            return
        self.stream.write(text + "\n")
        self.stream.flush()

    def _live_line(self) -> Text:
        return Text(self._line(), no_wrap=True, overflow="ellipsis")

    def study_started(self, study: optuna.Study, total: int) -> None:
        now = counts(study)
        self.counts = {k: now[k] for k in self.counts}
        best = best_feasible(study)
        self.best = best.values[0] if best else None
        self.total = total
        self.done = finished(study)
        if self.live and self._view is None:
            self._view = Live(get_renderable=self._live_line, console=Console(file=self.stream),
                              refresh_per_second=1 / self.refresh_s, transient=True,
                              redirect_stdout=False, redirect_stderr=False)
            self._view.start()

    def trial_started(self, number: int, preset: str | None) -> None:
        if self.trial is None and self.stage_name and not self.live:  # the reference run's last stage
            self._print(self._stage_took())
        self.trial = number
        self.trial_started_at = time.monotonic()
        self.stage_name = ""
        if preset:
            self._print(f"trial {number}: preset {preset}")

    def stage(self, name: str) -> None:
        took = self._stage_took()
        self.stage_name = name
        self.stage_started = time.monotonic()
        if not self.live:
            self._print(self._line(f"({took})" if took else ""))

    def trial_finished(self, state: str, objective: float | None, reason: str = "") -> None:
        self.counts[state] = self.counts.get(state, 0) + 1
        self.done += 1
        if objective is not None and (self.best is None or objective < self.best):
            self.best = objective
        note = f" ({reason if len(reason) <= 240 else reason[:239] + '…'})" if reason else ""
        took = "" if self.live else self._stage_took()
        last = f", {took}" if took else ""
        self._print(f"trial {self.trial} {state} in {time.monotonic() - self.trial_started_at:.1f}s{last}{note}")

    def close(self) -> None:
        if self._view is not None:
            view, self._view = self._view, None
            view.stop()  # the live line goes (transient); the last state stays as a plain line
            self._print(self._line())
