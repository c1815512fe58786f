"""Distance to the physical floor: FLOPs and bytes of a (compressed) text decoder, and the
least energy a GPU could spend on them at its datasheet peak and power limit.

The model is read from a Hugging Face config dict (a multimodal config.json with
``text_config``/``vision_config``, or a bare text config) and its compressed-tensors
``quantization_config``. Its layers and Linear shapes come from its family in search/models
(Gemma 4, Llama); an architecture no family models is refused with a message naming it.

FLOPs count 2 per multiply-add of matrix products only (norms, activations, RoPE and softcapping
are left out, as torch's FlopCounterMode does); pruned layers' down_proj biases count as bytes,
not FLOPs. MoE blocks and 2:4 sparse storage formats are not modelled.

``floor_metrics`` at the bottom puts one trial's work and measurement through these functions.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from search.models import DecoderLayer, LinearShape, family_for, text_config

if TYPE_CHECKING:  # the adapter's argument types only: the maths above imports none of the pipeline
    from search.config import TrialConfig
    from search.energy import EnergyReading
    from search.workload import Prompt

# Gemma 4's default image budget (70/140/280/560/1120 soft tokens are offered).
DEFAULT_SOFT_TOKENS_PER_IMAGE = 280

DTYPE_BYTES = {
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2, "float32": 4, "fp32": 4, "float": 4,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "float8_e4m3fn": 1, "int8": 1,
}


# ---------------------------------------------------------------------------------------------
# Architecture


def model_dtype_bytes(config: dict) -> int:
    tc = text_config(config)
    name = tc.get("dtype") or tc.get("torch_dtype") or config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return DTYPE_BYTES[str(name).removeprefix("torch.")]


def decoder_layers(config: dict) -> list[DecoderLayer]:
    return family_for(config).decoder_layers(config)


def text_linears(config: dict) -> list[LinearShape]:
    """Every Linear of the text decoder except lm_head, in the order transformers builds them."""
    return family_for(config).text_linears(config)


# ---------------------------------------------------------------------------------------------
# FLOPs


def linear_flops_per_token(config: dict) -> dict[str, int]:
    """Matrix-product FLOPs of one token through the text decoder's Linears, and through lm_head."""
    tc = text_config(config)
    return {
        "decoder": sum(2 * lin.in_features * lin.out_features for lin in text_linears(config)),
        "lm_head": 2 * tc["hidden_size"] * tc["vocab_size"],
    }


def _window(config: dict, layer: DecoderLayer) -> int | None:
    return text_config(config)["sliding_window"] if layer.sliding else None


def attention_flops(config: dict, n_keys: int) -> int:
    """Score (QK^T) and mixing (PV) FLOPs of one query token that sees ``n_keys`` positions
    (itself included); sliding layers see at most ``sliding_window`` of them."""
    total = 0
    for layer in decoder_layers(config):
        window = _window(config, layer)
        keys = n_keys if window is None else min(n_keys, window)
        total += 4 * layer.heads * layer.head_dim * keys
    return total


def prefill_attention_flops(config: dict, prompt_len: int) -> int:
    """Attention FLOPs of prefilling a whole prompt causally: position i sees min(i, window) keys."""
    total = 0
    for layer in decoder_layers(config):
        w = _window(config, layer) or prompt_len
        m = min(prompt_len, w)
        keys = m * (m + 1) // 2 + (prompt_len - m) * w  # sum over i = 1..prompt_len of min(i, w)
        total += 4 * layer.heads * layer.head_dim * keys
    return total


def flops_per_token(config: dict, context_len: int) -> dict[str, float]:
    """FLOPs per token: ``prefill`` averaged over a ``context_len``-token prompt (no logits: only
    the last prompt token needs them, see workload_flops), ``decode`` for one generated token whose
    sequence holds ``context_len`` tokens (itself included), logits included."""
    linear = linear_flops_per_token(config)
    attn_prefill = prefill_attention_flops(config, context_len) / context_len
    attn_decode = attention_flops(config, context_len)
    return {
        "prefill": linear["decoder"] + attn_prefill,
        "decode": linear["decoder"] + linear["lm_head"] + attn_decode,
        "linear": linear["decoder"],
        "lm_head": linear["lm_head"],
        "attention_prefill": attn_prefill,
        "attention_decode": attn_decode,
    }


