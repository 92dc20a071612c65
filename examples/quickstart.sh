#!/usr/bin/env bash
# The quick start: a real Ray batch job over the bundled sample prompts (examples/prompts.parquet).
#
#   bash examples/quickstart.sh [MODEL]
#
# MODEL is `tiny` by default: a random tiny Janus built offline, so no weights or GPU are needed.
# Pass a checkpoint folder or a Hugging Face id (deepseek-community/Janus-Pro-7B) for real images.
# twig-batch is installed first when missing (cluster/install.sh). Running it again resumes the same
# run, which then has nothing left to draw. TWIG_OUTPUT moves the output folder.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
model="${1:-${TWIG_MODEL:-tiny}}"
output="${TWIG_OUTPUT:-twig-output/quickstart}"

if ! "$python" -c "import twig_batch, ray" 2>/dev/null; then
  echo "installing twig-batch (cluster/install.sh) ..."
  bash "$root/cluster/install.sh"
fi

"$python" -m twig_batch.cli run examples/prompts.parquet --output "$output" --model "$model" \
  --samples-per-prompt 2 --resume

echo
echo "Images:   $output/images/<xx>/<id>-<hash>/sample-NNNN.png (band images beside them)"
echo "Manifest: $output/manifest.parquet (one row per prompt and sample); run record: $output/run.json"
echo "Check it: $python -m twig_batch.cli verify $output --input examples/prompts.parquet"
echo "Look at it: $python -c \"import pyarrow.parquet as pq; print(pq.read_table('$output/manifest.parquet')"\
".select(['id', 'sample_index', 'status', 'image_uri']).to_pandas())\""
