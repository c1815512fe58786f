"""A full-size, random-weight twin of Gemma 4 E4B (`python -m search make-twin`), for GPU runs
without downloading weights.

The text decoder has E4B's public config values (42 layers, 2560 wide, 10240 MLP, 8 heads / 2 KV
heads, head_dim 256 / global 512, 18 KV-shared layers, per-layer inputs 256 wide, vocabulary
262144, 5 sliding + 1 full attention, window 512, softcap 30); the vision tower is transformers
5.17's `Gemma4VisionConfig` default (768 wide, 16 layers, ~150M parameters; 280 soft tokens an
image); no audio tower. The tokenizer is the toy's (search/toy_model.py: Gemma 4's special tokens
and chat template) grown to the full vocabulary with never-produced filler tokens. The weights are
drawn from a fixed seed in bf16 directly on the device (no CPU copy).

Energy and speed of a random-weight model are representative when the output length is fixed;
its quality is not. `--toy` builds the same structure at toy size (a CPU rehearsal).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

SEED = 0

LAYER_TYPES = (["sliding_attention"] * 5 + ["full_attention"]) * 7
FULL_TEXT = dict(
    vocab_size=262144, vocab_size_per_layer_input=262144, hidden_size=2560, intermediate_size=10240,
    num_hidden_layers=42, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
    global_head_dim=512, num_kv_shared_layers=18, hidden_size_per_layer_input=256,
    layer_types=LAYER_TYPES, sliding_window=512, final_logit_softcapping=30.0,
    max_position_embeddings=131072, tie_word_embeddings=True,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "rope_theta": 1000000.0,
                           "partial_rotary_factor": 0.25},
    },
    pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.02,
)
SOFT_TOKENS = 280  # E4B's default image budget
# transformers 5.17's Gemma4VisionConfig defaults are E4B's encoder (~150M parameters);
# vLLM sizes image placeholders from default_output_length, which must equal the processor's budget.
FULL_VISION = dict(default_output_length=SOFT_TOKENS)

# The same structure at toy size (--toy: a rehearsal on a CPU).
TOY_TEXT = dict(FULL_TEXT, vocab_size=4096, vocab_size_per_layer_input=4096, hidden_size=128,
                intermediate_size=512, num_hidden_layers=12, num_attention_heads=2,
                num_key_value_heads=1, head_dim=64, global_head_dim=128, num_kv_shared_layers=4,
                hidden_size_per_layer_input=128,
                layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 2,
                sliding_window=128, max_position_embeddings=4096)
TOY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=32, position_embedding_size=1024,
                  default_output_length=SOFT_TOKENS)

DONE = "BUILD_OK"  # written last: the folder is a complete twin
STATS = "build_stats.json"


def build_tokenizer(vocab_size: int):
    """The toy's BPE tokenizer (Gemma 4's special tokens and chat template), grown to vocab_size
    entries with never-produced filler tokens, so ids span the whole embedding table."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from search.toy_model import CHAT_TEMPLATE, NAMED_TOKENS, build_tokenizer as toy_tokenizer

    small = toy_tokenizer(Path("."))
    state = json.loads(small.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    n = small.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    used = set(vocab.values()) | {t["id"] for t in state.get("added_tokens", [])}
    for i in range(n, vocab_size):
        if i not in used:
            vocab[f"<fill{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(state))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", mask_token="<mask>", extra_special_tokens=NAMED_TOKENS,
        model_max_length=131072,
    )
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


def twin_config(tokenizer, toy: bool = False):
    from transformers import Gemma4Config

    from search.toy_model import NAMED_TOKENS

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in NAMED_TOKENS.items()}
    return Gemma4Config(
        text_config=TOY_TEXT if toy else FULL_TEXT, vision_config=TOY_VISION if toy else FULL_VISION,
        audio_config=None, boi_token_id=ids["boi_token"], eoi_token_id=ids["eoi_token"],
        image_token_id=ids["image_token"], video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
        boa_token_id=ids["boa_token"], eoa_token_index=ids["eoa_token"], audio_token_id=ids["audio_token"],
        tie_word_embeddings=True, initializer_range=0.02,
    )


def build_model(config, device: str):
    """The seeded random twin in bf16, created and initialised on `device` (no CPU copy)."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Gemma4ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.generation_config.do_sample = False
    return model


def param_counts(model) -> dict[str, float]:
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for n, p in model.named_parameters() if "vision" in n)
    per_layer_emb = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens_per_layer" in n)
    return {"params_total": total, "params_vision": vision, "params_embed_per_layer": per_layer_emb}


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def build(out: str | Path, device: str | None = None, toy: bool = False) -> dict:
    """Write the twin into `out` (weights in 4 GB shards, tokenizer, processor, the KV-shared layers'
    completion vLLM loads) and return its build record with its timings (`out/build_stats.json` holds
    the record without them). A folder that already holds a complete twin is kept as it is."""
    out = Path(out)
    if (out / DONE).exists():
        return json.loads((out / STATS).read_text())
    import torch
    import transformers

    from search.models.gemma4 import complete_kv_shared
    from search.toy_model import save_processor

    shutil.rmtree(out, ignore_errors=True)
    device = device or default_device()
    t0 = time.perf_counter()
    tokenizer = build_tokenizer((TOY_TEXT if toy else FULL_TEXT)["vocab_size"])
    config = twin_config(tokenizer, toy)
    t1 = time.perf_counter()
    model = build_model(config, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    counts = param_counts(model)
    # Sanity: one short forward pass gives finite logits.
    with torch.no_grad():
        ids = torch.tensor([tokenizer("<|turn>user\nWhat is the total?<turn|>\n<|turn>model\n")["input_ids"]],
                           device=device)
        finite = bool(torch.isfinite(model(input_ids=ids).logits).all())
    t3 = time.perf_counter()
    model.save_pretrained(out, max_shard_size="4GB")
    tokenizer.save_pretrained(out)
    save_processor(out, tokenizer, SOFT_TOKENS)
    added = complete_kv_shared(out)
    t4 = time.perf_counter()
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    # What the folder is, without the build's timings: the study's model fingerprint hashes every file,
    # and a rebuild on the next machine must fingerprint the same for its study to resume.
    record = {**counts, "logits_finite": finite, "size_bytes": size, "device": device,
              "kv_shared_tensors_added": len(added), "torch": torch.__version__,
              "transformers": transformers.__version__, "toy": toy}
    (out / STATS).write_text(json.dumps(record, indent=2))
    (out / DONE).write_text("ok\n")
    return {**record, "tokenizer_s": t1 - t0, "build_s": t2 - t1, "forward_s": t3 - t2, "save_s": t4 - t3}