def vision_flops_per_image(config: dict, soft_tokens: int | None = None) -> int:
    """Vision encoder + projection into the text model, per image (0 without a vision_config).

    Counted exactly for matrix products over the patches the encoder runs on: soft_tokens x
    pooling_kernel_size^2 (the processor pads every image to its budget's patch count). Attention
    is bidirectional over all patches. The pooling average is elementwise and left out.
    """
    vc = config.get("vision_config")
    if not vc:
        return 0
    soft = soft_tokens or vc.get("default_output_length") or DEFAULT_SOFT_TOKENS_PER_IMAGE
    patches = soft * vc.get("pooling_kernel_size", 3) ** 2
    hidden = vc["hidden_size"]
    head_dim = vc.get("head_dim") or hidden // vc["num_attention_heads"]
    q_width = vc["num_attention_heads"] * head_dim
    kv_width = vc.get("num_key_value_heads", vc["num_attention_heads"]) * head_dim
    per_patch_layer = 2 * hidden * (2 * q_width + 2 * kv_width) + 2 * 3 * hidden * vc["intermediate_size"]
    attention = 4 * q_width * patches * patches
    embed = 2 * 3 * vc["patch_size"] ** 2 * hidden * patches
    project = 2 * hidden * text_config(config)["hidden_size"] * soft
    return embed + vc["num_hidden_layers"] * (per_patch_layer * patches + attention) + project


# ---------------------------------------------------------------------------------------------
# Bytes


def _matches(name: str, target: str) -> bool:
    # compressed-tensors' rules: "re:" prefix = regex match from the start, else exact module name
    # or class name; every module modelled here is a Linear.
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in (name, "Linear")


def weight_scheme(name: str, quant: dict | None) -> dict | None:
    """The compressed-tensors weight arguments (num_bits, type, strategy, group_size, ...) that
    apply to a module, or None when it stays in the model dtype."""
    if not quant:
        return None
    if any(_matches(name, ign) for ign in quant.get("ignore") or []):
        return None
    for group in (quant.get("config_groups") or {}).values():
        if group.get("weights") and any(_matches(name, t) for t in group.get("targets") or []):
            return {**group["weights"], "input_activations": group.get("input_activations")}
    return None


def linear_bytes(lin: LinearShape, scheme: dict | None, dtype_bytes: int = 2) -> int:
    """Stored bytes of one Linear's weight: packed values + scales (+ zero points, g_idx).

    Scales are in the model dtype unless ``scale_dtype`` says otherwise (FP4 group scales are fp8);
    asymmetric zero points are packed at the weight's bit width; actorder 'group' stores an int32
    g_idx per input column. Checkpoint metadata such as ``weight_shape`` is not read by kernels and
    is not counted.
    """
    n_in, n_out = lin.in_features, lin.out_features
    if scheme is None:
        return n_in * n_out * dtype_bytes
    bits = scheme["num_bits"]
    strategy = scheme.get("strategy") or ("group" if scheme.get("group_size") else "tensor")
    if strategy in ("group", "tensor_group"):
        scales = n_out * math.ceil(n_in / scheme["group_size"])
    elif strategy == "channel":
        scales = n_out
    elif strategy == "block":
        rows, cols = scheme["block_structure"]
        scales = math.ceil(n_out / rows) * math.ceil(n_in / cols)
    else:
        scales = 1
    scale_dtype = scheme.get("scale_dtype")
    scale_bytes = DTYPE_BYTES[str(scale_dtype).removeprefix("torch.")] if scale_dtype else dtype_bytes
    global_scale = 0
    if strategy == "tensor_group":  # NVFP4: fp8 group scales plus one fp32 global scale
        scale_bytes, global_scale = 1, 4
    total = math.ceil(n_in * bits / 8) * n_out + scales * scale_bytes + global_scale
    if not scheme.get("symmetric", True):
        total += math.ceil(scales * bits / 8)
    if scheme.get("actorder") == "group":
        total += 4 * n_in
    inputs = scheme.get("input_activations")
    if inputs and not inputs.get("dynamic") and inputs.get("strategy") == "tensor":
        total += dtype_bytes  # a static input scale
    return total


