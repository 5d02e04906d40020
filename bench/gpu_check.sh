#!/usr/bin/env bash
# The GPU check, for any machine with CUDA and fastppo installed (pip install -e ".[dev]"):
#
#   bash bench/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to <repository>/bench/results/gpu_check
#
# Stages in order of value, each under its own time limit and all under one deadline (8 minutes from the
# start; GPU_CHECK_SECONDS sets another), each writing its results into OUT_DIR as it finishes, so a check
# cut short keeps what it measured. A stage gets at most what is left of the deadline (one with under 15 s
# left is skipped) and is stopped with SIGINT first, so pytest still writes its summary and JUnit file:
#   1. gpu_tests      the CUDA tests and the kernels, compiled (in parallel processes with pytest-xdist)
#   2. fastppo_bench  the default sweep on Pong-v5: EnvPool's ceiling, envs + inference, training
#   3. host_overhead  the collectors' host microseconds and torch operators per step on CUDA
#   4. pong_to_score  `fastppo train --env-id Pong-v5 --preset fast --target-return 20 --max-seconds 240`
#                     through bench/learning.py (its curve against steps and seconds, JSON + PNG)
#   5. bench_kernels  fused kernels against torch (forward, backward) on a few shapes
# then a closing table. Every JSON file names the card, the CPU, versions and fastppo's commit (where
# the tree is not a git checkout, set FASTPPO_COMMIT): commit them under bench/results/.
set -uo pipefail
SECONDS_IN_ALL=${GPU_CHECK_SECONDS:-480}
if ! [[ $SECONDS_IN_ALL =~ ^[0-9]+$ ]]; then
  echo "gpu_check.sh: GPU_CHECK_SECONDS must be a whole number of seconds, got '$SECONDS_IN_ALL'" >&2
  exit 2
fi
DEADLINE=$(( $(date +%s) + 10#$SECONDS_IN_ALL ))
KILL_AFTER=10  # seconds from a stage's SIGINT to its SIGKILL
seconds_left() { echo $(( DEADLINE - $(date +%s) - KILL_AFTER )); }  # for a stage starting now
OUT_DIR=$(realpath -m "${1:-$(dirname "$0")/results/gpu_check}")  # a relative OUT_DIR is the caller's
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu_check.log
: > "$LOG"
summary=()

if ! python -c "import torch" 2>&1 | tee -a "$LOG"; then
  echo "gpu_check.sh: torch does not import; install fastppo first (pip install -e \".[dev]\")" | tee -a "$LOG"
  exit 2
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: no CUDA device is visible to torch; this check needs one" | tee -a "$LOG"
  exit 2
fi
CARD=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")

run() {  # run NAME SECONDS CMD...: time-limited, output appended to the log, status kept for the table
  local name=$1 limit=$2 start rc left
  shift 2
  start=$(date +%s)
  left=$(seconds_left)
  if (( left < 15 )); then
    echo "=== $name: skipped, ${left}s left of the deadline" | tee -a "$LOG"
    summary+=("$(printf '%-16s %-9s %4ss' "$name" skipped 0)")
    return
  fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --signal=INT --kill-after="$KILL_AFTER" "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-16s %-9s %4ss' "$name" "$([ "$rc" = 0 ] && echo ok || echo "FAIL($rc)")" $(( $(date +%s) - start )))")
}

python -c "import torch, envpool; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'envpool', envpool.__version__)" 2>&1 | tee -a "$LOG"
echo "cores: $(nproc)" | tee -a "$LOG"
XDIST=()
python -c "import xdist" 2>/dev/null && XDIST=(-n 8)
run gpu_tests 60 python -m pytest -q "${XDIST[@]}" -m "gpu or not slow" --junitxml="$OUT_DIR/gpu_tests.xml" \
  tests/test_cuda_path.py tests/test_async.py tests/test_overlap.py tests/test_kernels.py tests/test_gaussian_kernels.py
run fastppo_bench 130 python -m fastppo bench --env-id Pong-v5 --seconds 3 --warmup 1 \
  --out-dir "$OUT_DIR" --name "bench_Pong-v5_$CARD"
run host_overhead 20 python bench/host_overhead.py --device cuda --num-envs 64 256 1024 --rollouts 2 --out "$OUT_DIR"
# 240 s of training, less where the stages before ran long: the run ends by itself, and writes its results,
# before the deadline (30 s for start-up and the plot)
PONG_SECONDS=$(( $(seconds_left) - 30 ))
(( PONG_SECONDS > 240 )) && PONG_SECONDS=240
(( PONG_SECONDS < 1 )) && PONG_SECONDS=1
run pong_to_score $(( PONG_SECONDS + 30 )) python bench/learning.py --env-id Pong-v5 --preset fast --target-return 20 \
  --max-seconds "$PONG_SECONDS" \
  --device cuda --out-dir "$OUT_DIR" --name "learning_Pong-v5_fast_$CARD"
run bench_kernels 30 python bench/bench_kernels.py --out "$OUT_DIR"

echo "=== summary" | tee -a "$LOG"
printf '%s\n' "${summary[@]}" | tee -a "$LOG"
python - "$OUT_DIR" <<'PY' 2>&1 | tee -a "$LOG"
import glob, json, sys
out = sys.argv[1]
for path in sorted(glob.glob(f"{out}/bench_Pong*.json")):
    r = json.load(open(path))
    print(path, r["machine"]["gpu"], r["machine"]["commit"], f"sweep {r.get('seconds', 0):.0f}s")
    print(f"{'num_envs':>8} {'EnvPool':>9} {'env+inf':>9} {'%':>5} {'train':>9} {'%':>5} {'iters':>5}")
    for p in r["points"]:
        print(f"{p['num_envs']:>8} {p['ceiling']:>9,.0f} {p['inference']:>9,.0f} {100 * p['inference'] / p['ceiling']:>4.0f}% "
              f"{p['training']:>9,.0f} {p['training_pct_of_ceiling']:>4.0f}% {p['training_iterations']:>5}")
for path in sorted(glob.glob(f"{out}/learning_*.json")):
    r = json.load(open(path))
    for run in r.get("runs", [r]):
        print(path, "seed", run.get("seed"), "reached", run.get("reached"), "steps", run.get("steps"),
              "seconds", round(run.get("seconds", 0)), "final return", run.get("final_return"))
PY
