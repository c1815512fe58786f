"""Gemma 4 (Gemma4ForConditionalGeneration, and its bare text decoder): the family of the toy model
and of google/gemma-4-E4B-it.

Mirrors transformers' Gemma 4 modelling code (models/gemma4):

- full-attention layers use ``global_head_dim`` (or ``per_layer_config`` overrides, as a saved
  config spells it), sliding layers ``head_dim``;
- the last ``num_kv_shared_layers`` layers have no k/v projections and no KV cache of their own:
  they attend over the cache of the last earlier layer of the same type;
- every layer has a per-layer-input gate and projection (``hidden_size_per_layer_input``), fed by
  ``per_layer_model_projection`` and the packed ``embed_tokens_per_layer`` table;
- ``intermediate_size`` may be a per-layer list; ``use_double_wide_mlp`` doubles KV-shared layers' MLP;
  a structurally pruned checkpoint's ``intermediate_sizes`` gives every layer's FFN width, and a
  layer narrower than stock has a down_proj bias (search/compress/structured.py prunes,
  search/models/gemma4_pruned.py loads).

MoE blocks are not modelled. The toy builder is ``search.toy_model``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.config import Infeasible
from search.models._base import DecoderLayer, LinearShape, ModelFamily, ModuleNames, text_config

if TYPE_CHECKING:
    from search.config import TrialConfig
    from search.platform import Platform

# transformers' default for full-attention layers when a config names neither global_head_dim nor
# per_layer_config (Gemma4TextConfig.__post_init__).
DEFAULT_GLOBAL_HEAD_DIM = 512

_LAYER = r"re:.*language_model\.layers\.\d+\."
# llmcompressor has no Gemma 4 mappings. Gemma 4 feeds the MLP from pre_feedforward_layernorm (as
# Gemma 2/3 do); the q/k-normed attention inputs are left unsmoothed, as llmcompressor does for Gemma 3.
MODULES = ModuleNames(
    decoder_layer=r"re:.*language_model\.layers\.\d+$",
    attention=_LAYER + r"self_attn\.(q|k|v|o)_proj$",
    qkv=_LAYER + r"self_attn\.(q|k|v)_proj$",
    mlp=_LAYER + r"mlp\.(gate|up|down)_proj$",
    always_bf16=("lm_head", "re:.*vision_tower.*", "re:.*embed_vision.*", "re:.*audio_tower.*",
                 "re:.*embed_audio.*", "re:.*embed_tokens.*"),
    per_layer_inputs=(_LAYER + r"per_layer_(input_gate|projection)$", r"re:.*per_layer_model_projection$"),
    awq_mappings=(
        {"smooth_layer": _LAYER + r"pre_feedforward_layernorm$",
         "balance_layers": [_LAYER + r"mlp\.gate_proj$", _LAYER + r"mlp\.up_proj$"]},
        {"smooth_layer": _LAYER + r"mlp\.up_proj$", "balance_layers": [_LAYER + r"mlp\.down_proj$"]},
    ),
    smoothquant_mappings=([[_LAYER + r"mlp\.gate_proj$", _LAYER + r"mlp\.up_proj$"],
                           _LAYER + r"pre_feedforward_layernorm$"],),
)


class Gemma4(ModelFamily):
    name = "gemma4"
    architectures = ("Gemma4ForConditionalGeneration", "Gemma4ForCausalLM")
    model_types = ("gemma4", "gemma4_text")
    modules = MODULES
    takes_images = True
    screen_unsupported = ("its compressed model is not scored in the compression worker (image prompts, per-layer "
                          "inputs and KV sharing are not checked against vLLM there); the served screen judges it")

    def decoder_layers(self, config: dict) -> list[DecoderLayer]:
        tc = text_config(config)
        if tc.get("enable_moe_block"):
            raise NotImplementedError("MoE Gemma 4 text decoders are not modelled")
        n = tc["num_hidden_layers"]
        types = tc.get("layer_types") or [
            "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)
        ]
        overrides = {int(k): v for k, v in (tc.get("per_layer_config") or {}).items()}
        if not overrides:  # an unsaved (hub-style) config: derive what __post_init__ would
            full = {"head_dim": tc.get("global_head_dim", DEFAULT_GLOBAL_HEAD_DIM)}
            if tc.get("attention_k_eq_v") and tc.get("num_global_key_value_heads") is not None:
                full["num_key_value_heads"] = tc["num_global_key_value_heads"]
            overrides = {i: full for i, t in enumerate(types) if t == "full_attention"}
        first_shared = n - (tc.get("num_kv_shared_layers") or 0)
        inter = tc["intermediate_size"]
        pruned = tc.get("intermediate_sizes")
        layers = []
        for i, layer_type in enumerate(types):
            sliding = layer_type == "sliding_attention"
            shared = i >= first_shared
            stock = inter[i] if isinstance(inter, list) else inter
            if tc.get("use_double_wide_mlp") and shared and first_shared > 0:
                stock *= 2
            width = pruned[i] if pruned else stock
            layers.append(DecoderLayer(
                index=i,
                sliding=sliding,
                heads=tc["num_attention_heads"],
                kv_heads=overrides.get(i, {}).get("num_key_value_heads", tc["num_key_value_heads"]),
                head_dim=overrides.get(i, {}).get("head_dim", tc["head_dim"]),
                intermediate=width,
                kv_shared=shared,
                v_proj=not (tc.get("attention_k_eq_v") and not sliding),
                down_proj_bias=width < stock,
            ))
        return layers

    def text_linears(self, config: dict) -> list[LinearShape]:
        """Every Linear of the text decoder except lm_head, in the order transformers builds them."""
        tc = text_config(config)
        hidden, ple = tc["hidden_size"], tc.get("hidden_size_per_layer_input") or 0
        prefix = "model.language_model." if "text_config" in config else "model."
        out = []
        for layer in self.decoder_layers(config):
            p = f"{prefix}layers.{layer.index}."
            q_width, kv_width = layer.heads * layer.head_dim, layer.kv_heads * layer.head_dim
            out.append(LinearShape(p + "self_attn.q_proj", hidden, q_width))
            if not layer.kv_shared:
                out.append(LinearShape(p + "self_attn.k_proj", hidden, kv_width))
                if layer.v_proj:
                    out.append(LinearShape(p + "self_attn.v_proj", hidden, kv_width))
            out.append(LinearShape(p + "self_attn.o_proj", q_width, hidden))
            out.append(LinearShape(p + "mlp.gate_proj", hidden, layer.intermediate))
            out.append(LinearShape(p + "mlp.up_proj", hidden, layer.intermediate))
            out.append(LinearShape(p + "mlp.down_proj", layer.intermediate, hidden))
            if ple:
                out.append(LinearShape(p + "per_layer_input_gate", hidden, ple))
                out.append(LinearShape(p + "per_layer_projection", ple, hidden))
        if ple:
            out.append(LinearShape(prefix + "per_layer_model_projection", hidden, tc["num_hidden_layers"] * ple))
        return out

    def small_params(self, config: dict) -> int:
        """RMSNorm scales (v_norm has none), each layer's layer_scalar and pruned layers' down_proj
        biases: read every step, tiny, but counted so that byte totals are exact."""
        tc = text_config(config)
        hidden, ple = tc["hidden_size"], tc.get("hidden_size_per_layer_input") or 0
        total = hidden + ple  # final norm, per_layer_projection_norm
        for layer in self.decoder_layers(config):
            total += 4 * hidden + layer.head_dim + 1  # input/post-attention/pre-/post-feedforward norms, q_norm, scalar
            total += 0 if layer.kv_shared else layer.head_dim  # k_norm
            total += hidden if ple else 0  # post_per_layer_input_norm
            total += hidden if layer.down_proj_bias else 0
        return total

    def stock_widths(self, config: dict) -> list[int]:
        """Stock FFN widths (double-wide KV-shared layers included), whatever a pruned checkpoint says."""
        tc = text_config(config)
        n = tc["num_hidden_layers"]
        first_shared = n - (tc.get("num_kv_shared_layers") or 0)
        double = tc.get("use_double_wide_mlp", False)
        return [tc["intermediate_size"] * (2 if double and i >= first_shared > 0 else 1) for i in range(n)]

    def calibration_pipeline(self, config: dict) -> str | None:
        """llmcompressor's sequential pipeline fails on KV-shared layers (field notes: KeyError
        'sliding_attention'); the basic one works."""
        return "basic" if text_config(config).get("num_kv_shared_layers", 0) > 0 else None

    def load_for_compression(self, path: Path, **kwargs: Any):
        from search.models.gemma4_pruned import load_pretrained
        return load_pretrained(path, **kwargs)

    def complete_checkpoint(self, ckpt: Path) -> list[str]:
        # vLLM 0.26 refuses Gemma 4 checkpoints without the KV-shared layers' k_norm (GPU machines run it).
        return complete_kv_shared(ckpt)

    def check_serving(self, config: TrialConfig, platform: Platform) -> None:
        if config.compress.prune.active and config.compress.prune.structured and not platform.pruned_ffn_plugin:
            raise Infeasible("structurally pruned checkpoints need the vllm-gemma4-pruned plugin in the serving "
                             "environment (./setup.sh installs plugins/gemma4_pruned)")


# ---------------------------------------------------------------------------------------------
# KV-shared layers in the layout vLLM loads, for checkpoints transformers 5.17 saves. Runs where
# the checkpoint is written (compression environment, toy generator, GPU bench); needs torch and
# safetensors only.


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
