"""One trial, stage by stage: check, compress, serve, workload (measured), quality, score.

Every stage reports its name through `stage(...)` (the progress display) and its duration into the
outcome, and every artifact it produces is written into the trial's folder before anything can fail
later, so a failed trial keeps what it made.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from objectives import fidelity
from objectives.recovery import Gate, RecoveryEstimate, estimate_recovery
from objectives.scorers import get_scorer
from search import energy, feasibility, floor, workload
from search.compress import CheckpointCache, Compressor, compress
from search.config import TrialConfig, WorkloadConfig, flatten
from search.feasibility import Platform
from search.serve import Server, ServerPool, vllm_config
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
    _prompts: dict[str, list[Prompt]] = field(default_factory=dict)

    def prompts(self, config: WorkloadConfig) -> list[Prompt]:
        key = json.dumps([config.tasks, config.n_requests], sort_keys=True)
        if key not in self._prompts:
            self._prompts[key] = workload.load_prompts(config, self.data_dir)
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
    workload.warm_up(server.base_url, server.served_name, prompts, ref.workload)
    results = workload.run(server.base_url, server.served_name, prompts, ref.workload)
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"baseline requests failed: {errors[0]}")
    stage("baseline: teacher forcing")
    items = []
    for prompt, result in zip(prompts, results):
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


def _serve(runtime: Runtime, model: Path, config: TrialConfig, workdir: Path) -> Server:
    server, _ = runtime.pool.get(model, vllm_config(config.serve, config.compress), workdir)
    return server


def _fidelity(server: Server, baseline_items: list[dict], prompts_by_id: dict[str, Prompt],
              reference: WorkloadConfig) -> list[tuple[str, float, float]]:
    """(task, top-1 agreement, top-k KL) per baseline item, teacher-forced on the baseline's answer."""
    out = []
    for item in baseline_items:
        positions = workload.teacher_forced_logprobs(server.base_url, server.served_name,
                                                     prompts_by_id[item["id"]], item["answer"], reference)
        out.append((item["task"], fidelity.top1_agreement(item["positions"], positions),
                    fidelity.topk_kl(item["positions"], positions)))
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
    feasibility.check(config, runtime.platform)
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
    engine = vllm_config(config.serve, config.compress)
    (workdir / "vllm_config.yaml").write_text(yaml.safe_dump(engine, sort_keys=False))
    artifacts.append(workdir / "vllm_config.yaml")
    server, reused = runtime.pool.get(result.checkpoint, engine, workdir)
    done()
    tags["server_reused"] = str(reused).lower()
    artifacts.append(server.log_path)

    prompts = runtime.prompts(config.workload)
    prompts_by_id = {p.id: p for p in runtime.prompts(runtime.reference.workload)}
    prompts_by_id.update({p.id: p for p in prompts})
    done = timed("warmup")
    workload.warm_up(server.base_url, server.served_name, prompts, config.workload)
    meter = energy.make_meter(None, server.pids)
    cleanup.callback(meter.close)
    if not isinstance(meter, energy.EstimateMeter):
        meter.measure_idle(runtime.idle_seconds)
    done()

    # The workload runs in two measured windows; between them, recovery on the first part decides
    # whether the rest is worth its energy.
    split = max(1, round(len(prompts) * config.workload.early_check_fraction))
    base_items = baseline["items"]
    base_split = max(1, round(len(base_items) * config.workload.early_check_fraction))
    readings, results, fidelity_rows = [], [], []
    parts = [(prompts[:split], base_items[:base_split], 0), (prompts[split:], base_items[base_split:], split)]
    for index, (part, base_part, first) in enumerate(parts):
        if not part and not base_part:
            continue
        done = timed(f"workload_{index + 1}")
        meter.start()
        part_results = workload.run(server.base_url, server.served_name, part, config.workload, first)
        readings.append(meter.stop())
        results += part_results
        done()
        failed = [r for r in part_results if r.error]
        if failed and not server.alive():
            raise RuntimeError(f"vLLM server died during the workload: {failed[0].error}")
        done = timed(f"quality_{index + 1}")
        if config.workload.quality == "fidelity":
            fidelity_rows += _fidelity(server, base_part, prompts_by_id, runtime.reference.workload)
        done()
        if index == 0 and len(parts[1][0]) + len(parts[1][1]) > 0:
            try:
                _check_reachable(runtime.gate, config, baseline, results, fidelity_rows, prompts_by_id,
                                 [p.id for p in prompts])
            except TrialPruned:
                # What the skipped part would have cost, at the first part's pace.
                first_part_s = times["time_workload_1_s"] + times["time_quality_1_s"]
                times["pruning_saved_s"] = first_part_s * (len(prompts) - split) / split
                # The first window was measured: a pruned trial keeps its energy, named as partial.
                tokens = int(workload.summarize(results, readings[0].duration_s)["completion_tokens"])
                times.update({f"first_window_{k}": v for k, v in readings[0].as_metrics(len(results), tokens).items()})
                raise

    errors = [r for r in results if r.error]
    if len(errors) == len(results):
        raise RuntimeError(f"every request failed: {errors[0].error}")
    repeat_j_per_request = [sum(r.joules_gross for r in readings) / len(results)]
    for repeat in range(1, config.workload.energy_repeats):
        done = timed(f"repeat_{repeat}")
        meter.start()
        workload.run(server.base_url, server.served_name, prompts, config.workload)
        repeat_j_per_request.append(meter.stop().joules_gross / len(prompts))
        done()

    per_task = _recovery(_item_scores(config, baseline, results, fidelity_rows, prompts_by_id),
                         config.workload.seed)
    outcome_gate = runtime.gate.evaluate(per_task)
    stats = workload.summarize(results, sum(r.duration_s for r in readings))
    reading = _combine(readings)
    metrics = {**stats, **reading.as_metrics(len(results), int(stats["completion_tokens"])), **times}
    metrics["recovery_mean"] = sum(e.point for e in per_task.values()) / len(per_task)
    metrics["recovery_margin"] = outcome_gate.margin
    for task, est in per_task.items():
        metrics.update({f"recovery_{task}": est.point, f"recovery_{task}_low": est.low,
                        f"recovery_{task}_high": est.high})
    if fidelity_rows:
        metrics["top1_agreement"] = sum(r[1] for r in fidelity_rows) / len(fidelity_rows)
        metrics["topk_kl"] = sum(r[2] for r in fidelity_rows) / len(fidelity_rows)
    metrics["answer_agreement"] = fidelity.answer_agreement(
        [i["answer"] for i in base_items], _answers_for(base_items, results))
    if len(repeat_j_per_request) > 1:
        spread = energy.spread(repeat_j_per_request)
        metrics.update({f"energy_j_per_request_{k}": v for k, v in spread.items()})
    floor_values, floor_tags = floor_metrics(result.checkpoint, config, stats, prompts, reading)
    metrics.update(floor_values)
    tags.update(floor_tags)
    metrics["compress_saved_s"] = result.saved_seconds
    metrics["checkpoint_bytes"] = result.size_bytes
    metrics["server_start_s"] = 0.0 if reused else server.started_s
    tags.update({"energy_source": reading.source, "energy_method": reading.method,
                 "gate": outcome_gate.reason, "feasible": str(outcome_gate.passed).lower(),
                 "gpu": ", ".join(reading.gpus) or "none"})

    answers_path = workdir / "answers.jsonl"
    answers_path.write_text("".join(json.dumps(r.as_dict()) + "\n" for r in results))
    trace_csv, trace_png = workdir / "power_trace.csv", workdir / "power_trace.png"
    energy.write_trace_csv(reading, trace_csv)
    energy.plot_trace(reading, trace_png)
    artifacts += [answers_path, trace_csv, trace_png]
    return Outcome(metrics["energy_j_per_request"], metrics["recovery_mean"], outcome_gate.passed,
                   metrics, tags, artifacts)


