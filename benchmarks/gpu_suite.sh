#!/usr/bin/env bash
# One-command GPU suite (~5 min on one H100/H200, each step time-boxed so the whole run stays under 8 min):
#   1. the bf16 kernel tests (compiled Triton kernels vs the PyTorch references),
#   2. bench_kernels.py at the production shape T=65536 n=12 H=32 d=128 bf16 (targets: >= 3x eager,
#      >= 1.3x torch.compile, >= 70% of peak HBM bandwidth),
#   3. bench_lap_module.py: Krea2LayerwisePooling / LAP + refiner vs diffusers Krea2TextFusion
#      (target: Triton rows >= 1.5x Krea-2 with lower peak memory),
#   4. bench_train_steps.py: 20 quickstart training steps with kernel_impl=torch vs triton
#      (equal losses within tolerance, step-time ratio).
# CSVs and the log go to benchmarks/results/, named with the GPU (nvidia-smi name, slugged).
#
#   bash benchmarks/gpu_suite.sh              # run it (needs a CUDA GPU)
#   bash benchmarks/gpu_suite.sh --dry_run    # list the commands, run nothing (works without a GPU)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY="${PYTHON:-python3}"
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry_run|--dry-run) DRY=1 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument '$arg' (use --dry_run or --help)" >&2; exit 2 ;;
  esac
done

gpu_name=""
if command -v nvidia-smi >/dev/null 2>&1; then
  gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
fi
if [ -z "$gpu_name" ] && [ "$DRY" = 0 ]; then
  echo "gpu_suite.sh: no NVIDIA GPU found (nvidia-smi lists none); run it on a CUDA machine, or use --dry_run to list the steps" >&2
  exit 1
fi
slug="$(printf '%s' "${gpu_name:-no-gpu}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9.]+/-/g; s/^-+|-+$//g')"
RESULTS="benchmarks/results"
LOG="$RESULTS/gpu_suite_${slug}.log"

# name | time box (s) | command
STEPS=(
  "kernel_tests_bf16|120|$PY -m pytest -q -m gpu tests/kernels"
  "bench_kernels|100|$PY benchmarks/bench_kernels.py --ops layerwise_attention --T 65536 --n 12 --H 32 --d 128 --dtype bf16 --out $RESULTS/bench_kernels_${slug}.csv"
  "bench_lap_module|90|$PY benchmarks/bench_lap_module.py --out $RESULTS/bench_lap_module_${slug}.csv"
  "bench_train_steps|150|$PY benchmarks/bench_train_steps.py --steps 20 --impls torch triton --accelerator gpu --out $RESULTS/bench_train_steps_${slug}.csv"
)

if [ "$DRY" = 1 ]; then
  echo "gpu_suite.sh --dry_run: GPU '${gpu_name:-none found}', results in $RESULTS/*_${slug}.csv, log $LOG"
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name box cmd <<<"$step"
    echo "[$name] timeout ${box}s: $cmd"
  done
  exit 0
fi

mkdir -p "$RESULTS"
: >"$LOG"
echo "gpu_suite.sh on '$gpu_name' ($(date -u +%Y-%m-%dT%H:%M:%SZ)); log: $LOG" | tee -a "$LOG"
failed=()
start=$SECONDS
for step in "${STEPS[@]}"; do
  IFS='|' read -r name box cmd <<<"$step"
  echo "=== [$name] (time box ${box}s) $cmd" | tee -a "$LOG"
  t0=$SECONDS
  timeout "$box" bash -c "$cmd" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "=== [$name] exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  [ "$rc" = 0 ] || failed+=("$name (exit $rc)")
done
echo | tee -a "$LOG"
echo "Summary ($((SECONDS - start)) s):" | tee -a "$LOG"
grep -E "PASS|MISS|x Krea2|step time torch|max relative difference|passed|failed" "$LOG" | grep -v "^===" | tee -a "$LOG.summary" || true
mv -f "$LOG.summary" "$RESULTS/gpu_suite_${slug}_summary.txt" 2>/dev/null || true
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_suite.sh: failed steps: ${failed[*]}" | tee -a "$LOG"
  exit 1
fi
echo "gpu_suite.sh: all steps finished; CSVs in $RESULTS/*_${slug}.csv" | tee -a "$LOG"