def weight_bytes(config: dict, quant: dict | None = None) -> dict[str, int]:
    """Stored bytes of the text decoder's checkpoint tensors by part; ``total`` counts a tied
    lm_head once.

    Embeddings stay in the model dtype (vLLM cannot load them quantized); lm_head follows the
    quantization config when it is not tied.
    """
    tc = text_config(config)
    dtype = model_dtype_bytes(config)
    hidden, ple = tc["hidden_size"], tc.get("hidden_size_per_layer_input") or 0
    parts = {
        "linear": sum(linear_bytes(lin, weight_scheme(lin.name, quant), dtype) for lin in text_linears(config)),
        "lm_head": 0,
        "embed_tokens": tc["vocab_size"] * hidden * dtype,
        "embed_tokens_per_layer": (tc.get("vocab_size_per_layer_input") or 0) * tc["num_hidden_layers"] * ple * dtype,
        "norms_and_scalars": family_for(config).small_params(config) * dtype,
    }
    if not tc.get("tie_word_embeddings", config.get("tie_word_embeddings", True)):
        head = LinearShape("lm_head", hidden, tc["vocab_size"])
        parts["lm_head"] = linear_bytes(head, weight_scheme(head.name, quant), dtype)
    parts["total"] = sum(parts.values())
    return parts


def _kv_dtype_bytes(config: dict, kv_dtype: str) -> int:
    return model_dtype_bytes(config) if kv_dtype == "auto" else DTYPE_BYTES[kv_dtype]


def kv_cache_bytes(config: dict, batch: int, context_len: int, kv_dtype: str = "auto") -> int:
    """KV cache of ``batch`` sequences of ``context_len`` tokens: only layers that own a cache
    (KV-shared layers read their source's), sliding layers holding at most ``sliding_window``."""
    per_token = _kv_dtype_bytes(config, kv_dtype)
    total = 0
    for layer in decoder_layers(config):
        if layer.kv_shared:
            continue
        window = _window(config, layer)
        tokens = context_len if window is None else min(context_len, window)
        total += 2 * layer.kv_heads * layer.head_dim * tokens * per_token  # K and V
    return batch * total


def _step_weight_bytes(config: dict, quant: dict | None) -> int:
    """Weight bytes a decode step reads once, whatever its batch: a tied lm_head reads the whole
    embedding matrix."""
    w = weight_bytes(config, quant)
    return w["linear"] + w["norms_and_scalars"] + (w["lm_head"] or w["embed_tokens"])


def _step_sequence_bytes(config: dict, context_len: int, kv_dtype: str) -> int:
    """Bytes a decode step reads for each sequence: its new token's embedding rows (token and
    per-layer tables) and its KV cache."""
    tc = text_config(config)
    rows = tc["hidden_size"] + tc["num_hidden_layers"] * (tc.get("hidden_size_per_layer_input") or 0)
    return rows * model_dtype_bytes(config) + kv_cache_bytes(config, 1, context_len, kv_dtype)


def decode_step_bytes(
    config: dict, quant: dict | None, batch: int, context_len: int, kv_dtype: str = "auto"
) -> int:
    """Least bytes one decode step of ``batch`` sequences at ``context_len`` reads from memory:
    every decoder weight once in its stored format, lm_head, the new tokens' embedding rows, and
    each stored KV byte once (KV-shared layers re-reading their source's cache are not counted
    again: a floor assumes they hit on-chip cache)."""
    return _step_weight_bytes(config, quant) + batch * _step_sequence_bytes(config, context_len, kv_dtype)


