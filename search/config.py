"""Typed configuration of one trial: compression, serving and workload, validated at the edge.

Each stage reads only its own dataclass. Flat dotted names (``compress.scheme``,
``serve.max_num_seqs``) address the fields from the space file, Optuna and MLflow alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

Scheme = Literal["none", "fp8", "fp8_dynamic", "w8a8", "w4a16", "w8a16", "nvfp4a16", "bnb_nf4"]
QuantMethod = Literal["rtn", "gptq", "awq"]
# sparsegpt/wanda zero weights (unstructured or 2:4); flap removes whole FFN channels per layer.
PruneMethod = Literal["none", "sparsegpt", "wanda", "flap"]
PruneShape = Literal["uniform", "ramp_up", "ramp_down", "middle"]
# Named groups of decoder Linear layers: what a user picks from instead of regexes.
TargetSet = Literal["attn_mlp", "mlp", "mlp_o", "attn"]
KVCacheDtype = Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
Verbosity = Literal["model", "concise", "terse"]
Quality = Literal["fidelity", "labels"]
# How answers are decoded, for the energy window and for scoring alike: "sampled" is the competition's
# policy (temperature/top_p/top_k below, a seed per request); "greedy" is temperature 0.
Decoding = Literal["sampled", "greedy"]


class ConfigError(ValueError):
    """A configuration that cannot be run as written: reported before any heavy work starts."""


class CombinationError(ConfigError):
    """Values that are each valid and cannot go together (AWQ without W4A16): a space may offer
    both, and a trial that samples them is infeasible."""


class Infeasible(Exception):
    """A configuration that cannot run here; recorded with its reason, never compressed or served."""


@dataclass(frozen=True)
class PruneConfig:
    method: PruneMethod = "none"
    # A profile of few parameters that expands to one ratio per decoder layer ...
    base: float = 0.0
    shape: PruneShape = "uniform"
    protect_first: int = 0
    protect_last: int = 0
    # ... or the full list, which wins when given.
    ratios: tuple[float, ...] = ()
    mask_structure: Literal["0:0", "2:4"] = "0:0"

    def validate(self) -> None:
        if not 0.0 <= self.base < 1.0:
            raise ConfigError(f"compress.prune.base must be in [0, 1), got {self.base}")
        if any(not 0.0 <= r < 1.0 for r in self.ratios):
            raise ConfigError(f"compress.prune.ratios must each be in [0, 1), got {list(self.ratios)}")
        if self.protect_first < 0 or self.protect_last < 0:
            raise ConfigError("compress.prune.protect_first/protect_last must be >= 0")
        if self.structured and self.mask_structure != "0:0":
            raise CombinationError("compress.prune.method=flap removes whole channels; mask_structure must be 0:0")

    def layer_ratios(self, num_layers: int) -> list[float]:
        """One pruning ratio per decoder layer."""
        if self.ratios:
            if len(self.ratios) != num_layers:
                raise ConfigError(
                    f"compress.prune.ratios has {len(self.ratios)} values, the model has {num_layers} layers"
                )
            return list(self.ratios)
        ratios = []
        for i in range(num_layers):
            pos = i / max(1, num_layers - 1)
            weight = {"uniform": 1.0, "ramp_up": 2 * pos, "ramp_down": 2 * (1 - pos),
                      "middle": 2 * (1 - abs(2 * pos - 1))}[self.shape]
            protected = i < self.protect_first or i >= num_layers - self.protect_last
            ratios.append(0.0 if protected else round(min(0.95, self.base * weight), 4))
        return ratios

    @property
    def active(self) -> bool:
        return self.method != "none" and (self.base > 0 or any(self.ratios) or self.mask_structure == "2:4")

    @property
    def structured(self) -> bool:
        """Channels are removed (layers get narrower) instead of weights being zeroed."""
        return self.method == "flap"


@dataclass(frozen=True)
class CalibrationConfig:
    dataset: str = "builtin"  # "builtin", a local path (load_from_disk / jsonl) or a Hub dataset name
    n_samples: int = 16
    seq_len: int = 128
    seed: int = 0

    def validate(self) -> None:
        if self.n_samples < 1 or self.seq_len < 8:
            raise ConfigError("compress.calibration needs n_samples >= 1 and seq_len >= 8")


@dataclass(frozen=True)
class CompressionConfig:
    scheme: Scheme = "none"
    method: QuantMethod = "rtn"
    group_size: int = 128
    symmetric: bool = True
    # GPTQ activation ordering as compressed-tensors 0.19 has it: "static" is an alias of "weight";
    # "group" (desc_act with a g_idx) was removed there, and llmcompressor refuses it.
    actorder: Literal["none", "static", "weight"] = "none"
    targets: TargetSet = "attn_mlp"
    per_layer_inputs: bool = False  # quantize Gemma 4's per-layer-input projections too
    prune: PruneConfig = field(default_factory=PruneConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def validate(self) -> None:
        if self.group_size not in (32, 64, 128, 256):
            raise ConfigError(f"compress.group_size must be 32, 64, 128 or 256, got {self.group_size}")
        if self.method == "awq" and self.scheme != "w4a16":
            raise CombinationError("compress.method=awq applies to scheme w4a16 only")
        if self.scheme == "bnb_nf4" and self.prune.active:
            raise CombinationError("bnb_nf4 quantizes at load time; it cannot follow pruning in this tool")
        self.prune.validate()
        self.calibration.validate()

    @property
    def needs_checkpoint(self) -> bool:
        """Whether llmcompressor must write a new checkpoint (bf16 and load-time NF4 reuse the base)."""
        return self.scheme not in ("none", "bnb_nf4") or self.prune.active


@dataclass(frozen=True)
class ServeConfig:
    """vLLM engine arguments: the single source of what the server is started with."""

    kv_cache_dtype: KVCacheDtype = "auto"
    max_model_len: int = 1024
    max_num_seqs: int = 8
    max_num_batched_tokens: int | None = None
    # Caches off unless a study turns them on on purpose: a measured window must not be made
    # cheaper by what an earlier window or trial left behind.
    enable_prefix_caching: bool = False
    mm_processor_cache_gb: float = 0.0
    enable_chunked_prefill: bool = True
    gpu_memory_utilization: float = 0.2
    # The most GPU memory vLLM may take (weights, activations, CUDA graphs, KV cache), whatever the
    # card: a study on an H200 sees the capacity limits of the card it deploys on (an L4: 22).
    # Replaces gpu_memory_utilization with budget / this GPU's memory.
    memory_budget_gib: float | None = None
    # "marlin" forces vLLM's FP8 Marlin kernel (VLLM_TEST_FORCE_FP8_MARLIN=1): what seed 002's card
    # needed for its FP8 checkpoint on an L4 (sm_89); "auto" lets vLLM choose.
    fp8_kernel: Literal["auto", "marlin"] = "auto"
    limit_images: int = 1
    image_soft_tokens: Literal[70, 140, 280, 560, 1120] = 70
    enforce_eager: bool = True
    # "uni" runs the model in the engine process: one Python start fewer (~17 s on 2 CPU cores).
    distributed_executor_backend: Literal["auto", "uni", "mp"] = "auto"
    # None lets vLLM choose. vLLM 0.26 picks FlashAttention 4 for Gemma 4's mixed head sizes on
    # Hopper, which needs the nvidia-cutlass-dsl package; TRITON_ATTN runs without it.
    attention_backend: Literal["TRITON_ATTN", "FLASH_ATTN", "FLASHINFER", "FLEX_ATTENTION"] | None = None
    # CUDA-graph capture sizes (with enforce_eager false). "workload": decode batches up to the largest
    # the trial can form, min(max_num_seqs, workload concurrency), in vLLM's own steps; "vllm": vLLM's
    # default (up to 2 x max_num_seqs, at most 512). The sizes are part of vLLM's compile-cache key, so
    # under "workload" trials that differ only in a max_num_seqs above the concurrency share one
    # compiled model, and a start captures fewer graphs.
    cudagraph_capture: Literal["workload", "vllm"] = "workload"
    dtype: str = "bfloat16"
    seed: int = 0

    def validate(self) -> None:
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("serve.gpu_memory_utilization must be in (0, 1]")
        if self.cudagraph_capture not in ("workload", "vllm"):
            raise ConfigError(f"serve.cudagraph_capture: unknown value {self.cudagraph_capture!r}; "
                              "expected 'workload' or 'vllm'")
        if self.max_model_len < 128 or self.max_num_seqs < 1:
            raise ConfigError("serve.max_model_len must be >= 128 and serve.max_num_seqs >= 1")
        if self.memory_budget_gib is not None and self.memory_budget_gib <= 0:
            raise ConfigError("serve.memory_budget_gib must be > 0 (GiB)")
        if self.mm_processor_cache_gb < 0:
            raise ConfigError("serve.mm_processor_cache_gb must be >= 0")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_num_seqs:
            raise CombinationError("serve.max_num_batched_tokens must be >= serve.max_num_seqs")


@dataclass(frozen=True)
class WorkloadConfig:
    n_requests: int = 8
    warmup_requests: int = 2
    concurrency: int = 8
    max_tokens: int = 16
    ignore_eos: bool = False
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 64
    seed: int = 0
    decoding: Decoding = "sampled"
    verbosity: Verbosity = "model"
    thinking: bool = False
    tasks: tuple[str, ...] = ("builtin_documents", "builtin_scenes")
    quality: Quality = "fidelity"
    # Share of the requests after which recovery is checked and a hopeless trial is pruned.
    early_check_fraction: float = 0.5
    # Measure the workload this many times in all (the extra windows give the energy's spread).
    energy_repeats: int = 1
    # Share of failed or timed-out requests a trial may have and stay feasible; energy is divided
    # by the requests served either way.
    max_failed_share: float = 0.0
    # How requests arrive: all at once (a benchmark replay), a closed loop of `concurrency`, or a
    # seeded Poisson process of `rate_rps` requests a second.
    arrival: Literal["all_at_once", "concurrency", "rate"] = "concurrency"
    rate_rps: float = 1.0
    # The window the objective is read from: the whole run, or its steady state (search/windows.py).
    # Whole by default: a CPU toy's few requests have almost no steady state; the GPU spaces pick steady.
    objective_window: Literal["whole", "steady"] = "whole"
    # A steady window shorter than this is too short to read (NVML updates at ~10 Hz; Zeus settles
    # on >= 5 s): with the objective on the steady window, such a trial fails saying so.
    min_steady_s: float = 5.0

    @property
    def max_in_flight(self) -> int:
        """The most requests the workload has open at once."""
        return self.concurrency if self.arrival == "concurrency" else self.n_requests

    def validate(self) -> None:
        if self.n_requests < 1 or self.concurrency < 1 or self.max_tokens < 1:
            raise ConfigError("workload.n_requests, concurrency and max_tokens must be >= 1")
        if not 0.0 < self.early_check_fraction <= 1.0:
            raise ConfigError("workload.early_check_fraction must be in (0, 1]")
        if self.energy_repeats < 1:
            raise ConfigError("workload.energy_repeats must be >= 1")
        if not 0.0 <= self.max_failed_share < 1.0:
            raise ConfigError("workload.max_failed_share must be in [0, 1)")
        if self.min_steady_s < 0:
            raise ConfigError("workload.min_steady_s must be >= 0")
        if self.rate_rps <= 0:
            raise ConfigError("workload.rate_rps must be > 0")


@dataclass(frozen=True)
class TrialConfig:
    compress: CompressionConfig = field(default_factory=CompressionConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)

    def validate(self) -> "TrialConfig":
        self.compress.validate()
        self.serve.validate()
        self.workload.validate()
        return self

    def flat(self) -> dict[str, Any]:
        return flatten(self)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dataclass tree -> {"compress.prune.base": 0.1, ...}."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def known_keys(cls: type = TrialConfig, prefix: str = "") -> dict[str, Any]:
    """Every settable dotted key and its type annotation."""
    keys: dict[str, Any] = {}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            keys.update(known_keys(hint, f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = hint
    return keys


def coerce(key: str, hint: Any, value: Any) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{key}: unknown value {value!r}; expected one of {list(get_args(hint))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(value)
    args = [a for a in get_args(hint) if a is not type(None)]
    if value is None and type(None) in get_args(hint):
        return None
    target = args[0] if args else hint
    if get_origin(target) is Literal:
        return coerce(key, target, value)
    if target is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if target in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if target is int and float(value) != int(value):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return target(value)
    if target is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def build(values: dict[str, Any], base: TrialConfig | None = None) -> TrialConfig:
    """Dotted values over a base config -> a validated TrialConfig; unknown keys are errors."""
    keys = known_keys()
    nested: dict[str, Any] = {}
    for key, value in values.items():
        if key not in keys:
            raise ConfigError(f"unknown option {key!r}; known options: {', '.join(sorted(keys))}")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = coerce(key, keys[key], value)
    return _replace(base or TrialConfig(), nested).validate()


def _replace(obj: Any, changes: dict[str, Any]) -> Any:
    updates = {}
    for name, value in changes.items():
        current = getattr(obj, name)
        updates[name] = _replace(current, value) if isinstance(value, dict) else value
    return dataclasses.replace(obj, **updates)
