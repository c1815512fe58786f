"""The study: Optuna over the joint space, one trial pipeline per trial, MLflow for review.

Samplers are chosen by name (constraint-aware TPE by default: the gate is a trial constraint); the storage is any Optuna RDB URL
(SQLite by default, PostgreSQL for many workers) with heartbeats, so a worker that dies mid-trial
has its trial failed and retried by the others.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import statistics
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import optuna
import pydantic.dataclasses
import sqlalchemy
import tenacity
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from search import bill
from search import config as cfg
from search import dedupe
from search import interrupts
from search import review
from search import space as space_mod
from search import stopping
from search import trial as trial_mod
from search.progress import Progress
from search.redaction import redact
from search.summaries import (RECOVERY_GATE, RUNS_HERE, best_feasible, constraints_of, counts, finished,
                              is_duplicate, is_infeasible, set_constraints, study_bill, versus_presets)
from search.track import Tracker, TrackingFailed
from search.errors import SearchError
from search.retries import after_pauses

OBJECTIVE = "energy_j_per_request"
# The objectives as Optuna (and optuna-dashboard) names them, with their units.
METRIC_NAMES = {OBJECTIVE: "energy per request [J]", "recovery_mean": "mean recovery [fraction of the reference]"}
# The name of the reference configuration's trial, every study's first (one name, kept in dedupe).
REFERENCE_PRESET = dedupe.REFERENCE_PRESET
SAMPLERS = ("tpe", "nsga2", "motpe", "gp", "random")
MULTI_OBJECTIVE = ("nsga2", "motpe")


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name in ("tpe", "motpe"):  # the same sampler; the study's directions make it multi-objective
        # 4 start-up trials, not 8: fewer trials to come within 5% of the best in every replayed
        # condition (bench/README.md, "Which sampler"), intervals overlapping.
        return optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=seed,
                                          n_startup_trials=4)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=10)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise cfg.ConfigError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")


# A dropped database connection (a restart, a fail-over) is retried for about 30 s before the
# operation fails: `pool_pre_ping` alone only replaces connections that died while idle.
DB_RETRY_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
# RDBStorage's public calls: each runs in a database session of its own, so each can run again.
_RETRIED_CALLS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_all_studies", "create_new_trial", "set_trial_param", "get_trial_id_from_study_id_trial_number",
    "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr",
    "set_trial_system_attr", "get_trial", "get_trial_user_attrs", "get_trial_system_attrs", "get_all_trials",
    "record_heartbeat")


def _connection_lost(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) or (
                isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated):
            return True
        exc = exc.__cause__
    return False


_ON_LOST_CONNECTION = after_pauses(DB_RETRY_S, tenacity.retry_if_exception(
    lambda exc: isinstance(exc, (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError))
    and _connection_lost(exc)))


def _connect_patiently(dialect, connection_record, cargs, cparams):
    """SQLAlchemy's `do_connect` hook: a new connection (a pre-ping replacing a dead one too) waits
    for a database that is away, as the retried calls do."""
    return after_pauses(DB_RETRY_S, tenacity.retry_if_exception_type(dialect.loaded_dbapi.OperationalError))(
        dialect.connect, *cargs, **cparams)


class ReconnectingStorage(RDBStorage):
    """Optuna's RDB storage, running again the public calls a lost database connection broke.

    Optuna's cache in front of it also calls methods of its own (a new trial, a parameter, the trials'
    read, the stale trials' ids): a connection they open waits for the database, but a call whose
    connection drops mid-way is not run again."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # the first connection fails at once, as a wrong URL should
        sqlalchemy.event.listen(self.engine, "do_connect", _connect_patiently)

    def __setstate__(self, state: dict[Any, Any]) -> None:  # a new engine: listen on it too
        super().__setstate__(state)
        sqlalchemy.event.listen(self.engine, "do_connect", _connect_patiently)


for _name in _RETRIED_CALLS:
    setattr(ReconnectingStorage, _name, _ON_LOST_CONNECTION.wraps(getattr(RDBStorage, _name)))


def storage(url: str, heartbeat_s: int = 30) -> RDBStorage:
    """A worker whose trial has sent no heartbeat for 3 intervals is taken as dead; its trial is
    failed by the next worker that starts a trial, and run again once."""
    return ReconnectingStorage(url, heartbeat_interval=heartbeat_s, grace_period=3 * heartbeat_s,
                               heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                               engine_kwargs={"pool_pre_ping": True})