def workload_flops(
    config: dict,
    prompt_tokens: int,
    output_tokens: int,
    images: int = 0,
    *,
    requests: int = 1,
    soft_tokens_per_image: int | None = None,
    quant: dict | None = None,
    batch: int = 1,
    kv_dtype: str = "auto",
) -> dict[str, float]:
    """FLOPs and least memory traffic of ``requests`` identical requests.

    ``prompt_tokens`` counts every token the decoder prefills, image soft tokens included (as
    vLLM's prompt_tokens_total does); ``images`` adds their vision-encoder cost. The first output
    token comes from the prefill pass's logits; each later one costs one decode pass. ``bytes`` is
    the decode phase only, with ``batch`` sequences sharing each step's weight read: prefill is
    compute bound and its traffic overlaps decode in a continuously batched server, so leaving it
    out keeps the figure a lower bound.
    """
    linear = linear_flops_per_token(config)
    decode_keys = range(prompt_tokens + 1, prompt_tokens + output_tokens)  # sequence length of each decode pass
    prefill = prompt_tokens * linear["decoder"] + prefill_attention_flops(config, prompt_tokens) + linear["lm_head"]
    decode = sum(linear["decoder"] + linear["lm_head"] + attention_flops(config, n) for n in decode_keys)
    vision = images * vision_flops_per_image(config, soft_tokens_per_image)
    steps = math.ceil(requests / batch) * len(decode_keys)
    per_sequence = sum(_step_sequence_bytes(config, n, kv_dtype) for n in decode_keys)
    return {
        "requests": requests,
        "prefill_flops": requests * prefill,
        "decode_flops": requests * decode,
        "vision_flops": requests * vision,
        "flops": requests * (prefill + decode + vision),
        "decode_steps": steps,
        "bytes": steps * _step_weight_bytes(config, quant) + requests * per_sequence,
    }


# ---------------------------------------------------------------------------------------------
# GPUs and floors


GPUS_FILE = Path(__file__).with_name("gpus.yaml")


@dataclass(frozen=True)
class GpuSpec:
    name: str
    tflops: dict[str, float]  # dense tensor-core peak per compute format (TOPS for int8)
    mem_bw_gbs: float
    power_w: float
    source: str
    match: list[str] = field(default_factory=list)  # regexes over NVML device names


def _load_gpus(path: Path) -> list[GpuSpec]:
    entries = (yaml.safe_load(path.read_text()) or {}).get("gpus") or []
    return [
        GpuSpec(
            name=e["name"],
            tflops={k: float(v) for k, v in e["tflops"].items() if v is not None},
            mem_bw_gbs=float(e["mem_bw_gbs"]),
            power_w=float(e["power_w"]),
            source=e.get("source") or f"user file {path}",
            match=list(e.get("match") or [e["name"]]),
        )
        for e in entries
    ]


def check_gpus_file(path: str | Path, source: str = "SEARCH_GPUS_FILE") -> None:
    """A user's GPU file (search/gpus.yaml's format) read and checked whole, before a study starts:
    its figures are read again mid-study, by every trial's roofline. Raises a one-line ConfigError."""
    from search.config import ConfigError
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{source}: GPU file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    entries = raw.get("gpus") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: {path}: expected `gpus:` and a list of GPUs (search/gpus.yaml's format)")
    for index, entry in enumerate(entries):
        where = f"{source}: {path}: gpus[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping, got {entry!r}"[:300])
        where += f" ({entry.get('name', '?')})"
        missing = sorted({"name", "tflops", "mem_bw_gbs", "power_w"} - set(entry))
        if missing:
            raise ConfigError(f"{where}: missing key(s) {missing}")
        numbers = {"mem_bw_gbs": entry["mem_bw_gbs"], "power_w": entry["power_w"],
                   **({f"tflops.{k}": v for k, v in entry["tflops"].items() if v is not None}
                      if isinstance(entry["tflops"], dict) else {"tflops": entry["tflops"]})}
        for key, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{where}: {key} must be a number above 0, got {value!r}")
        if "bf16" not in entry["tflops"]:
            raise ConfigError(f"{where}: tflops needs a bf16 figure (the format every scheme can fall back to)")
        match = entry.get("match") or [entry["name"]]
        if not isinstance(match, list) or not all(isinstance(m, str) for m in match):
            raise ConfigError(f"{where}: match must be a list of regular expressions, got {match!r}")
        for pattern in match:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{where}: match {pattern!r} is not a regular expression: {exc}") from None


def gpu_spec(nvml_name: str, extra_path: str | Path | None = None) -> GpuSpec | None:
    """Datasheet figures for an NVML device name ("NVIDIA H100 80GB HBM3", "NVIDIA L4"), or None.

    Entries from ``extra_path`` and from the file in $SEARCH_GPUS_FILE are tried before the
    built-in search/gpus.yaml, so a user file can add or override GPUs.
    """
    files = [Path(p) for p in (extra_path, os.environ.get("SEARCH_GPUS_FILE")) if p]
    for spec in (s for f in [*files, GPUS_FILE] for s in _load_gpus(f)):
        if any(re.fullmatch(pattern, nvml_name.strip(), re.IGNORECASE) for pattern in spec.match):
            return spec
    return None


