"""Energy of the seed configurations on a full-size random-weight Gemma 4 E4B twin, served by vLLM.

Runs on the GPU machine (bench/gpu/stage_and_run.sh starts it); every stage has its own
subcommand and interpreter environment, because llmcompressor and vLLM cannot share one:

  twin      (compression env)  the product's `python -m search make-twin` (search/twin.py), run
                               by drive first: E4B's config values, random bf16 weights made on the
                               GPU from a fixed seed, tokenizer of 262144 entries, processor, and the
                               KV-shared layers' completion vLLM 0.26 loads.
  compress  (compression env)  one checkpoint per configuration through the product's compression
                               stage (search.compress.compress: recipe, pipeline, calibration, its
                               worker process, cache), whose worker builds the same seeded twin on the
                               GPU (search.twin.twin_for_compression) instead of loading the base's weights.
  drive     (image python)     orchestrates: build, compression in a child process (GPU work under a
                               file lock, so nothing else runs on the GPU during a measured window),
                               then for every configuration a vLLM server from search.serve
                               (vllm_config + engine_env), the product's warm-up, idle and measured
                               windows (search.workload, search.energy, search.energy.window_metrics),
                               peak GPU memory from NVML, a table.

Local CPU rehearsal at toy size (no GPU): `--toy` and `--meter auto` (see bench/gpu/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GiB = 1024**3

# The twin is the product's (`python -m search make-twin`, search/twin.py); its values are read here
# for the serving settings and floor_ratio.py.
from search.twin import FULL_TEXT, FULL_VISION, SOFT_TOKENS, TOY_TEXT, TOY_VISION  # noqa: E402,F401

# --------------------------------------------------------------------------------------------
# The configurations: the project's seed presets (spaces/presets/seeds.yaml), compression as the
# seeds have it; serving fixed for all, so that only compression and KV-cache dtype differ.

PRESETS = {
    "bf16": (None, {"compress.scheme": "none"}),  # the reference: no preset, the uncompressed model
    "nf4_000": ("seed_000_bnb_nf4", {}),
    "fp8_002": ("seed_002_fp8_weights_fp8kv", {}),
    "gptq_fp8kv_001np": ("seed_001_sparsegpt_gptq_w4a16_fp8kv", {"compress.prune.method": "none"}),
    "w4a16_obs_003": ("seed_003_observer_w4a16", {}),
    "sgpt_gptq_001": ("seed_001_sparsegpt_gptq_w4a16_fp8kv", {}),
    # Issue 9: structured FFN pruning (served through plugins/gemma4_pruned), alone and as seed 004.
    "flap_bf16": ("seed_004_pruned_gptq_w4a16", {"compress.scheme": "none", "compress.method": "rtn",
                                                 "compress.actorder": "none"}),
    "flap_gptq_004": ("seed_004_pruned_gptq_w4a16", {}),
}
ORDER = ["bf16", "nf4_000", "fp8_002", "w4a16_obs_003", "gptq_fp8kv_001np", "sgpt_gptq_001"]
LABELS = {
    "bf16": "bf16 (reference)",
    "nf4_000": "000 bnb NF4 at load",
    "fp8_002": "002 FP8 W (static) + FP8 KV",
    "w4a16_obs_003": "003 W4A16 observer (RTN) g128",
    "gptq_fp8kv_001np": "001 w/o pruning: GPTQ W4A16 g128 + FP8 KV",
    "sgpt_gptq_001": "001: SparseGPT 10% + GPTQ W4A16 + FP8 KV",
    "flap_bf16": "FLAP seed-004 profile (bf16, pruned widths)",
    "flap_gptq_004": "004: FLAP + GPTQ W4A16 on o_proj + MLP",
}
BENCH_SERVE = {
    "serve.max_model_len": 4096, "serve.max_num_seqs": 128, "serve.max_num_batched_tokens": 8192,
    "serve.enable_prefix_caching": False, "serve.enable_chunked_prefill": True,
    "serve.gpu_memory_utilization": 0.9, "serve.limit_images": 1, "serve.image_soft_tokens": SOFT_TOKENS,
    "serve.enforce_eager": False, "serve.seed": 0,
    # No multimodal processor cache: every window preprocesses its images, none reuses another's.
    "serve.mm_processor_cache_gb": 0,
    # vLLM 0.26 chooses FlashAttention 4 for Gemma 4's mixed head sizes (256/512) on Hopper; FA4 imports
    # nvidia-cutlass-dsl, which the staged wheels leave out ("No module named 'cutlass'" on the H200).
    "serve.attention_backend": "TRITON_ATTN",
}
# The one engine argument beyond ServeConfig's fields, merged over vllm_config(...)'s: a fixed
# KV-cache size, so that NVML's peak memory compares the configurations (with
# gpu-memory-utilization alone every server fills 90% of the card).
ENGINE_EXTRA = {"kv-cache-memory-bytes": 8 * GiB}
# The servers' environment besides the configuration's own (search.serve.engine_env).
SERVER_ENV = {
    "VLLM_USE_FLASHINFER_SAMPLER": "0",  # field notes: the FlashInfer sampler hangs at first use
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
WARMUP_TOKENS = 32  # a warm-up answer: enough to run every kernel, short to save the budget
# What the compression worker calls instead of loading the base (search.compress.worker.load_model).
TWIN_FACTORY = "search.twin:twin_for_compression"


def trial_config(name: str, override: dict | None = None):
    """The configuration `name` as search.config.build validates it; `override`: dotted values."""
    import yaml
    from search.config import build

    preset_name, extra = PRESETS[name]
    presets = yaml.safe_load((REPO / "spaces/presets/seeds.yaml").read_text())
    values = dict(presets[preset_name]["config"]) if preset_name else {}
    kv = values.get("serve.kv_cache_dtype", "auto")
    values = {k: v for k, v in values.items() if k.startswith("compress.")}
    values.update(extra)
    values.update(BENCH_SERVE)
    values["serve.kv_cache_dtype"] = kv
    values.update(override or {})
    return build(values)


def bench_workload(args, n_prompts: int) -> dict:
    """The measured windows' workload as dotted values: every prompt once, all warmed up first,
    a fixed output length (ignore_eos), the answers' own sampling settings (not fidelity's)."""
    return {"workload.n_requests": n_prompts, "workload.warmup_requests": n_prompts,
            "workload.concurrency": args.concurrency, "workload.max_tokens": args.max_tokens,
            "workload.ignore_eos": True, "workload.quality": "labels"}


# --------------------------------------------------------------------------------------------
# Compress (compression environment: llmcompressor 0.14.0.1)


@contextlib.contextmanager
def gpu_lock(root: Path, who: str):
    """Only one GPU phase at a time: a compression, or a server's whole life (measurements)."""
    path = root / "gpu.lock"
    with open(path, "a+") as f:
        t = time.perf_counter()
        fcntl.flock(f, fcntl.LOCK_EX)
        waited = time.perf_counter() - t
        if waited > 1:
            print(f"[{who}] waited {waited:.0f} s for the GPU lock", flush=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def compressed_marker(root: Path, name: str) -> Path:
    """Written by `compress` when the checkpoint of `name` is made: its path and the stage's stats."""
    return root / f"ckpt-{name}.json"


def failed_marker(root: Path, name: str) -> Path:
    return root / f"ckpt-{name}.FAILED"


def cmd_compress(args) -> None:
    """Compress each named configuration in turn through the product's compression stage; disk
    permitting, ahead of the servers."""
    from search.compress import CheckpointCache, Compressor, compress

    root = Path(args.root)
    base = root / "base"
    base_bytes = json.loads((base / "build_stats.json").read_text())["size_bytes"]
    cache = CheckpointCache(root / "cache")
    compressor = Compressor(sys.executable, model_factory=TWIN_FACTORY)
    for name in args.names.split(","):
        if not name or not trial_config(name).compress.needs_checkpoint:
            continue
        done, failed = compressed_marker(root, name), failed_marker(root, name)
        if done.exists() or failed.exists():
            continue
        # A checkpoint is at most the base's size: wait until the drive has deleted served ones.
        while shutil.disk_usage(root).free < base_bytes + 3 * GiB:
            time.sleep(5)
        job_log = root / f"compress-{name}.log"
        with gpu_lock(root, f"compress {name}"):
            print(f"[compress] {name} start (free {shutil.disk_usage(root).free / GiB:.1f} GiB)", flush=True)
            result, error = None, None
            try:
                result = compress(trial_config(name).compress, base, cache, compressor, version("llmcompressor"),
                                  job_log)
            except Exception as exc:  # an OOM or a recipe failure is this configuration's result
                traceback.print_exc()
                error = f"{type(exc).__name__}: {exc}"[:2000]
            finally:
                # Its worker ends with each checkpoint: nothing llmcompressor keeps alive stays on the GPU.
                compressor.close()
            if job_log.exists():  # the worker's output joins this process's (the drive's compress.log)
                print(job_log.read_text(errors="replace"), flush=True)
        if error:
            failed.write_text(error)
            print(f"[compress] {name} FAILED {error[:300]}", flush=True)
            continue
        stats = {"name": name, "checkpoint": str(result.checkpoint), "cache_key": result.key,
                 "seconds": result.seconds, "modifiers": list(result.recipe.get("default_stage", {}).get(
                     "default_modifiers", {})),
                 **json.loads((result.checkpoint / "compress_stats.json").read_text())}
        done.write_text(json.dumps(stats))
        print(f"[compress] {name} done {json.dumps(stats)}", flush=True)


# --------------------------------------------------------------------------------------------
# Drive (image python: search.serve / workload / energy; no torch needed)


class MemorySampler:
    """Peak NVML memory while a server lives: device total used, and the server's own processes."""

    def __init__(self, hz: float = 5.0):
        self.hz = hz
        self.peak_used = 0
        self.peak_procs = 0
        self.baseline_used = 0
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._h = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.baseline_used = pynvml.nvmlDeviceGetMemoryInfo(self._h).used
        except Exception:
            self._nvml = None

    def start(self) -> None:
        if self._nvml is None:
            return
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1 / self.hz):
            self.sample()

    def sample(self) -> None:
        n = self._nvml
        try:
            self.peak_used = max(self.peak_used, n.nvmlDeviceGetMemoryInfo(self._h).used)
            procs = n.nvmlDeviceGetComputeRunningProcesses(self._h)
            mine = sum(p.usedGpuMemory or 0 for p in procs if not self.pids or p.pid in self.pids)
            self.peak_procs = max(self.peak_procs, mine)
        except Exception:
            pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


