"""What the other stages ask of a model family, and the shapes they get back.

A family (one module per architecture in this package, as vLLM keeps one file per architecture in
its model registry) answers: the decoder layers and Linear shapes of a config (for the floor), the
module names a quantization scheme may target and what must stay bf16 (for recipes), how the
compression environment loads a checkpoint and fixes it up for vLLM, and what serving it needs
(for feasibility). Everything here is plain data over a Hugging Face config dict: no torch import.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from search.errors import SearchError

if TYPE_CHECKING:
    from search.config import TrialConfig
    from search.platform import Platform


@dataclass(frozen=True)
class DecoderLayer:
    index: int
    sliding: bool
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    kv_shared: bool  # reads another layer's KV cache, has no k/v projections
    v_proj: bool  # False where attention_k_eq_v reuses k as v
    down_proj_bias: bool = False  # FFN channels removed, their mean contribution kept as a bias


@dataclass(frozen=True)
class LinearShape:
    name: str  # module name as transformers (and so llmcompressor's ignore lists) spell it
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModuleNames:
    """Module names in compressed-tensors' syntax ("re:" = regex from the start) that recipes use."""

    decoder_layer: str  # one decoder layer (SparseGPT's per-layer sparsity targets these)
    attention: str  # q/k/v/o projections
    qkv: str  # q/k/v projections
    mlp: str  # gate/up/down projections
    always_bf16: tuple[str, ...]  # what vLLM builds as plain bf16 layers and cannot load quantized
    per_layer_inputs: tuple[str, ...] = ()  # projections compress.per_layer_inputs opts into
    awq_mappings: tuple[dict, ...] = ()
    smoothquant_mappings: tuple[list, ...] = ()


def dense_attention_mlp_linears(layers: list[DecoderLayer], hidden: int) -> list[LinearShape]:
    """The Linear shapes of decoders with separate q/k/v/o projections and a gated MLP (Llama's and
    Gemma 3's layout: `model.layers.N.self_attn.*_proj`, `model.layers.N.mlp.*_proj`)."""
    out = []
    for layer in layers:
        p = f"model.layers.{layer.index}."
        q_width, kv_width = layer.heads * layer.head_dim, layer.kv_heads * layer.head_dim
        out += [LinearShape(p + "self_attn.q_proj", hidden, q_width),
                LinearShape(p + "self_attn.k_proj", hidden, kv_width),
                LinearShape(p + "self_attn.v_proj", hidden, kv_width),
                LinearShape(p + "self_attn.o_proj", q_width, hidden),
                LinearShape(p + "mlp.gate_proj", hidden, layer.intermediate),
                LinearShape(p + "mlp.up_proj", hidden, layer.intermediate),
                LinearShape(p + "mlp.down_proj", layer.intermediate, hidden)]
    return out


def text_config(config: dict) -> dict:
    return config.get("text_config") or config


class ModelFamily(ABC):
    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]  # config.json "architectures" this module models
    model_types: ClassVar[tuple[str, ...]]  # config "model_type" values, for configs without architectures
    modules: ClassVar[ModuleNames]
    takes_images: ClassVar[bool]
    # Why the pre-serve screen (search/compress/screen.py) cannot score this family's compressed model
    # in the compression worker by teacher forcing, or None where it can (a transformers text path
    # whose logits were checked against the served model's).
    screen_unsupported: ClassVar[str | None] = "no teacher-forcing path in the compression worker is checked for it"

    # --- floor
    @abstractmethod
    def decoder_layers(self, config: dict) -> list[DecoderLayer]: ...

    @abstractmethod
    def text_linears(self, config: dict) -> list[LinearShape]:
        """Every Linear of the text decoder except lm_head, in the order transformers builds them."""

    @abstractmethod
    def small_params(self, config: dict) -> int:
        """Norm scales, scalars and biases: read every step, counted so byte totals are exact."""

    # --- recipes and compression
    def stock_widths(self, config: dict) -> list[int]:
        """Each decoder layer's FFN width as transformers and vLLM build it."""
        return [layer.intermediate for layer in self.decoder_layers(config)]

    def calibration_pipeline(self, config: dict) -> str | None:
        """llmcompressor pipeline for calibrated recipes; None lets llmcompressor choose."""
        return None

    @abstractmethod
    def load_for_compression(self, path: Path, **kwargs: Any):
        """The transformers model llmcompressor compresses (compression environment only)."""

    def complete_checkpoint(self, ckpt: Path) -> list[str]:
        """Fix-ups a saved checkpoint needs before vLLM loads it; the tensors added."""
        return []

    # --- feasibility
    def check_serving(self, config: TrialConfig, platform: Platform) -> None:
        """Raise Infeasible when this family cannot serve ``config`` on ``platform``."""


class UnknownModelFamily(SearchError, ValueError):
    """A checkpoint whose architecture no module of search/models describes."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(
            f"model architecture {name!r} is not modelled (known: {', '.join(known)}): the floor's FLOPs and "
            "bytes, the module names that recipes quantize or keep in bf16, and the checkpoint fix-ups for "
            "vLLM are unknown for it; add a module for its family under search/models/")
        self.name = name
