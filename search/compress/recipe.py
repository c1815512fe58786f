"""CompressionConfig -> an llmcompressor recipe (plain data, written as recipe.yaml).

Pure functions: no llmcompressor import, so recipes are tested and logged without the compression
environment. Pruning comes before quantization (seed 001's order). Structured (FLAP) pruning is
not an llmcompressor modifier: `structured_widths` gives the compression worker the FFN width
of every decoder layer, and the worker removes channels before `oneshot` runs the recipe.
"""

from __future__ import annotations

import math
from typing import Any

from search.config import CompressionConfig, ConfigError

_LAYER = r"re:.*language_model\.layers\.\d+\."
_ATTN = _LAYER + r"self_attn\.(q|k|v|o)_proj$"
_O = _LAYER + r"self_attn\.o_proj$"
_MLP = _LAYER + r"mlp\.(gate|up|down)_proj$"
_DECODER_LAYER = r"re:.*language_model\.layers\.\d+$"
_PER_LAYER = [_LAYER + r"per_layer_(input_gate|projection)$", r"re:.*per_layer_model_projection$"]
_QKV = _LAYER + r"self_attn\.(q|k|v)_proj$"
# Target sets are written as what stays bf16: recipes target "Linear" and list the rest in
# `ignore`, which llmcompressor expands to module names that vLLM maps onto its own layers (vLLM
# cannot match regex targets against its renamed modules and then refuses the checkpoint).
KEEP_BF16 = {"attn_mlp": [], "mlp": [_ATTN], "mlp_o": [_QKV], "attn": [_MLP]}

# What vLLM builds as plain bf16 layers and cannot load quantized: kept out of every recipe.
ALWAYS_BF16 = ["lm_head", "re:.*vision_tower.*", "re:.*embed_vision.*", "re:.*audio_tower.*",
               "re:.*embed_audio.*", "re:.*embed_tokens.*"]

# Modifiers that run calibration forward passes layer by layer: the ones that hit llmcompressor's
# sequential-pipeline failure on Gemma 4's KV-shared layers (field notes: KeyError 'sliding_attention').
CALIBRATED = {"GPTQModifier", "AWQModifier", "SparseGPTModifier", "WandaPruningModifier", "SmoothQuantModifier"}

# llmcompressor has no Gemma 4 mappings. Gemma 4 feeds the MLP from pre_feedforward_layernorm (as
# Gemma 2/3 do); the q/k-normed attention inputs are left unsmoothed, as llmcompressor does for Gemma 3.
_LM = r"re:.*language_model\.layers\.\d+\."
_AWQ_MAPPINGS = [
    {"smooth_layer": _LM + r"pre_feedforward_layernorm$",
     "balance_layers": [_LM + r"mlp\.gate_proj$", _LM + r"mlp\.up_proj$"]},
    {"smooth_layer": _LM + r"mlp\.up_proj$", "balance_layers": [_LM + r"mlp\.down_proj$"]},
]
_SMOOTHQUANT_MAPPINGS = [
    [[_LM + r"mlp\.gate_proj$", _LM + r"mlp\.up_proj$"], _LM + r"pre_feedforward_layernorm$"],
]

_PRESET_SCHEMES = {"fp8": "FP8", "fp8_dynamic": "FP8_DYNAMIC", "w8a8": "W8A8", "w8a16": "W8A16",
                   "nvfp4a16": "NVFP4A16"}


def ignored(config: CompressionConfig) -> list[str]:
    return ALWAYS_BF16 + KEEP_BF16[config.targets] + ([] if config.per_layer_inputs else _PER_LAYER)


def _w4a16_group(config: CompressionConfig, with_actorder: bool) -> dict[str, Any]:
    weights = {"num_bits": 4, "type": "int", "symmetric": config.symmetric, "strategy": "group",
               "group_size": config.group_size, "dynamic": False}
    if with_actorder and config.actorder != "none":
        weights["actorder"] = config.actorder
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def quantization_modifier(config: CompressionConfig) -> dict[str, dict[str, Any]]:
    """The quantization step alone, or {} for schemes that write no checkpoint."""
    common = {"ignore": ignored(config)}
    scheme = config.scheme
    if scheme in ("none", "bnb_nf4"):
        return {}
    if scheme == "w4a16":
        if config.method == "gptq":
            return {"GPTQModifier": {**common, "config_groups": _w4a16_group(config, True),
                                     "block_size": 128, "dampening_frac": 0.01}}
        if config.method == "awq":
            # AWQ only computes smoothing scales; the quantizer that follows uses them.
            # Cached activations go to host memory: the default asks for an accelerator even on a CPU.
            return {"AWQModifier": {"mappings": _AWQ_MAPPINGS, "offload_device": "cpu"},
                    "QuantizationModifier": {**common, "config_groups": _w4a16_group(config, False)}}
        if config.actorder != "none":
            raise ConfigError("compress.actorder needs compress.method=gptq (observers only have no ordering)")
        return {"QuantizationModifier": {**common, "config_groups": _w4a16_group(config, False)}}
    preset = {**common, "targets": ["Linear"], "scheme": _PRESET_SCHEMES[scheme]}
    if scheme == "w8a8":
        # INT8 activations need outliers smoothed into the weights before GPTQ.
        return {"SmoothQuantModifier": {"smoothing_strength": 0.8, "mappings": _SMOOTHQUANT_MAPPINGS},
                "GPTQModifier": preset}
    if config.method == "gptq":
        return {"GPTQModifier": preset}
    return {"QuantizationModifier": preset}