def directions_for(sampler: str) -> list[str]:
    """Energy alone under the gate, or the (energy, recovery) front for the multi-objective samplers."""
    return ["minimize", "maximize"] if sampler in MULTI_OBJECTIVE else ["minimize"]


def quiet_optuna() -> None:
    """The product prints one line per finished trial; Optuna's own log would add a traceback to
    every failed one (those go to the trial's folder and its MLflow run)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def open_study(name: str, storage_url: str, sampler: str = "tpe", seed: int | None = 0,
               heartbeat_s: int = 30) -> optuna.Study:
    multi = sampler in MULTI_OBJECTIVE
    study = optuna.create_study(study_name=name, storage=storage(storage_url, heartbeat_s),
                                sampler=make_sampler(sampler, seed),
                                directions=directions_for(sampler), load_if_exists=True)
    names = [OBJECTIVE, "recovery_mean"] if multi else [OBJECTIVE]
    # A dashboard then shows the objectives by name and unit, not "Objective 0" (a study named before
    # units were given gets them).
    if not study.metric_names or study.metric_names == names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRIC_NAMES[n] for n in names])
    return study


def check_definition(study: optuna.Study, definition: dict[str, Any],
                     model_files: dict[str, str] | None = None) -> None:
    """A study keeps what defines it (space, gate, sampler and directions, model, energy source):
    trials made under other ones cannot be compared. The first run stores them; a later run that
    changes one is refused, naming it. A key the study does not hold yet is added. `model_files`
    (each file's sha256, search/compress/stage.py's model_digests) is kept beside the definition, so
    that a changed model fingerprint is refused naming the files that differ."""
    definition = json.loads(json.dumps(definition))  # as the storage gives it back: lists, not tuples
    stored = study.user_attrs.get("definition", {})
    changed = [f"{key} {stored[key]!r} -> {value!r}" for key, value in definition.items()
               if key in stored and stored[key] != value]
    kept_files = study.user_attrs.get("model_files")
    if any(entry.startswith("model_fingerprint ") for entry in changed) and kept_files and model_files:
        differ = sorted(name for name in {*kept_files, *model_files} if kept_files.get(name) != model_files.get(name))
        changed.append(f"the model's files that differ: {', '.join(differ[:8])}" + (" ..." if len(differ) > 8 else ""))
    if changed:
        raise cfg.ConfigError(f"study {study.study_name!r} was made with other settings ({'; '.join(changed)}); "
                              "give a new --study name to change them")
    if any(key not in stored for key in definition):
        study.set_user_attr("definition", {**stored, **definition})
    if model_files is not None and kept_files is None:
        study.set_user_attr("model_files", model_files)


def load_study(name: str, storage_url: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage(storage_url))
    except KeyError:
        raise cfg.ConfigError(f"no study named {name!r} in {redact(storage_url)}") from None


@pydantic.dataclasses.dataclass(config=pydantic.ConfigDict(extra="forbid", strict=True))
class RunOptions:
    """What one run of the study does (the CLI makes it from search/options.py's RunSettings): typed,
    and checked as it is made."""

    trials: int
    timeout_s: float | None
    warm_start: str
    presets: dict[str, dict[str, Any]]
    trial_timeout_s: float | None = None
    storage_url: str = ""  # where the workers of the study count its trials under one lock
    poll_s: float = 5.0  # how often a worker waiting on the others' last trials looks again
    stop_rule: stopping.StopRule | None = None  # stop before `trials` once more are unlikely to help; None: never
    repeat_measured: bool = False  # serve a configuration a complete trial already measured (else answer from it)


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
                 baseline: trial_mod.Baseline, tracker: Tracker, presets: dict[str, dict[str, Any]], progress: Progress,
                 multi_objective: bool, trial_timeout_s: float | None = None, repeat_measured: bool = False):
        self.study = study
        self.space = space
        self.runtime = runtime
        self.baseline = baseline
        self.tracker = tracker
        self.presets = presets
        self.progress = progress
        self.multi_objective = multi_objective
        self.trial_timeout_s = trial_timeout_s
        self.repeat_measured = repeat_measured
        self._expired = threading.Event()

    def _enforce_budget(self, trial_over: threading.Event) -> None:
        """Past the trial's budget, its server (ready or still starting) and its compression are
        stopped, which makes the running stage fail; and again each second until the trial has
        given up, so that a stage begun meanwhile is stopped too."""
        if trial_over.wait(self.trial_timeout_s):
            return
        self._expired.set()
        while True:
            self.runtime.pool.discard()
            self.runtime.compressor.close()
            if trial_over.wait(1.0):
                return

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        workdir = self.runtime.workdir / f"trial-{trial.number:04d}"
        trial.set_user_attr("workdir", str(workdir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        preset = self.presets.get(trial.user_attrs.get("preset", ""), {})
        self.progress.trial_started(trial.number, trial.user_attrs.get("preset"))
        # Opened before the first stage, so that a trial that raises is logged with what its stages spent.
        trial_record = trial_mod.TrialRecord()
        record: dict[str, Any] = {"number": trial.number, "params": {}, "metrics": trial_record.spent, "tags": {},
                                  "artifacts": [], **self._review_context(trial)}
        started = time.perf_counter()
        self._expired.clear()
        trial_over = threading.Event()
        watchdog = (threading.Thread(target=self._enforce_budget, args=(trial_over,), daemon=True)
                    if self.trial_timeout_s else None)
        if watchdog:
            watchdog.start()
        try:
            with interrupts.interruptible():  # a stop signal cuts the trial's work, not its record
                config = self.space.sample(trial, preset)
                if trial.user_attrs.get("preset") == REFERENCE_PRESET:
                    # The reference's own settings, also where the space's fixed ones differ (a space's
                    # reference section wins for the reference): it prices what the baseline answered.
                    config = self.space.reference_config()
                record["params"] = config.flat()
                trial.set_user_attr("config", record["params"])
                if not self.repeat_measured:  # raises AlreadyMeasured: answered from that trial, nothing served
                    dedupe.check_not_measured(self.study, record["params"], trial.number)
                outcome = trial_mod.run(self.runtime, config, workdir, self.baseline, self.progress.stage,
                                        trial_record).outcome
        except space_mod.Infeasible as exc:
            return self._end(trial, record, "INFEASIBLE", f"infeasible: {exc}", started)
        except dedupe.AlreadyMeasured as known:
            return self._repeat(trial, record, known.earlier, started)
        except trial_mod.TrialPruned as exc:  # what it produced (logs, configs, screen answers) goes with it
            return self._end(trial, record, "PRUNED", f"pruned: {exc}", started, workdir=workdir)
        except Exception as exc:  # whatever broke, the trial is recorded with its reason and the study goes on
            self.runtime.pool.discard()  # a server that saw a failure is not reused
            reason = (f"trial exceeded its time budget of {self.trial_timeout_s:.0f} s" if self._expired.is_set()
                      else f"{type(exc).__name__}: {exc}")
            workdir.mkdir(parents=True, exist_ok=True)  # the traceback goes with the trial, not to the console
            (workdir / "traceback.txt").write_text("".join(traceback.format_exception(exc)))
            return self._end(trial, record, "FAIL", reason, started, workdir=workdir)
        except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM or SIGHUP: the next run retries the trial
            trial.set_user_attr("interrupted", True)
            self._end(trial, record, "FAIL", f"interrupted ({interrupts.signal_name(exc)})", started,
                      raise_=False, workdir=workdir)
            raise
        finally:
            trial_over.set()
            if watchdog:
                watchdog.join()
        record["metrics"] = outcome.metrics
        record["tags"] = outcome.tags
        record["artifacts"] = [str(p) for p in outcome.artifacts]
        trial.set_user_attr("metrics", {k: v for k, v in outcome.metrics.items() if _finite(v)})
        trial.set_user_attr("feasible", outcome.feasible)
        trial.set_user_attr("energy_source", outcome.tags["energy_source"])
        trial.set_user_attr("gpu", outcome.tags.get("gpu"))  # what the export says it was measured on
        # <= 0 is feasible: the samplers read these to prefer configurations that pass the gate.
        set_constraints(trial, {RECOVERY_GATE: -outcome.metrics["recovery_margin"], RUNS_HERE: 0.0,
                                **{k: v for k, v in outcome.metrics.items() if k.startswith("slo_")}})
        record["metrics"]["trial_s"] = time.perf_counter() - started
        record["tags"].update({"state": "COMPLETE", "feasible": str(bool(outcome.feasible)).lower(),
                               "search.study": self.study.study_name})
        try:
            self.tracker.log_trial(record)
        except TrackingFailed as exc:  # the study goes on: this trial fails, saying why
            return self._end(trial, record, "FAIL", str(exc), started)
        self.progress.trial_finished("complete", outcome.objective if outcome.feasible else None)
        if self.multi_objective:
            return outcome.objective, outcome.recovery
        return outcome.objective

    def _review_context(self, trial: optuna.Trial) -> dict[str, Any]:
        """What the trial's MLflow run is described against (search/review.py): its real start, the gate,
        the reference configuration and the reference's J/request (the reference's own trial is its own)."""
        reference = dedupe.reference_config(self.study) or self.baseline.reference
        reference_j = study_bill(self.study).reference_j_per_request
        start = trial.datetime_start
        gate = getattr(self.runtime, "gate", None)
        return {"start_ms": int(start.timestamp() * 1000) if start else None,
                "gate": None if gate is None else gate.threshold,
                "reference": reference, "reference_j": reference_j,
                "is_reference": trial.user_attrs.get("preset") == REFERENCE_PRESET}

    def _repeat(self, trial: optuna.Trial, record: dict, earlier: optuna.trial.FrozenTrial, started: float):
        """A configuration `earlier` measured is not served again: this trial tells Optuna the same
        values and constraints (a sampler sees the point it proposed, at its measured value), and
        records which trial it repeats. It spent nothing but the look-up: no stage, no bill."""
        set_constraints(trial, constraints_of(earlier))
        trial.set_user_attr(dedupe.DUPLICATE_OF, earlier.number)
        trial.set_user_attr("feasible", bool(earlier.user_attrs.get("feasible")))
        if "energy_source" in earlier.user_attrs:
            trial.set_user_attr("energy_source", earlier.user_attrs["energy_source"])
        record["metrics"]["trial_s"] = time.perf_counter() - started
        record["tags"].update({"state": "COMPLETE", dedupe.DUPLICATE_OF: str(earlier.number),
                               "feasible": str(bool(earlier.user_attrs.get("feasible"))).lower(),
                               "search.study": self.study.study_name})
        try:
            self.tracker.log_trial(record)
        except TrackingFailed as exc:  # as a complete trial's: it fails, saying why
            return self._end(trial, record, "FAIL", str(exc), started)
        self.progress.trial_finished("duplicate", None, f"the configuration of trial {earlier.number}, measured "
                                     "already: its values, not served again; --repeat-measured serves it")
        return dedupe.answer(earlier, self.multi_objective)

    def _end(self, trial: optuna.Trial, record: dict, state: str, reason: str, started: float,
             raise_: bool = True, workdir: Path | None = None):
        """Record a trial that did not complete. An infeasible one is told to Optuna as complete with
        its RUNS_HERE constraint violated and no measured value: every sampler then ranks it below
        the runnable trials (TPE, NSGA-II and GP read constraints of complete trials only)."""
        infeasible = state == "INFEASIBLE"
        trial.set_user_attr("reason", reason[:1000])
        trial.set_user_attr("infeasible", infeasible)
        trial.set_user_attr("stage_times", dict(record["metrics"]))
        record["tags"].update({"state": state, "failure_reason": reason[:4000],
                               "feasible": "false", "search.study": self.study.study_name})
        record["metrics"]["trial_s"] = time.perf_counter() - started
        if workdir is not None:
            record["artifacts"] = [str(p) for p in sorted(workdir.glob("*")) if p.is_file()]
        try:
            self.tracker.log_trial(record)
        except TrackingFailed as exc:  # Optuna keeps the trial, and why MLflow has no run of it
            reason = f"{reason}; {exc}"
            trial.set_user_attr("reason", reason[:1000])
        self.progress.trial_finished({"FAIL": "failed"}.get(state, state.lower()), None, reason)
        if infeasible:
            # Every constraint a complete trial has, violated: GP refuses trials whose constraint
            # names differ ("The constraint names must be the same for all trials").
            set_constraints(trial, {name: 1.0 for name in (RECOVERY_GATE, RUNS_HERE,
                                                           *(f"slo_{slo}" for slo in self.runtime.slos))})
            return (math.inf, -math.inf) if self.multi_objective else math.inf
        if not raise_:
            return None
        if state == "PRUNED":
            raise optuna.TrialPruned(reason)
        raise TrialFailed(reason)


class TrialFailed(SearchError):
    """Raised inside the objective so Optuna records the trial as failed (caught by optimize)."""


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def run(study: optuna.Study, space: space_mod.Space, runtime: trial_mod.Runtime, baseline: trial_mod.Baseline,
        tracker: Tracker, options: RunOptions, progress: Progress) -> dict[str, int]:
    queue_first_trials(study, space, options)
    objective = Objective(study, space, runtime, baseline, tracker, with_reference(space, options.presets), progress,
                          len(study.directions) > 1, options.trial_timeout_s, repeat_measured=options.repeat_measured)
    # What the baseline spent, and the reference it answered as, for the search's bill.
    study.set_user_attr("baseline", baseline.for_the_bill())
    study.set_user_attr("job", runtime.reference.workload.describe_job())
    progress.study_started(study, options.trials)
    stopped = optimize_until(study, objective, options)
    if stopped:  # one line, as a trial's; the stop rule's the bill and `search status` say too
        hint = "" if stopped.startswith(TIMEOUT_STOP) else f" (--no-early-stop goes on to --trials {options.trials})"
        print(("\r\033[K" if progress.live else "") + f"stopped early: {stopped}{hint}", file=progress.stream,
              flush=True)
    try:
        tracker.log_bill(*bill.mlflow_fields(study_bill(study)))
        # The answer where MLflow opens: the best feasible trial, its saving, the trials by energy.
        tracker.log_review(review.from_study(study))
    except TrackingFailed as exc:  # the study's trials are all recorded; the next run logs the bill again
        print(f"warning: the search's bill not logged: {exc}", file=sys.stderr)
    tracker.flush()
    return counts(study)


def with_reference(space: space_mod.Space, presets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The presets a study knows: the reference configuration (REFERENCE_PRESET) and the user's."""
    return {REFERENCE_PRESET: space.reference_config().flat(), **presets}