def make_prompts(n: int, data_dir: Path):
    """n distinct image+text prompts from the project's built-in tasks (n/2 receipts, n/2 scenes)."""
    import io

    from objectives.tasks import get_task, load_examples
    from search.workload import Prompt

    per_task = []
    for name in ("builtin_documents", "builtin_scenes"):
        task = dataclasses.replace(get_task(name), n_samples=(n + 1) // 2)
        per_task.append((task, load_examples(task, data_dir)))
    prompts = []
    for i in range(n):
        task, examples = per_task[i % 2]
        ex = examples[i // 2]
        buf = io.BytesIO()
        ex.image.convert("RGB").save(buf, format="PNG")
        prompts.append(Prompt(f"{task.name}/{ex.id}", task.name, ex.prompt, buf.getvalue(),
                              tuple(ex.answers), task.scorer))
    return prompts


class Log:
    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = out / "results.jsonl"

    def record(self, kind: str, **data) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"kind": kind, "t": time.time(), **data}, default=str) + "\n")


def fmt(x, spec=".1f"):
    return "n/a" if x is None or math.isnan(x) else format(x, spec)


def table(rows: list[dict], spread_row: dict | None) -> str:
    ref = next((r for r in rows if r["name"] == "bf16" and r.get("ok")), None)

    def rel(r, key):
        if not ref or not r.get("ok") or not ref.get(key) or math.isnan(r[key] / ref[key]):
            return "n/a"
        return f"{r[key] / ref[key]:.2f}x"

    lines = [
        "| configuration | J/1k out tok (gross) | vs bf16 | J/1k tok net of idle | vs bf16 | J/1k tok, steady state "
        "| vs bf16 | tokens/Wh | vs bf16 "
        "| throughput tok/s | vs bf16 | avg W | peak GPU mem GiB (NVML, server) | vs bf16 | windows | start s | images "
        "| floor J/window (compute / memory) | measured / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"| {LABELS.get(r['name'], r['name'])} | FAILED: {r.get('error', '?')[:300]} "
                         "| | | | | | | | | | | | | | | | | |")
            continue
        lines.append(
            f"| {LABELS.get(r['name'], r['name'])} | {r['j_per_1k_gross']:.1f} | {rel(r, 'j_per_1k_gross')} "
            f"| {r['j_per_1k_net']:.1f} | {rel(r, 'j_per_1k_net')} | {fmt(r['j_per_1k_steady'])} "
            f"| {rel(r, 'j_per_1k_steady')} | {r['tokens_per_wh']:.0f} "
            f"| {rel(r, 'tokens_per_wh')} | {r['throughput']:.0f} | {rel(r, 'throughput')} | {r['avg_w']:.0f} "
            f"| {r['peak_mem_gib']:.1f} | {rel(r, 'peak_mem_gib')} | {r['windows']} | {r['start_s']:.0f} "
            f"| {'1/request' if r.get('images', True) else 'NONE (text-only fallback)'} "
            f"| {fmt(r.get('floor_j'))} ({fmt(r.get('floor_compute_j'))} / {fmt(r.get('floor_memory_j'))}) "
            f"| {fmt(r.get('floor_ratio'))}{'x' if r.get('floor_ratio') else ''} |")
    if spread_row:
        s = spread_row
        lines.append("")
        lines.append(f"Spread of {s['name']} over {s['n']} windows (search.energy.spread of J/1k output tokens, "
                     f"gross): mean {s['mean']:.2f}, std {s['std']:.2f}, min {s['min']:.2f}, max {s['max']:.2f}, "
                     f"rel_std {100 * s['rel_std']:.2f}%; net of idle: rel_std {100 * s['net_rel_std']:.2f}%.")
    return "\n".join(lines)


