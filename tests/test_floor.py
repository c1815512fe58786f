import json

import pytest
import torch
from safetensors import safe_open
from torch.utils.flop_counter import FlopCounterMode
from transformers import Gemma4ForCausalLM, Gemma4TextConfig, Gemma4VisionConfig
from transformers.models.gemma4.modeling_gemma4 import Gemma4MultimodalEmbedder, Gemma4VisionModel

from search.floor import (
    attention_flops,
    compute_format,
    decode_step_bytes,
    floor_ratio,
    floors,
    flops_per_token,
    gpu_spec,
    kv_cache_bytes,
    linear_flops_per_token,
    prefill_attention_flops,
    vision_flops_per_image,
    weight_bytes,
    workload_flops,
)

# The toy keeps E4B's structure at tiny sizes. Its layer types are 3 sliding, full, sliding, full
# rather than 5 sliding + 1 full: with 2 KV-shared layers, each shared layer's type must also occur
# among the 4 layers that own a cache (transformers raises KeyError: 'full_attention' otherwise).
TOY = dict(
    vocab_size=512, vocab_size_per_layer_input=512, hidden_size=64, intermediate_size=128,
    num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=32,
    num_kv_shared_layers=2, hidden_size_per_layer_input=16, sliding_window=8, tie_word_embeddings=True,
    layer_types=["sliding_attention"] * 3 + ["full_attention", "sliding_attention", "full_attention"],
)


def toy_model(**overrides) -> tuple[Gemma4ForCausalLM, dict]:
    config = Gemma4TextConfig(**{**TOY, **overrides})
    torch.manual_seed(0)
    return Gemma4ForCausalLM(config).eval(), config.to_dict()


def count_flops(fn) -> dict[str, dict[str, int]]:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return {module: {str(op): n for op, n in ops.items()} for module, ops in counter.get_flop_counts().items()}


def test_linear_flops_match_flop_counter():
    # Tolerance: none. FlopCounterMode counts 2*m*n*k for every aten.mm, which is exactly what
    # each nn.Linear (and nothing else in the text decoder) lowers to; elementwise work (norms,
    # activations, RoPE, softcapping) is absent from both counts.
    model, config = toy_model(sliding_window=32, attn_implementation="eager")
    seq = 8
    counts = count_flops(lambda: model(torch.randint(0, 512, (1, seq))))  # logits for all positions
    linear = linear_flops_per_token(config)
    assert counts["Global"]["aten.mm"] == seq * (linear["decoder"] + linear["lm_head"])
    assert linear["decoder"] == 2 * 208_896  # the Linear parameter count worked out in test_floors_hand_checked


def test_attention_flops_match_eager_attention():
    # Eager attention multiplies the full seq x seq score matrix and masks afterwards, so it spends
    # 4*h*d*seq^2 per layer where causal attention needs 4*h*d*seq*(seq+1)/2: with the window longer
    # than the prompt the two differ by exactly 2*seq/(seq+1). Only the self_attn modules' bmm are
    # attention (the rotary embedding's small bmm is elsewhere).
    model, config = toy_model(sliding_window=32, attn_implementation="eager")
    seq = 8
    counts = count_flops(lambda: model(torch.randint(0, 512, (1, seq))))
    eager = sum(ops.get("aten.bmm", 0) for name, ops in counts.items() if name.endswith("self_attn"))
    assert eager == prefill_attention_flops(config, seq) * 2 * seq // (seq + 1)


def test_weight_bytes_equal_parameter_bytes(tmp_path):
    model, config = toy_model()
    model = model.to(torch.bfloat16)
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # the tied lm_head once
    scalars = sum(b.nbytes for name, b in model.named_buffers() if name.endswith("layer_scalar"))  # saved too
    assert weight_bytes(config)["total"] == params + scalars == 2 * 293_030
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert sum(f.get_tensor(k).nbytes for k in f.keys()) == params + scalars
    # A hub-style config (global_head_dim, no per_layer_config) describes the same model.
    hub_style = {k: v for k, v in config.items() if k != "per_layer_config"} | {"global_head_dim": 32}
    assert weight_bytes(hub_style) == weight_bytes(config)
    assert linear_flops_per_token({"text_config": hub_style}) == linear_flops_per_token(config)


@pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules")
def test_quantized_weight_bytes_equal_llmcompressor_checkpoint(tmp_path):
    pytest.importorskip("llmcompressor")
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model, _ = toy_model()
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    int4_asym = {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 16}}}
    recipes = {
        "w4g16": QuantizationModifier(config_groups=int4_asym, ignore=["lm_head", "re:.*per_layer_model_projection"]),
        "fp8": QuantizationModifier(scheme="FP8_DYNAMIC", ignore=["lm_head", "model.layers.0.mlp.down_proj"]),
    }
    for name, recipe in recipes.items():
        loaded = Gemma4ForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
        oneshot(model=loaded, recipe=recipe)
        loaded.save_pretrained(tmp_path / name, save_compressed=True)
        config = json.loads((tmp_path / name / "config.json").read_text())
        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:
            # weight_shape is checkpoint metadata that no kernel reads
            stored = sum(f.get_tensor(k).nbytes for k in f.keys() if not k.endswith("weight_shape"))
        assert weight_bytes(config, config["quantization_config"])["total"] == stored, name