# Whose data sheet the floors use when the trial ran on no GPU we know (a CPU machine).
REFERENCE_GPU = "NVIDIA H100 80GB HBM3"  # NVML's name of the H100 SXM


def floor_metrics(checkpoint: Path, config: TrialConfig, stats: dict, prompts: list[Prompt],
           reading: energy.EnergyReading) -> tuple[dict[str, float], dict[str, str]]:
    """The hardware's least energy for this trial's work, and how far the measured energy is from it."""
    model_config = json.loads((checkpoint / "config.json").read_text())
    quant = model_config.get("quantization_config")
    n = max(1, len(prompts))
    work = floor.workload_flops(
        model_config, round(stats["prompt_tokens"] / n), max(1, round(stats["completion_tokens"] / n)),
        images=round(sum(p.image_png is not None for p in prompts) / n), requests=n,
        soft_tokens_per_image=config.serve.image_soft_tokens, quant=quant,
        batch=min(config.workload.concurrency, config.serve.max_num_seqs),
        kv_dtype="auto" if config.serve.kv_cache_dtype == "auto" else "fp8")
    gpu = floor.gpu_spec(reading.gpus[0]) if reading.gpus else None
    basis = "data sheet"
    if gpu is None:
        gpu, basis = floor.gpu_spec(REFERENCE_GPU), "data sheet (no known GPU measured here)"
    floors = floor.floors(work, gpu, floor.compute_format(quant))
    metrics = {"floor_compute_j": floors["compute_j"], "floor_memory_j": floors["memory_j"],
               "floor_j": floors["floor_j"], "workload_flops": work["flops"], "workload_decode_bytes": work["bytes"],
               "floor_ratio": floor.floor_ratio(reading.joules_gross, floors["floor_j"])}
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
        if wanted is None or item["id"] in wanted:
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


def _combine(readings: list[energy.EnergyReading]) -> energy.EnergyReading:
    """Windows of one trial as one reading: energies and durations add, the trace is concatenated."""
    if len(readings) == 1:
        return readings[0]
    offset, trace = 0.0, []
    for r in readings:
        trace += [(t + offset, w) for t, w in r.trace]
        offset += r.duration_s
    gross = sum(r.joules_gross for r in readings)
    duration = sum(r.duration_s for r in readings)
    first = readings[0]
    return energy.EnergyReading(
        source=first.source, method=first.method, gpus=first.gpus, idle_w=first.idle_w,
        duration_s=duration, joules_gross=gross, joules_net=sum(r.joules_net for r in readings),
        avg_w=gross / duration if duration else 0.0, peak_w=max(r.peak_w for r in readings), trace=trace)
