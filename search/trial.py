"""One trial, top to bottom: check, compress, serve, warm-up, quality screen, measured window,
quality, score. `run` is that list; the functions under it are its parts, in the same order. The
maths is elsewhere: item scores and the early-stop rule in objectives/scoring.py, a window's
steady state in search/windows.py and its energy in search/energy/, the roofline in search/floor.py.

Every stage is named on the progress display, and its seconds and joules go into the trial's
record as it ends, failed or not: the search paid for it (its bill, search/bill.py). Every
artifact a stage produces is written into the trial's folder before anything can fail later, so a
failed trial keeps what it made.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypedDict

import httpx
import yaml

from objectives import fidelity, scoring
from objectives.recovery import Gate
from objectives.scorers import get_scorer
from objectives.scoring import TrialPruned
from search import energy, feasibility, windows, workload
from search.compress import CheckpointCache, CompressResult, Compressor, compress
from search.compress import screen as pre_serve
from search.config import ConfigError, Infeasible, TrialConfig, WorkloadConfig, flatten
from search.platform import Platform
from search.floor import floor_metrics
from search.models import ModelFamily, family_of
from search.serve import Server, ServerFailed, ServerPool, engine_env, vllm_config
from search.workload import Prompt, RequestResult

Stage = Callable[[str], None]
# The stage meter only sums joules (no trace is kept): a slow rate costs next to nothing.
STAGE_SAMPLE_HZ = 2.0
# Teacher-forced requests in flight at once: the server batches them. One at a time left the GPU
# waiting between requests: 36-44 s for 64 items a trial on an H100 (bench/results/gpu-2026-12-06-h100-l4-study/).
FORCED_AT_ONCE = 16


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


@dataclass
class TrialRecord:
    """One trial's account, opened by the caller before the first stage: each stage's seconds
    (`time_<stage>_s`) and joules (`spent_<stage>_j`) go into `spent` as it ends, so a trial that
    raises keeps what it spent; `outcome` is set when the trial completes."""

    spent: dict[str, float] = field(default_factory=dict)
    outcome: Outcome | None = None


class BaselineItem(TypedDict):
    """One of the baseline's answers: what a trial's answer to the same prompt is scored against."""

    id: str
    task: str
    answer: str | None
    positions: list | None  # teacher-forced top-k logprobs; None for a repeated prompt or past fidelity_items
    completion_tokens: int
    label_score: float


@dataclass
class Baseline:
    """The uncompressed model's answers under the reference settings, made once per study by the
    trial's own stages (serve, warm-up, answers, quality: `load_or_make_baseline`): every trial's quality
    is scored against its `items`. Its stages' seconds and joules are in `spent`. On disk it is the
    JSON object of these four fields (`to_json`); `from_json` reads it, older files too (no `spent`
    before the stages were metered)."""

    key: str
    items: list[BaselineItem]
    reference: dict[str, Any] | None = None  # the reference config, flattened
    spent: dict[str, float] | None = None  # None: made before its stages were metered

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Baseline:
        return cls(key=data.get("key", ""), items=list(data["items"]), reference=data.get("reference"),
                   spent=data.get("spent"))

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "reference": self.reference, "items": self.items, "spent": self.spent}

    def for_the_bill(self) -> dict[str, Any]:
        """What the study keeps of it for the search's bill: the reference it answered as and what it spent."""
        return {name: value for name, value in (("reference", self.reference), ("spent", self.spent))
                if value is not None}


# --------------------------------------------------------------------------------------------
# The trial