def queue_first_trials(study: optuna.Study, space: space_mod.Space, options: RunOptions) -> None:
    """The reference, the presets and the retries of interrupted trials, under the lock the workers ask
    under: workers that start together would each read "not enqueued yet" and enqueue them once apiece.
    The reference is every study's first trial: it is priced by the same stages, in the same state and
    window, repeated as often as the trials it is compared with (the bill reads its price there)."""
    presets = with_reference(space, options.presets)
    with ask_lock(options.storage_url, study.study_name):
        warm_start(study, space, {REFERENCE_PRESET: presets[REFERENCE_PRESET]})
        if options.warm_start != "none":
            warm_start(study, space, options.presets)
        retry_interrupted(study)


TIMEOUT_STOP = "--timeout"


def optimize_until(study: optuna.Study, objective, options: RunOptions) -> str | None:
    """Run trials until the study holds `options.trials` finished ones, counted over all its
    workers, or until `options.timeout_s` (no trial starts that would, at the study's median trial
    length, end after it), or until `options.stop_rule` says more trials are unlikely
    to beat the best feasible one (returns its reason, also kept in the study's user attributes).
    Workers count and ask under one lock, and count the trials running elsewhere too, so that
    exactly that many finish; a worker with no free slot waits on the others' last trials (one may
    fail and need running again), and so does a worker the stop rule would stop (one may gain)."""
    deadline = None if options.timeout_s is None else time.monotonic() + options.timeout_s
    while deadline is None or time.monotonic() < deadline:
        if deadline is not None and (late := _would_end_late(study, deadline - time.monotonic())):
            return late
        stopped = None
        with interrupts.deferred(), ask_lock(options.storage_url, study.study_name) as release:
            slot = _free_slot(study, options.trials)
            if slot is not None and options.stop_rule is not None:
                slot, stopped = _stop_rule_slot(study, options.stop_rule, slot)
            if slot:
                stopping.forget(study)  # a trial starts: the study no longer stands stopped
                def asked(trial: optuna.Trial) -> Any:
                    release()  # the trial exists: the other workers may count and ask again
                    return objective(trial)
                study.optimize(asked, n_trials=1, catch=(TrialFailed,))
        if slot is None:
            return stopped
        if not slot:
            time.sleep(options.poll_s)
    return None


