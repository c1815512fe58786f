"""Typed configuration of one trial: compression, serving and workload, validated at the edge.

Each stage reads only its own model. Flat dotted names (``compress.scheme``,
``serve.max_num_seqs``) address the fields from the space file, ``--set``, Optuna and MLflow alike.
The models hold every rule a value must meet (its type, bounds and choices, and which values go
together), and a value that breaks one is refused as a one-line ConfigError naming its dotted key.
"""

from __future__ import annotations

from typing import Annotated, Any, Iterator, Literal, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from search.errors import SearchError

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


def _whole_float_to_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# A whole float (4096.0 in a YAML file) is the integer it names; 2.5 is refused, and so are true and '8'.
Integer = Annotated[int, BeforeValidator(_whole_float_to_int)]
# A share of something that is never all of it: a pruning ratio, the failed requests a trial may have.
Share = Annotated[float, Field(ge=0, lt=1)]


class ConfigError(SearchError, ValueError):
    """A configuration that cannot be run as written: reported before any heavy work starts."""


class CombinationError(ConfigError):
    """Values that are each valid and cannot go together (AWQ without W4A16): a space may offer
    both, and a trial that samples them is infeasible."""


class Infeasible(SearchError):
    """A configuration that cannot run here; recorded with its reason, never compressed or served."""


class _Options(BaseModel):
    """A frozen group of options that refuses unknown keys; constructing one validates it."""

    # Strict, as the options always were: true is not a number, 1 not a boolean, '8' (quoted in YAML)
    # not an integer. Lists (YAML, JSON, MLflow) still become tuples: the tuple fields say strict=False.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _one_line(exc, _SECTIONS[type(self)]) from None


class PruneConfig(_Options):
    method: PruneMethod = "none"
    # A profile of few parameters that expands to one ratio per decoder layer ...
    base: Share = 0.0
    shape: PruneShape = "uniform"
    protect_first: Integer = Field(0, ge=0)
    protect_last: Integer = Field(0, ge=0)
    # ... or the full list, which wins when given.
    ratios: tuple[Share, ...] = Field((), strict=False)
    mask_structure: Literal["0:0", "2:4"] = "0:0"

    @model_validator(mode="after")
    def _channels_are_removed_whole(self) -> PruneConfig:
        if self.structured and self.mask_structure != "0:0":
            raise CombinationError("compress.prune.method=flap removes whole channels; mask_structure must be 0:0")
        return self

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


class CalibrationConfig(_Options):
    dataset: str = "builtin"  # "builtin", a local path (load_from_disk / jsonl) or a Hub dataset name
    n_samples: Integer = Field(16, ge=1)
    seq_len: Integer = Field(128, ge=8)
    seed: Integer = 0


class CompressionConfig(_Options):
    scheme: Scheme = "none"
    method: QuantMethod = "rtn"
    group_size: Literal[32, 64, 128, 256] = 128
    symmetric: bool = True
    # GPTQ activation ordering as compressed-tensors 0.19 has it: "static" is an alias of "weight";
    # "group" (desc_act with a g_idx) was removed there, and llmcompressor refuses it.
    actorder: Literal["none", "static", "weight"] = "none"
    targets: TargetSet = "attn_mlp"
    per_layer_inputs: bool = False  # quantize Gemma 4's per-layer-input projections too
    prune: PruneConfig = Field(default_factory=PruneConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)

    @model_validator(mode="after")
    def _method_and_pruning_fit_the_scheme(self) -> CompressionConfig:
        if self.method == "awq" and self.scheme != "w4a16":
            raise CombinationError("compress.method=awq applies to scheme w4a16 only")
        if self.scheme == "bnb_nf4" and self.prune.active:
            raise CombinationError("bnb_nf4 quantizes at load time; it cannot follow pruning in this tool")
        return self

    @property
    def needs_checkpoint(self) -> bool:
        """Whether llmcompressor must write a new checkpoint (bf16 and load-time NF4 reuse the base)."""
        return self.scheme not in ("none", "bnb_nf4") or self.prune.active


class ServeConfig(_Options):
    """vLLM engine arguments: the single source of what the server is started with."""

    kv_cache_dtype: KVCacheDtype = "auto"
    max_model_len: Integer = Field(1024, ge=128)
    max_num_seqs: Integer = Field(8, ge=1)
    max_num_batched_tokens: Integer | None = None
    # Caches off unless a study turns them on on purpose: a measured window must not be made
    # cheaper by what an earlier window or trial left behind.
    enable_prefix_caching: bool = False
    mm_processor_cache_gb: float = Field(0.0, ge=0)
    enable_chunked_prefill: bool = True
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1)
    # The most GPU memory vLLM may take (weights, activations, CUDA graphs, KV cache), whatever the
    # card: a study on an H200 sees the capacity limits of the card it deploys on (an L4: 22).
    # Replaces gpu_memory_utilization with budget / this GPU's memory.
    memory_budget_gib: float | None = Field(None, gt=0)
    # "marlin" forces vLLM's FP8 Marlin kernel (VLLM_TEST_FORCE_FP8_MARLIN=1): what seed 002's card
    # needed for its FP8 checkpoint on an L4 (sm_89); "auto" lets vLLM choose.
    fp8_kernel: Literal["auto", "marlin"] = "auto"
    limit_images: Integer = 1
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
    # Skip vLLM's start-up profile of the vision encoder's peak memory (part of every start's profile
    # run): a faster start, with the encoder's activations no longer in the KV-cache budget's sum.
    skip_mm_profiling: bool = False
    dtype: str = "bfloat16"
    seed: Integer = 0

    @model_validator(mode="after")
    def _a_batch_holds_every_sequence(self) -> ServeConfig:
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_num_seqs:
            raise CombinationError("serve.max_num_batched_tokens must be >= serve.max_num_seqs")
        return self


