#!/usr/bin/env bash
# One call on the GPU machine: the GPU tests, the kernel benchmark and the `fastppo bench` sweep,
# each under a time limit so the whole fits in about 8 minutes; a short table last; results in $OUT.
#
# Here, once:   bash ../shared/gpu/prepare.sh        (builds .device-site/: envpool, tyro, ...)
# Device run:   command "bash bench/gpu_check.sh", carry [".device-site"], timeout_s 600
# Then commit $OUT's bench_*.json / bench_*.png under bench/results/ (they name the card).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/.device-site/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: > "$LOG"
summary=()

run() {  # run NAME SECONDS CMD...: time-limited, output appended to the log, status kept for the table
  local name=$1 limit=$2 start rc
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-16s %-8s %4ss' "$name" "$([ "$rc" = 0 ] && echo ok || echo "FAIL($rc)")" $(( $(date +%s) - start )))")
}

{ nvidia-smi -L; nproc; python -c "import torch, envpool; print('torch', torch.__version__, 'envpool', envpool.__version__)"; } 2>&1 | tee -a "$LOG"
run kernel_tests 100 python -m pytest -q -x tests/test_kernels.py
run perf_tests 100 python -m pytest -q -m "not slow" tests/test_async.py tests/test_overlap.py tests/test_bench.py
run bench_kernels 90 python bench/bench_kernels.py --out "$OUT"
run host_overhead 40 python bench/host_overhead.py --device cuda --out "$OUT"
run fastppo_bench 270 python -m fastppo bench --env-id Pong-v5 --num-envs 64 256 1024 4096 --seconds 6 --warmup 2 \
  --out-dir "$OUT" --name "bench_Pong-v5_$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')"

echo "=== summary" | tee -a "$LOG"
printf '%s\n' "${summary[@]}" | tee -a "$LOG"
python - "$OUT" <<'PY' 2>&1 | tee -a "$LOG"
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/bench_Pong*.json")):
    r = json.load(open(path))
    print(path, r["machine"]["gpu"], r["machine"]["commit"])
    print(f"{'num_envs':>8} {'EnvPool':>9} {'env+inf':>9} {'train':>9} {'%':>5}")
    for p in r["points"]:
        print(f"{p['num_envs']:>8} {p['ceiling']:>9,.0f} {p['inference']:>9,.0f} {p['training']:>9,.0f} "
              f"{p['training_pct_of_ceiling']:>4.0f}%")
PY
