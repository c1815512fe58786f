"""Which sampler finds the best feasible configuration in fewest trials: measured studies, replayed
(issue 26, item 5).

A measured study (its trials' configurations, J/request and recovery) becomes a replayable problem:
a surrogate fitted on its trials gives every configuration of the study's space an energy and a
recovery, in microseconds. A sampler then searches that problem exactly as the product searches the
real one: the study comes from the product's `search.study.make_sampler` and `directions_for`, the
trial's configuration from the product's `Space.sample` (conditions, presets, fixed settings,
constraints), the warm start from the product's `search.study.warm_start`, and each trial reports
to Optuna what the product's Objective reports: the objective (and recovery, for the
multi-objective samplers), the `recovery_gate` constraint (-(recovery - gate)) and `runs_here`
(a configuration the surrogate cannot score, such as a GPU seed's NF4 on the CPU space, is told as
infeasible: value inf, runs_here violated, as the product tells a configuration that cannot run).

The metric: the number of trials until the sampler first proposes a configuration that passes the
gate and whose energy is within 5% of the best feasible configuration of the whole space (both by
the surrogate's values, without noise: the sampler may be told noisy ones). A run that does not get
there within its budget is censored (counted as never). Per sampler and condition: the median over
seeds with its 95% bootstrap interval, its quartiles, the hits, and the distinct configurations
measured by then (a repeat is answered from the earlier trial, as search/dedupe.py does: it counts
as a trial, not as a configuration served).

"grid" is every runnable configuration of the space once, in a seeded random order (enqueued
through the product's Space, so a grid trial is sampled as any other). Warm-start conditions: none;
the reference configuration first (every study's first trial since commit 7a426fb); the reference
and the presets of the product's `--warm-start seeds`. Each sampler and condition runs on
the seeds 0..N-1; a sampler's random start-up trials are then the same draws as random sampling's,
so the comparison is paired.

The surrogate: per param value an additive term (one-hot, inactive as a value of its own), ridge
least squares on log(J/request) and on recovery_mean; its leave-one-out error is reported beside the
study's own replicate noise. Robustness landscapes (reference first): a fit per seed on a bootstrap
resample of the trials; measured means where a configuration was measured and the fit elsewhere
(the measurements' interactions and noise); and the fit with the study's replicate noise on what the
sampler is told.

Usage:
    .venvs/main/bin/python bench/sampler_replay.py --seeds 100 --out bench/results/sampler-replay-DATE.json
    .venvs/main/bin/python bench/sampler_replay.py --table bench/results/sampler-replay-DATE.json  # Markdown
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import random
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from search import config as cfg  # noqa: E402
from search import space as space_mod  # noqa: E402
from search import study as study_mod  # noqa: E402
from search.cli import DEFAULT_PRESETS  # noqa: E402
from search.summaries import RUNS_HERE  # noqa: E402

GATE = 0.8  # the product's default gate (objectives/recovery.py Gate.threshold), the studies' gate
WITHIN = 0.05
SAMPLERS = ("tpe", "gp", "nsga2", "random", "grid")
# The measured studies this benchmark can replay: name -> (space file, the study's trials).
STUDIES = {
    "smollm2": ("spaces/smollm2-135m.yaml", "bench/results/smollm2-study-2026-12-02.json"),
}
# Studies looked at and not replayed: what they hold is counted by inventory().
TOY_TRIALS_CSV = "bench/results/cpu-2026-12-02-avx512-amx-study-50-trials.csv"
GPU_STUDY_ARCHIVES = "bench/results/gpu-*/**/product-study.tgz"

Key = tuple  # a configuration as the space sees it: each param's value, None where inactive


# --- the problem: a space, measured trials, a surrogate ------------------------------------------

def levels(param: space_mod.Param) -> list:
    """The values a param takes: its choices, or every step of a stepped range."""
    if param.choices is not None:
        return list(param.choices)
    if param.step is None or param.log:
        raise cfg.ConfigError(f"{param.name}: a continuous range cannot be replayed (give it a step)")
    count = int(round((param.high - param.low) / param.step))
    return [param.low + i * param.step for i in range(count + 1)]


def key_of(space: space_mod.Space, values: dict[str, Any]) -> Key:
    """The configuration's value of each param, None where its `when:` leaves it inactive."""
    return tuple(values.get(p.name) if p.active(values) else None for p in space.params)


def enumerate_keys(space: space_mod.Space) -> tuple[list[Key], list[tuple[Key, str]]]:
    """Every configuration of the space (params in file order, conditions applied), split into the
    runnable ones and those the config or a constraint refuses (with why), as Space.sample would."""
    keys: list[dict] = [{}]
    for param in space.params:
        grown = []
        for values in keys:
            if param.active({**space.fixed, **values}):
                grown += [{**values, param.name: level} for level in levels(param)]
            else:
                grown.append(values)
        keys = grown
    runnable, refused = [], []
    for values in keys:
        key = key_of(space, {**space.fixed, **values})
        try:
            space.check(cfg.build({**space.fixed, **values}))
        except (cfg.ConfigError, space_mod.Infeasible) as exc:
            refused.append((key, str(exc)))
            continue
        runnable.append(key)
    return runnable, refused