def pruning_modifier(config: CompressionConfig, num_layers: int) -> dict[str, dict[str, Any]]:
    prune = config.prune
    if not prune.active or prune.structured:
        return {}
    name = {"sparsegpt": "SparseGPTModifier", "wanda": "WandaPruningModifier"}[prune.method]
    ratios = prune.layer_ratios(num_layers)
    if prune.mask_structure == "2:4":
        sparsity: float | list[float] = 0.5
    else:
        sparsity = ratios if len(set(ratios)) > 1 else ratios[0]
    # One ratio per decoder layer (the modifier's targets are the layers); inside each, seed 001
    # prunes the MLP only, so attention and per-layer-input projections are ignored.
    return {name: {"sparsity": sparsity, "mask_structure": prune.mask_structure,
                   "targets": [_DECODER_LAYER], "ignore": ALWAYS_BF16 + [_ATTN] + _PER_LAYER}}


# vLLM's GPU kernels (Marlin, FP8) want Linear dimensions divisible by 64 (vLLM's gemma4_mm says so
# for the vision tower); group-quantized weights also need whole groups along down_proj's input.
_CHANNEL_MULTIPLE = 64


def channel_multiple(config: CompressionConfig) -> int:
    """What every pruned FFN width is a multiple of, so that the quantization that follows fits it."""
    group = {"w4a16": config.group_size, "nvfp4a16": 16}.get(config.scheme, 1)
    return math.lcm(_CHANNEL_MULTIPLE, group)


def pruned_width(stock: int, ratio: float, multiple: int) -> int:
    """FFN channels a layer keeps when ``ratio`` of its ``stock`` channels are removed, rounded to
    the nearest ``multiple`` (at least one multiple, never more than ``stock``)."""
    if ratio == 0:
        return stock
    kept = round(stock * (1 - ratio) / multiple) * multiple
    return min(stock, max(multiple, kept))


def stock_widths(text_config: dict[str, Any]) -> list[int]:
    """Each decoder layer's FFN width as transformers and vLLM build Gemma 4 (double-wide KV-shared
    layers included)."""
    n = text_config["num_hidden_layers"]
    first_shared = n - (text_config.get("num_kv_shared_layers") or 0)
    double = text_config.get("use_double_wide_mlp", False)
    return [text_config["intermediate_size"] * (2 if double and i >= first_shared > 0 else 1) for i in range(n)]


def structured_widths(config: CompressionConfig, model_config: dict[str, Any]) -> list[int] | None:
    """The FFN width of every decoder layer after structured pruning, or None when none is asked."""
    prune = config.prune
    if not (prune.active and prune.structured):
        return None
    text = model_config.get("text_config", model_config)
    if text.get("intermediate_sizes"):
        raise ConfigError("the base checkpoint is already structurally pruned; prune the original model")
    stock = stock_widths(text)
    multiple = channel_multiple(config)
    return [pruned_width(s, r, multiple) for s, r in zip(stock, prune.layer_ratios(len(stock)))]


def build_recipe(config: CompressionConfig, num_layers: int) -> dict[str, Any]:
    """A recipe document for llmcompressor.oneshot, or {} when nothing is compressed."""
    modifiers = {**pruning_modifier(config, num_layers), **quantization_modifier(config)}
    if not modifiers:
        return {}
    return {"default_stage": {"default_modifiers": modifiers}}


def needs_calibration(recipe: dict[str, Any]) -> bool:
    modifiers = recipe.get("default_stage", {}).get("default_modifiers", {})
    if CALIBRATED & set(modifiers):
        return True
    quant = modifiers.get("QuantizationModifier", {})
    # Static activation scales (FP8 per-tensor) and NVFP4's global scales are observed on data.
    return quant.get("scheme") in ("FP8", "NVFP4A16")


def pipeline_for(recipe: dict[str, Any], model_config: dict[str, Any]) -> str | None:
    """llmcompressor's sequential pipeline fails on KV-shared layers; the basic one works."""
    text = model_config.get("text_config", model_config)
    if needs_calibration(recipe) and text.get("num_kv_shared_layers", 0) > 0:
        return "basic"
    return None
