"""Tests only: makes torch report an AVX2-only CPU (no AVX-512, no AMX) to the process it starts in.

vLLM's CPU backend decides from these very calls which kernel library to load (_C_AVX2) and what
its attention can do, so a server started with this on PYTHONPATH behaves as on an AVX2 machine.
"""

import torch
import torch.backends.cpu

torch.cpu._is_avx512_supported = lambda: False
torch.cpu._is_avx512_bf16_supported = lambda: False
torch.cpu._is_amx_tile_supported = lambda: False
torch.backends.cpu.get_cpu_capability = lambda: "AVX2"