def additive_design(space: space_mod.Space, keys: list[Key]) -> tuple[np.ndarray, list[str]]:
    """One-hot columns, one per (param, value) with inactive as a value of its own, and an intercept."""
    columns = [(i, v) for i, p in enumerate(space.params) for v in [None, *levels(p)]]
    x = np.zeros((len(keys), len(columns) + 1))
    x[:, 0] = 1.0
    index = {c: j + 1 for j, c in enumerate(columns)}
    for row, key in enumerate(keys):
        for i, value in enumerate(key):
            if (i, value) in index:
                x[row, index[(i, value)]] = 1.0
    names = ["intercept"] + [f"{space.params[i].name}={v}" for i, v in columns]
    return x, names


def ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares (intercept not penalised): weights and the leave-one-out residuals
    (closed form: residual / (1 - leverage))."""
    penalty = alpha * np.eye(x.shape[1])
    penalty[0, 0] = 0.0
    inverse = np.linalg.inv(x.T @ x + penalty)
    w = inverse @ x.T @ y
    leverage = np.einsum("ij,jk,ik->i", x, inverse, x)
    loo = (y - x @ w) / (1.0 - leverage)
    return w, loo


@dataclass
class Measured:
    key: Key
    energy: float
    recovery: float
    feasible: bool


@dataclass
class Problem:
    name: str
    space: space_mod.Space
    measured: list[Measured]
    alpha: float = 0.1
    measured_means: bool = False  # a measured configuration's value is its measurements' mean, not the fit's
    keys: list[Key] = field(default_factory=list)
    refused: list[tuple[Key, str]] = field(default_factory=list)
    energy: dict[Key, float] = field(default_factory=dict)
    recovery: dict[Key, float] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keys, self.refused = enumerate_keys(self.space)
        x, self.columns = additive_design(self.space, [m.key for m in self.measured])
        log_e = np.log([m.energy for m in self.measured])
        rec = np.array([m.recovery for m in self.measured])
        self.w_energy, loo_e = ridge(x, log_e, self.alpha)
        self.w_recovery, loo_r = ridge(x, rec, self.alpha)
        grid, _ = additive_design(self.space, self.keys)
        self.energy = dict(zip(self.keys, np.exp(grid @ self.w_energy).tolist()))
        self.recovery = dict(zip(self.keys, (grid @ self.w_recovery).tolist()))
        if self.measured_means:  # the measurements' own interactions and noise where there are any
            for key, logs in _groups(self.measured).items():
                if key in self.energy:
                    self.energy[key] = float(np.mean(np.exp(logs)))
                    self.recovery[key] = float(np.mean([m.recovery for m in self.measured if m.key == key]))
        feasible = [m.feasible for m in self.measured]
        loo_feasible = (rec - loo_r) >= GATE
        self.fit = {
            "model": f"additive (one-hot per param value, inactive its own value), ridge alpha {self.alpha}: "
                     "log(J/request) and recovery_mean",
            "measured_trials": len(self.measured),
            "distinct_measured": len({m.key for m in self.measured}),
            "coefficients": x.shape[1],
            "loo_rmse_log_energy": float(np.sqrt(np.mean(loo_e ** 2))),
            "replicate_sd_log_energy": replicate_sd(self.measured),
            "replicate_groups": sum(1 for n in _groups(self.measured).values() if len(n) > 1),
            "loo_rmse_recovery": float(np.sqrt(np.mean(loo_r ** 2))),
            "loo_gate_agreement": float(np.mean(loo_feasible == np.array(feasible))),
            "loo_gate_confusion": {
                "pass_predicted_pass": int(np.sum(loo_feasible & feasible)),
                "pass_predicted_fail": int(np.sum(~loo_feasible & feasible)),
                "fail_predicted_pass": int(np.sum(loo_feasible & ~np.array(feasible))),
                "fail_predicted_fail": int(np.sum(~loo_feasible & ~np.array(feasible)))},
        }

    def feasible(self, key: Key) -> bool:
        return self.recovery[key] >= GATE

    @property
    def best(self) -> float:
        return min(self.energy[k] for k in self.keys if self.feasible(k))

    @property
    def targets(self) -> set[Key]:
        return {k for k in self.keys if self.feasible(k) and self.energy[k] <= (1 + WITHIN) * self.best}

    def describe(self, key: Key) -> dict[str, Any]:
        return {p.name: v for p, v in zip(self.space.params, key) if v is not None}

    def score(self, flat: dict[str, Any]) -> tuple[Key | None, str]:
        """A sampled configuration's key, or None and why the surrogate cannot score it: a param
        value outside the space, or a setting no measured trial varied that differs from them all."""
        key = key_of(self.space, flat)
        if key not in self.energy:
            off = {p.name: v for p, v in zip(self.space.params, key) if v is not None and v not in levels(p)}
            return None, f"outside the measured space: {off or key}"
        ours = {p.name for p in self.space.params}
        usual = self.space.reference_config().flat()
        other = sorted(k for k, v in flat.items() if k not in ours and v != usual.get(k))
        if other:
            return None, f"sets what no measured trial varied: {', '.join(other)}"
        return key, ""


def _groups(measured: list[Measured]) -> dict[Key, list[float]]:
    groups: dict[Key, list[float]] = {}
    for m in measured:
        groups.setdefault(m.key, []).append(math.log(m.energy))
    return groups


def replicate_sd(measured: list[Measured]) -> float | None:
    """The pooled within-configuration standard deviation of log(J/request): measurement noise."""
    groups = [g for g in _groups(measured).values() if len(g) > 1]
    dof = sum(len(g) - 1 for g in groups)
    if not dof:
        return None
    return float(math.sqrt(sum(((np.array(g) - np.mean(g)) ** 2).sum() for g in groups) / dof))


def load_study_json(space: space_mod.Space, path: Path) -> list[Measured]:
    """bench/real_model_study.py's output: one row per trial with each param's value."""
    rows = json.loads(path.read_text())["trials"]
    out = []
    for row in rows:
        if row.get("energy_j_per_request") is None or row.get("recovery_mean") is None:
            continue  # pruned or failed: nothing measured
        values = {**space.fixed, **{k: v for k, v in row.items() if "." in k}}
        out.append(Measured(key_of(space, values), float(row["energy_j_per_request"]),
                            float(row["recovery_mean"]), bool(row["feasible"])))
    return out


def load_problem(name: str, alpha: float) -> Problem:
    space_file, trials_file = STUDIES[name]
    space = space_mod.load(PROJECT / space_file)
    return Problem(name, space, load_study_json(space, PROJECT / trials_file), alpha)


# --- what was looked at and not replayed ---------------------------------------------------------

def inventory(coefficients: int, trials: int) -> list[dict[str, Any]]:
    """The other committed studies, and why each is not replayed (counted from their files)."""
    out = []
    toy = PROJECT / TOY_TRIALS_CSV
    if toy.is_file():
        header, *rows = toy.read_text().splitlines()
        out.append({"source": TOY_TRIALS_CSV, "trials": len(rows), "columns": header.split(","),
                    "replayed": False, "why": "per trial only its state, duration and reason: no configuration, "
                                             "J/request or recovery (the study's optuna.db was not committed)"})
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for archive in sorted(PROJECT.glob(GPU_STUDY_ARCHIVES)):
        with tarfile.open(archive) as tar, tempfile.TemporaryDirectory() as tmp:
            member = next((m for m in tar.getmembers() if m.name.endswith("optuna.db")), None)
            if member is None:
                continue
            (Path(tmp) / "optuna.db").write_bytes(tar.extractfile(member).read())
            storage = f"sqlite:///{tmp}/optuna.db"
            states: dict[str, int] = {}
            measured = 0
            for summary in optuna.get_all_study_summaries(storage):
                study = optuna.load_study(study_name=summary.study_name, storage=storage)
                for t in study.get_trials(deepcopy=False):
                    states[t.state.name] = states.get(t.state.name, 0) + 1
                    measured += (t.state.name == "COMPLETE" and "energy_j_per_request" in t.user_attrs.get("metrics", {}))
        out.append({"source": str(archive.relative_to(PROJECT)), "trials_by_state": states,
                    "measured": measured, "replayed": False,
                    "why": f"{measured} measured trial(s): an additive surrogate over a GPU space's params needs "
                           f"dozens (the replayed study: {trials} trials for {coefficients} coefficients)"})
    return out


# --- one replay: the product's sampler, space and warm start on the surrogate --------------------

@dataclass
class Outcome:
    trials: int | None  # the trial (1-based) that first proposed a target configuration; None: not within budget
    distinct: int | None  # distinct scored configurations tried up to it
    ran: int  # trials run
    infeasible: int  # trials the surrogate could not score (told to Optuna as runs_here violated)
    failed: int  # trials whose sampling raised (the product's Objective records them as failed)
    error: str | None
    seconds: float


class ReplayFailed(Exception):
    """A trial the product's Objective would record as failed (its `except Exception`)."""


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """The product's sampler by name; the grid's trials are all enqueued (its sampler never decides)."""
    return optuna.samplers.RandomSampler(seed=seed) if name == "grid" else study_mod.make_sampler(name, seed)