def test_floors_hand_checked():
    _, config = toy_model()
    # Toy, bf16 (2 bytes). Linear parameters: sliding layers that own KV (0, 1, 2): q 64x32, k and
    # v 64x16, o 32x64, MLP 3x64x128, per-layer gate 64x16 and projection 16x64 = 32,768 each; full
    # layer 3 (head_dim 32): 4,096 + 2,048 + 2,048 + 4,096 + 24,576 + 2,048 = 38,912; KV-shared
    # sliding layer 4 (no k, v): 30,720; KV-shared full layer 5: 34,816; per_layer_model_projection
    # 64x96 = 6,144. Sum 208,896. Norm scales and layer scalars 2,214; embed_tokens 512x64 = 32,768
    # (read whole as the tied lm_head); embed_tokens_per_layer 512x96 = 49,152 (only rows read).
    # A decode step reads (208,896 + 2,214 + 32,768) x 2 = 487,756 bytes of weights, and per
    # sequence: embedding rows (64 + 6x16) x 2 = 320 bytes plus the fp8 KV cache at context 10:
    # layers 0-2 hold min(10, window 8) tokens x K,V x 1 head x 16 = 256 bytes each, layer 3 holds
    # 10 x 2 x 32 = 640 bytes, layers 4-5 none: 1,408. Batch 2: 487,756 + 2 x 1,728 = 491,212.
    assert kv_cache_bytes(config, 1, 10, "fp8") == 1_408
    step_bytes = decode_step_bytes(config, None, batch=2, context_len=10, kv_dtype="fp8")
    assert step_bytes == 491_212
    # FLOPs per sequence: linear 417,792 + lm_head 2x64x512 = 65,536 + attention 4 x 2 heads x
    # (16 x 8 keys on the 4 sliding layers + 32 x 10 keys on the 2 full ones) = 9,216: 492,544.
    assert attention_flops(config, 10) == 9_216
    step_flops = 2 * flops_per_token(config, 10)["decode"]
    assert step_flops == 985_088
    # On an L4 (121 dense bf16 TFLOPS, 300 GB/s, 72 W): compute 985,088 / 121e12 x 72 = 5.8616e-7 J,
    # memory 491,212 / 300e9 x 72 = 1.1789088e-4 J; the floor is the larger, memory.
    l4 = gpu_spec("NVIDIA L4")
    result = floors({"flops": step_flops, "bytes": step_bytes}, l4, "bf16")
    assert result["compute_j"] == pytest.approx(5.8616e-7, rel=1e-4)
    assert result["memory_j"] == pytest.approx(1.1789088e-4, rel=1e-9)
    assert result["floor_j"] == result["memory_j"] and result["fmt"] == "bf16"
    assert floor_ratio(2.5e-3, result["floor_j"]) == pytest.approx(2.5e-3 / 1.1789088e-4)


def test_prefill_attention_caps_sliding_layers():
    _, config = toy_model()  # window 8
    # Prompt of 12: a sliding layer sees 1..8 keys, then 8 keys for 4 more positions: 36 + 32 = 68
    # key-query pairs; a full layer 78. Per pair 4 x heads x head_dim.
    expected = 4 * 2 * (4 * 16 * 68 + 2 * 32 * 78)
    assert prefill_attention_flops(config, 12) == expected
    assert prefill_attention_flops(config, 12) == sum(attention_flops(config, i) for i in range(1, 13))


def test_workload_flops_adds_up():
    _, config = toy_model()
    per = flops_per_token(config, 5)
    lm_head = linear_flops_per_token(config)["lm_head"]
    w = workload_flops(config, prompt_tokens=5, output_tokens=4, requests=3, batch=2, kv_dtype="fp8")
    assert w["prefill_flops"] == pytest.approx(3 * (5 * per["prefill"] + lm_head))
    # Output token 1 comes from the prefill logits; tokens 2-4 are decode passes over 6, 7, 8 tokens.
    assert w["decode_flops"] == 3 * sum(flops_per_token(config, n)["decode"] for n in (6, 7, 8))
    assert w["flops"] == w["prefill_flops"] + w["decode_flops"] and w["vision_flops"] == 0
    # 3 requests in batches of 2: 2 rounds x 3 decode steps, each reading the weights once.
    assert w["decode_steps"] == 6
    weights_once = decode_step_bytes(config, None, 0, 1, "fp8")
    per_sequence = [decode_step_bytes(config, None, 1, n, "fp8") - weights_once for n in (6, 7, 8)]
    assert w["bytes"] == 6 * weights_once + 3 * sum(per_sequence)


