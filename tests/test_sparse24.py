"""compress.prune.mask_structure '2:4' (issue 27 item 3).

vLLM removed its 2:4 sparse ("Sparse24", compressed-tensors' sparse-24-bitmask) checkpoints, and
compressed-tensors 0.19 (llmcompressor 0.14's) no longer writes a sparsity compressor at all: a 2:4
SparseGPT/Wanda model is saved dense, its zeros in ordinary weights, with the quantization format of
its scheme only. That checkpoint is what the pinned vLLM serves: these tests compress the toy Gemma 4
with a 2:4 mask, check the weights keep the mask, that config.json names no sparse format, and that
the serving environment's vLLM loads it and generates.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from search import config as cfg
from search import feasibility
from search.compress import CheckpointCache, Compressor, compress
from search.config import Infeasible

from tests.test_compress import _load_in_vllm

pytestmark = pytest.mark.e2e  # studies, servers and compressions: minutes

TWO_FOUR = {"bf16": {"compress.scheme": "none", "compress.prune.method": "sparsegpt",
                     "compress.prune.mask_structure": "2:4"},
            "w4a16": {"compress.scheme": "w4a16", "compress.method": "rtn", "compress.prune.method": "sparsegpt",
                      "compress.prune.mask_structure": "2:4"}}


@pytest.fixture(scope="module")
def compressor(main_python):
    worker = Compressor(main_python)
    yield worker
    worker.close()


def _two_four(weight: torch.Tensor) -> bool:
    """Every 4 consecutive inputs of every output row hold at least 2 zeros."""
    groups = weight.float().reshape(weight.shape[0], -1, 4)
    return bool(((groups == 0).sum(-1) >= 2).all())


@pytest.mark.parametrize("name", list(TWO_FOUR))
def test_a_two_four_checkpoint_is_dense_and_served_by_the_pinned_vllm(name, toy_model, tmp_path, compressor,
                                                                      serve_python, platform):
    config = cfg.build({"serve.max_model_len": 512, **TWO_FOUR[name]})
    try:
        feasibility.check(config, platform)
    except Infeasible as exc:  # a scheme this CPU cannot run: its own reason, not the mask's
        assert "2:4" not in str(exc)
        pytest.skip(f"{name} cannot run here: {exc}")
    result = compress(config.compress, toy_model, CheckpointCache(tmp_path / "cache"), compressor, "test",
                      tmp_path / "compress.log")
    written = json.loads((result.checkpoint / "config.json").read_text())
    quant = written.get("quantization_config") or {}
    assert not quant.get("sparsity_config")  # absent, or {} beside a quantization format
    text = json.dumps(written)
    assert "sparse-24" not in text and "marlin-24" not in text and "2:4" not in text
    if name == "bf16":
        assert "quantization_config" not in written  # an ordinary bf16 checkpoint
        weights = {}
        for shard in result.checkpoint.glob("*.safetensors"):
            weights.update(load_file(shard))
        mlp = [k for k in weights if "mlp" in k and k.endswith("proj.weight") and "vision" not in k]
        assert mlp and all(_two_four(weights[k]) for k in mlp), "the MLP weights lost their 2:4 mask"
        attention = [k for k in weights if "self_attn.q_proj.weight" in k and "vision" not in k]
        assert attention and not all(_two_four(weights[k]) for k in attention)  # ignored: left dense
    loaded = _load_in_vllm(serve_python, result.checkpoint, config)
    assert loaded["ok"], loaded.get("error")
    assert loaded["tokens"] == 4
