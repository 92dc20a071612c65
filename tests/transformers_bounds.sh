#!/usr/bin/env bash
# The tests that lean on transformers' own code, run again with the lowest and the highest release
# of transformers that pyproject.toml allows (and pip can install): loading both checkpoint layouts
# (tied and untied lm_head), the reference paths over transformers' cache, the fast engine's decoder
# built from its modules against them token for token, its system prompt and its image processing
# functions.
#
# Each release is installed on its own into a folder put first on PYTHONPATH, so it shadows the
# suite's transformers and shares every other package; `pip check` then says whether that release's
# own requirements hold. A release the suite's environment already has is not run again.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
[ -z "${PYTHON:-}" ] && [ -x "$root/.venv/bin/python" ] && python="$root/.venv/bin/python"  # made by install.sh
cd "$root"

# The range as pyproject.toml writes it, e.g. ">=5.18,<6".
range="$("$python" -c '
import re, sys
found = re.search(r"\"transformers\s*([^\";]*)\"", open("pyproject.toml").read())
sys.exit("pyproject.toml names no transformers requirement") if not found else print(found.group(1).replace(" ", ""))')"
lowest="$(sed -n 's/.*>=\([0-9][0-9.]*\).*/\1/p' <<<"$range")"
[ -n "$lowest" ] || { echo "transformers_bounds: no lower bound in transformers$range" >&2; exit 1; }
installed="$("$python" -c 'import transformers; print(transformers.__version__)')"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

run_with() {  # $1: a pip requirement for transformers
  local target="$work/$(echo "$1" | tr -c 'A-Za-z0-9.\n' '_')"
  "$python" -m pip install -q --no-deps --target "$target" "$1"
  local version
  version="$(PYTHONPATH="$target" "$python" -c 'import transformers; print(transformers.__version__)')"
  if [ "$version" = "$installed" ]; then
    echo "transformers_bounds: $version is the suite's own release, already tested"
    return 0
  fi
  echo "transformers_bounds: transformers $version ($1)"
  local unmet
  unmet="$(PYTHONPATH="$target" "$python" -m pip check 2>/dev/null | grep -i '^transformers ' || true)"
  [ -z "$unmet" ] || { echo "$unmet" >&2; return 1; }
  PYTHONPATH="$target" "$python" -m pytest -q -p no:cacheprovider tests/test_model_loading.py \
    tests/test_cached_forward.py tests/test_fast_engine.py \
    "tests/test_prompts_templates.py::test_pictures_are_asked_about_with_the_models_own_system_prompt_and_text_only_turns_with_none" \
    "tests/test_text_generation.py::test_pixels_are_prepared_as_deepseeks_image_processor_prepares_them"
}

run_with "transformers==$lowest"
# The highest is the release pip resolves from the package index, its own requirements included: a
# newer release whose requirements the index cannot meet (5.25 asks for a `kernels` release it does
# not have) is not one pip would install.
report="$work/resolved.json"
"$python" -m pip install -q --dry-run --ignore-installed --report "$report" "transformers$range"
highest="$("$python" -c '
import json, sys
print(next(item["metadata"]["version"] for item in json.load(open(sys.argv[1]))["install"]
           if item["metadata"]["name"].lower() == "transformers"))' "$report")"
run_with "transformers==$highest"