def serve_and_measure(name: str, model: Path, args, root: Path, log: Log, prompts,
                      idle_bare_w: float | None) -> dict:
    """Serve `model` as configuration `name` and measure its windows the way a trial does."""
    import httpx

    from search import energy, serve, workload
    from search.config import build, flatten
    from search.energy import window_metrics
    from search.floor import floor_metrics
    from search.trial import raise_if_engine_died

    override = json.loads(args.serve_override) if args.serve_override else {}
    cfg = trial_config(name, {**override, **bench_workload(args, len(prompts))})
    engine = {**serve.vllm_config(cfg.serve, cfg.compress, cfg.workload.max_in_flight), **ENGINE_EXTRA,
              **(json.loads(args.engine_override) if args.engine_override else {})}
    env = {**SERVER_ENV, "PYTHONPATH": args.site_vllm, **serve.engine_env(cfg.serve)}
    workdir = root / f"serve-{name}"
    shutil.rmtree(workdir, ignore_errors=True)
    mem = MemorySampler()
    mem.start()
    server = None
    row: dict = {"name": name, "label": LABELS.get(name, name), "model": str(model),
                 "engine": engine, "engine_env": serve.engine_env(cfg.serve),
                 "compress": flatten(cfg.compress)}
    try:
        row["stage"] = "start"
        server = serve.start(args.serve_python, model, engine, workdir, timeout_s=args.start_timeout, env=env)
        row["stage"] = "warmup"
        mem.pids = set(server.pids())
        row["start_s"] = server.started_s
        print(f"[drive] {name}: server ready in {row['start_s']:.0f} s", flush=True)
        tw = time.perf_counter()
        warm = workload.warm_up(server.base_url, server.served_name, prompts,
                                build({"workload.max_tokens": WARMUP_TOKENS}, base=cfg).workload)
        raise_if_engine_died(server, warm)
        errors = [r.error for r in warm if r.error]
        if errors:
            raise RuntimeError(f"warm-up: {len(errors)}/{len(warm)} requests failed: {errors[0]}")
        row["warmup_s"] = time.perf_counter() - tw
        row["stage"] = "measure"
        meter = energy.NvmlMeter() if args.meter == "nvml" else energy.make_meter(None, server.pids)
        try:
            time.sleep(args.settle)
            row["idle_server_w"] = meter.measure_idle(args.idle_s)
            row["idle_bare_w"] = idle_bare_w
            windows = []
            for rep in range(args.repeats_bf16 if name == "bf16" else args.repeats):
                before = server.metrics()
                meter.start()
                results = workload.run(server.base_url, server.served_name, prompts, cfg.workload,
                                       first_index=rep * 1000, timeout_s=args.request_timeout)
                reading = meter.stop()
                raise_if_engine_died(server, results)
                generated = server.metrics().get("vllm:generation_tokens_total", 0) - before.get(
                    "vllm:generation_tokens_total", 0)
                # The trial's own reading of a window: counts, latencies, whole and steady-state energy.
                metrics = window_metrics(results, reading, cfg, sum(r.error is None for r in results))
                w = window_record(rep, metrics, reading, generated)
                if metrics["request_errors"]:
                    w["first_error"] = next(r.error for r in results if r.error)
                windows.append(w)
                log.record("window", name=name, **w)
                shown = ("tokens", "request_errors", "window_s", "joules_gross", "j_per_1k_gross", "j_per_1k_steady",
                         "avg_power_w")
                print(f"[drive] {name} window {rep}: {json.dumps({k: w[k] for k in shown})}", flush=True)
                if not w["tokens"]:
                    raise RuntimeError(f"no output tokens in window {rep}: {w.get('first_error', 'no error reported')}"
                                       f"{'' if server.alive() else ' (the server died)'}")
            row["method"] = reading.method
            # The product's floor (search.floor.floor_metrics) for one window's work on this GPU (none
            # without a GPU measured: the CPU rehearsal).
            floor_values, floor_tags = floor_metrics(model, cfg, metrics, prompts, reading)
            row.update({k: floor_values[k] for k in ("floor_j", "floor_compute_j", "floor_memory_j")
                        if k in floor_values}, floor_basis=floor_tags["floor_basis"])
        finally:
            meter.close()
        good = [w for w in windows if w["tokens"]]
        expected = len(prompts) * args.max_tokens
        row["short_windows"] = [w["rep"] for w in good if w["tokens"] != expected]
        mean = lambda k: sum(w[k] for w in good) / len(good)  # noqa: E731
        row.update(ok=True, windows=len(good), j_per_1k_gross=mean("j_per_1k_gross"),
                   j_per_1k_net=mean("j_per_1k_net"), j_per_1k_steady=mean("j_per_1k_steady"),
                   tokens_per_wh=mean("tokens_per_wh"), throughput=mean("throughput_tok_s"),
                   avg_w=mean("avg_power_w"), tokens_per_window=mean("tokens"),
                   prompt_tokens_per_window=mean("prompt_tokens"), window_s=mean("window_s"),
                   j_per_1k_gross_all=[w["j_per_1k_gross"] for w in good],
                   j_per_1k_net_all=[w["j_per_1k_net"] for w in good])
        if "floor_j" in row:
            row["floor_ratio"] = mean("joules_gross") / row["floor_j"]
        with contextlib.suppress(Exception):
            row["vllm_log_facts"] = log_facts(server.log_path)
    except Exception as exc:
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:1500])
        print(f"[drive] {name} FAILED: {row['error'][:500]}", flush=True)
        if not isinstance(exc, (serve.ServerFailed, RuntimeError, httpx.HTTPError)):
            traceback.print_exc()
        row["vllm_log_facts"] = log_facts(workdir / "server.log")
    finally:
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop()
        mem.sample()
        mem.stop()
        row["peak_mem_gib"] = (mem.peak_used - mem.baseline_used) / GiB
        row["peak_mem_procs_gib"] = mem.peak_procs / GiB
        row["device_used_before_gib"] = mem.baseline_used / GiB
        with contextlib.suppress(Exception):
            keep = args.out / "server-logs"
            keep.mkdir(exist_ok=True)
            shutil.copy2(workdir / "server.log", keep / f"{name}.log")
    return row


