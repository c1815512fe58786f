"""What a machine is, as the probe (search/feasibility.py) finds it: plain data, below the model
families that read it, so no family imports the probe."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CpuBuild:
    """What vLLM's CPU backend sees on this machine."""

    isa: str  # torch's CPU capability: "AVX512", "AVX2", "DEFAULT"
    avx512: bool
    amx: bool
    kernel_library: str  # the vLLM library vLLM's CPU platform loaded here, e.g. "_C_AVX2"
    kernels: frozenset[str] = field(default_factory=frozenset)  # `_C::` ops with a CPU kernel

    def describe(self) -> str:
        if self.amx:
            return "AVX-512 and AMX"
        return "AVX-512, no AMX" if self.avx512 else f"{self.isa}, no AVX-512 or AMX"


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
    cpu: CpuBuild | None = None  # on a machine without a GPU
    gpu_memory_gib: float | None = None  # the GPU's whole memory, which serve.memory_budget_gib is a share of