def test_vision_flops_match_flop_counter():
    # Exact for the same reason as the text model; the pooler's one-hot averaging bmm and the
    # rotary embedding's mm are not model FLOPs and are taken out of the count.
    vision = Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, patch_size=4, pooling_kernel_size=3, position_embedding_size=64, attn_implementation="eager",
    )
    text = Gemma4TextConfig(**TOY)
    encoder, projection = Gemma4VisionModel(vision).eval(), Gemma4MultimodalEmbedder(vision, text)
    soft_tokens, side = 4, 6  # 36 patches pooled 3x3 into 4 soft tokens
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), -1)
    counts = count_flops(lambda: projection(encoder(torch.rand(1, side * side, 48), grid.reshape(1, -1, 2))[0]))
    counted = counts["Global"]["aten.mm"] + counts["Global"]["aten.bmm"]
    counted -= counts["Gemma4VisionModel.pooler"]["aten.bmm"] + counts["Gemma4VisionModel.encoder.rotary_emb"]["aten.mm"]
    config = {"text_config": text.to_dict(), "vision_config": vision.to_dict()}
    assert vision_flops_per_image(config, soft_tokens) == counted


def test_gpu_spec_lookup_and_user_file(tmp_path, monkeypatch):
    monkeypatch.delenv("SEARCH_GPUS_FILE", raising=False)
    h100 = gpu_spec("NVIDIA H100 80GB HBM3")
    assert (h100.name, h100.tflops["bf16"], h100.mem_bw_gbs, h100.power_w) == ("NVIDIA H100 SXM", 989.5, 3350, 700)
    assert gpu_spec("NVIDIA H100 PCIe").power_w == 350
    assert gpu_spec("NVIDIA A100-SXM4-80GB").mem_bw_gbs == 2039
    assert gpu_spec("NVIDIA H200").mem_bw_gbs == 4800
    assert gpu_spec("NVIDIA L4").source.startswith("NVIDIA L4 Tensor Core GPU Datasheet")
    assert gpu_spec("NVIDIA GeForce RTX 4090") is None
    user = tmp_path / "gpus.yaml"
    user.write_text(
        "gpus:\n"
        "  - name: RTX 4090\n"
        "    match: ['NVIDIA GeForce RTX 4090']\n"
        "    tflops: {bf16: 165.2, fp8: 330.3}\n"
        "    mem_bw_gbs: 1008\n"
        "    power_w: 450\n"
    )
    monkeypatch.setenv("SEARCH_GPUS_FILE", str(user))
    assert gpu_spec("NVIDIA GeForce RTX 4090").power_w == 450
    assert gpu_spec("NVIDIA L4").power_w == 72  # built-ins still there


def test_compute_format_and_fallback():
    w4a16 = {"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int"}}}}
    fp8 = {"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"},
                                   "input_activations": {"num_bits": 8, "type": "float", "dynamic": True}}}}
    assert (compute_format(None), compute_format(w4a16), compute_format(fp8)) == ("bf16", "bf16", "fp8")
    a100 = gpu_spec("NVIDIA A100-SXM4-40GB")
    result = floors({"flops": 312e12, "bytes": 0}, a100, "fp8")  # no FP8 tensor cores: bf16 peak
    assert result["fmt"] == "bf16" and result["compute_j"] == pytest.approx(400.0)


# Gemma 4 E4B's public text config (see the field notes) and its ~150M-parameter vision encoder.
E4B = {
    "text_config": dict(
        hidden_size=2560, num_hidden_layers=42, intermediate_size=10240, num_attention_heads=8,
        num_key_value_heads=2, head_dim=256, global_head_dim=512, num_kv_shared_layers=18,
        hidden_size_per_layer_input=256, vocab_size=262144, vocab_size_per_layer_input=262144,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 7, sliding_window=512,
        tie_word_embeddings=True, dtype="bfloat16",
    ),
    "vision_config": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
        num_key_value_heads=12, head_dim=64, patch_size=16, pooling_kernel_size=3,
    ),
}


def _quant(weights: dict, inputs: dict | None = None) -> dict:
    return {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs}},
            "ignore": ["lm_head", "re:.*vision_tower.*", "re:.*embed_vision.*"]}


def test_e4b_paper_figures():
    # The figures: a decode step reads ~9.3 GB in bf16, ~5.3 GB FP8, ~3.4 GB W4A16 g128,
    # and 3,460 questions of ~500 prompt + 511 output tokens take ~30 PFLOP.
    fp8 = _quant({"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
                 {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True})
    w4a16 = _quant({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True})
    assert decode_step_bytes(E4B, None, 1, 1) / 1e9 == pytest.approx(9.3, abs=0.05)
    assert decode_step_bytes(E4B, fp8, 1, 1) / 1e9 == pytest.approx(5.3, abs=0.05)
    assert decode_step_bytes(E4B, w4a16, 1, 1) / 1e9 == pytest.approx(3.4, abs=0.05)
    assert workload_flops(E4B, 500, 511, requests=3460)["flops"] / 1e15 == pytest.approx(30, rel=0.05)
    assert vision_flops_per_image(E4B) / 1e12 == pytest.approx(1.08, abs=0.01)  # 280 soft tokens
