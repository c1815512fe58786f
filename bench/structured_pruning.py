"""Parameters and FLOPs per token of structurally pruned Gemma 4 (issue 9), from search/floor.py's model.

Run: .venvs/main/bin/python bench/structured_pruning.py
For E4B's text decoder (the field notes' config values) and for the toy, every FFN-width profile is
turned into the widths the compression stage prunes to (search.compress.recipe.structured_widths;
no quantization after it, so widths are multiples of 64), then counted: text-decoder parameters
(Linears, embeddings, norms, compensation biases) and matrix-product FLOPs per token at a
1024-token context (decode: one generated token with logits; prefill: averaged over the prompt).
Pure arithmetic on configs: no weights are built.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search import config as cfg  # noqa: E402
from search.compress.recipe import structured_widths  # noqa: E402
from search.floor import flops_per_token, linear_flops_per_token, model_dtype_bytes, weight_bytes  # noqa: E402
from search.toy_model import TEXT_CONFIG as TOY_TEXT  # noqa: E402
from search.twin import FULL_TEXT as E4B_TEXT  # noqa: E402  (the twin's: E4B's public config values)

# Seed 004's published profile: 20% of the channels in 22 layers, 10% in layer 9, none elsewhere.
SEED_004 = [0.2] * 4 + [0.0] + [0.2] * 2 + [0.0] * 2 + [0.1] + [0.0] * 2 + [0.2] * 2 + [0.0] + [0.2] * 2 + [0.0] \
    + [0.2] * 4 + [0.0] * 2 + [0.2] * 4 + [0.0] * 2 + [0.2] * 2 + [0.0] + [0.2] * 2 + [0.0] * 7
PROFILES = {
    "unpruned": {},
    "uniform 10%": {"compress.prune.base": 0.1},
    "uniform 20%": {"compress.prune.base": 0.2},
    "ramp_up 20%, last 2 kept": {"compress.prune.base": 0.2, "compress.prune.shape": "ramp_up",
                                 "compress.prune.protect_last": 2},
    "middle 30%, first/last 2 kept": {"compress.prune.base": 0.3, "compress.prune.shape": "middle",
                                      "compress.prune.protect_first": 2, "compress.prune.protect_last": 2},
}
CONTEXT = 1024


def pruned_config(text: dict, values: dict) -> dict:
    config = {"text_config": dict(text)}
    if values:
        compression = cfg.build({"compress.prune.method": "flap", **values}).compress
        config["text_config"]["intermediate_sizes"] = structured_widths(compression, config)
    return config


def table(name: str, text: dict, profiles: dict) -> None:
    rows = [(label, pruned_config(text, values)) for label, values in profiles.items()]
    base = rows[0][1]
    base_decode = flops_per_token(base, CONTEXT)["decode"]
    base_params = weight_bytes(base)["total"] / model_dtype_bytes(base)
    print(f"### {name}\n")
    print(f"| profile | FFN widths (min-max) | decoder Linear params (M) | text params (M) | vs unpruned "
          f"| decode MFLOP/token @{CONTEXT} | prefill MFLOP/token @{CONTEXT} | decode vs unpruned |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, config in rows:
        tc = config["text_config"]
        widths = tc.get("intermediate_sizes") or [tc["intermediate_size"]] * tc["num_hidden_layers"]
        params = weight_bytes(config)["total"] / model_dtype_bytes(config)
        linear = linear_flops_per_token(config)["decoder"] / 2
        flops = flops_per_token(config, CONTEXT)
        print(f"| {label} | {min(widths)}-{max(widths)} | {linear / 1e6:.1f} | {params / 1e6:.1f} "
              f"| {params / base_params - 1:+.1%} | {flops['decode'] / 1e6:.1f} | {flops['prefill'] / 1e6:.1f} "
              f"| {flops['decode'] / base_decode - 1:+.1%} |")
    print()


def main() -> None:
    table("Gemma 4 E4B text decoder (42 layers, FFN 10240)", E4B_TEXT,
          {**PROFILES, "seed 004 (0/10/20% per layer)": {"compress.prune.ratios": SEED_004}})
    table("toy Gemma 4 (12 layers, FFN 512)", TOY_TEXT, PROFILES)


if __name__ == "__main__":
    main()