def typical_trial_s(study: optuna.Study) -> float | None:
    """The median wall time of the study's trials that ran to an end (complete or pruned), those answered
    from an earlier measurement or refused as infeasible left out (they take no time); None before any."""
    took = [t.duration.total_seconds()
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if t.duration and not is_duplicate(t) and not is_infeasible(t)]
    return statistics.median(took) if took else None


def _would_end_late(study: optuna.Study, left_s: float) -> str | None:
    """Why the next trial is not started before --timeout: a trial of this study's median length would
    end after it, cut and paid for nothing (on a rented or lent machine, the end of its time)."""
    typical = typical_trial_s(study)
    if typical is None or typical <= left_s:
        return None
    return f"{TIMEOUT_STOP}: {left_s:.0f} s left, and this study's median trial takes {typical:.0f} s"


def _stop_rule_slot(study: optuna.Study, rule: stopping.StopRule, slot: bool) -> tuple[bool | None, str | None]:
    """The free slot as the stop rule leaves it, and why it stops the study. Trials the study queued
    (presets, retries) still run; a trial running on another worker may still gain: wait for it."""
    if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return slot, None
    reason = stopping.check(study, rule)
    if reason is None:
        return slot, None
    if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        return False, None
    stopping.record(study, reason, rule)
    return None, reason


