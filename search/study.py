"""The study: Optuna over the joint space, one trial pipeline per trial, MLflow for review.

Samplers are chosen by name (constraint-aware TPE by default: the gate is a trial constraint); the storage is any Optuna RDB URL
(SQLite by default, PostgreSQL for many workers) with heartbeats, so a worker that dies mid-trial
has its trial failed and retried by the others.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from search import config as cfg
from search import space as space_mod
from search import trial as trial_mod
from search.progress import Progress
from search.track import Tracker

OBJECTIVE = "energy_j_per_request"
SAMPLERS = ("tpe", "nsga2", "motpe", "gp", "random")
MULTI_OBJECTIVE = ("nsga2", "motpe")


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name in ("tpe", "motpe"):  # the same sampler; the study's directions make it multi-objective
        return optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=seed,
                                          n_startup_trials=8)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=10)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise cfg.ConfigError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")


def storage(url: str, heartbeat_s: int = 30) -> RDBStorage:
    """A worker whose trial has sent no heartbeat for 3 intervals is taken as dead; its trial is
    failed by the next worker that starts a trial, and run again once."""
    return RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=3 * heartbeat_s,
                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                      engine_kwargs={"pool_pre_ping": True})


def open_study(name: str, storage_url: str, sampler: str = "tpe", seed: int | None = 0,
               heartbeat_s: int = 30) -> optuna.Study:
    directions = ["minimize", "maximize"] if sampler in MULTI_OBJECTIVE else ["minimize"]
    return optuna.create_study(study_name=name, storage=storage(storage_url, heartbeat_s),
                               sampler=make_sampler(sampler, seed),
                               directions=directions, load_if_exists=True)


def load_study(name: str, storage_url: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage(storage_url))
    except KeyError:
        raise cfg.ConfigError(f"no study named {name!r} in {storage_url}") from None


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials by state. `feasible` is the part of `complete` that passed the recovery gate;
    `infeasible` are configurations rejected before any work (they cannot run here)."""
    out = {"complete": 0, "feasible": 0, "pruned": 0, "infeasible": 0, "failed": 0, "running": 0, "waiting": 0}
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            out["complete"] += 1
            out["feasible"] += bool(t.user_attrs.get("feasible"))
        elif t.state == TrialState.PRUNED:
            out["infeasible" if t.user_attrs.get("infeasible") else "pruned"] += 1
        elif t.state == TrialState.FAIL:
            out["failed"] += 1
        elif t.state == TrialState.RUNNING:
            out["running"] += 1
        elif t.state == TrialState.WAITING:
            out["waiting"] += 1
    return out


def best_feasible(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    feasible = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get("feasible")]
    return min(feasible, key=lambda t: t.values[0], default=None)


