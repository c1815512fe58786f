#!/usr/bin/env bash
# Downloads (here, where pip reaches a registry) every wheel the GPU machine lacks for
# bench/gpu/bench_seeds.py, and packs them into parts of <= 60 MiB that travel one per `run` call:
#
#   .whl/dl/common/  wheels both environments need (pydantic stack, loguru, dill)
#   .whl/dl/llmc/    llmcompressor 0.14.0.1, compressed-tensors 0.19.0 and their missing deps
#   .whl/dl/bnb/     bitsandbytes (CUDA 13.0 library only: the other CUDA/ROCm/XPU builds are removed)
#   .whl/dl/plugin/  the project's vLLM plugin (plugins/gemma4_pruned), built here
#   .whl/dl/orch/    Optuna, MLflow and their requirements the image lacks (`search run` there)
#   .whl/dl/vllm/    vLLM 0.26.0 and its extra wheels (bench/gpu/wheels-vllm.txt, a copy of
#                    shared/gpu/vllm-0.26.0-extra-wheels.txt; the heavy optional kernels listed in
#                    shared/gpu/README.md are left out), minus those moved to common/
#   .whl/parts/pNN/  what each call carries: p00 holds early.tar (common + llmc, installable at
#                    once) and the first chunk of rest.tar (bnb + vllm); p01.. the next chunks,
#                    made with split -b and joined on the machine with cat (stage_and_run.sh)
#
# The GPU image (Python 3.12, torch 2.11.0+cu130, transformers 5.17.0, accelerate, nvidia-ml-py,
# pyarrow, pandas, xxhash, fsspec, huggingface-hub, py-cpuinfo, psutil, httpx, pyyaml) has the rest.
# Usage: bash bench/gpu/fetch_wheels.sh   (from the repository root; .whl/ is git-ignored)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }

# Each part travels beside the working tree, 64 MiB in all: PART_MIB=34 leaves the tree ~30 MiB (it is
# ~25 MiB since the study's stores are committed under bench/results/).
PART_BYTES=$((${PART_MIB:-60} * 1024 * 1024))
DL=.whl/dl
mkdir -p "$DL/common" "$DL/llmc" "$DL/bnb" "$DL/vllm"

pip_dl() {  # DIR SPEC...
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
    -d "$dir" "$@"
}

# vLLM 0.26.0 and the wheels the image lacks, as resolved on the machine before (shared/gpu).
pip_dl "$DL/vllm" -r bench/gpu/wheels-vllm.txt
# Wheels both environments need: installed into both --target folders from one copy.
for name in pydantic pydantic_core annotated_types typing_inspection loguru dill; do
  for f in "$DL"/vllm/"$name"-[0-9]*.whl; do [ -e "$f" ] && mv "$f" "$DL/common/"; done
done
pip_dl "$DL/common" tenacity==9.2.1  # search/: retries and waits (pure Python; pyproject.toml)
# The compression stack (llmcompressor pins compressed-tensors 0.19.0, vLLM 0.17.0: separate targets).
pip_dl "$DL/llmc" llmcompressor==0.14.0.1 compressed-tensors==0.19.0 datasets==5.2.0 auto-round==0.15.1 \
  multiprocess==0.70.19
# bitsandbytes for seed 000 (NF4 at load time). torch 2.11.0+cu130 loads libbitsandbytes_cuda130.so;
# the other 15 native builds (~38 MB) are removed from the wheel (pip does not check RECORD hashes).
pip_dl "$DL/bnb" bitsandbytes==0.50.2
for w in "$DL"/bnb/bitsandbytes-*.whl; do
  zip -q -d "$w" 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' 'bitsandbytes/libbitsandbytes_cuda132.so' \
    'bitsandbytes/libbitsandbytes_rocm*.so' 'bitsandbytes/libbitsandbytes_xpu*.so' \
    'bitsandbytes/libbitsandbytes_cpu.so' >/dev/null 2>&1 || true
done

# The orchestrator of `python -m search run` on the GPU machine (stage_and_run.sh product): Optuna,
# MLflow and their requirements, less what the image (image-packages.txt) or the vLLM set has.
norm() { echo "$1" | tr 'A-Z_.' 'a-z--'; }
rm -rf "$DL/orch" .whl/orch-all && mkdir -p "$DL/orch"
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux1_x86_64 \
  --platform manylinux_2_5_x86_64 -d .whl/orch-all optuna==5.0.0 mlflow==3.17.2
have=$( (grep -v '^#' bench/gpu/image-packages.txt | tr ' ' '\n'; \
         for f in "$DL"/vllm/*.whl "$DL"/common/*.whl; do norm "$(basename "$f" | cut -d- -f1)"; done) | grep .)
for f in .whl/orch-all/*.whl; do
  echo "$have" | grep -qx "$(norm "$(basename "$f" | cut -d- -f1)")" || mv "$f" "$DL/orch/"
done
rm -rf .whl/orch-all

# The project's vLLM plugin for structurally pruned checkpoints (vLLM finds it by its entry point,
# so it is installed, not put on the path).
mkdir -p "$DL/plugin" && rm -f "$DL"/plugin/*.whl
python3 -m pip wheel -q --no-deps -w "$DL/plugin" plugins/gemma4_pruned && rm -rf plugins/gemma4_pruned/build

# Pack: early.tar (common + llmc) goes whole in p00; rest.tar is cut into chunks around it.
rm -rf .whl/parts .whl/pack && mkdir -p .whl/parts .whl/pack
tar -C "$DL" -cf .whl/pack/early.tar common llmc
tar -C "$DL" -cf .whl/pack/rest.tar bnb plugin orch vllm
early=$(stat -c %s .whl/pack/early.tar)
first=$((PART_BYTES - early - 4096))
mkdir -p .whl/parts/p00
cp .whl/pack/early.tar .whl/parts/p00/
head -c "$first" .whl/pack/rest.tar > .whl/parts/p00/rest.tar.000
tail -c +"$((first + 1))" .whl/pack/rest.tar | split -b "$PART_BYTES" -d -a 3 --numeric-suffixes=1 - .whl/pack/rest.tar.
n=0
for chunk in .whl/pack/rest.tar.[0-9][0-9][0-9]; do
  n=$((n + 1)); d=$(printf '.whl/parts/p%02d' "$n"); mkdir -p "$d"; mv "$chunk" "$d/"
done
total=$((n + 1))
# The manifest travels in p00: how many parts, and the checksum of the whole rest.tar.
{ echo "parts=$total"; echo "rest_sha256=$(sha256sum .whl/pack/rest.tar | cut -d' ' -f1)";
  echo "rest_bytes=$(stat -c %s .whl/pack/rest.tar)"; } > .whl/parts/p00/MANIFEST
rm -rf .whl/pack
echo "wheels: common $(ls $DL/common | wc -l), llmc $(ls $DL/llmc | wc -l), bnb $(ls $DL/bnb | wc -l), plugin $(ls $DL/plugin | wc -l), orch $(ls $DL/orch | wc -l), vllm $(ls $DL/vllm | wc -l)"
du -sh "$DL"/* | sed 's/^/  /'
for d in .whl/parts/p*; do echo "$d $(du -cb "$d"/* | tail -1 | cut -f1) bytes"; done
echo "$total parts; carry one per call: .whl/parts/p00 first"
