#!/usr/bin/env bash
# The test command: installs what the suite needs, then runs it (exit 5, "no tests", counts as failure).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/cluster/install.sh" --test || exit 1
cd "$root"
python="${PYTHON:-python3}"
[ -z "${PYTHON:-}" ] && [ -x "$root/.venv/bin/python" ] && python="$root/.venv/bin/python"  # made by install.sh
"$python" -m pytest -q tests "$@"
rc=$?
[ "$rc" -eq 5 ] && { echo "no tests were collected"; exit 1; }
exit "$rc"