def finished(study: optuna.Study) -> int:
    """Trials that count towards --trials: complete, pruned, and failed ones that are not retried."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials} | {t.system_attrs.get("failed_trial") for t in trials}
    return sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and t.number not in retried))


@dataclass
class RunOptions:
    trials: int
    timeout_s: float | None
    warm_start: str
    presets: dict[str, dict[str, Any]]
    trial_timeout_s: float | None = None


def warm_start(study: optuna.Study, space: space_mod.Space, presets: dict[str, dict[str, Any]]) -> int:
    """Enqueue each preset once per study (a resumed study does not enqueue them again)."""
    done = set(study.user_attrs.get("warm_started", []))
    queued = 0
    for name, values in presets.items():
        if name in done:
            continue
        study.enqueue_trial(space.enqueue_params(values), user_attrs={"preset": name})
        done.add(name)
        queued += 1
    study.set_user_attr("warm_started", sorted(done))
    return queued


def retry_interrupted(study: optuna.Study) -> int:
    """Trials a Ctrl-C or crash left failed are run again once, with the same parameters."""
    retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    queued = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if t.user_attrs.get("interrupted") and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, **(
                {"preset": t.user_attrs["preset"]} if "preset" in t.user_attrs else {})})
            queued += 1
    return queued


class Objective:
    def __init__(self, study: optuna.Study, space: space_mod.Space, runtime: trial_mod.Runtime,
                 baseline: dict, tracker: Tracker, presets: dict[str, dict[str, Any]], progress: Progress,
                 multi_objective: bool, trial_timeout_s: float | None = None):
        self.study = study
        self.space = space
        self.runtime = runtime
        self.baseline = baseline
        self.tracker = tracker
        self.presets = presets
        self.progress = progress
        self.multi_objective = multi_objective
        self.trial_timeout_s = trial_timeout_s
        self._expired = threading.Event()

    def _expire(self) -> None:
        """The trial's time is up: killing its server and compressor makes the running stage fail."""
        self._expired.set()
        self.runtime.pool.discard()
        self.runtime.compressor.close()

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        workdir = self.runtime.workdir / f"trial-{trial.number:04d}"
        trial.set_user_attr("workdir", str(workdir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        preset = self.presets.get(trial.user_attrs.get("preset", ""), {})
        self.progress.trial_started(trial.number, trial.user_attrs.get("preset"))
        times: dict[str, float] = {}
        record: dict[str, Any] = {"number": trial.number, "params": {}, "metrics": times, "tags": {},
                                  "artifacts": []}
        started = time.perf_counter()
        self._expired.clear()
        watchdog = threading.Timer(self.trial_timeout_s, self._expire) if self.trial_timeout_s else None
        if watchdog:
            watchdog.start()
        try:
            config = self.space.sample(trial, preset)
            record["params"] = config.flat()
            trial.set_user_attr("config", record["params"])
            outcome = trial_mod.run(self.runtime, config, workdir, self.baseline, self.progress.stage, times)
        except space_mod.Infeasible as exc:
            return self._end(trial, record, "PRUNED", f"infeasible: {exc}", started, infeasible=True)
        except trial_mod.TrialPruned as exc:
            return self._end(trial, record, "PRUNED", f"pruned: {exc}", started)
        except Exception as exc:  # whatever broke, the trial is recorded with its reason and the study goes on
            self.runtime.pool.discard()  # a server that saw a failure is not reused
            reason = (f"trial exceeded its time budget of {self.trial_timeout_s:.0f} s" if self._expired.is_set()
                      else f"{type(exc).__name__}: {exc}")
            return self._end(trial, record, "FAIL", reason, started, workdir=workdir)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            self._end(trial, record, "FAIL", "interrupted (Ctrl-C)", started, raise_=False, workdir=workdir)
            raise
        finally:
            if watchdog:
                watchdog.cancel()
        record["metrics"] = outcome.metrics
        record["tags"] = outcome.tags
        record["artifacts"] = [str(p) for p in outcome.artifacts]
        trial.set_user_attr("metrics", {k: v for k, v in outcome.metrics.items() if _finite(v)})
        trial.set_user_attr("feasible", outcome.feasible)
        trial.set_user_attr("energy_source", outcome.tags["energy_source"])
        # <= 0 is feasible: the samplers read it to prefer configurations that pass the gate.
        trial.set_constraint("recovery_gate", -outcome.metrics["recovery_margin"])
        record["metrics"]["trial_s"] = time.perf_counter() - started
        record["tags"].update({"state": "COMPLETE", "search.study": self.study.study_name})
        self.tracker.log_trial(record)
        self.progress.trial_finished("complete", outcome.objective if outcome.feasible else None)
        if self.multi_objective:
            return outcome.objective, outcome.recovery
        return outcome.objective

    def _end(self, trial: optuna.Trial, record: dict, state: str, reason: str, started: float,
             infeasible: bool = False, raise_: bool = True, workdir: Path | None = None):
        trial.set_user_attr("reason", reason[:1000])
        trial.set_user_attr("infeasible", infeasible)
        trial.set_user_attr("stage_times", dict(record["metrics"]))
        record["tags"].update({"state": "INFEASIBLE" if infeasible else state, "failure_reason": reason[:4000],
                               "feasible": "false", "search.study": self.study.study_name})
        record["metrics"]["trial_s"] = time.perf_counter() - started
        if workdir is not None:
            record["artifacts"] = [str(p) for p in sorted(workdir.glob("*")) if p.is_file()]
        self.tracker.log_trial(record)
        self.progress.trial_finished("infeasible" if infeasible else state.lower(), None, reason)
        if not raise_:
            return None
        if state == "PRUNED":
            raise optuna.TrialPruned(reason)
        raise TrialFailed(reason)


class TrialFailed(Exception):
    """Raised inside the objective so Optuna records the trial as failed (caught by optimize)."""


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def run(study: optuna.Study, space: space_mod.Space, runtime: trial_mod.Runtime, baseline: dict,
        tracker: Tracker, options: RunOptions, progress: Progress) -> dict[str, int]:
    if options.warm_start == "seeds":
        warm_start(study, space, options.presets)
    retry_interrupted(study)
    objective = Objective(study, space, runtime, baseline, tracker, options.presets, progress,
                          len(study.directions) > 1, options.trial_timeout_s)
    progress.study_started(study, options.trials)

    def enough(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        if finished(study) >= options.trials:  # counted across every worker of the study
            study.stop()

    if finished(study) < options.trials:
        study.optimize(objective, timeout=options.timeout_s, catch=(TrialFailed,), callbacks=[enough])
    tracker.flush()
    return counts(study)


def study_dir(home: Path, name: str) -> Path:
    path = home / "studies" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def summary(study: optuna.Study) -> dict[str, Any]:
    best = best_feasible(study)
    return {
        "study": study.study_name,
        "counts": counts(study),
        "best_feasible": None if best is None else {
            "trial": best.number, "objective": best.values[0], "objective_name": OBJECTIVE,
            "recovery_mean": best.user_attrs.get("metrics", {}).get("recovery_mean"),
            "floor_ratio": best.user_attrs.get("metrics", {}).get("floor_ratio"),
            "energy_source": best.user_attrs.get("energy_source"), "config": best.user_attrs.get("config")},
    }


def trial_record(study: optuna.Study, number: int) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise cfg.ConfigError(f"study {study.study_name} has no trial {number} (it has {len(trials)})")
    t = trials[number]
    return {"trial": t.number, "state": t.state.name, "values": t.values, "params": t.params,
            "user_attrs": t.user_attrs, "duration_s": t.duration.total_seconds() if t.duration else None}


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
