"""Compression time and checkpoint size per scheme on the toy Gemma 4 (issue 3's benchmark).

Run: .venvs/main/bin/python bench/compress_schemes.py
Each scheme is compressed into a fresh cache by the project's persistent compression worker; the
first job also pays the worker's start (imports), reported on its own row.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search import config as cfg  # noqa: E402
from search.compress import CheckpointCache, CompressionFailed, Compressor, compress  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]
SCHEMES = [
    ("fp8_dynamic (worker start included)", {"compress.scheme": "fp8_dynamic", "compress.calibration.seed": 1}),
    ("fp8_dynamic", {"compress.scheme": "fp8_dynamic"}),
    ("fp8 (static, calibrated)", {"compress.scheme": "fp8"}),
    ("w8a8 (SmoothQuant + GPTQ)", {"compress.scheme": "w8a8"}),
    ("w4a16 observers only (seed 003)", {"compress.scheme": "w4a16", "compress.method": "rtn"}),
    ("w4a16 GPTQ g128 static act-order", {"compress.scheme": "w4a16", "compress.method": "gptq",
                                           "compress.actorder": "static"}),
    ("w4a16 AWQ", {"compress.scheme": "w4a16", "compress.method": "awq"}),
    ("nvfp4a16", {"compress.scheme": "nvfp4a16"}),
    ("SparseGPT 10% + GPTQ w4a16 (seed 001)", {"compress.scheme": "w4a16", "compress.method": "gptq",
                                                "compress.actorder": "static", "compress.prune.method": "sparsegpt",
                                                "compress.prune.base": 0.1}),
    ("Wanda 2:4 (bf16)", {"compress.scheme": "none", "compress.prune.method": "wanda",
                          "compress.prune.mask_structure": "2:4"}),
    ("FLAP 20% ramp_up (bf16, structured)", {"compress.scheme": "none", "compress.prune.method": "flap",
                                              "compress.prune.base": 0.2, "compress.prune.shape": "ramp_up"}),
    ("FLAP seed 004 profile + GPTQ w4a16", {"compress.scheme": "w4a16", "compress.method": "gptq",
                                            "compress.actorder": "weight", "compress.targets": "mlp_o",
                                            "compress.prune.method": "flap", "compress.prune.base": 0.1,
                                            "compress.prune.shape": "ramp_down", "compress.prune.protect_last": 7}),
]


def main() -> None:
    work = Path(tempfile.mkdtemp())
    toy = work / "toy"
    subprocess.run([str(PROJECT / ".venvs/serve/bin/python"), "-m", "search.toy_model", str(toy)], check=True,
                   cwd=PROJECT, capture_output=True)
    base_bytes = sum(p.stat().st_size for p in toy.rglob("*") if p.is_file())
    compressor = Compressor(str(PROJECT / ".venvs/main/bin/python"))
    print(f"toy checkpoint (bf16): {base_bytes / 1e6:.2f} MB\n")
    print("| scheme | seconds | checkpoint MB | vs bf16 |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in SCHEMES:
        config = cfg.build(values).compress
        started = time.perf_counter()
        try:
            result = compress(config, toy, CheckpointCache(work / "cache"), compressor, "bench", work / "log")
        except CompressionFailed as exc:
            print(f"| {name} | failed | | {exc} |")
            continue
        seconds = time.perf_counter() - started
        print(f"| {name} | {seconds:.1f} | {result.size_bytes / 1e6:.2f} | {result.size_bytes / base_bytes:.2f} |")
    compressor.close()


if __name__ == "__main__":
    main()