def window_record(rep: int, metrics: dict, reading, generated_tokens: float) -> dict:
    """One measured window for results.jsonl: the trial's window metrics, in this table's units
    (J per 1000 output tokens), and the names that floor_ratio.py and the earlier runs' files use."""
    tokens = int(metrics["completion_tokens"])

    def per_1k(joules: float) -> float:
        return 1000 * joules / tokens if tokens else math.nan

    return {"rep": rep, **metrics, "tokens": tokens, "joules_gross": reading.joules_gross,
            "joules_net": reading.joules_net, "source": reading.source, "metrics_generation_tokens": generated_tokens,
            "j_per_1k_gross": per_1k(reading.joules_gross), "j_per_1k_net": per_1k(reading.joules_net),
            "j_per_1k_steady": 1000 * metrics.get("steady_energy_j_per_output_token", math.nan)}


def log_facts(path: Path) -> list[str]:
    """The server log's lines that say which kernels, backends and sizes it chose."""
    keys = ("attention backend", "Using ", "quantiz", "Model loading took", "torch.compile took",
            "Graph capturing finished", "KV cache", "Available KV", "maximum concurrency", "marlin",
            "Marlin", "FP8", "fp8", "bitsandbytes", "CUTLASS", "Cutlass", "Triton", "compile range",
            "init engine", "Error", "error")
    out = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        if any(k in line for k in keys) and len(out) < 60:
            out.append(line.split("] ", 1)[-1][:300])
    return out