def replay(problem: Problem, sampler: str, seed: int, warm: dict[str, dict[str, Any]], budget: int,
           noise_sd: float = 0.0, sampler_factory: Callable[[int], optuna.samplers.BaseSampler] | None = None,
           gate_on_infeasible: bool = False) -> Outcome:
    """One study on the surrogate. A configuration measured before is answered with the value told
    then (the product's search/dedupe.py, issue 26 item 3: not served again). `gate_on_infeasible`
    also names the recovery_gate constraint (violated) on a trial that cannot run, which the product's
    Objective._end does not: GPSampler refuses a study whose trials name different constraints."""
    directions = study_mod.directions_for(sampler)
    multi = len(directions) > 1
    study = optuna.create_study(sampler=(sampler_factory or (lambda s: make_sampler(sampler, s)))(seed),
                                directions=directions)
    space = problem.space
    if warm:
        study_mod.warm_start(study, space, warm)
    if sampler == "grid":
        order = list(problem.keys)
        random.Random(seed).shuffle(order)
        for key in order[:budget]:
            study.enqueue_trial({p.name: v for p, v in zip(space.params, key) if v is not None})
    rng = np.random.default_rng(seed)
    targets = problem.targets
    told: dict[Key, float] = {}
    state: dict[str, Any] = {"trials": None, "distinct": None, "infeasible": 0, "failed": 0, "error": None}

    def objective(trial: optuna.Trial):
        preset = warm.get(trial.user_attrs.get("preset", ""), {})
        try:
            key, why = problem.score(space.sample(trial, preset).flat())
        except space_mod.Infeasible as exc:
            key, why = None, str(exc)
        except Exception as exc:  # as the product's Objective: the trial fails, the study goes on
            state["failed"] += 1
            state["error"] = state["error"] or f"{type(exc).__name__}: {exc}"
            raise ReplayFailed(str(exc)) from None
        if key is None:  # as the product's Objective._end tells a configuration that cannot run
            state["infeasible"] += 1
            trial.set_user_attr("reason", why)
            if gate_on_infeasible:
                trial.set_constraint("recovery_gate", 1.0)
            trial.set_constraint(RUNS_HERE, 1.0)
            return (math.inf, -math.inf) if multi else math.inf
        if key not in told:
            told[key] = problem.energy[key] * (math.exp(rng.normal(0.0, noise_sd)) if noise_sd else 1.0)
        recovery, energy = problem.recovery[key], told[key]
        trial.set_constraint("recovery_gate", -(recovery - GATE))
        trial.set_constraint(RUNS_HERE, 0.0)
        if key in targets and state["trials"] is None:
            state["trials"], state["distinct"] = trial.number + 1, len(told)
            trial.study.stop()
        return (energy, recovery) if multi else energy

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.optimize(objective, n_trials=budget, catch=(ReplayFailed,))
    return Outcome(state["trials"], state["distinct"], len(study.trials), state["infeasible"], state["failed"],
                   state["error"], time.perf_counter() - started)


