#!/usr/bin/env bash
# The quick start: a real Ray batch job over the bundled sample prompts (examples/prompts.parquet),
# in twig mode with the latent controller, then its HTML report.
#
#   bash examples/quickstart.sh [MODEL]
#
# MODEL is `tiny` by default: a random tiny Janus built offline, so no weights or GPU are needed
# (its thoughts are random text, kept short with --think-max-tokens). Pass a checkpoint folder or a
# Hugging Face id (deepseek-community/Janus-Pro-7B) for real images. twig-batch is installed first
# when missing (cluster/install.sh; into .venv where the system python refuses pip installs).
# Running it again resumes the same run, which then has nothing left to draw. TWIG_OUTPUT moves the
# output folder.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
[ -z "${PYTHON:-}" ] && [ -x "$root/.venv/bin/python" ] && python="$root/.venv/bin/python"
model="${1:-${TWIG_MODEL:-tiny}}"
output="${TWIG_OUTPUT:-twig-output/quickstart}"

if ! "$python" -c "import twig_batch, ray" 2>/dev/null; then
  echo "installing twig-batch (cluster/install.sh) ..."
  bash "$root/cluster/install.sh"
  [ -z "${PYTHON:-}" ] && [ -x "$root/.venv/bin/python" ] && python="$root/.venv/bin/python"
fi

think=()
case "$model" in tiny|tiny-micro) think=(--think-max-tokens 32) ;; esac
"$python" -m twig_batch.cli run examples/prompts.parquet --output "$output" --model "$model" \
  --mode twig --controller ${think[@]+"${think[@]}"} --samples-per-prompt 2 --resume
"$python" -m twig_batch.cli report "$output"

echo
echo "Report:   $output/report.html: open it in a browser (each image with its bands, the thoughts written"
echo "          before them, the reflection scores, redrawn bands and the controller's triggers)"
echo "Images:   $output/images/<xx>/<id>-<hash>/sample-NNNN.png (band images beside them)"
echo "Manifest: $output/manifest.parquet (one row per prompt and sample); run record: $output/run.json"
echo "Check it: $python -m twig_batch.cli verify $output --input examples/prompts.parquet"
