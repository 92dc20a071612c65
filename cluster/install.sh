#!/usr/bin/env bash
# Installs twig-batch (and its test tools with --test) into the current Python environment.
# torch is installed first and only when missing: a machine with a GPU gets pip's default build,
# a machine without one gets TORCH_SPEC (default torch==2.13.0, taken from the CPU wheels when the
# local pip configuration provides them). An existing torch is never replaced.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
if ! "$python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$python" -m pip install -q "${TORCH_SPEC:-torch}"
  else
    "$python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi
"$python" -m pip install -q -e "${root}${extra}"