def run(runtime: Runtime, config: TrialConfig, workdir: Path, baseline: Baseline, stage: Stage,
        record: TrialRecord) -> TrialRecord:
    """Run one trial into `record`; raises Infeasible, CompressionFailed, ServerFailed, TrialPruned or
    RuntimeError, with what its stages spent (the one that raised too) left in `record.spent`."""
    workdir.mkdir(parents=True, exist_ok=True)
    artifacts: list[Path] = []
    tags: dict[str, str] = {}
    with contextlib.ExitStack() as cleanup:
        stages = Stages(record.spent, stage, stage_meter(cleanup), runtime.energy_source)

        with stages("check"):
            feasibility.check(config, runtime.platform, runtime.family)

        # The pre-serve screen scores the compressed model in the worker before it is saved: a model
        # that cannot reach the gate stops here, with no checkpoint and no server (compress/screen.py).
        try:
            with stages("compress"):
                compressed = compress(config.compress, runtime.base_model, runtime.cache, runtime.compressor,
                                      runtime.platform.llmcompressor_version, workdir / "compress.log",
                                      make_room=runtime.pool.close,
                                      screen=pre_serve.for_trial(runtime, config, baseline))
        except pre_serve.PrunedBeforeServing as pruned:
            record.spent.update({**pre_serve.metrics(pruned.result), "pruned_before_serving": 1.0})
            raise
        record.spent.update(pre_serve.metrics(compressed.screen))
        artifacts += write_compression(workdir, compressed)
        tags.update({"cache_hit": str(compressed.cache_hit).lower(), "cache_key": compressed.key or "none"})

        with stages("serve"):
            engine = engine_args(runtime, config)
            artifacts.append(write_yaml(workdir / "vllm_config.yaml", engine))
            server, reused = runtime.pool.get(compressed.checkpoint, engine, workdir, engine_env(config.serve))
        artifacts += write_chat_template(workdir, config.workload, compressed.checkpoint) + [server.log_path]
        tags["server_reused"] = str(reused).lower()

        prompts = runtime.prompts(config.workload)
        # The measured job: the tasks' prompts, or the user's own traffic (workload.traffic), whose
        # quality items stay the tasks'.
        measured = workload.measured_prompts(config.workload, prompts)
        prompts_by_id = {p.id: p for p in runtime.prompts(runtime.reference.workload)}
        prompts_by_id.update({p.id: p for p in prompts})
        with stages("warmup"):
            raise_if_engine_died(server, workload.warm_up(server.base_url, server.served_name, measured,
                                                          config.workload))
            meter = window_meter(runtime, server, cleanup)

        # The quality screen, before any energy is measured: the first items' scores decide whether
        # the trial can still reach the gate, so a hopeless one is pruned without a measurement and
        # the measured window is never split.
        base_items = [item for item in baseline.items if item["positions"] is not None]  # distinct prompts
        fidelity_rows: list[scoring.FidelityRow] = []
        base_split = 0
        # Under a gate of 0 no partial score prunes, and after a clear pre-serve pass it would find nothing.
        if runtime.gate.can_prune and not pre_serve.confident(compressed.screen):
            split = max(1, round(len(prompts) * config.workload.early_check_fraction))
            base_split = max(1, round(len(base_items) * config.workload.early_check_fraction))
            with stages("screen"):
                screen_results, fidelity_rows = screen(server, prompts[:split], base_items[:base_split],
                                                       prompts_by_id, config.workload)
            if split < len(prompts) or base_split < len(base_items):
                try:
                    scoring.check_reachable(runtime.gate, config.workload.quality, baseline.items,
                                            screen_results, fidelity_rows, prompts_by_id, [p.id for p in prompts])
                except TrialPruned:
                    record.spent["pruned_at_screen"] = 1.0  # nothing measured: no energy window was run
                    # What the screen found goes with the pruned trial (its MLflow run): the answers
                    # (labels) and each teacher-forced item's agreement with the reference.
                    (workdir / "screen_answers.jsonl").write_text(
                        "".join(json.dumps(r.as_dict()) + "\n" for r in screen_results) +
                        "".join(json.dumps({"task": task, "top1_agreement": top1, "topk_kl": kl}) + "\n"
                                for task, top1, kl in fidelity_rows))
                    raise

        with stages("workload"):
            results, reading, cache_counts = measure_window(runtime, server, meter, measured, config.workload)
        artifacts += write_window(workdir, results, reading)  # kept whatever happens to the trial later
        raise_if_engine_died(server, results)
        answers = results  # the tasks' answers the labels are scored on
        if config.workload.traffic:
            answers = []  # the window answered the traffic: the tasks' items are asked outside it
            if config.workload.quality == "labels":
                with stages("answers"):
                    answers = workload.run(server.base_url, server.served_name, prompts, config.workload)
                raise_if_engine_died(server, answers)

        # Label-free agreement in either quality mode: with labels it is what the label recovery is
        # compared with (bench/README.md), with fidelity it is the score.
        with stages("quality"):
            fidelity_rows += _fidelity_or_engine_error(server, base_items[base_split:], prompts_by_id,
                                                       config.workload)

        served = require_served(results, config.workload.max_failed_share)
        window = window_metrics(results, reading, config, served)
        # Each repeat is read as the objective is (its own steady state), so the spread is the objective's.
        repeats = [window["energy_j_per_request"]]
        for repeat in range(1, config.workload.energy_repeats):
            with stages(f"repeat_{repeat}"):
                repeats.append(measure_repeat(runtime, server, meter, measured, config))

        # Score: what the windows measured, then recovery, the gate and the latency limits over it.
        metrics = {**window, **record.spent, "failed_requests": len(results) - served}
        # What the measured windows took from vLLM's prefix cache: 0 unless the study turned it on.
        metrics["prefix_cache_hit_rate"] = cache_counts[0] / cache_counts[1] if cache_counts[1] else 0.0
        metrics["prefix_cache_queries"] = cache_counts[1]
        if len(repeats) > 1:
            metrics.update({f"energy_j_per_request_{k}": v for k, v in energy.spread(repeats).items()})
        floor_values, floor_tags = floor_metrics(compressed.checkpoint, config, window, measured, reading,
                                                 runtime.target_gpu)
        metrics.update(floor_values)
        tags.update(floor_tags)
        metrics.update({"compress_saved_s": compressed.saved_seconds, "checkpoint_bytes": compressed.size_bytes,
                        "server_start_s": 0.0 if reused else server.started_s})
        tags.update({"energy_source": reading.source, "energy_method": reading.method,
                     "gpu": ", ".join(reading.gpus) or "none"})
        record.outcome = score(runtime, config, baseline, answers, fidelity_rows, prompts_by_id, metrics, tags,
                               artifacts)
    return record


