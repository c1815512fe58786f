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
from search.models import DEFAULT, ModelFamily, ModuleNames, family_for


# Target sets are written as what stays bf16: recipes target "Linear" and list the rest in
# `ignore`, which llmcompressor expands to module names that vLLM maps onto its own layers (vLLM
# cannot match regex targets against its renamed modules and then refuses the checkpoint). The
# module names are the model family's (search/models).
def _keep_bf16(targets: str, modules: ModuleNames) -> list[str]:
    return {"attn_mlp": [], "mlp": [modules.attention], "mlp_o": [modules.qkv], "attn": [modules.mlp]}[targets]


# Modifiers that run calibration forward passes layer by layer: the ones that hit llmcompressor's
# sequential-pipeline failure on Gemma 4's KV-shared layers (field notes: KeyError 'sliding_attention').
CALIBRATED = {"GPTQModifier", "AWQModifier", "SparseGPTModifier", "WandaPruningModifier", "SmoothQuantModifier"}

_PRESET_SCHEMES = {"fp8": "FP8", "fp8_dynamic": "FP8_DYNAMIC", "w8a8": "W8A8", "w8a16": "W8A16",
                   "nvfp4a16": "NVFP4A16"}


def ignored(config: CompressionConfig, family: ModelFamily = DEFAULT) -> list[str]:
    modules = family.modules
    return ([*modules.always_bf16] + _keep_bf16(config.targets, modules)
            + ([] if config.per_layer_inputs else [*modules.per_layer_inputs]))


def _w4a16_group(config: CompressionConfig, with_actorder: bool) -> dict[str, Any]:
    weights = {"num_bits": 4, "type": "int", "symmetric": config.symmetric, "strategy": "group",
               "group_size": config.group_size, "dynamic": False}
    if with_actorder and config.actorder != "none":
        weights["actorder"] = config.actorder
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def quantization_modifier(config: CompressionConfig, family: ModelFamily = DEFAULT) -> dict[str, dict[str, Any]]:
    """The quantization step alone, or {} for schemes that write no checkpoint."""
    common = {"ignore": ignored(config, family)}
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
            return {"AWQModifier": {"mappings": list(family.modules.awq_mappings), "offload_device": "cpu"},
                    "QuantizationModifier": {**common, "config_groups": _w4a16_group(config, False)}}
        if config.actorder != "none":
            raise ConfigError("compress.actorder needs compress.method=gptq (observers only have no ordering)")
        return {"QuantizationModifier": {**common, "config_groups": _w4a16_group(config, False)}}
    preset = {**common, "targets": ["Linear"], "scheme": _PRESET_SCHEMES[scheme]}
    if scheme == "w8a8":
        # INT8 activations need outliers smoothed into the weights before GPTQ.
        return {"SmoothQuantModifier": {"smoothing_strength": 0.8,
                                        "mappings": list(family.modules.smoothquant_mappings)},
                "GPTQModifier": preset}
    if config.method == "gptq":
        return {"GPTQModifier": preset}
    return {"QuantizationModifier": preset}


def pruning_modifier(config: CompressionConfig, num_layers: int,
                     family: ModelFamily = DEFAULT) -> dict[str, dict[str, Any]]:
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
    modules = family.modules
    return {name: {"sparsity": sparsity, "mask_structure": prune.mask_structure, "targets": [modules.decoder_layer],
                   "ignore": [*modules.always_bf16, modules.attention, *modules.per_layer_inputs]}}


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


def structured_widths(config: CompressionConfig, model_config: dict[str, Any]) -> list[int] | None:
    """The FFN width of every decoder layer after structured pruning, or None when none is asked."""
    prune = config.prune
    if not (prune.active and prune.structured):
        return None
    text = model_config.get("text_config", model_config)
    if text.get("intermediate_sizes"):
        raise ConfigError("the base checkpoint is already structurally pruned; prune the original model")
    stock = family_for(model_config).stock_widths(model_config)
    multiple = channel_multiple(config)
    return [pruned_width(s, r, multiple) for s, r in zip(stock, prune.layer_ratios(len(stock)))]


def build_recipe(config: CompressionConfig, num_layers: int, family: ModelFamily = DEFAULT) -> dict[str, Any]:
    """A recipe document for llmcompressor.oneshot, or {} when nothing is compressed."""
    modifiers = {**pruning_modifier(config, num_layers, family), **quantization_modifier(config, family)}
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
    """The pipeline the model's family asks for when the recipe calibrates (Gemma 4's KV-shared
    layers need llmcompressor's basic one), else None."""
    return family_for(model_config).calibration_pipeline(model_config) if needs_calibration(recipe) else None