# --- the table ------------------------------------------------------------------------------------

def quantile(values: list[float | None], q: float) -> float | None:
    """The q-quantile (lower median convention for even counts, nearest rank) with runs that never
    got there (None) ranked last; None when the quantile falls among them."""
    ranked = sorted(values, key=lambda v: math.inf if v is None else v)
    if not ranked:
        return None
    position = max(0, math.ceil(q * len(ranked)) - 1)
    return ranked[position]


def median(values: list[float | None]) -> float | None:
    """The median with censored runs (None) ranked last: the mean of the middle two for an even
    count; None when a middle run is censored."""
    ranked = sorted(values, key=lambda v: math.inf if v is None else v)
    n = len(ranked)
    if not n:
        return None
    middle = ranked[(n - 1) // 2: n // 2 + 1]
    return None if any(v is None for v in middle) else float(sum(middle) / len(middle))


def _array(values: list[float | None]) -> np.ndarray:
    return np.array([math.inf if v is None else v for v in values], dtype=float)


def median_ci(values: list[float | None], resamples: int = 2000, seed: int = 0) -> list[float | None]:
    """A 95% percentile-bootstrap interval of the median over seeds (None: the bound is censored)."""
    x = _array(values)
    idx = np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))
    with np.errstate(invalid="ignore"):
        low, high = np.percentile(np.median(x[idx], axis=1), [2.5, 97.5], method="nearest")
    return [None if not math.isfinite(v) else float(v) for v in (low, high)]


def ratio_ci(a: list[float | None], b: list[float | None], resamples: int = 2000, seed: int = 0) -> list[float | None]:
    """A 95% paired-bootstrap interval of median(a) / median(b), seeds resampled together (a sampler's
    random start-up trials are the same draws as random sampling's under the same seed)."""
    x, y = _array(a), _array(b)
    idx = np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))
    with np.errstate(invalid="ignore"):
        ratios = np.median(x[idx], axis=1) / np.median(y[idx], axis=1)
        ratios = ratios[~np.isnan(ratios)]
        if not len(ratios):
            return [None, None]
        low, high = np.percentile(ratios, [2.5, 97.5], method="nearest")
    return [None if not math.isfinite(v) else round(float(v), 3) for v in (low, high)]


def expected_random_position(n: int, k: int) -> float:
    """Mean position of the first of k targets among n configurations in a random order."""
    return (n + 1) / (k + 1)