class Stages:
    """A trial's stages, one after another: each is named on the progress display, and its seconds
    and joules go into `spent` as it ends, failed or not (the search paid for it)."""

    def __init__(self, spent: dict[str, float], show: Stage, meter: energy.Meter, study_source: str | None):
        self.spent = spent
        self.show = show
        self.meter = meter
        self.study_source = study_source

    @contextlib.contextmanager
    def __call__(self, name: str, shown: str | None = None) -> Iterator[None]:
        self.show(shown or name)
        started = time.perf_counter()
        self.meter.start()
        try:
            yield
        finally:
            reading = self.meter.stop()
            self.spent[f"time_{name}_s"] = time.perf_counter() - started
            # Joules of another meter than the study's would not add up with the rest of its bill.
            if not self.study_source or energy.meter_kind(reading.source) == self.study_source:
                self.spent[f"spent_{name}_j"] = reading.joules_gross


def stage_meter(cleanup: contextlib.ExitStack) -> energy.Meter:
    """The stages' meter, of the kind the windows use; on the estimate it follows this process and
    everything it started (the compression worker, the vLLM servers)."""
    meter = energy.make_meter(None, lambda: [os.getpid()], STAGE_SAMPLE_HZ)
    cleanup.callback(meter.close)
    return meter


# --------------------------------------------------------------------------------------------
# Compress and serve


def write_compression(workdir: Path, compressed: CompressResult) -> list[Path]:
    """The compression's log (when it ran) and its recipe."""
    log = workdir / "compress.log"
    recipe = workdir / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(compressed.recipe, sort_keys=False) if compressed.recipe else "# no compression\n")
    return [log, recipe] if log.exists() else [recipe]