def compute_format(quant: dict | None) -> str:
    """The tensor-core format a checkpoint's matmuls run in: fp8 or int8 only when both weights and
    activations are quantized to 8 bits (W8A8); weight-only schemes (W4A16, W8A16) compute in bf16."""
    for group in ((quant or {}).get("config_groups") or {}).values():
        weights, inputs = group.get("weights") or {}, group.get("input_activations") or {}
        if weights.get("num_bits") == 8 and inputs.get("num_bits") == 8:
            return "fp8" if weights.get("type") == "float" else "int8"
    return "bf16"


def floors(workload: dict, gpu: GpuSpec, fmt: str = "bf16") -> dict[str, float | str]:
    """Least energy for a workload's FLOPs and bytes on ``gpu`` running at its power limit.

    compute = FLOPs / dense peak of ``fmt`` x power limit; memory = bytes / bandwidth x power limit;
    the floor is the larger (a roofline: the two overlap at best). A format the GPU has no tensor
    cores for (fp8 on A100) falls back to bf16, as vLLM then runs weight-only kernels; ``fmt`` in
    the result says which peak was used.
    """
    used = fmt if fmt in gpu.tflops else "bf16"
    compute_s = workload["flops"] / (gpu.tflops[used] * 1e12)
    memory_s = workload["bytes"] / (gpu.mem_bw_gbs * 1e9)
    return {
        "compute_j": compute_s * gpu.power_w,
        "memory_j": memory_s * gpu.power_w,
        "floor_j": max(compute_s, memory_s) * gpu.power_w,
        "compute_s": compute_s,
        "memory_s": memory_s,
        "fmt": used,
    }


def floor_ratio(measured_j: float, floor_j: float) -> float:
    """How many times the floor a measurement spent (>= 1 when the floor is a true lower bound)."""
    return measured_j / floor_j if floor_j > 0 else math.inf


# ---------------------------------------------------------------------------------------------
# The adapter a trial calls


def floor_metrics(checkpoint: Path, config: TrialConfig, stats: dict, prompts: list[Prompt],
                  reading: EnergyReading, target_gpu: str | None = None
                  ) -> tuple[dict[str, float], dict[str, str]]:
    """The trial's work (FLOPs, decode bytes) and its roofline at TDP on the measured GPU: the time
    the work needs at the data sheet's peak rate, times the board power. Not a lower bound (a GPU
    can draw less than its TDP); a yardstick of how far the measurement is from the data sheet.
    Without a measured GPU, only the GPU the user names (`target_gpu`) gives a ratio."""
    model_config = json.loads((checkpoint / "config.json").read_text())
    quant = model_config.get("quantization_config")
    n = max(1, len(prompts))
    work = workload_flops(
        model_config, round(stats["prompt_tokens"] / n), max(1, round(stats["completion_tokens"] / n)),
        images=round(sum(p.images for p in prompts) / n), requests=n,
        soft_tokens_per_image=config.serve.image_soft_tokens, quant=quant,
        batch=min(config.workload.max_in_flight, config.serve.max_num_seqs),
        kv_dtype="auto" if config.serve.kv_cache_dtype == "auto" else "fp8")
    counts = {"workload_flops": work["flops"], "workload_decode_bytes": work["bytes"]}
    gpu = gpu_spec(reading.gpus[0]) if reading.gpus else None
    basis = "data sheet"
    if gpu is None and target_gpu:
        gpu, basis = gpu_spec(target_gpu), "data sheet of the named target GPU (not the one measured)"
    if gpu is None:
        return counts, {"floor_basis": "none: no GPU measured here (--target-gpu names one for a roofline)"}
    roofline = floors(work, gpu, compute_format(quant))
    metrics = {**counts, "floor_compute_j": roofline["compute_j"], "floor_memory_j": roofline["memory_j"],
               "floor_j": roofline["floor_j"], "floor_ratio": floor_ratio(reading.joules_gross, roofline["floor_j"])}
    against = "an estimate" if reading.source == "estimate" else "a measurement"
    return metrics, {"floor_basis": f"{gpu.name} {basis}, {roofline['fmt']} peak", "floor_ratio_against": against}
