"""The progress line: plain lines where stderr is not a terminal (a log, a pipe), rich's live line on one."""

import io
import os
import pty
import select

import pytest

from search import progress as progress_mod
from search.progress import Progress


@pytest.fixture
def study(monkeypatch):
    """One trial done, none feasible: what Progress reads of a study."""
    monkeypatch.setattr(progress_mod, "counts", lambda s: {"complete": 1, "pruned": 0, "failed": 0, "infeasible": 0})
    monkeypatch.setattr(progress_mod, "best_feasible", lambda s: None)
    monkeypatch.setattr(progress_mod, "finished", lambda s: 1)
    return object()


def run_one_trial(progress, study):
    progress.study_started(study, 5)
    progress.stage("baseline: serve")
    progress.trial_started(1, "ref")
    progress.stage("serve [x]")
    progress.stage("warmup")
    progress.trial_finished("complete", 1.5)
    progress.close()


def test_not_a_terminal_gets_one_line_per_stage_and_trial(study):
    stream = io.StringIO()
    progress = Progress(stream)
    assert not progress.live
    run_one_trial(progress, study)
    lines = stream.getvalue().splitlines()
    # Each line is written as its stage begins, so it says what the stage before it took.
    assert lines[0] == "baseline: serve"
    assert lines[1].startswith("baseline: serve took ") and lines[1].endswith("s")
    assert lines[2] == "trial 1: preset ref"
    assert lines[3].startswith("[1/5] trial 1 serve [x] (trial ") and lines[3].endswith(
        "| complete 1 pruned 0 failed 0 infeasible 0 | best feasible none yet")
    assert lines[4].startswith("[1/5] trial 1 warmup (serve [x] took ")
    assert lines[5].startswith("trial 1 complete in ") and ", warmup took " in lines[5]
    assert len(lines) == 6


def test_a_terminal_gets_the_live_line_and_the_trials_above_it(study):
    master, replica = pty.openpty()
    stream = os.fdopen(replica, "w")
    progress = Progress(stream, refresh_s=0.05)
    assert progress.live
    run_one_trial(progress, study)
    stream.flush()
    out = b""
    # The pty hands the master what was written a moment later (the kernel pushes it): read until the
    # last line has come, or nothing more comes for 10 s.
    while not out.endswith(b"J/request\r\n") and select.select([master], [], [], 10)[0]:
        out += os.read(master, 1 << 16)
    out = out.decode()
    os.close(master)
    stream.close()
    assert "trial 1: preset ref\r\n" in out and "trial 1 complete in " in out
    # The last state, whole, as a plain line once the live line is gone.
    assert out.rstrip().splitlines()[-1].endswith("complete 2 pruned 0 failed 0 infeasible 0 | best feasible 1.5 J/request")