def row(problem_for: Callable[[int], Problem], sampler: str, label: str, landscape: str, warm_name: str,
        warm: dict, seeds: list[int], budget: int, noise_sd: float = 0.0, factory=None,
        gate_on_infeasible: bool = False, progress=print) -> dict[str, Any]:
    """One line of the table: `sampler` over `seeds`, each on problem_for(seed)."""
    outcomes = []
    started = time.perf_counter()
    for seed in seeds:
        problem = problem_for(seed)
        run_budget = len(problem.keys) + len(warm) if sampler == "grid" else budget  # a grid runs to its end
        outcomes.append(replay(problem, sampler, seed, warm, run_budget, noise_sd, factory, gate_on_infeasible))
    trials = [o.trials for o in outcomes]
    distinct = [o.distinct for o in outcomes]
    out = {"sampler": label, "landscape": landscape, "warm_start": warm_name, "noise_sd": round(noise_sd, 4),
           "budget": "every configuration" if sampler == "grid" else budget, "seeds": len(seeds),
           "median_trials": median(trials), "median_trials_ci95": median_ci(trials),
           "q25_trials": quantile(trials, 0.25),
           "q75_trials": quantile(trials, 0.75), "hits": sum(t is not None for t in trials),
           "median_distinct": median(distinct), "q25_distinct": quantile(distinct, 0.25),
           "q75_distinct": quantile(distinct, 0.75),
           "infeasible_told_median": median([o.infeasible for o in outcomes]),
           "failed_median": median([o.failed for o in outcomes]),
           "error": next((o.error for o in outcomes if o.error), None),
           "ms_per_trial": round(1000 * sum(o.seconds for o in outcomes) / max(1, sum(o.ran for o in outcomes)), 2),
           "trials_per_seed": trials, "distinct_per_seed": distinct}
    ci = "-".join(fmt(v) for v in out["median_trials_ci95"])
    progress(f"  {label:<24} {landscape:<9} warm={warm_name:<9} median {fmt(out['median_trials'])} trials "
             f"[95% CI {ci}] (q25 {fmt(out['q25_trials'])}, q75 {fmt(out['q75_trials'])}), {fmt(out['median_distinct'])} distinct, "
             f"hits {out['hits']}/{len(seeds)}" + (f", failed trials: {out['error'][:70]}" if out["error"] else "")
             + f"; {out['ms_per_trial']} ms/trial, {time.perf_counter() - started:.0f} s")
    return out


def fmt(value: float | None) -> str:
    return "never" if value is None else f"{value:g}"


def machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), None)
    flags = sorted(set(subprocess.run(["grep", "-o", r"avx512f\|amx_bf16", "/proc/cpuinfo"],
                                      capture_output=True, text=True).stdout.split()))
    cores = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("CPU(s):")), None)
    return {"model_name": name, "flags": flags, "cores": cores, "python": platform.python_version()}


