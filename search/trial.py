"""One trial, stage by stage: check, compress, serve, warm-up, quality screen, workload (one
measured window), quality, score.

Every stage reports its name through `stage(...)` (the progress display) and its duration into the
outcome, and every artifact it produces is written into the trial's folder before anything can fail
later, so a failed trial keeps what it made.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import yaml

from objectives import fidelity
from objectives.recovery import Gate, RecoveryEstimate, estimate_recovery
from objectives.scorers import get_scorer
from search import energy, feasibility, floor, windows, workload
from search.compress import CheckpointCache, Compressor, compress
from search.config import ConfigError, Infeasible, TrialConfig, WorkloadConfig, flatten
from search.feasibility import Platform
from search.models import ModelFamily, family_of
from search.serve import Server, ServerFailed, ServerPool, engine_env, vllm_config
from search.workload import Prompt, RequestResult

Stage = Callable[[str], None]


class TrialPruned(Exception):
    """Recovery after the first part of the workload shows the gate cannot be reached any more."""


@dataclass
class Runtime:
    """What every trial of one study run shares."""

    workdir: Path
    base_model: Path
    cache: CheckpointCache
    pool: ServerPool
    compressor: Compressor
    platform: Platform
    gate: Gate
    reference: TrialConfig
    data_dir: Path
    idle_seconds: float = 3.0
    target_gpu: str | None = None  # the GPU a roofline is computed for when none is measured here
    # The meter the study was made with ('nvml', 'rapl', 'estimate'): energies of two do not compare.
    energy_source: str | None = None
    # Latency limits a feasible trial must meet, e.g. {"itl_p90_ms": 100.0} (--slo).
    slos: dict[str, float] = field(default_factory=dict)
    _prompts: dict[str, list[Prompt]] = field(default_factory=dict)

    @functools.cached_property
    def family(self) -> ModelFamily:
        return family_of(self.base_model)

    def prompts(self, config: WorkloadConfig) -> list[Prompt]:
        key = json.dumps([config.tasks, config.n_requests], sort_keys=True)
        if key not in self._prompts:
            prompts = workload.load_prompts(config, self.data_dir)
            with_image = next((p for p in prompts if p.image_png is not None), None)
            if with_image is not None and not self.family.takes_images:
                raise ConfigError(f"the model is a {self.family.name} text model and task {with_image.task} has "
                                  "images: choose text tasks (e.g. objectives/tasks/text/)")
            self._prompts[key] = prompts
        return self._prompts[key]


@dataclass
class Outcome:
    objective: float
    recovery: float
    feasible: bool
    metrics: dict[str, float]
    tags: dict[str, str]
    artifacts: list[Path]


# --------------------------------------------------------------------------------------------
# Baseline: the uncompressed model under the reference settings, scored once per study and cached.


def baseline_key(runtime: Runtime, model_fingerprint: str) -> str:
    material = {"model": model_fingerprint, "reference": flatten(runtime.reference)}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def load_or_make_baseline(runtime: Runtime, key: str, stage: Stage) -> dict[str, Any]:
    """Workers sharing a study folder make the baseline once: the first takes the lock, the rest wait."""
    path = runtime.workdir / f"baseline-{key}.json"
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return json.loads(path.read_text())
        return _make_baseline(runtime, key, path, stage)


def _make_baseline(runtime: Runtime, key: str, path: Path, stage: Stage) -> dict[str, Any]:
    ref = runtime.reference
    stage("baseline: serve")
    server = _serve(runtime, runtime.base_model, ref, runtime.workdir / f"baseline-{key}")
    prompts = runtime.prompts(ref.workload)
    stage("baseline: workload")
    raise_if_engine_died(server, workload.warm_up(server.base_url, server.served_name, prompts, ref.workload))
    results = workload.run(server.base_url, server.served_name, prompts, ref.workload)
    raise_if_engine_died(server, results)
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"baseline requests failed: {errors[0]}")
    stage("baseline: teacher forcing")
    items = []
    forced = set()
    for prompt, result in zip(prompts, results):
        # A prompt the workload repeats (more requests than task items) is compared once: fidelity
        # items are distinct prompts, and a repeat would cost a teacher-forced pass for no new evidence.
        positions = None
        if prompt.id not in forced:
            forced.add(prompt.id)
            positions = workload.teacher_forced_logprobs(server.base_url, server.served_name, prompt,
                                                         result.answer, ref.workload)
        items.append({"id": prompt.id, "task": prompt.task, "answer": result.answer,
                      "positions": positions, "completion_tokens": result.completion_tokens,
                      "label_score": get_scorer(prompt.scorer)(result.answer, list(prompt.answers))})
    if ref.workload.quality == "labels":
        for task in {i["task"] for i in items}:
            if not any(i["label_score"] for i in items if i["task"] == task):
                raise ValueError(f"the baseline scores 0 on task {task}: recovery against it is undefined "
                                 "(a random-weight model? use workload.quality: fidelity)")
    baseline = {"key": key, "reference": flatten(ref), "items": items}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(baseline))
    tmp.replace(path)
    return baseline


# --------------------------------------------------------------------------------------------
# Stages


def engine_args(runtime: Runtime, config: TrialConfig) -> dict[str, Any]:
    return vllm_config(config.serve, config.compress, config.workload.max_in_flight, runtime.platform.gpu_memory_gib)


def _serve(runtime: Runtime, model: Path, config: TrialConfig, workdir: Path) -> Server:
    server, _ = runtime.pool.get(model, engine_args(runtime, config), workdir, engine_env(config.serve))
    return server


def prefix_cache_counts(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    """(hit tokens, queried tokens) of vLLM's prefix cache between two /metrics readings."""
    return (after.get("vllm:prefix_cache_hits_total", 0.0) - before.get("vllm:prefix_cache_hits_total", 0.0),
            after.get("vllm:prefix_cache_queries_total", 0.0) - before.get("vllm:prefix_cache_queries_total", 0.0))