def env_report(args) -> dict:
    info = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    with contextlib.suppress(Exception):
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm,temperature.gpu",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    probe = ("import importlib.metadata as m, json, sys; out={'python': sys.version.split()[0]}\n"
             "for n in ['torch','transformers','vllm','llmcompressor','compressed-tensors','bitsandbytes',"
             "'triton','flashinfer-python','nvidia-ml-py','datasets','accelerate']:\n"
             "    try: out[n]=m.version(n)\n    except Exception: pass\nprint(json.dumps(out))")
    for env_name, site in (("serve_env", args.site_vllm), ("compress_env", args.site_llmc)):
        with contextlib.suppress(Exception):
            r = subprocess.run([args.serve_python if env_name == "serve_env" else args.compress_python, "-c", probe],
                               capture_output=True, text=True, timeout=120,
                               env={**os.environ, "PYTHONPATH": site})
            info[env_name] = json.loads(r.stdout.strip().splitlines()[-1])
    return info


def run_child(cmd: list[str], pythonpath: str, log_path: Path, wait: bool = True):
    """A child in the compression environment (its interpreter is cmd[0])."""
    env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    f = open(log_path, "a")
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    if wait:
        rc = p.wait()
        f.close()
        return rc
    return p


def cmd_drive(args) -> None:
    root, out = Path(args.root), Path(args.out)
    args.out = out
    root.mkdir(parents=True, exist_ok=True)
    log = Log(out)
    names = [n for n in (args.configs.split(",") if args.configs != "all" else ORDER)]
    me = [args.compress_python, str(Path(__file__).resolve())]
    t_start = time.time()
    print(f"[drive] configs {names}; root {root} (free {shutil.disk_usage(root).free / GiB:.1f} GiB)", flush=True)

    # 1. The twin.
    tb = time.perf_counter()
    rc = run_child([args.compress_python, "-m", "search", "make-twin", "--out", str(root / "base")]
                   + (["--toy"] if args.toy else []), args.site_llmc + os.pathsep + str(REPO), out / "compress.log")
    if rc != 0 or not (root / "base" / "BUILD_OK").exists():
        log.record("fatal", error=f"build failed (rc {rc}); see compress.log")
        print("[drive] build FAILED; see compress.log", flush=True)
        (out / "DONE").write_text("build failed\n")
        return
    build_stats = json.loads((root / "base" / "build_stats.json").read_text())
    log.record("build", wall_s=time.perf_counter() - tb, **build_stats)
    print(f"[drive] build done in {time.perf_counter() - tb:.0f} s: {json.dumps(build_stats)}", flush=True)

    # 2. Compression ahead of serving, in the background, one GPU phase at a time.
    to_compress = [n for n in names if trial_config(n).compress.needs_checkpoint]

    def compress_all() -> None:
        for n in to_compress:
            rc = run_child(me + ["compress", "--root", str(root), "--names", n],
                           args.site_llmc + os.pathsep + str(REPO), out / "compress.log")
            if not compressed_marker(root, n).exists() and not failed_marker(root, n).exists():
                failed_marker(root, n).write_text(f"compress process exited with rc {rc} and no "
                                                  "checkpoint (killed? see compress.log)")

    comp = threading.Thread(target=compress_all, daemon=True)
    comp.start()

    # 3. The serving environment (the stager writes the marker once vLLM is installed).
    if args.wait_for:
        marker = Path(args.wait_for)
        while not marker.exists() and not marker.with_suffix(".failed").exists():
            time.sleep(2)
        if marker.with_suffix(".failed").exists():
            log.record("fatal", error="vLLM install failed: " + marker.with_suffix(".failed").read_text()[:1000])
            (out / "DONE").write_text("vllm install failed\n")
            return
    info = env_report(args)
    log.record("env", **info)
    (out / "env.json").write_text(json.dumps(info, indent=2))
    print(f"[drive] env {json.dumps(info)}", flush=True)
    prompts = make_prompts(args.n_requests, root / "data")
    print(f"[drive] {len(prompts)} prompts, all with an image: {all(p.image_png for p in prompts)}", flush=True)

    # 4. Idle first: the bare GPU, nothing running on it.
    idle_bare = None
    if args.meter == "nvml":
        from search.energy import NvmlMeter
        with gpu_lock(root, "drive idle"):
            m = NvmlMeter()
            try:
                time.sleep(args.settle)
                idle_bare = m.measure_idle(args.idle_s)
            finally:
                m.close()
        log.record("idle_bare", watts=idle_bare, seconds=args.idle_s)
        print(f"[drive] bare GPU idle {idle_bare:.1f} W", flush=True)

    # 5. Serve and measure each configuration.
    rows = []
    images_ok = True
    text_prompts = [dataclasses.replace(p, image_png=None) for p in prompts]
    for name in names:
        cfg = trial_config(name)
        model = root / "base"
        done, failed = compressed_marker(root, name), failed_marker(root, name)
        if cfg.compress.needs_checkpoint:
            while not done.exists() and not failed.exists() and comp.is_alive():
                time.sleep(2)
            if not done.exists():
                reason = failed.read_text() if failed.exists() else "compression process ended without a checkpoint"
                row = {"name": name, "ok": False, "error": f"compression failed: {reason[:1200]}"}
                rows.append(row)
                log.record("config", **row)
                continue
            compressed = json.loads(done.read_text())
            log.record("compress", **compressed)
            model = Path(compressed["checkpoint"])
        with gpu_lock(root, f"serve {name}"):
            row = serve_and_measure(name, model, args, root, log, prompts if images_ok else text_prompts, idle_bare)
            if not row.get("ok") and row.get("stage") == "warmup" and images_ok:
                # Fallback: if image requests break this vLLM, measure text-only rather than nothing.
                images_ok = False
                first_error = row.get("error", "")
                log.record("images_failed", name=name, error=first_error)
                print(f"[drive] image requests failed ({first_error[:300]}); text-only from now on", flush=True)
                row = serve_and_measure(name, model, args, root, log, text_prompts, idle_bare)
                row["images_error"] = first_error
            if cfg.compress.needs_checkpoint and not args.keep:
                # Served: its disk goes to the next checkpoints (a cache entry without its folder is no entry).
                shutil.rmtree(model, ignore_errors=True)
                done.unlink()
            rest = names[names.index(name) + 1:]
            if not args.keep and all(trial_config(n).compress.needs_checkpoint for n in rest):
                # No server reads the base weights any more (the compression worker rebuilds the twin
                # from its seed and reads only config and tokenizer files): free their disk for the
                # checkpoints. Under the GPU lock: a compression starting meanwhile hashes the base's files.
                for f in (root / "base").glob("*.safetensors"):
                    f.unlink()
        row["images"] = images_ok
        rows.append(row)
        log.record("config", **{k: v for k, v in row.items() if k != "engine"}, engine=row.get("engine"))
        spread_row = spread_of(rows)
        (out / "results.md").write_text(table(rows, spread_row) + "\n")
        print(table(rows, spread_row), flush=True)
    comp.join()
    spread_row = spread_of(rows)
    text = table(rows, spread_row)
    (out / "results.md").write_text(text + "\n")
    log.record("done", wall_s=time.time() - t_start)
    print("[drive] FINAL\n" + text, flush=True)
    (out / "DONE").write_text("ok\n")