def _free_slot(study: optuna.Study, wanted: int) -> bool | None:
    """True: start a trial. None: the study holds `wanted` finished trials. False: the trials running
    (on other workers) may fill it; wait, for one may fail and need running again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial frees its slot (and is retried)
    # Running first: a trial that ends between the two reads is counted twice (this worker waits a
    # poll), never missed (which would start one trial too many).
    running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    done = finished(study)
    if done >= wanted:
        return None
    return done + running < wanted


def _advisory_lock(url: sqlalchemy.engine.URL, key: str) -> sqlalchemy.engine.Connection:
    """A connection holding PostgreSQL's session lock named `key` (it goes with the connection)."""
    connection = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool).connect()
    connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(hashtext(:key))"), {"key": key})
    return connection


@contextlib.contextmanager
def ask_lock(storage_url: str, study_name: str):
    """Workers count a study's trials and ask for the next one under this lock, so that exactly
    --trials finish: a file lock beside an SQLite database, an advisory lock on PostgreSQL, none
    elsewhere (in-memory). Yields `release`, for the lock is let go once the trial is asked for."""
    url = sqlalchemy.engine.make_url(storage_url) if storage_url else None
    backend = url.get_backend_name() if url else ""
    handle = connection = None
    if backend == "sqlite" and url.database not in (None, "", ":memory:"):
        handle = open(f"{url.database}.ask-lock", "w")
        fcntl.flock(handle, fcntl.LOCK_EX)
    elif backend == "postgresql":
        connection = _ON_LOST_CONNECTION(_advisory_lock, url, study_name)

    def release() -> None:
        nonlocal handle, connection
        if handle is not None:
            handle.close()  # closing the file lets go of its lock
            handle = None
        if connection is not None:
            with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):  # a lost connection took the lock with it
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(hashtext(:key))"), {"key": study_name})
                connection.close()
            connection = None

    try:
        yield release
    finally:
        release()


def study_dir(home: Path, name: str) -> Path:
    path = home / "studies" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def summary(study: optuna.Study) -> dict[str, Any]:
    best = best_feasible(study)
    return {
        "study": study.study_name,
        "job": study.user_attrs.get("job"),
        "counts": counts(study),
        "best_feasible": None if best is None else {
            "trial": best.number, "objective": best.values[0], "objective_name": OBJECTIVE,
            "recovery_mean": best.user_attrs.get("metrics", {}).get("recovery_mean"),
            "floor_ratio": best.user_attrs.get("metrics", {}).get("floor_ratio"),
            "energy_source": best.user_attrs.get("energy_source"), "config": best.user_attrs.get("config"),
            "is_reference": dedupe.is_reference(best, dedupe.reference_config(study))},
        "duplicates": len(dedupe.duplicates(study)),  # trials answered from an earlier measurement
        "versus_presets": versus_presets(study),
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
