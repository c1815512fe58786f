"""The study loop under faults: many workers, a database restart, a full disk, a trial over its time
budget while its server starts, stop signals. Real Optuna storages, real PostgreSQL, a real full
filesystem, a real vLLM server; the trial pipeline itself is replaced only where it is not the
subject (the workers and the full-disk tests)."""

import io
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import psutil
import pytest
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from objectives.recovery import Gate
from search import interrupts, local_postgres, track
from search import space as space_mod
from search import study as study_mod
from search import trial as trial_mod
from search.compress import CheckpointCache, Compressor
from search.progress import Progress
from search.serve import ServerPool
from search.track import Tracker

PROJECT = Path(__file__).resolve().parents[1]
E2E_SPACE = PROJECT / "tests" / "data" / "e2e_space.yaml"


def short_trial(trial):
    time.sleep(0.2)
    return trial.suggest_float("x", 0, 1)


def worker(url, trials, seed):
    study = study_mod.open_study("exact", url, "random", seed)
    study_mod.optimize_until(study, short_trial, study_mod.RunOptions(trials, None, "none", {}, storage_url=url,
                                                                      poll_s=0.1))


@pytest.fixture
def postgres(tmp_path):
    if local_postgres.server_binaries() is None:
        pytest.skip("PostgreSQL server binaries not installed (setup.sh installs them as root)")
    with local_postgres.cluster(tmp_path / "pg") as url:
        yield tmp_path / "pg", url


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_exactly_the_asked_number_of_trials_finish_with_many_workers(backend, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if backend == "sqlite" else request.getfixturevalue("postgres")[1]
    study_mod.open_study("exact", url, "random")
    fork = multiprocessing.get_context("fork")
    workers = [fork.Process(target=worker, args=(url, 10, seed)) for seed in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    trials = study_mod.load_study("exact", url).get_trials()
    # Without the shared count and lock, each of the 4 workers could start one trial past the 10th.
    assert len(trials) == 10 and all(t.state == TrialState.COMPLETE for t in trials)


def test_a_database_restart_mid_study_costs_a_retry_not_the_study(postgres):
    base, url = postgres
    study = study_mod.open_study("restart", url, "random", heartbeat_s=1)

    def objective(trial):
        if trial.number == 1:  # PostgreSQL goes down (every connection drops) while this trial records
            restart = threading.Thread(target=local_postgres.restart, args=(base, make_url(url).port, 2.0))
            restart.start()
            time.sleep(0.5)
            trial.set_user_attr("written_while_down", True)
            restart.join()
        return trial.suggest_float("x", 0, 1)

    study_mod.optimize_until(study, objective, study_mod.RunOptions(3, None, "none", {}, storage_url=url))
    trials = study_mod.load_study("restart", url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert trials[1].user_attrs["written_while_down"] is True


@pytest.fixture
def full_disk(tmp_path):
    """A 512 KiB filesystem of the test's own, filled up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(mount: Path) -> Path:
    filler = mount / "filler"
    with open(filler, "wb") as handle:
        try:
            handle.write(b"\0" * (1 << 20))
        except OSError:
            pass
    return filler


def test_a_full_disk_fails_the_trial_it_hits_and_the_study_goes_on(full_disk, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(track, "SPOOL_RETRY_S", (0.05,))  # the retries themselves, shortened
    tracker = Tracker("http://127.0.0.1:9", "full", tmp_path / "art", full_disk / "spool")  # MLflow away too
    outcome = trial_mod.Outcome(1.0, 1.0, True, {"recovery_margin": 0.2, "energy_j_per_request": 1.0},
                                {"energy_source": "estimate"}, [])
    monkeypatch.setattr(trial_mod, "run", lambda *args: trial_mod.TrialRecord(outcome=outcome))
    study = optuna.create_study()
    space = space_mod.load(E2E_SPACE)
    objective = study_mod.Objective(study, space, SimpleNamespace(workdir=tmp_path), trial_mod.Baseline("test", []),
                                    tracker, {},
                                    Progress(io.StringIO()), False)
    filler = fill(full_disk)
    study.optimize(objective, n_trials=2, catch=(study_mod.TrialFailed,))
    filler.unlink()  # space again: the next trial is recorded as it ends
    study.optimize(objective, n_trials=1, catch=(study_mod.TrialFailed,))

    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    for failed in trials[:2]:
        assert "MLflow record not written" in failed.user_attrs["reason"]
        assert "No space left on device" in failed.user_attrs["reason"]
    pending = tracker.pending()
    assert len(pending) == 1 and '"number": 2' in pending[0].read_text()  # waits for MLflow, whole
    assert not list(tracker.spool_dir.glob(".*.tmp"))  # no half-written record left behind


def test_a_trial_over_its_budget_stops_its_server_while_it_starts(serve_python, toy_model, platform, tmp_path,
                                                                   monkeypatch):
    """A vLLM server takes ~35 s to start here; a 3 s budget stops it before it is ready."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    space = space_mod.load(E2E_SPACE).pinned({"compress.scheme": "none"})
    pool = ServerPool(serve_python)
    runtime = trial_mod.Runtime(tmp_path, toy_model, CheckpointCache(tmp_path / "cache"), pool,
                                Compressor(sys.executable), platform, Gate(0.8), space.reference_config(),
                                tmp_path / "data")
    study = optuna.create_study()
    tracker = Tracker("http://127.0.0.1:9", "budget", tmp_path / "art", tmp_path / "spool")
    objective = study_mod.Objective(study, space, runtime, trial_mod.Baseline("test", []), tracker, {},
                                    Progress(io.StringIO()), False, trial_timeout_s=3)
    started = time.monotonic()
    study.optimize(objective, n_trials=1, catch=(study_mod.TrialFailed,))
    elapsed = time.monotonic() - started

    trial = study.get_trials()[0]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["reason"] == "trial exceeded its time budget of 3 s"
    assert (tmp_path / "trial-0000" / "server.log").exists()  # it was launched ...
    assert elapsed < 25  # ... and stopped long before it could have been ready
    assert psutil.Process().children(recursive=True) == []  # no server left


def test_a_stop_signal_waits_for_bookkeeping_and_cuts_the_trials_work():
    saved = {sig: signal.getsignal(sig) for sig in interrupts.STOP_SIGNALS}
    try:
        interrupts.handle_stop_signals()
        reached = []
        with pytest.raises(interrupts.Interrupted) as raised:
            with interrupts.deferred():  # Optuna asking for a trial, telling its result
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.1)
                reached.append("bookkeeping ended")
        assert reached == ["bookkeeping ended"] and raised.value.signal_name == "SIGTERM"
        assert interrupts.exit_code(raised.value) == 143

        interrupts.handle_stop_signals()
        with pytest.raises(interrupts.Interrupted) as raised:
            with interrupts.deferred(), interrupts.interruptible():  # the trial's work
                os.kill(os.getpid(), signal.SIGHUP)
                time.sleep(5)
                reached.append("work went on")
        assert raised.value.signal_name == "SIGHUP" and "work went on" not in reached
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal while the clean-up runs: ignored
        time.sleep(0.1)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
