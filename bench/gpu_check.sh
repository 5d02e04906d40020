#!/usr/bin/env bash
# The GPU check, for any machine with CUDA and fastppo installed (pip install -e ".[dev]"):
#
#   bash bench/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to <repository>/bench/results/gpu_check
#
# Runs the GPU tests, the kernel benchmark, the host-overhead benchmark and the `fastppo bench`
# sweep on Pong-v5, each under a time limit (10 minutes in all at most), and prints a short table
# last. The log, JSON and PNG files land in OUT_DIR; each JSON file names the card it ran on (its
# "machine" record): commit them under bench/results/.
set -uo pipefail
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
  local name=$1 limit=$2 start rc
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-16s %-8s %4ss' "$name" "$([ "$rc" = 0 ] && echo ok || echo "FAIL($rc)")" $(( $(date +%s) - start )))")
}

python -c "import torch, envpool; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'envpool', envpool.__version__)" 2>&1 | tee -a "$LOG"
nproc | tee -a "$LOG"
run kernel_tests 100 python -m pytest -q -x tests/test_kernels.py tests/test_gaussian_kernels.py
run perf_tests 100 python -m pytest -q -m "not slow" tests/test_async.py tests/test_overlap.py tests/test_bench.py
run bench_kernels 90 python bench/bench_kernels.py --out "$OUT_DIR"
run host_overhead 40 python bench/host_overhead.py --device cuda --out "$OUT_DIR"
run fastppo_bench 270 python -m fastppo bench --env-id Pong-v5 --num-envs 64 256 1024 4096 --seconds 6 --warmup 2 \
  --out-dir "$OUT_DIR" --name "bench_Pong-v5_$CARD"

echo "=== summary" | tee -a "$LOG"
printf '%s\n' "${summary[@]}" | tee -a "$LOG"
python - "$OUT_DIR" <<'PY' 2>&1 | tee -a "$LOG"
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/bench_Pong*.json")):
    r = json.load(open(path))
    print(path, r["machine"]["gpu"], r["machine"]["commit"])
    print(f"{'num_envs':>8} {'EnvPool':>9} {'env+inf':>9} {'train':>9} {'%':>5}")
    for p in r["points"]:
        print(f"{p['num_envs']:>8} {p['ceiling']:>9,.0f} {p['inference']:>9,.0f} {p['training']:>9,.0f} "
              f"{p['training_pct_of_ceiling']:>4.0f}%")
PY
