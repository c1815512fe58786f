"""Loading structurally pruned Gemma 4 checkpoints in transformers: decoder MLPs built at the
per-layer FFN widths a pruned checkpoint's text config lists as ``intermediate_sizes``.

Gemma4TextConfig's own ``intermediate_size`` must stay an int (its strict dataclass rejects a
list), so it keeps the stock width and transformers needs ``per_layer_ffn_widths`` to build the
narrower layers (vLLM needs plugins/gemma4_pruned). The pruning itself is
search/compress/structured.py's. Runs in the compression environment (transformers 5.17, torch).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from torch import nn
from transformers.models.gemma4 import modeling_gemma4

WIDTHS_FIELD = "intermediate_sizes"


def narrow_linears(mlp: nn.Module, width: int) -> None:
    """Give ``mlp`` empty gate/up/down Linears ``width`` channels wide, down_proj with a bias."""
    like = mlp.down_proj.weight
    hidden = like.shape[0]
    kwargs = {"dtype": like.dtype, "device": like.device}
    mlp.gate_proj = nn.Linear(hidden, width, bias=False, **kwargs)
    mlp.up_proj = nn.Linear(hidden, width, bias=False, **kwargs)
    mlp.down_proj = nn.Linear(width, hidden, bias=True, **kwargs)
    mlp.intermediate_size = width


class PerLayerWidthMLP(modeling_gemma4.Gemma4TextMLP):
    """Gemma4TextMLP built at the width its config's ``intermediate_sizes`` gives this layer."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        widths = getattr(config, WIDTHS_FIELD, None)
        if widths and widths[layer_idx] < self.intermediate_size:
            narrow_linears(self, widths[layer_idx])


@contextlib.contextmanager
def per_layer_ffn_widths() -> Iterator[None]:
    """While open, transformers builds Gemma 4 decoder MLPs at the widths of a pruned checkpoint's
    config; a config without ``intermediate_sizes`` builds exactly as before."""
    stock = modeling_gemma4.Gemma4TextMLP
    modeling_gemma4.Gemma4TextMLP = PerLayerWidthMLP  # the decoder layer looks the class up here
    try:
        yield
    finally:
        modeling_gemma4.Gemma4TextMLP = stock


def load_pretrained(path: str | Path, model_class=None, **kwargs) -> nn.Module:
    """``from_pretrained`` for pruned and stock Gemma 4 checkpoints alike (image-text-to-text class
    unless ``model_class`` says otherwise)."""
    from transformers import AutoModelForImageTextToText

    with per_layer_ffn_widths():
        return (model_class or AutoModelForImageTextToText).from_pretrained(path, **kwargs)
