"""Structured FFN pruning of Gemma 4 (FLAP); search/models/gemma4_pruned.py loads its checkpoints.

A pruned decoder layer keeps some of its FFN channels: the rows of gate_proj and up_proj and the
columns of down_proj that belong to them. Which ones: FLAP's fluctuation metric, the variance of a
channel's activation (down_proj's input) over calibration tokens times the squared norm of the
down_proj column it feeds. The removed channels' mean contribution, W_down[:, removed] @
mean(h[removed]), becomes a down_proj bias, so a channel that barely fluctuates is removed at
almost no cost. Widths are per layer (``recipe.structured_widths``); the checkpoint's text
config lists them as ``intermediate_sizes``; search/models/gemma4_pruned.py loads such a checkpoint
in transformers (vLLM needs plugins/gemma4_pruned).

Runs in the compression environment (transformers 5.17, torch).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

# The checkpoint's layout (the widths field, narrowed linears) is the Gemma 4 family's, which loads it.
from search.models.gemma4_pruned import WIDTHS_FIELD, narrow_linears


class ChannelMoments:
    """Running mean and variance of each channel of a layer's FFN activation (float64 sums)."""

    def __init__(self, width: int):
        self.count = 0
        self.total = torch.zeros(width, dtype=torch.float64)
        self.squares = torch.zeros(width, dtype=torch.float64)

    def add(self, activation: torch.Tensor) -> None:
        rows = activation.reshape(-1, activation.shape[-1]).to(torch.float64).cpu()
        self.count += rows.shape[0]
        self.total += rows.sum(dim=0)
        self.squares += rows.square().sum(dim=0)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        # Unbiased, and never negative from rounding.
        return ((self.squares - self.count * self.mean.square()) / max(1, self.count - 1)).clamp_min(0)


def fluctuation_scores(moments: ChannelMoments, down_weight: torch.Tensor) -> torch.Tensor:
    """FLAP's importance of each channel: how much down_proj's output moves with it."""
    return moments.variance * down_weight.to(torch.float64).square().sum(dim=0).cpu()


def channels_to_keep(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of the ``width`` highest-scoring channels, in their original order."""
    return torch.topk(scores, width).indices.sort().values


@torch.no_grad()
def shrink_mlp(mlp: nn.Module, keep: torch.Tensor, mean_activation: torch.Tensor) -> None:
    """Keep channels ``keep`` of a Gemma 4 MLP; the others' mean contribution becomes down_proj's bias."""
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    removed = torch.ones(down.shape[1], dtype=torch.bool)
    removed[keep] = False
    compensation = down.to(torch.float64)[:, removed.to(down.device)] @ mean_activation[removed].to(down.device)
    narrow_linears(mlp, len(keep))
    keep = keep.to(down.device)
    mlp.gate_proj.weight.copy_(gate[keep])
    mlp.up_proj.weight.copy_(up[keep])
    mlp.down_proj.weight.copy_(down[:, keep])
    mlp.down_proj.bias.copy_(compensation)


@torch.no_grad()
def ffn_moments(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[ChannelMoments]:
    """Per decoder layer, the moments of its FFN activation over the calibration token ids."""
    layers = model.get_decoder().layers
    moments = [ChannelMoments(layer.mlp.down_proj.in_features) for layer in layers]
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda _, args, m=m: m.add(args[0]))
             for layer, m in zip(layers, moments)]
    try:
        for input_ids in batches:
            model(input_ids=input_ids.to(model.device))
    finally:
        for hook in hooks:
            hook.remove()
    return moments


def flap_prune(model: nn.Module, batches: Iterable[torch.Tensor], widths: list[int]) -> dict[str, int]:
    """Prune every decoder layer's FFN to ``widths`` in place; returns channel counts before and after."""
    layers = model.get_decoder().layers
    if len(widths) != len(layers):
        raise ValueError(f"{len(widths)} FFN widths for {len(layers)} decoder layers")
    moments = ffn_moments(model, batches)
    before = sum(layer.mlp.down_proj.in_features for layer in layers)
    for layer, layer_moments, width in zip(layers, moments, widths):
        if width < layer.mlp.down_proj.in_features:
            scores = fluctuation_scores(layer_moments, layer.mlp.down_proj.weight)
            shrink_mlp(layer.mlp, channels_to_keep(scores, width), layer_moments.mean)
    setattr(model.config.get_text_config(), WIDTHS_FIELD, list(widths))
    return {"ffn_channels_before": before, "ffn_channels_after": sum(widths)}
