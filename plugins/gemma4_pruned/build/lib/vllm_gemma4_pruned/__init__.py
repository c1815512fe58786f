"""vLLM general plugin: serves Gemma 4 checkpoints whose decoder layers have FFNs of different widths.

A structurally pruned checkpoint (the project's `compress.prune.method: flap`) lists every decoder
layer's FFN width in its text config as `intermediate_sizes`, and has a down_proj bias in each
layer narrower than stock. vLLM builds every layer at `intermediate_size` without a bias, so this
plugin registers subclasses of vLLM's own Gemma 4 model classes under the same architecture names;
they build each layer's MLP at its width. A checkpoint without `intermediate_sizes` is built by the
stock code path, unchanged.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# vLLM releases whose Gemma 4 MLP constructor and weight loading this plugin was written against.
SUPPORTED_VLLM = ("0.26.", "0.32.")

# architecture -> (the stock class the override subclasses, the override)
_OVERRIDES = {
    "Gemma4ForConditionalGeneration": (("vllm.model_executor.models.gemma4_mm", "Gemma4ForConditionalGeneration"),
                                       "vllm_gemma4_pruned.model:PrunedGemma4ForConditionalGeneration"),
    "Gemma4ForCausalLM": (("vllm.model_executor.models.gemma4", "Gemma4ForCausalLM"),
                          "vllm_gemma4_pruned.model:PrunedGemma4ForCausalLM"),
}


def register() -> None:
    """Entry point of the `vllm.general_plugins` group; vLLM calls it in every process it starts."""
    from vllm import ModelRegistry

    for arch, (stock, override) in _OVERRIDES.items():
        entry = ModelRegistry.models.get(arch)
        # Only where vLLM still registers the class we subclass: elsewhere stay out of the way.
        if (getattr(entry, "module_name", None), getattr(entry, "class_name", None)) != stock:
            logger.warning("gemma4_pruned: vLLM registers %s differently than expected; not overriding it", arch)
            continue
        ModelRegistry.register_model(arch, override)
