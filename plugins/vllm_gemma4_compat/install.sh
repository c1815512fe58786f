#!/usr/bin/env bash
# Installs vllm_gemma4_compat.py (the Gemma 4 config fix vLLM 0.26 needs; see its docstring) so that
# every Python process of a serving environment runs it at start:
#   install.sh PYTHON        into PYTHON's site-packages: the module + vllm_gemma4_compat.pth
#                            (setup.sh, for .venvs/serve)
#   install.sh --target DIR  into DIR, a PYTHONPATH folder (pip --target): the module + the .pth,
#                            and sitecustomize.py with the same line, since Python reads .pth files
#                            only in site directories (bench/gpu/stage_and_run.sh, for /tmp/site-vllm)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
line="import vllm_gemma4_compat"
if [ "${1:-}" = --target ]; then
  dir=${2:?usage: install.sh PYTHON | install.sh --target DIR}
  mkdir -p "$dir"
  echo "$line" > "$dir/sitecustomize.py"
else
  python=${1:?usage: install.sh PYTHON | install.sh --target DIR}
  dir=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
fi
cp "$here/vllm_gemma4_compat.py" "$dir/vllm_gemma4_compat.py"
echo "$line" > "$dir/vllm_gemma4_compat.pth"
echo "vllm_gemma4_compat installed into $dir"