def check_energy_source(runtime: Runtime, reading: energy.EnergyReading) -> None:
    """A window read by another meter than the study's fails the trial: the two do not compare."""
    if runtime.energy_source and reading.source.split("-")[0] != runtime.energy_source:  # nvml-power is NVML
        raise RuntimeError(f"this trial's energy came from {reading.source}, the study's from "
                           f"{runtime.energy_source}: the two do not compare (a GPU lost, a counter unreadable?)")


def require_served(results: list[RequestResult], max_failed_share: float) -> int:
    """The number of requests served; more failures than the study tolerates make the
    configuration infeasible, with the count and the first reason."""
    failed = [r for r in results if r.error]
    if failed and len(failed) > max_failed_share * len(results):
        raise Infeasible(f"{len(failed)} of {len(results)} requests failed (first: {failed[0].error}); "
                         f"the study tolerates {max_failed_share:.0%}")
    return len(results) - len(failed)


def _fidelity_or_engine_error(server: Server, items: list[dict], prompts_by_id: dict[str, Prompt],
                              settings: WorkloadConfig) -> list[tuple[str, float, float]]:
    try:
        return _fidelity(server, items, prompts_by_id, settings)
    except httpx.HTTPError as exc:
        raise_if_engine_died(server, [exc])
        raise


def raise_if_engine_died(server: Server, outcomes: list) -> None:
    """When requests failed because the engine died, the trial fails with the engine's own error
    (what the requests saw is only "connection refused" or an error event)."""
    if any(isinstance(o, Exception) or o.error for o in outcomes):
        error = server.engine_error()
        if error:
            raise ServerFailed(f"the vLLM engine died serving requests: {error}")


def _fidelity(server: Server, baseline_items: list[dict], prompts_by_id: dict[str, Prompt],
              settings: WorkloadConfig) -> list[tuple[str, float, float]]:
    """(task, top-1 agreement, top-k KL) per baseline item, teacher-forced on the baseline's answer
    under the trial's own prompt settings (system turn, thinking), so that they move the score too:
    the positions compared are the user turn and the answer, which both prompts end with. Answer
    tokens past the trial's max_tokens, which the trial would never have produced, count as misses."""
    out = []
    for item in baseline_items:
        if item["positions"] is None:  # a repeat of a prompt compared already
            continue
        positions = workload.teacher_forced_logprobs(server.base_url, server.served_name,
                                                     prompts_by_id[item["id"]], item["answer"], settings)
        base, trial = fidelity.common_suffix(item["positions"], positions)
        cut = max(0, item["completion_tokens"] - settings.max_tokens)
        out.append((item["task"], fidelity.top1_agreement(base, trial, missed_tail=cut),
                    fidelity.topk_kl(base, trial)))
    return out


