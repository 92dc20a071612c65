#!/usr/bin/env bash
# Every mode x controller through `twig-batch run` with default settings, then `twig-batch verify
# --input`: every run must finish with all images ok and no part failure or split in run.json.
# Run it on a GPU machine before resolving any change to the engine, the pipeline or the actor.
#
# Usage: bash benchmarks/gpu_checks.sh OUTDIR [MODEL] [IMAGES] [MODES] [RUN OPTIONS]
#   (default random-7b, 64 images, modes "plain twig seed", each without and with the controller;
#   RUN OPTIONS go to every `twig-batch run`, e.g. "--actors 1" beside another job on the same cluster)
# Writes OUTDIR/gpu_checks.txt (the log) and OUTDIR/gpu_checks.json (one record per run).
# Joins the Ray cluster `ray start` left on this machine, if any (as a workstation user would).
set -uo pipefail
out="${1:?usage: gpu_checks.sh OUTDIR [MODEL] [IMAGES]}"
model="${2:-random-7b}"
images="${3:-64}"
modes="${4:-plain twig seed}"
read -r -a run_options <<< "${5:-}"
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$out"
work="$(mktemp -d)"
python3 "$here/bench_prompts.py" "$work/prompts.parquet" "$images"
log="$out/gpu_checks.txt"
echo "gpu_checks $(date -u +%Y-%m-%dT%H:%M:%SZ) model=$model images=$images" | tee "$log"
python3 -c "import torch, transformers, ray; print('torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" | tee -a "$log"
failed=0
records=()
for mode in $modes; do
  for controller in --no-controller --controller; do
    dest="$work/$mode$controller"
    echo "== $mode $controller" | tee -a "$log"
    start=$(date +%s.%N)
    python3 -m twig_batch.cli run "$work/prompts.parquet" --output "$dest" --model "$model" --mode "$mode" \
      "$controller" "${run_options[@]}" 2>&1 | grep --line-buffered -v -E "^\s*$" | tee -a "$log"
    rc=${PIPESTATUS[0]}
    wall=$(python3 -c "import time; print(round(time.time() - $start, 1))")
    python3 -m twig_batch.cli verify "$dest" --input "$work/prompts.parquet" 2>&1 | tee -a "$log"
    verify_rc=${PIPESTATUS[0]}
    record=$(python3 - "$dest" "$mode" "$controller" "$rc" "$verify_rc" "$wall" <<'PY'
import json, sys
dest, mode, controller, rc, verify_rc, wall = sys.argv[1:]
try:
    attempt = json.load(open(f"{dest}/run.json"))["attempts"][-1]
except OSError:
    attempt = {}
record = {"mode": mode, "controller": controller == "--controller", "exit_code": int(rc),
          "verify_exit_code": int(verify_rc), "wall_s": float(wall), "ok": attempt.get("ok"),
          "errors": attempt.get("errors"), "part_event_counts": attempt.get("part_event_counts", {}),
          "actor_stats": attempt.get("actor_stats", {})}
record["passed"] = record["exit_code"] == 0 and record["verify_exit_code"] == 0 and not record["errors"] \
    and not record["part_event_counts"]
print(json.dumps(record))
PY
)
    echo "$record" | tee -a "$log"
    records+=("$record")
    case "$record" in *'"passed": true'*) ;; *) failed=1 ;; esac
  done
done
printf '%s\n' "${records[@]}" | python3 -c "import json, sys; print(json.dumps([json.loads(l) for l in sys.stdin], indent=1))" > "$out/gpu_checks.json"
[ "$failed" = 0 ] && echo "gpu_checks: all passed" | tee -a "$log" || echo "gpu_checks: FAILED" | tee -a "$log"
rm -rf "$work"
exit "$failed"