class WorkloadConfig(_Options):
    n_requests: Integer = Field(8, ge=1)
    warmup_requests: Integer = 2
    concurrency: Integer = Field(8, ge=1)
    max_tokens: Integer = Field(16, ge=1)
    ignore_eos: bool = False
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: Integer = 64
    seed: Integer = 0
    decoding: Decoding = "sampled"
    verbosity: Verbosity = "model"
    thinking: bool = False
    tasks: tuple[str, ...] = Field(("builtin_documents", "builtin_scenes"), strict=False)
    quality: Quality = "fidelity"
    # Distinct prompts whose reference answers are teacher-forced for the label-free scores (top-1
    # agreement, KL): each costs a forward pass in the baseline and in every trial, so a job of many
    # distinct prompts scores the first ones (round-robin over the tasks), not all.
    fidelity_items: Integer = Field(64, ge=1)
    # Share of the requests after which recovery is checked and a hopeless trial is pruned.
    early_check_fraction: float = Field(0.5, gt=0, le=1)
    # Measure the workload this many times in all (the extra windows give the energy's spread).
    energy_repeats: Integer = Field(1, ge=1)
    # Share of failed or timed-out requests a trial may have and stay feasible; energy is divided
    # by the requests served either way.
    max_failed_share: Share = 0.0
    # How requests arrive: all at once (a benchmark replay), a closed loop of `concurrency`, or a
    # seeded Poisson process of `rate_rps` requests a second.
    arrival: Literal["all_at_once", "concurrency", "rate"] = "concurrency"
    rate_rps: float = Field(1.0, gt=0)
    # The job the objective prices. "fixed": n_requests sent as `arrival` says (an evaluation, a batch
    # job), priced over the whole run, ramp-up and drain included: what the job pays. "sustained": a
    # server that never drains, priced per request over the steady state at the named load (a closed
    # loop of `concurrency`, or `rate_rps`); the ramp and the drain are left out (search/windows.py).
    job: Literal["fixed", "sustained"] = "fixed"
    # A steady window shorter than this is too short to read (NVML updates at ~10 Hz; Zeus settles
    # on >= 5 s): a sustained-service trial whose steady state is shorter fails saying so.
    min_steady_s: float = Field(5.0, ge=0)
    # The user's own traffic as the measured job: a JSONL of chat requests (search/traffic.py gives the
    # forms), each line sent once in the measured window instead of the tasks' prompts; the quality
    # items stay the tasks'. A relative path is the caller's folder's, else the project's.
    traffic: str | None = None

    @field_validator("traffic")
    @classmethod
    def _traffic_file_is_readable(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from search.traffic import TrafficError, read, resolve
        try:
            path = resolve(value)
            read(path)
        except TrafficError as exc:
            raise ConfigError(f"workload.traffic: {exc}") from None
        return str(path)

    @model_validator(mode="after")
    def _sustained_needs_a_load(self) -> WorkloadConfig:
        if self.job == "sustained" and self.arrival == "all_at_once":
            raise CombinationError("workload.job sustained prices a load a server sustains: give it one with "
                                   "workload.arrival concurrency or rate (all_at_once is a fixed job)")
        return self

    @property
    def max_in_flight(self) -> int:
        """The most requests the workload has open at once."""
        return self.concurrency if self.arrival == "concurrency" else self.measured_requests

    @property
    def measured_requests(self) -> int:
        """The requests one measured window sends: the traffic file's lines, else n_requests."""
        if self.traffic is None:
            return self.n_requests
        from search.traffic import read
        return len(read(self.traffic))

    def describe_job(self) -> str:
        """The job the objective prices, in words (search status, the export, MLflow)."""
        sent = {"all_at_once": "all at once", "concurrency": f"{self.concurrency} at a time",
                "rate": f"at {self.rate_rps:g} requests/s (Poisson)"}[self.arrival]
        if self.job == "fixed":
            what = (f"the {self.measured_requests} requests of {self.traffic}" if self.traffic
                    else f"{self.n_requests} requests")
            return f"fixed job: {what} sent {sent}, priced over the whole run"
        load = f"{self.concurrency} requests in flight" if self.arrival == "concurrency" else sent.removeprefix("at ")
        return f"sustained service at {load}, priced per request over the steady state"


class TrialConfig(_Options):
    compress: CompressionConfig = Field(default_factory=CompressionConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    workload: WorkloadConfig = Field(default_factory=WorkloadConfig)

    def flat(self) -> dict[str, Any]:
        return flatten(self)


def _group(field: FieldInfo) -> type[_Options] | None:
    """The model a field holds when it is a group of options (compress.prune), else None."""
    kind = field.annotation
    return kind if isinstance(kind, type) and issubclass(kind, _Options) else None


def _fields(cls: type[_Options], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted name, field) of every field under cls, each group before the options in it."""
    for name, field in cls.model_fields.items():
        yield f"{prefix}{name}", field
        if _group(field):
            yield from _fields(_group(field), f"{prefix}{name}.")


# Where each group sits in the tree (its errors name the dotted key), and every settable option.
_SECTIONS = {TrialConfig: "", **{_group(field): name for name, field in _fields(TrialConfig) if _group(field)}}
_OPTIONS = {name: field for name, field in _fields(TrialConfig) if not _group(field)}


def flatten(obj: _Options, prefix: str = "") -> dict[str, Any]:
    """Model tree -> {"compress.prune.base": 0.1, ...}."""
    out: dict[str, Any] = {}
    for name in type(obj).model_fields:
        value = getattr(obj, name)
        if isinstance(value, _Options):
            out.update(flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = list(value) if isinstance(value, tuple) else value
    return out


def known_keys(cls: type[_Options] = TrialConfig, prefix: str = "") -> dict[str, Any]:
    """Every settable dotted key and its type annotation."""
    return {name: field.annotation for name, field in _fields(cls, prefix) if not _group(field)}


def build(values: dict[str, Any], base: TrialConfig | None = None) -> TrialConfig:
    """Dotted values over a base config -> a validated TrialConfig; unknown keys are errors."""
    tree = (base or TrialConfig()).model_dump()
    for key, value in values.items():
        if key not in _OPTIONS:  # a group ("compress.prune") is not an option either
            raise ConfigError(_unknown_option(key))
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node[section]
        node[leaf] = value
    return TrialConfig(**tree)


def _unknown_option(key: str) -> str:
    return f"unknown option {key!r}; known options: {', '.join(sorted(_OPTIONS))}"


# pydantic's error types for a value of the wrong type, and what the option takes instead.
_EXPECTED = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
             "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
             "bool_parsing": "true or false", "string_type": "a string", "tuple_type": "a list"}
_LIMITS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _one_line(exc: ValidationError, section: str) -> ConfigError:
    """pydantic's report -> one line naming the dotted key. A value wrong on its own is told before
    a combination, so that CombinationError only ever means values that are each valid."""
    errors = exc.errors()
    error = next((e for e in errors if not isinstance(e.get("ctx", {}).get("error"), CombinationError)), errors[0])
    raised = error.get("ctx", {}).get("error")
    if isinstance(raised, ConfigError):  # a combination rule of the models above, in its own words
        return raised
    loc = error["loc"]
    names = [part for part in loc if isinstance(part, str)]
    key = ".".join([section, *names] if section else names)
    shown = key + "".join(f"[{part}]" for part in loc if isinstance(part, int))  # a list's element
    kind, value = error["type"], error["input"]
    if kind == "extra_forbidden":
        return ConfigError(_unknown_option(key))
    if kind == "literal_error":
        return ConfigError(f"{shown}: unknown value {value!r}; expected one of {_choices(_OPTIONS[key].annotation)}")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return ConfigError(f"{shown} must be {_range(_bounds(_OPTIONS[key], isinstance(loc[-1], int)))}, "
                           f"got {value!r}")
    if kind in _EXPECTED:
        return ConfigError(f"{shown}: expected {_EXPECTED[kind]}, got {value!r}")
    return ConfigError(f"{shown}: {error['msg']}")


def _choices(annotation: Any) -> list:
    """The values a Literal, or an optional one, allows."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return next(list(get_args(arg)) for arg in get_args(annotation) if get_origin(arg) is Literal)


def _bounds(field: FieldInfo, of_element: bool) -> dict[str, Any]:
    """The bounds a field sets, or its list's element type sets: {"ge": 0, "lt": 1}."""
    metadata = field.metadata
    if of_element:
        element = get_args(field.annotation)[0]  # tuple[Share, ...]
        metadata = [m for info in get_args(element)[1:] for m in info.metadata]
    return {name: getattr(m, name) for m in metadata for name in _LIMITS if hasattr(m, name)}


def _range(bounds: dict[str, Any]) -> str:
    """{"ge": 0, "lt": 1} -> "in [0, 1)"; {"ge": 128} -> ">= 128"."""
    low = f"[{bounds['ge']}" if "ge" in bounds else f"({bounds['gt']}" if "gt" in bounds else None
    high = f"{bounds['le']}]" if "le" in bounds else f"{bounds['lt']})" if "lt" in bounds else None
    if low and high:
        return f"in {low}, {high}"
    return " and ".join(f"{_LIMITS[name]} {limit}" for name, limit in bounds.items())