def _item_scores(config: TrialConfig, baseline: dict, results: list[RequestResult],
                 fidelity_rows: list[tuple[str, float, float]], prompts: dict[str, Prompt]
                 ) -> dict[str, tuple[list[float], list[float]]]:
    """task -> (trial item scores, baseline item scores), paired."""
    per_task: dict[str, tuple[list[float], list[float]]] = {}
    if config.workload.quality == "fidelity":
        # The baseline agrees with itself at every position: its item score is 1.
        for task, agreement, _ in fidelity_rows:
            trial_scores, base_scores = per_task.setdefault(task, ([], []))
            trial_scores.append(agreement)
            base_scores.append(1.0)
        return per_task
    by_id = {item["id"]: item for item in baseline["items"]}
    for result in results:
        item = by_id.get(result.id)
        if item is None:
            continue
        prompt = prompts[result.id]
        trial_scores, base_scores = per_task.setdefault(result.task, ([], []))
        trial_scores.append(0.0 if result.error else get_scorer(prompt.scorer)(result.answer, list(prompt.answers)))
        base_scores.append(item["label_score"])
    return per_task


def _recovery(per_task_items: dict[str, tuple[list[float], list[float]]], seed: int
              ) -> dict[str, RecoveryEstimate]:
    return {task: estimate_recovery(t, b, task=task, seed=seed) for task, (t, b) in per_task_items.items()}


def run(runtime: Runtime, config: TrialConfig, workdir: Path, baseline: dict, stage: Stage,
        times: dict[str, float]) -> Outcome:
    """Run one trial; raises Infeasible, CompressionFailed, ServerFailed, TrialPruned or RuntimeError.

    `times` receives each finished stage's seconds as it ends, so a trial that fails keeps them too."""
    with contextlib.ExitStack() as cleanup:
        return _run(runtime, config, workdir, baseline, stage, times, cleanup)


