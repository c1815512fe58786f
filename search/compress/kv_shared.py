"""Gemma 4's KV-shared layers in the layout vLLM loads, for checkpoints transformers 5.17 saves.

Runs where the checkpoint is written (compression environment, toy generator, GPU bench); needs
torch and safetensors only.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path


def complete_kv_shared(ckpt: Path) -> list[str]:
    """Write what vLLM 0.26 expects of Gemma 4's KV-shared layers and transformers 5.17 leaves out.

    transformers 5.17 builds the last num_kv_shared_layers decoder layers without k_proj, v_proj and
    k_norm (they reuse an earlier layer's K/V), so save_pretrained writes none. vLLM 0.26 builds
    those layers like the others (a fused qkv_proj and a k_norm it never uses at run time) and
    refuses a checkpoint without k_norm ("weights not initialized from checkpoint"); qkv_proj it
    fills from q_proj alone and leaves the K/V part as uninitialised memory (for per-tensor FP8
    that makes the merged scale garbage). Added here, in a separate file listed in the index:
    k_norm = ones, and k_proj/v_proj in the checkpoint's own format, made from the same layer's
    q_proj tensors (its first rows: the K/V output width; shapes, scales and zero points alike).
    The K/V results of these layers are discarded by the model, so their values do not matter;
    their cost is the same as vLLM's for any Gemma 4 checkpoint.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = json.loads((ckpt / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    n, shared = text["num_hidden_layers"], text.get("num_kv_shared_layers", 0)
    if not shared:
        return []
    index_path = ckpt / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        where = dict(index["weight_map"])
    else:
        index, where = None, {}
        for f in sorted(ckpt.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                where.update({k: f.name for k in h.keys()})
    prefix = next((k.split("layers.")[0] for k in where if ".layers.0.self_attn.q_proj" in k
                   and "language_model" in k), "model.language_model.")
    added: dict[str, torch.Tensor] = {}
    handles: dict[str, object] = {}
    with contextlib.ExitStack() as stack:
        def tensor(key: str):
            fname = where[key]
            if fname not in handles:
                handles[fname] = stack.enter_context(safe_open(ckpt / fname, "pt"))
            return handles[fname].get_tensor(key)

        for i in range(n - shared, n):
            attn = f"{prefix}layers.{i}.self_attn."
            # The layer's own head size, from its q_norm: transformers 5.17 saves the full-attention
            # layers' global_head_dim (512) only as a per-layer override, not as a config key.
            hd = tensor(attn + "q_norm.weight").shape[0]
            if attn + "k_norm.weight" not in where:
                added[attn + "k_norm.weight"] = torch.ones(hd, dtype=torch.bfloat16)
            q_keys = [k for k in where if k.startswith(attn + "q_proj.")]
            q_out = text["num_attention_heads"] * hd
            kv_out = text["num_key_value_heads"] * hd
            for qk in q_keys:
                suffix = qk[len(attn + "q_proj."):]
                t = tensor(qk)
                if suffix == "weight_shape":
                    new = torch.tensor([kv_out, int(t[1])], dtype=t.dtype)
                elif t.dim() >= 1 and t.shape[0] == q_out:
                    new = t[:kv_out].clone()
                else:
                    new = t.clone()
                for proj in ("k_proj", "v_proj"):
                    key = f"{attn}{proj}.{suffix}"
                    if key not in where:
                        added[key] = new.clone()
    _ignore_like_q_proj(ckpt, cfg, prefix, range(n - shared, n))
    if not added:
        return []
    fname = "model-kv-shared-completion.safetensors"
    save_file(added, ckpt / fname, metadata={"format": "pt"})
    if index is not None:
        index["weight_map"].update({k: fname for k in added})
        index_path.write_text(json.dumps(index, indent=2))
    return sorted(added)


def _ignore_like_q_proj(ckpt: Path, cfg: dict, prefix: str, layers: range) -> None:
    """compressed-tensors lists the modules it left unquantized by name, and the KV-shared layers had
    no k_proj/v_proj to list: where such a layer's q_proj is ignored, vLLM would take the added
    k_proj/v_proj as quantized ("different quantization schemes" in the fused qkv_proj)."""
    quant = cfg.get("quantization_config") or {}
    ignore = quant.get("ignore")
    if not ignore:
        return
    listed = set(ignore)
    for i in layers:
        attn = f"{prefix}layers.{i}.self_attn."
        if attn + "q_proj" in listed:
            ignore += [attn + p for p in ("k_proj", "v_proj") if attn + p not in listed]
    if len(ignore) > len(listed):
        (ckpt / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