def versions() -> dict[str, str]:
    import scipy
    import torch
    return {"optuna": optuna.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def commit() -> str:
    return subprocess.run(["git", "-C", str(PROJECT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def uncommitted_product_files() -> list[str]:
    """Product files that differ from the commit (the replay imports the working tree's)."""
    status = subprocess.run(["git", "-C", str(PROJECT), "status", "--porcelain", "--", "search", "spaces", "objectives"],
                            capture_output=True, text=True).stdout
    return sorted(line[3:] for line in status.splitlines())


def warm_conditions(space: space_mod.Space, presets: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict]]:
    """The presets each condition enqueues, in order: none; the reference configuration as the product
    enqueues it first in every study (search.study.with_reference); the reference and the presets,
    as the product's --warm-start seeds (a preset that only repeats reference values, the presets
    file's bf16_reference before 7a426fb, is left out: it was the same trial)."""
    reference = space.reference_config().flat()
    seeds = {name: values for name, values in presets.items()
             if any(reference.get(k) != v for k, v in values.items())}
    return {"none": {}, "reference": study_mod.with_reference(space, {}), "seeds": study_mod.with_reference(space, seeds)}


def modelled_after(problem: Problem, warm: dict[str, dict[str, Any]]) -> list[str]:
    """The params every trial holds once the presets have run: GPSampler models only these (Optuna's
    IntersectionSearchSpace); a preset whose value lies outside the space leaves that param unsuggested."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        study_mod.warm_start(study, problem.space, warm)
        for _ in warm:
            trial = study.ask()
            try:
                problem.space.sample(trial, warm.get(trial.user_attrs.get("preset", ""), {}))
            except space_mod.Infeasible:
                pass
            study.tell(trial, 1.0)
        return sorted(optuna.search_space.IntersectionSearchSpace().calculate(study))


def _tpe(changes: dict[str, Any]) -> Callable[[int], optuna.samplers.BaseSampler]:
    def factory(seed: int) -> optuna.samplers.BaseSampler:
        kwargs = dict(multivariate=True, group=True, constant_liar=True, n_startup_trials=8, seed=seed)
        return optuna.samplers.TPESampler(**{**kwargs, **changes})
    return factory


def _gp(changes: dict[str, Any]) -> Callable[[int], optuna.samplers.BaseSampler]:
    return lambda seed: optuna.samplers.GPSampler(seed=seed, **changes)


# The product's samplers (search/study.py make_sampler) with one setting changed: candidates for its
# defaults. label -> (the product's name, what changes, factory, name the gate on infeasible trials).
VARIANTS = {
    "tpe startup=4": ("tpe", "n_startup_trials=4", _tpe(dict(n_startup_trials=4)), False),
    "tpe startup=16": ("tpe", "n_startup_trials=16", _tpe(dict(n_startup_trials=16)), False),
    "tpe univariate": ("tpe", "multivariate=False, group=False", _tpe(dict(multivariate=False, group=False)), False),
    # GPSampler's default is 10 random start-up trials. Run with the recovery_gate constraint named on
    # infeasible trials too, without which GP fails every trial after the first infeasible one.
    "gp startup=4 +gate": ("gp", "n_startup_trials=4, and recovery_gate named (violated) on infeasible trials",
                           _gp(dict(n_startup_trials=4)), True),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Replay a measured study on a surrogate fitted to its trials and count, per sampler "
                    "(the product's make_sampler: tpe, gp, nsga2, random; and a grid), the trials until a "
                    "configuration within 5% of the best feasible one is first proposed: with no presets, "
                    "with the reference first (the product's default since issue 26 item 3) and with the "
                    "product's --warm-start seeds. Then the same on the landscapes of bootstrap resamples "
                    "of the trials and with the study's measurement noise. Progress goes to stderr.",
        epilog="The committed results (18 min on 2 shared cores): .venvs/main/bin/python bench/sampler_replay.py "
               "--seeds 100 --out bench/results/sampler-replay-2026-12-06.json; then --table on that file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20, help="seeds per sampler and condition")
    parser.add_argument("--budget", type=int, default=150,
                        help="trials a run may take before it counts as never getting there (a grid runs to its end)")
    parser.add_argument("--gp-budget", type=int, default=60,
                        help="the GP sampler's budget: its trials cost 0.05-0.5 s each here, the others' ~1 ms")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated, of " + ", ".join(SAMPLERS))
    parser.add_argument("--study", default="smollm2", choices=sorted(STUDIES), help="the measured study to replay")
    parser.add_argument("--alpha", type=float, default=0.1, help="the surrogate's ridge penalty")
    parser.add_argument("--no-robustness", action="store_true",
                        help="leave out the bootstrap-landscape and measurement-noise tables")
    parser.add_argument("--no-variants", action="store_true",
                        help="leave out the product's TPE with one setting changed (startup trials, univariate)")
    parser.add_argument("--presets", default=str(DEFAULT_PRESETS), help="the seeds condition's presets file")
    parser.add_argument("--out", type=Path, help="write the results here as JSON (else to stdout)")
    parser.add_argument("--table", type=Path, metavar="RESULTS.json",
                        help="print a results file's table as Markdown (bench/README.md's) and exit; runs nothing")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return 0
    if args.seeds < 1 or args.budget < 1 or args.gp_budget < 1:
        parser.error("--seeds, --budget and --gp-budget must be at least 1")
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    unknown = set(samplers) - set(SAMPLERS)
    if unknown:
        parser.error(f"unknown sampler(s) {sorted(unknown)}; choose from {', '.join(SAMPLERS)}")

    study_mod.quiet_optuna()
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    import torch  # GPSampler's: one thread, for a machine shared with other work (two threads thrash under load)
    torch.set_num_threads(1)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    problem = load_problem(args.study, args.alpha)
    best = min((k for k in problem.keys if problem.feasible(k)), key=problem.energy.get)
    targets = sorted(problem.targets, key=problem.energy.get)
    log(f"{problem.name}: {len(problem.measured)} measured trials, {len(problem.keys)} runnable configurations "
        f"({len(problem.refused)} refused), {len(targets)} within {WITHIN:.0%} of the best feasible "
        f"({problem.energy[best]:.3f} J/request); surrogate LOO RMSE log-energy "
        f"{problem.fit['loo_rmse_log_energy']:.3f} vs replicate SD {problem.fit['replicate_sd_log_energy']:.3f}")
    conditions = warm_conditions(problem.space, space_mod.load_presets(args.presets))
    preset_report = {}  # what the warm start enqueues on this space, and what the surrogate makes of it
    for name, values in conditions["seeds"].items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study = optuna.create_study()
            study_mod.warm_start(study, problem.space, {name: values})
            try:
                key, why = problem.score(problem.space.sample(study.ask(), values).flat())
            except space_mod.Infeasible as exc:
                key, why = None, str(exc)
        preset_report[name] = {"enqueued": problem.space.enqueue_params(values), "scored": key is not None,
                               "told_infeasible_because": why or None, "energy": problem.energy.get(key),
                               "recovery": problem.recovery.get(key),
                               "config": problem.describe(key) if key is not None else None}
    modelled = {name: modelled_after(problem, warm) for name, warm in conditions.items() if warm}
    log("warm start: " + "; ".join(f"{n}: " + ("scored" if r["scored"] else "told infeasible")
                                   for n, r in preset_report.items()))

    seeds = list(range(args.seeds))
    table = []

    def lines(problem_for, landscape: str, warm_names: list[str], noise_sd: float = 0.0) -> None:
        for warm_name in warm_names:
            warm = conditions[warm_name]
            for sampler in samplers:
                budget = min(args.budget, args.gp_budget) if sampler == "gp" else args.budget
                table.append(row(problem_for, sampler, sampler, landscape, warm_name, warm, seeds, budget, noise_sd,
                                 progress=log))
                if sampler == "gp" and table[-1]["error"]:  # GP once the product names the gate there too
                    table.append(row(problem_for, sampler, "gp +gate on infeasible", landscape, warm_name, warm,
                                     seeds, budget, noise_sd, gate_on_infeasible=True, progress=log))
            if not args.no_variants:
                for label, (name, _, factory, gate) in VARIANTS.items():
                    budget = min(args.budget, args.gp_budget) if name == "gp" else args.budget
                    table.append(row(problem_for, name, label, landscape, warm_name, warm, seeds, budget,
                                     noise_sd, factory, gate, progress=log))

    log("fitted on all trials, no noise:")
    lines(lambda seed: problem, "fitted", list(conditions))
    landscapes = {}
    if not args.no_robustness:
        log("a landscape per seed, fitted on a bootstrap resample of the trials (reference first):")
        resampled = {seed: bootstrap(problem, seed) for seed in seeds}
        landscapes = {str(seed): {"targets": len(p.targets), "best": problem_best(p)} for seed, p in resampled.items()}
        lines(resampled.__getitem__, "bootstrap", ["reference"])
        hybrid = Problem(problem.name, problem.space, problem.measured, problem.alpha, measured_means=True)
        landscapes["measured"] = problem_best(hybrid) | {"targets": [hybrid.describe(k) for k in hybrid.targets]}
        log(f"measured means where measured ({len(_groups(problem.measured))} configurations), the fit elsewhere "
            f"({len(hybrid.targets)} within 5%), reference first:")
        lines(lambda seed: hybrid, "measured", ["reference"])
        noise = problem.fit["replicate_sd_log_energy"]
        log(f"fitted on all trials, the study's measurement noise on the energy told (sd {noise:.3f} in log):")
        lines(lambda seed: problem, "noisy", ["reference"], noise)

    ratios = {}
    for r in table:
        if r["sampler"] != "random":
            continue
        for other in table:
            if (other["landscape"], other["warm_start"], other["noise_sd"]) != (r["landscape"], r["warm_start"],
                                                                             r["noise_sd"]):
                continue
            if other["sampler"] not in ("random", "grid") and other["median_trials"] and r["median_trials"]:
                ratios[f"{other['sampler']} / random, {r['landscape']}, warm={r['warm_start']}"] = {
                    **{what: round(other[f"median_{what}"] / r[f"median_{what}"], 3) for what in ("trials", "distinct")},
                    "trials_ci95": ratio_ci(other["trials_per_seed"], r["trials_per_seed"]),
                    "distinct_ci95": ratio_ci(other["distinct_per_seed"], r["distinct_per_seed"])}
    result = {
        "command": " ".join([".venvs/main/bin/python", "bench/sampler_replay.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": commit(), "uncommitted_product_files": uncommitted_product_files(),
        "machine": machine(), "versions": versions(),
        "metric": f"trials until the first proposed configuration that passes the gate ({GATE}) with J/request "
                  f"within {WITHIN:.0%} of the best feasible configuration of the space (surrogate values); "
                  "median over seeds, runs that never got there within the budget ranked last (null: the median "
                  "is among them). distinct: the distinct configurations measured up to and including that trial "
                  "(what is served once a configuration measured before is answered from it, issue 26 item 3; "
                  "presets told infeasible are not served either)",
        "study": {
            "name": problem.name, "space": STUDIES[problem.name][0], "trials_file": STUDIES[problem.name][1],
            "runnable_configurations": len(problem.keys), "refused_configurations": len(problem.refused),
            "surrogate": problem.fit,
            "best_feasible": {"config": problem.describe(best), "energy": problem.energy[best],
                              "recovery": problem.recovery[best]},
            "targets": [{"config": problem.describe(k), "energy": problem.energy[k], "recovery": problem.recovery[k]}
                        for k in targets],
            "feasible_configurations": sum(problem.feasible(k) for k in problem.keys),
            "grid_expected_position": expected_random_position(len(problem.keys), len(targets)),
            "bootstrap_landscapes": landscapes,
        },
        "warm_start": {"presets_file": _relative(args.presets),
                       "conditions": {name: list(warm) for name, warm in conditions.items()},
                       "how": "none: nothing enqueued (the product before 7a426fb without --warm-start). "
                              "reference: the space's reference configuration first (search.study.with_reference; "
                              "every study's first trial since 7a426fb, whatever --warm-start says). seeds: the "
                              "reference, then the presets file (--warm-start seeds; before 7a426fb the file's own "
                              "bf16_reference entry gave the same reference trial). Enqueued with "
                              "search.study.warm_start(study, space, presets); each enqueued trial sampled by "
                              "Space.sample(trial, preset) as the product's Objective does. A preset the surrogate "
                              "cannot score (a value outside the measured space) is told to Optuna as infeasible",
                       "presets": preset_report,
                       "gp_models_after_presets": {
                           "what": "the params every trial holds once a condition's presets have run: GPSampler "
                                   "models these and samples the others at random (Optuna's IntersectionSearchSpace)",
                           "space_params": [p.name for p in problem.space.params], **modelled}},
        "samplers": {"tpe": "search.study.make_sampler('tpe', seed): TPESampler(multivariate=True, group=True, "
                            "constant_liar=True, n_startup_trials=8)",
                     "gp": f"search.study.make_sampler('gp', seed): GPSampler(); budget {args.gp_budget} trials",
                     "gp +gate on infeasible": "as gp, with the recovery_gate constraint also set (violated, 1.0) on "
                                               "trials that cannot run (the product's Objective._end sets only runs_here)",
                     "nsga2": "search.study.make_sampler('nsga2', seed): NSGAIISampler(population_size=10), "
                              "directions (minimize energy, maximize recovery)",
                     "random": "search.study.make_sampler('random', seed): RandomSampler()",
                     "grid": "every runnable configuration once, seeded random order, enqueued",
                     **{k: f"the product's {name} with {what}" for k, (name, what, *_) in VARIANTS.items()}},
        "table": table,
        "ratios": ratios,
        "not_replayed": inventory(problem.fit["coefficients"], len(problem.measured)),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        log(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    else:
        print(text)
    return 0


def markdown(result: dict[str, Any]) -> str:
    """The table of a results file: median trials [95% CI] (distinct configurations served), hits."""
    def cell(r: dict) -> str:
        ci = "-".join(fmt(v) for v in r["median_trials_ci95"])
        return f"{fmt(r['median_trials'])} [{ci}] ({fmt(r['median_distinct'])}), {r['hits']}/{r['seeds']}"
    columns = []
    for r in result["table"]:
        column = (r["landscape"], r["warm_start"], r["noise_sd"])
        if column not in columns:
            columns.append(column)
    names = {("fitted", "none"): "fit, no presets", ("fitted", "reference"): "fit, reference first",
             ("fitted", "seeds"): "fit, --warm-start seeds", ("bootstrap", "reference"): "bootstrap fits",
             ("measured", "reference"): "measured means", ("noisy", "reference"): "fit + noise"}
    head = [names.get((c[0], c[1]), f"{c[0]} {c[1]}") for c in columns]
    lines = ["| sampler | " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(columns)]
    samplers = []
    for r in result["table"]:
        if r["sampler"] not in samplers:
            samplers.append(r["sampler"])
    for sampler in samplers:
        cells = []
        for column in columns:
            r = next((r for r in result["table"] if r["sampler"] == sampler
                      and (r["landscape"], r["warm_start"], r["noise_sd"]) == column), None)
            cells.append(cell(r) if r else "")
        lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    # Each against random sampling in its column: median trials' ratio [95% paired-bootstrap interval].
    lines += ["", "| median trials / random's | " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(columns)]
    for sampler in samplers:
        if sampler in ("random", "grid"):
            continue
        cells = []
        for landscape, warm, _ in columns:
            ratio = result["ratios"].get(f"{sampler} / random, {landscape}, warm={warm}")
            cells.append("" if ratio is None else
                         f"{ratio['trials']:.2f} [{'-'.join('never' if v is None else f'{v:.2f}' for v in ratio['trials_ci95'])}]")
        if any(cells):
            lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _relative(path: str) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(PROJECT)) if resolved.is_relative_to(PROJECT) else path


def problem_best(problem: Problem) -> dict[str, Any]:
    best = min((k for k in problem.keys if problem.feasible(k)), key=problem.energy.get)
    return {"config": problem.describe(best), "energy": round(problem.energy[best], 4)}


def bootstrap(problem: Problem, seed: int) -> Problem:
    """The problem fitted on a resample (with replacement) of its measured trials: a landscape the
    same number of other measurements could have given."""
    rng = random.Random(10_000 + seed)
    sample = [rng.choice(problem.measured) for _ in problem.measured]
    return Problem(f"{problem.name} bootstrap {seed}", problem.space, sample, problem.alpha)


if __name__ == "__main__":
    sys.exit(main())