def spread_of(rows: list[dict]) -> dict | None:
    from search.energy import spread

    for r in rows:
        if r.get("ok") and len(r.get("j_per_1k_gross_all", [])) >= 3:
            s = spread(r["j_per_1k_gross_all"])
            s_net = spread(r["j_per_1k_net_all"])
            return {"name": LABELS.get(r["name"], r["name"]), "n": len(r["j_per_1k_gross_all"]), **s,
                    "net_rel_std": s_net["rel_std"]}
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compress")
    c.add_argument("--root", required=True)
    c.add_argument("--names", required=True)
    d = sub.add_parser("drive")
    d.add_argument("--root", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--configs", default="all")
    d.add_argument("--toy", action="store_true")
    d.add_argument("--site-vllm", default="/tmp/site-vllm")
    d.add_argument("--site-llmc", default="/tmp/site-llmc")
    d.add_argument("--serve-python", default=sys.executable)
    d.add_argument("--compress-python", default=sys.executable)
    d.add_argument("--wait-for", default="", help="file whose existence says the vLLM env is installed")
    d.add_argument("--meter", choices=["nvml", "auto"], default="nvml")
    d.add_argument("--n-requests", type=int, default=128)
    d.add_argument("--concurrency", type=int, default=128)
    d.add_argument("--max-tokens", type=int, default=256)
    d.add_argument("--repeats", type=int, default=2)
    d.add_argument("--repeats-bf16", type=int, default=3)
    d.add_argument("--idle-s", type=float, default=10.0)
    d.add_argument("--settle", type=float, default=3.0)
    d.add_argument("--start-timeout", type=float, default=600.0)
    d.add_argument("--request-timeout", type=float, default=240.0)
    d.add_argument("--serve-override", default="", help="JSON of dotted serve.* values (local rehearsal)")
    d.add_argument("--engine-override", default="", help="JSON merged into the engine arguments")
    d.add_argument("--keep", action="store_true", help="keep compressed checkpoints after serving")
    args = p.parse_args(argv)
    {"compress": cmd_compress, "drive": cmd_drive}[args.cmd](args)


if __name__ == "__main__":
    main()
