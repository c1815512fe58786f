"""vLLM's Gemma 4 model classes, building each decoder layer's MLP at the width its config gives."""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import vllm
from vllm.model_executor.layers.linear import RowParallelLinear
from vllm.model_executor.models import gemma4
from vllm.model_executor.models.gemma4 import Gemma4ForCausalLM
from vllm.model_executor.models.gemma4_mm import Gemma4ForConditionalGeneration

from vllm_gemma4_pruned import SUPPORTED_VLLM

WIDTHS_FIELD = "intermediate_sizes"
_LAYER = re.compile(r"layers\.(\d+)\.mlp$")


def ffn_widths(hf_config) -> list[int] | None:
    """Each decoder layer's FFN width from a pruned checkpoint's text config, None for a stock one."""
    text_config = getattr(hf_config, "text_config", hf_config)
    return getattr(text_config, WIDTHS_FIELD, None) or None


def check_version() -> None:
    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        supported = ", ".join(v + "x" for v in SUPPORTED_VLLM)
        raise RuntimeError(f"gemma4_pruned supports vLLM {supported}, not {vllm.__version__}: "
                           f"this checkpoint's per-layer FFN widths ({WIDTHS_FIELD}) cannot be built")


def _mlp_class(widths: list[int]) -> type[gemma4.Gemma4MLP]:
    class PerLayerWidthMLP(gemma4.Gemma4MLP):
        """Gemma4MLP at this layer's pruned width; narrower than stock means a down_proj bias."""

        def __init__(self, hidden_size, intermediate_size, hidden_activation, quant_config=None, prefix=""):
            width = widths[int(_LAYER.search(prefix).group(1))]
            super().__init__(hidden_size, width, hidden_activation, quant_config, prefix)
            if width < intermediate_size:  # intermediate_size: the stock width vLLM asked for
                self.down_proj = RowParallelLinear(width, hidden_size, bias=True, quant_config=quant_config,
                                                   prefix=f"{prefix}.down_proj")

    return PerLayerWidthMLP


@contextlib.contextmanager
def per_layer_ffn_widths(widths: list[int]) -> Iterator[None]:
    """While open, vLLM's Gemma 4 decoder layers build their MLPs at ``widths``."""
    stock = gemma4.Gemma4MLP
    gemma4.Gemma4MLP = _mlp_class(widths)  # Gemma4DecoderLayer looks the class up in its module
    try:
        yield
    finally:
        gemma4.Gemma4MLP = stock


class _PerLayerWidths:
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        widths = ffn_widths(vllm_config.model_config.hf_config)
        if widths is None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            return
        check_version()
        with per_layer_ffn_widths(widths):
            super().__init__(vllm_config=vllm_config, prefix=prefix)


class PrunedGemma4ForConditionalGeneration(_PerLayerWidths, Gemma4ForConditionalGeneration):
    pass


class PrunedGemma4ForCausalLM(_PerLayerWidths, Gemma4ForCausalLM):
    pass