def engine_args(runtime: Runtime, config: TrialConfig) -> dict[str, Any]:
    return vllm_config(config.serve, config.compress, config.workload.max_in_flight, runtime.platform.gpu_memory_gib)


def write_yaml(path: Path, values: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def write_chat_template(workdir: Path, settings: WorkloadConfig, checkpoint: Path) -> list[Path]:
    """What a deployment needs to answer a bare request with this trial's system turn (search/export.py)."""
    system, template = workload.SYSTEM_PROMPTS[settings.verbosity], workload.chat_template(checkpoint)
    if not (system and template):
        return []
    path = workdir / "chat_template.jinja"
    path.write_text(workload.with_default_system_turn(template, system))
    return [path]


def raise_if_engine_died(server: Server, outcomes: list) -> None:
    """When requests failed because the engine died, the trial fails with the engine's own error
    (what the requests saw is only "connection refused" or an error event)."""
    if any(isinstance(o, Exception) or o.error for o in outcomes):
        error = server.engine_error()
        if error:
            raise ServerFailed(f"the vLLM engine died serving requests: {error}")


# --------------------------------------------------------------------------------------------
# Warm-up, quality screen, measured window, quality


def window_meter(runtime: Runtime, server: Server, cleanup: contextlib.ExitStack) -> energy.Meter:
    """The measured windows' meter, its idle draw measured on the warm server (the estimate has none)."""
    meter = energy.make_meter(None, server.pids)
    cleanup.callback(meter.close)
    if not isinstance(meter, energy.EstimateMeter):
        meter.measure_idle(runtime.idle_seconds)
    return meter


def screen(server: Server, prompts: list[Prompt], base_items: list[dict], prompts_by_id: dict[str, Prompt],
           settings: WorkloadConfig) -> tuple[list[RequestResult], list[scoring.FidelityRow]]:
    """The first items' answers (labels mode: the measured window then repeats them) and fidelity rows."""
    results = []
    if settings.quality == "labels":
        results = workload.run(server.base_url, server.served_name, prompts, settings)
        raise_if_engine_died(server, results)
    return results, _fidelity_or_engine_error(server, base_items, prompts_by_id, settings)


def measure_window(runtime: Runtime, server: Server, meter: energy.Meter, prompts: list[Prompt],
                   settings: WorkloadConfig) -> tuple[list[RequestResult], energy.EnergyReading, tuple[float, float]]:
    """The whole workload under the meter: its answers, its reading and its prefix-cache counts."""
    counters_before = server.metrics()
    meter.start()
    results = workload.run(server.base_url, server.served_name, prompts, settings)
    reading = meter.stop()
    energy.check_energy_source(runtime.energy_source, reading)
    return results, reading, windows.prefix_cache_counts(counters_before, server.metrics())


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
    windows.read_objective_window(metrics, config.workload)
    return metrics


def measure_repeat(runtime: Runtime, server: Server, meter: energy.Meter, prompts: list[Prompt],
                   config: TrialConfig) -> float:
    """One more measured window's objective J/request (workload.energy_repeats)."""
    results, reading, _ = measure_window(runtime, server, meter, prompts, config.workload)
    served = require_served(results, config.workload.max_failed_share)
    return window_metrics(results, reading, config, served)["energy_j_per_request"]


def write_window(workdir: Path, results: list[RequestResult], reading: energy.EnergyReading) -> list[Path]:
    """The measured window's answers and power trace, written as soon as it ends."""
    answers_path = workdir / "answers.jsonl"
    answers_path.write_text("".join(json.dumps(r.as_dict()) + "\n" for r in results))
    trace_csv, trace_png = workdir / "power_trace.csv", workdir / "power_trace.png"
    energy.write_trace_csv(reading, trace_csv)
    energy.plot_trace(reading, trace_png)
    return [answers_path, trace_csv, trace_png]


def require_served(results: list[RequestResult], max_failed_share: float) -> int:
    """The number of requests served; more failures than the study tolerates make the
    configuration infeasible, with the count and the first reason."""
    failed = [r for r in results if r.error]
    if failed and len(failed) > max_failed_share * len(results):
        raise Infeasible(f"{len(failed)} of {len(results)} requests failed (first: {failed[0].error}); "
                         f"the study tolerates {max_failed_share:.0%}")
    return len(results) - len(failed)


def _fidelity_or_engine_error(server: Server, items: list[dict], prompts_by_id: dict[str, Prompt],
                              settings: WorkloadConfig) -> list[scoring.FidelityRow]:
    try:
        return _fidelity(server, items, prompts_by_id, settings)
    except httpx.HTTPError as exc:
        raise_if_engine_died(server, [exc])
        raise


def _fidelity(server: Server, baseline_items: list[dict], prompts_by_id: dict[str, Prompt],
              settings: WorkloadConfig) -> list[scoring.FidelityRow]:
    """(task, top-1 agreement, top-k KL) per baseline item, teacher-forced on the baseline's answer
    under the trial's own prompt settings (system turn, thinking), so that they move the score too:
    the positions compared are the user turn and the answer, which both prompts end with. Answer
    tokens past the trial's max_tokens, which the trial would never have produced, count as misses."""
    items = [item for item in baseline_items if item["positions"] is not None]  # None: a repeated prompt
    forced = forced_at_once(lambda item: workload.teacher_forced_logprobs(
        server.base_url, server.served_name, prompts_by_id[item["id"]], item["answer"], settings), items)
    out = []
    for item, positions in zip(items, forced):
        base, trial = fidelity.common_suffix(item["positions"], positions)
        cut = max(0, item["completion_tokens"] - settings.max_tokens)
        out.append((item["task"], fidelity.top1_agreement(base, trial, missed_tail=cut),
                    fidelity.topk_kl(base, trial)))
    return out


def forced_at_once(force: Callable[[Any], list], items: list) -> list[list]:
    """`force` over `items`, FORCED_AT_ONCE requests in flight (the server batches them), in order."""
    if not items:
        return []
    with concurrent.futures.ThreadPoolExecutor(min(FORCED_AT_ONCE, len(items))) as pool:
        return list(pool.map(force, items))


# --------------------------------------------------------------------------------------------
# Score


def score(runtime: Runtime, config: TrialConfig, baseline: Baseline, results: list[RequestResult],
          fidelity_rows: list[scoring.FidelityRow], prompts_by_id: dict[str, Prompt], metrics: dict[str, float],
          tags: dict[str, str], artifacts: list[Path]) -> Outcome:
    """Recovery against the baseline per task, the gate and the latency limits over the measured
    `metrics`: the trial's outcome."""
    per_task = scoring.recovery_by_task(
        scoring.paired_scores(config.workload.quality, baseline.items, results, fidelity_rows, prompts_by_id),
        config.workload.seed)
    gate = runtime.gate.evaluate(per_task)
    # Each latency limit as a constraint value: <= 0 holds (the samplers read them as the gate's).
    slo = {f"slo_{name}": metrics[name] - limit for name, limit in runtime.slos.items()}
    metrics.update(slo)
    feasible = gate.passed and all(v <= 0 for v in slo.values())
    metrics["recovery_mean"] = sum(e.point for e in per_task.values()) / len(per_task)
    metrics["recovery_margin"] = gate.margin
    for task, est in per_task.items():
        metrics.update({f"recovery_{task}": est.point, f"recovery_{task}_low": est.low,
                        f"recovery_{task}_high": est.high})
    if fidelity_rows:
        metrics["top1_agreement"] = sum(r[1] for r in fidelity_rows) / len(fidelity_rows)
        metrics["topk_kl"] = sum(r[2] for r in fidelity_rows) / len(fidelity_rows)
    answers = {r.id: r.answer for r in results}
    if any(i["id"] in answers for i in baseline.items):  # none when a replayed traffic was measured
        metrics["answer_agreement"] = fidelity.answer_agreement(
            [i["answer"] for i in baseline.items], [answers.get(i["id"]) for i in baseline.items])
    tags.update({"gate": gate.reason, "feasible": str(feasible).lower(),
                 "slo": ", ".join(f"{k[4:]} {'ok' if v <= 0 else 'missed'}" for k, v in slo.items()) or "none"})
    return Outcome(metrics["energy_j_per_request"], metrics["recovery_mean"], feasible, metrics, tags, artifacts)


# --------------------------------------------------------------------------------------------
# Baseline: the uncompressed model's answers under the reference settings, made once per study and cached.


def baseline_key(runtime: Runtime, model_fingerprint: str) -> str:
    material = {"model": model_fingerprint, "reference": flatten(runtime.reference)}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def load_or_make_baseline(runtime: Runtime, key: str, stage: Stage) -> Baseline:
    """Workers sharing a study folder make the baseline once: the first takes the lock, the rest wait."""
    path = runtime.workdir / f"baseline-{key}.json"
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return Baseline.from_json(json.loads(path.read_text()))
        with contextlib.ExitStack() as cleanup:
            return _make_baseline(runtime, key, path, stage, cleanup)


def _make_baseline(runtime: Runtime, key: str, path: Path, stage: Stage, cleanup: contextlib.ExitStack) -> Baseline:
    """The reference's answers and teacher-forced positions, and what its stages spent (the search's bill)."""
    ref = runtime.reference
    spent: dict[str, float] = {}
    stages = Stages(spent, stage, stage_meter(cleanup), runtime.energy_source)
    with stages("serve", "baseline: serve"):
        server, _ = runtime.pool.get(runtime.base_model, engine_args(runtime, ref), runtime.workdir / f"baseline-{key}",
                                     engine_env(ref.serve))
    prompts = runtime.prompts(ref.workload)
    with stages("warmup", "baseline: warm-up"):
        raise_if_engine_died(server, workload.warm_up(server.base_url, server.served_name, prompts, ref.workload))
    # Answers only: the reference's price is its own trial's (the study's first, study.queue_first_trials),
    # measured by the same stages in the same warm state as every trial's.
    with stages("answers", "baseline: answers"):
        results = workload.run(server.base_url, server.served_name, prompts, ref.workload)
    raise_if_engine_died(server, results)
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"baseline requests failed: {errors[0]}")
    items: list[BaselineItem] = []
    forced = set()
    with stages("quality", "baseline: teacher forcing"):
        # A prompt the workload repeats (more requests than task items) is compared once: fidelity
        # items are distinct prompts, and a repeat would cost a teacher-forced pass for no new evidence.
        # Past workload.fidelity_items distinct prompts, none is forced: scoring is sized to rank.
        to_force = []
        for index, prompt in enumerate(prompts):
            if prompt.id not in forced and len(forced) < ref.workload.fidelity_items:
                forced.add(prompt.id)
                to_force.append(index)
        positions = dict(zip(to_force, forced_at_once(lambda i: workload.teacher_forced_logprobs(
            server.base_url, server.served_name, prompts[i], results[i].answer, ref.workload), to_force)))
        for index, (prompt, result) in enumerate(zip(prompts, results)):
            items.append(BaselineItem(id=prompt.id, task=prompt.task, answer=result.answer,
                                      positions=positions.get(index), completion_tokens=result.completion_tokens,
                                      label_score=get_scorer(prompt.scorer)(result.answer, list(prompt.answers))))
    if ref.workload.quality == "labels":
        for task in {i["task"] for i in items}:
            if not any(i["label_score"] for i in items if i["task"] == task):
                raise ValueError(f"the baseline scores 0 on task {task}: recovery against it is undefined "
                                 "(a random-weight model? use workload.quality: fidelity)")
    baseline = Baseline(key=key, items=items, reference=flatten(ref), spent=spent)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(baseline.to_json()))
    tmp.replace(path)
    return baseline