def _run(runtime: Runtime, config: TrialConfig, workdir: Path, baseline: dict, stage: Stage,
         times: dict[str, float], cleanup: contextlib.ExitStack) -> Outcome:
    workdir.mkdir(parents=True, exist_ok=True)
    artifacts: list[Path] = []
    tags: dict[str, str] = {}

    def timed(name: str):
        stage(name)
        started = time.perf_counter()
        return lambda: times.__setitem__(f"time_{name}_s", time.perf_counter() - started)

    done = timed("check")
    feasibility.check(config, runtime.platform, runtime.family)
    done()

    done = timed("compress")
    result = compress(config.compress, runtime.base_model, runtime.cache, runtime.compressor,
                      runtime.platform.llmcompressor_version, workdir / "compress.log",
                      make_room=runtime.pool.close)
    done()
    if (workdir / "compress.log").exists():
        artifacts.append(workdir / "compress.log")
    recipe_path = workdir / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(result.recipe, sort_keys=False) if result.recipe else "# no compression\n")
    artifacts.append(recipe_path)
    tags.update({"cache_hit": str(result.cache_hit).lower(), "cache_key": result.key or "none"})

    done = timed("serve")
    engine = engine_args(runtime, config)
    (workdir / "vllm_config.yaml").write_text(yaml.safe_dump(engine, sort_keys=False))
    artifacts.append(workdir / "vllm_config.yaml")
    server, reused = runtime.pool.get(result.checkpoint, engine, workdir, engine_env(config.serve))
    done()
    # What a deployment needs to answer a bare request with this trial's system turn (search/export.py).
    system, template = workload.SYSTEM_PROMPTS[config.workload.verbosity], workload.chat_template(result.checkpoint)
    if system and template:
        (workdir / "chat_template.jinja").write_text(workload.with_default_system_turn(template, system))
        artifacts.append(workdir / "chat_template.jinja")
    tags["server_reused"] = str(reused).lower()
    artifacts.append(server.log_path)

    prompts = runtime.prompts(config.workload)
    prompts_by_id = {p.id: p for p in runtime.prompts(runtime.reference.workload)}
    prompts_by_id.update({p.id: p for p in prompts})
    done = timed("warmup")
    raise_if_engine_died(server, workload.warm_up(server.base_url, server.served_name, prompts, config.workload))
    meter = energy.make_meter(None, server.pids)
    cleanup.callback(meter.close)
    if not isinstance(meter, energy.EstimateMeter):
        meter.measure_idle(runtime.idle_seconds)
    done()

    # The quality screen, before any energy is measured: the first items' scores decide whether
    # the trial can still reach the gate, so a hopeless one is pruned without a measurement and
    # the measured window is never split.
    base_items = [item for item in baseline["items"] if item["positions"] is not None]  # distinct prompts
    split = max(1, round(len(prompts) * config.workload.early_check_fraction))
    base_split = max(1, round(len(base_items) * config.workload.early_check_fraction))
    done = timed("screen")
    screen_results = []
    if config.workload.quality == "labels":  # answers the measured window then repeats
        screen_results = workload.run(server.base_url, server.served_name, prompts[:split], config.workload)
        raise_if_engine_died(server, screen_results)
    fidelity_rows = _fidelity_or_engine_error(server, base_items[:base_split], prompts_by_id, config.workload)
    done()
    if split < len(prompts) or base_split < len(base_items):
        try:
            _check_reachable(runtime.gate, config, baseline, screen_results, fidelity_rows, prompts_by_id,
                             [p.id for p in prompts])
        except TrialPruned:
            times["pruned_at_screen"] = 1.0  # nothing measured: no energy window was run
            raise

    done = timed("workload")
    counters_before = server.metrics()
    meter.start()
    results = workload.run(server.base_url, server.served_name, prompts, config.workload)
    reading = meter.stop()
    check_energy_source(runtime, reading)
    cache_counts = prefix_cache_counts(counters_before, server.metrics())
    done()
    artifacts += write_window(workdir, results, reading)  # kept whatever happens to the trial later
    raise_if_engine_died(server, results)
    # Label-free agreement in either quality mode: with labels it is what the label recovery is
    # compared with (bench/README.md), with fidelity it is the score.
    done = timed("quality")
    fidelity_rows += _fidelity_or_engine_error(server, base_items[base_split:], prompts_by_id, config.workload)
    done()

    served = require_served(results, config.workload.max_failed_share)
    window = window_metrics(results, reading, config, served)
    # Each repeat is read as the objective is (its own steady state), so the spread is the objective's.
    repeats = [window["energy_j_per_request"]]
    for repeat in range(1, config.workload.energy_repeats):
        done = timed(f"repeat_{repeat}")
        meter.start()
        repeat_results = workload.run(server.base_url, server.served_name, prompts, config.workload)
        repeat_reading = meter.stop()
        check_energy_source(runtime, repeat_reading)
        repeats.append(window_metrics(repeat_results, repeat_reading, config, require_served(
            repeat_results, config.workload.max_failed_share))["energy_j_per_request"])
        done()

    per_task = _recovery(_item_scores(config, baseline, results, fidelity_rows, prompts_by_id),
                         config.workload.seed)
    outcome_gate = runtime.gate.evaluate(per_task)
    metrics = {**window, **times}
    metrics["failed_requests"] = len(results) - served
    # What the measured windows took from vLLM's prefix cache: 0 unless the study turned it on.
    metrics["prefix_cache_hit_rate"] = cache_counts[0] / cache_counts[1] if cache_counts[1] else 0.0
    metrics["prefix_cache_queries"] = cache_counts[1]
    # Each latency limit as a constraint value: <= 0 holds (the samplers read them as the gate's).
    slo = {f"slo_{name}": metrics[name] - limit for name, limit in runtime.slos.items()}
    metrics.update(slo)
    feasible = outcome_gate.passed and all(v <= 0 for v in slo.values())
    metrics["recovery_mean"] = sum(e.point for e in per_task.values()) / len(per_task)
    metrics["recovery_margin"] = outcome_gate.margin
    for task, est in per_task.items():
        metrics.update({f"recovery_{task}": est.point, f"recovery_{task}_low": est.low,
                        f"recovery_{task}_high": est.high})
    if fidelity_rows:
        metrics["top1_agreement"] = sum(r[1] for r in fidelity_rows) / len(fidelity_rows)
        metrics["topk_kl"] = sum(r[2] for r in fidelity_rows) / len(fidelity_rows)
    metrics["answer_agreement"] = fidelity.answer_agreement(
        [i["answer"] for i in baseline["items"]], _answers_for(baseline["items"], results))
    if len(repeats) > 1:
        spread = energy.spread(repeats)
        metrics.update({f"energy_j_per_request_{k}": v for k, v in spread.items()})
    floor_values, floor_tags = floor_metrics(result.checkpoint, config, window, prompts, reading, runtime.target_gpu)
    metrics.update(floor_values)
    tags.update(floor_tags)
    metrics["compress_saved_s"] = result.saved_seconds
    metrics["checkpoint_bytes"] = result.size_bytes
    metrics["server_start_s"] = 0.0 if reused else server.started_s
    tags.update({"energy_source": reading.source, "energy_method": reading.method,
                 "gate": outcome_gate.reason, "feasible": str(feasible).lower(),
                 "slo": ", ".join(f"{k[4:]} {'ok' if v <= 0 else 'missed'}" for k, v in slo.items()) or "none",
                 "gpu": ", ".join(reading.gpus) or "none"})

    return Outcome(metrics["energy_j_per_request"], metrics["recovery_mean"], feasible, metrics, tags, artifacts)


