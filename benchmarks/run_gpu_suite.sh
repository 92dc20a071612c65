#!/usr/bin/env bash
# On one GPU machine: the batch job with a GPU actor (tiny and random 7B-sized models) and the
# twig / seed workloads. Usage: bash benchmarks/run_gpu_suite.sh OUT_DIR
set -uo pipefail
out="${1:?output folder}"
mkdir -p "$out"
export RAY_ADDRESS=local RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
run() { timeout "$1" python3 -m twig_batch.cli run examples/prompts.parquet "${@:2}" 2>&1 | grep -v "^(\|Traceback\|^ " | tail -12; }

echo "== batch job, tiny model, GPU actor, twig mode with the controller"
run 240 --output /tmp/run-tiny --model tiny --mode twig --set think_max_tokens=16 --controller \
  --samples-per-prompt 2 --images-per-call 32
python3 - <<'PY' | tee "$out/ray_tiny_manifest.txt"
import pyarrow.parquet as pq
t = pq.read_table("/tmp/run-tiny/manifest.parquet").to_pandas()
print(t[["id", "sample_index", "status", "width", "n_injections", "duration_s"]].head(6).to_string())
print("rows", len(t), "ok", int((t.status == "ok").sum()))
PY
cp "$(find /tmp/run-tiny/images -name 'sample-0000.png' | head -1)" "$out/ray_tiny_sample.png"

echo "== batch job, random 7B-sized model, GPU actor, plain mode"
run 300 --output /tmp/run-7b --model random-7b --samples-per-prompt 4 --images-per-call 64
python3 -c "import pyarrow.parquet as pq; t=pq.read_table('/tmp/run-7b/manifest.parquet').to_pandas(); \
print('rows', len(t), 'ok', int((t.status=='ok').sum()), 'size', t.width.iloc[0], t.height.iloc[0])" \
  | tee "$out/ray_7b_manifest.txt"

for mode in twig seed; do
  echo "== $mode workload"
  timeout 240 python3 benchmarks/staged_speed.py --out "$out" --mode "$mode" --images "${STAGED_IMAGES:-32}" 2>&1 | tail -25
done
