#!/usr/bin/env bash
# Installs twig-batch (and its test tools with --test) into the current Python environment.
# torch is installed first and only when missing: a machine with a GPU gets pip's default build,
# a machine without one gets TORCH_SPEC (default torch==2.13.0, taken from the CPU wheels when the
# local pip configuration provides them). An existing torch is never replaced.
# A Python that refuses pip installs (Debian's and Ubuntu's system python, PEP 668) gets a virtual
# environment in .venv at the repository root instead; examples/quickstart.sh and tests/run.sh use it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
managed='import os, sys, sysconfig
print(sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'
if [ "$("$python" -c "$managed")" = "True" ]; then
  echo "install: $python refuses pip installs (an externally managed system python); using a virtual environment in $root/.venv"
  [ -x "$root/.venv/bin/python" ] || "$python" -m venv "$root/.venv" || {
    echo "install: cannot create $root/.venv; install the venv module (Debian/Ubuntu: apt install python3-venv)" >&2
    exit 1; }
  python="$root/.venv/bin/python"
fi
if ! "$python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "install: torch (pip's default CUDA build; a few GB, several minutes) ..."
    "$python" -m pip install -q "${TORCH_SPEC:-torch}"
  else
    echo "install: torch (${TORCH_SPEC:-torch==2.13.0}, CPU build; a few minutes) ..."
    "$python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi
echo "install: twig-batch${extra} from $root and its dependencies (Ray, transformers, pyarrow, ...; pip, about a minute) ..."
"$python" -m pip install -q -e "${root}${extra}"
echo "install: done ($("$python" -c 'import sys; print(sys.executable)'))"