def write_window(workdir: Path, results: list[RequestResult], reading: energy.EnergyReading) -> list[Path]:
    """The measured window's answers and power trace, written as soon as it ends."""
    answers_path = workdir / "answers.jsonl"
    answers_path.write_text("".join(json.dumps(r.as_dict()) + "\n" for r in results))
    trace_csv, trace_png = workdir / "power_trace.csv", workdir / "power_trace.png"
    energy.write_trace_csv(reading, trace_csv)
    energy.plot_trace(reading, trace_png)
    return [answers_path, trace_csv, trace_png]


def window_metrics(results: list[RequestResult], reading: energy.EnergyReading, config: TrialConfig,
                   served: int) -> dict[str, float]:
    """One measured run: counts, latencies, the whole run's energy and its steady state's, with the
    objective window's J/request as `energy_j_per_request`. Energy is per request served: a
    configuration whose requests fail is not made cheaper by them."""
    stats = workload.summarize(results, reading.duration_s)
    metrics = {**stats, **reading.as_metrics(served, int(stats["completion_tokens"]))}
    ok = [r for r in results if not r.error]
    metrics.update(windows.steady_metrics(
        [(r.token_times[0], r.ended_at) for r in ok if r.token_times], [r.token_times for r in ok],
        reading.trace, reading.started_at, reading.joules_gross, reading.idle_w, config.serve.max_num_seqs,
        stats["tokens_per_answer"]))
    read_objective_window(metrics, config.workload)
    return metrics


def read_objective_window(metrics: dict[str, float], settings: WorkloadConfig) -> None:
    """Put the objective window's J/request in `energy_j_per_request` (the whole run's stays as
    `whole_energy_j_per_request`); a steady window that is missing or too short to read fails the trial."""
    if settings.objective_window != "steady":
        return
    steady_s = metrics.get("steady_window_s") or 0.0
    if not steady_s:
        raise RuntimeError("the workload had no steady state to measure (workload.objective_window: steady "
                           "needs more requests than max_num_seqs, or all at once)")
    if steady_s < settings.min_steady_s:
        raise RuntimeError(f"the steady state lasted {steady_s:.1f} s, under workload.min_steady_s "
                           f"{settings.min_steady_s:g} s: too short to read; more requests or longer answers "
                           "lengthen it")
    metrics["whole_energy_j_per_request"] = metrics["energy_j_per_request"]
    metrics["energy_j_per_request"] = metrics["steady_energy_j_per_request"]


