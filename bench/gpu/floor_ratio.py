"""Measured energy against the physical floor (search/floor.py) for the windows of a GPU bench run.

Reads the `window` records of bench_seeds.py's results.jsonl (NVML energy, prompt and output tokens
of each measured window), rebuilds the twin's config from the same architecture values
(bench_seeds.FULL_TEXT / FULL_VISION) and each configuration's quantization from the project's
recipe (search.compress.recipe.build_recipe), and prints the floors and the ratio per configuration.
The measurement is the GPU's; the floor is arithmetic, so it can be computed anywhere.

    .venvs/main/bin/python bench/gpu/floor_ratio.py bench/results/gpu-2026-11-26-h200/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_seeds import FULL_TEXT, FULL_VISION, LABELS, SOFT_TOKENS, trial_config  # noqa: E402

from search import floor  # noqa: E402
from search.compress.recipe import build_recipe  # noqa: E402


def twin_config() -> dict:
    from transformers import Gemma4Config

    return Gemma4Config(text_config=FULL_TEXT, vision_config=FULL_VISION, audio_config=None).to_dict()


def quantization_of(name: str, num_layers: int) -> dict | None:
    """The compressed-tensors quantization config the recipe writes: its config groups and ignore list."""
    recipe = build_recipe(trial_config(name).compress, num_layers)
    for stage in recipe.values():
        for modifiers in stage.values():
            for modifier in modifiers.values():
                if "config_groups" in modifier:
                    return {"config_groups": modifier["config_groups"], "ignore": modifier.get("ignore", [])}
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.jsonl of a bench_seeds.py drive")
    parser.add_argument("--gpu", default="NVIDIA H200", help="NVML device name of the GPU that measured")
    parser.add_argument("--requests", type=int, default=128, help="requests per window (drive --n-requests)")
    parser.add_argument("--batch", type=int, default=128, help="concurrent sequences (drive --concurrency)")
    args = parser.parse_args()

    windows: dict[str, list[dict]] = defaultdict(list)
    for line in args.results.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "window" and record.get("tokens"):
            windows[record["name"]].append(record)
    config = twin_config()
    gpu = floor.gpu_spec(args.gpu)
    print(f"GPU {gpu.name}: {gpu.tflops} TFLOPS dense, {gpu.mem_bw_gbs} GB/s, {gpu.power_w} W ({args.results})")
    print("| configuration | windows | measured J/window (NVML, gross) | floor J (compute / memory, format) "
          "| measured / floor | net of idle / floor |")
    print("|---|---|---|---|---|---|")
    for name, recs in windows.items():
        quant = quantization_of(name, FULL_TEXT["num_hidden_layers"])
        kv = "auto" if trial_config(name).serve.kv_cache_dtype == "auto" else "fp8"
        n = args.requests
        work = floor.workload_flops(
            config, round(recs[0]["prompt_tokens"] / n), round(recs[0]["tokens"] / n), images=1, requests=n,
            soft_tokens_per_image=SOFT_TOKENS, quant=quant, batch=min(n, args.batch), kv_dtype=kv)
        floors = floor.floors(work, gpu, floor.compute_format(quant))
        gross = statistics.mean(r["joules_gross"] for r in recs)
        net = statistics.mean(r["joules_net"] for r in recs)
        print(f"| {LABELS.get(name, name)} | {len(recs)} | {gross:.0f} | {floors['floor_j']:.1f} "
              f"({floors['compute_j']:.1f} / {floors['memory_j']:.1f}, {floors['fmt']}) "
              f"| {gross / floors['floor_j']:.1f}x | {net / floors['floor_j']:.1f}x |")


if __name__ == "__main__":
    main()