def floor_metrics(checkpoint: Path, config: TrialConfig, stats: dict, prompts: list[Prompt],
                  reading: energy.EnergyReading, target_gpu: str | None = None
                  ) -> tuple[dict[str, float], dict[str, str]]:
    """The trial's work (FLOPs, decode bytes) and its roofline at TDP on the measured GPU: the time
    the work needs at the data sheet's peak rate, times the board power. Not a lower bound (a GPU
    can draw less than its TDP); a yardstick of how far the measurement is from the data sheet.
    Without a measured GPU, only the GPU the user names (`target_gpu`) gives a ratio."""
    model_config = json.loads((checkpoint / "config.json").read_text())
    quant = model_config.get("quantization_config")
    n = max(1, len(prompts))
    work = floor.workload_flops(
        model_config, round(stats["prompt_tokens"] / n), max(1, round(stats["completion_tokens"] / n)),
        images=round(sum(p.image_png is not None for p in prompts) / n), requests=n,
        soft_tokens_per_image=config.serve.image_soft_tokens, quant=quant,
        batch=min(config.workload.max_in_flight, config.serve.max_num_seqs),
        kv_dtype="auto" if config.serve.kv_cache_dtype == "auto" else "fp8")
    counts = {"workload_flops": work["flops"], "workload_decode_bytes": work["bytes"]}
    gpu = floor.gpu_spec(reading.gpus[0]) if reading.gpus else None
    basis = "data sheet"
    if gpu is None and target_gpu:
        gpu, basis = floor.gpu_spec(target_gpu), "data sheet of the named target GPU (not the one measured)"
    if gpu is None:
        return counts, {"floor_basis": "none: no GPU measured here (--target-gpu names one for a roofline)"}
    floors = floor.floors(work, gpu, floor.compute_format(quant))
    metrics = {**counts, "floor_compute_j": floors["compute_j"], "floor_memory_j": floors["memory_j"],
               "floor_j": floors["floor_j"], "floor_ratio": floor.floor_ratio(reading.joules_gross, floors["floor_j"])}
    against = "an estimate" if reading.source == "estimate" else "a measurement"
    return metrics, {"floor_basis": f"{gpu.name} {basis}, {floors['fmt']} peak", "floor_ratio_against": against}


def _answers_for(base_items: list[dict], results: list[RequestResult]) -> list[str | None]:
    by_id = {r.id: r.answer for r in results}
    return [by_id.get(item["id"]) for item in base_items]


def _check_reachable(gate: Gate, config: TrialConfig, baseline: dict, results: list[RequestResult],
                     fidelity_rows: list, prompts: dict[str, Prompt], trial_ids: list[str]) -> None:
    """Prune when even a perfect score on every remaining item leaves mean recovery under the gate."""
    per_task = _item_scores(config, baseline, results, fidelity_rows, prompts)
    if not per_task:
        return
    # Per task: how many items the whole workload has and the baseline's total score on them.
    totals: dict[str, list[float]] = {}
    wanted = None if config.workload.quality == "fidelity" else set(trial_ids)
    for item in baseline["items"]:
        if (item["positions"] is not None) if wanted is None else item["id"] in wanted:
            count_and_sum = totals.setdefault(item["task"], [0, 0.0])
            count_and_sum[0] += 1
            count_and_sum[1] += 1.0 if wanted is None else item["label_score"]
    best = []
    for task, (count, base_sum) in totals.items():
        trial_scores = per_task.get(task, ([], []))[0]
        if base_sum <= 0:
            return  # the final scoring reports this task's zero baseline as an error
        best.append((sum(trial_scores) + (count - len(trial_scores))) / base_sum)
    best_possible = sum(best) / len(best)
    if best_possible < gate.threshold:
        seen = sum(len(t) for t, _ in per_task.values())
        raise TrialPruned(f"after {seen} of {sum(c for c, _ in totals.values())} items mean recovery can "
                          f"reach at most {best_possible:.3f} < gate {gate.threshold}")
