#!/usr/bin/env bash
# The one command for a machine with a GPU (issue 13): build with the machine's torch, the test
# suite on CUDA, compute-sanitizer memcheck and racecheck, torch.compile, a CUDA-graph capture,
# kernel launches per step, TF32, autocast, the cuBLAS rate (bench/gpu_check.py), and every
# benchmark on CUDA. Writes bench/results/*_cuda.{json,txt} and bench/results/gpu_check_summary.txt;
# a deadline keeps it inside 10 minutes (a step that would start too late is skipped and says so).
#
#   bash bench/gpu_check.sh              # on the GPU machine; commit what it writes under bench/results/
#   bash bench/gpu_check.sh --dry-run    # on a CPU (CI): every step's command on tiny sizes, into a temp folder
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
PY=${PYTHON:-python3}
start=$(date +%s)
budget=${GPU_CHECK_SECONDS:-570}   # the device machine allows 600 s a command
if [ $dry = 1 ]; then out=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX"); device=cpu; else out=bench/results; device=cuda; fi
mkdir -p "$out/gpu_check_logs"
summary="$out/gpu_check_summary.txt"
failed=0
{
  echo "jacext GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')$([ $dry = 1 ] && echo ' (dry run on the CPU)')"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' + local changes')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  echo
} > "$summary"

# step NAME SECONDS COMMAND...: run with a timeout (never past the deadline), log to
# gpu_check_logs/NAME.log, one line in the summary.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((budget - ($(date +%s) - start)))
  if [ $left -lt 20 ]; then
    printf '%-22s SKIP  (deadline: %ss left of %ss)\n' "$name" "$left" "$budget" | tee -a "$summary"
    return
  fi
  [ $limit -gt $left ] && limit=$left
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$out/gpu_check_logs/$name.log" 2>&1
  local rc=$? took=$(($(date +%s) - t0))
  if [ $rc = 0 ]; then
    printf '%-22s PASS  %4ss\n' "$name" "$took" | tee -a "$summary"
  else
    failed=1
    printf '%-22s FAIL  %4ss  (exit %s%s; log gpu_check_logs/%s.log)\n' "$name" "$took" "$rc" \
      "$([ $rc = 124 ] && echo ', timed out')" "$name" | tee -a "$summary"
    tail -n 15 "$out/gpu_check_logs/$name.log" | sed 's/^/    /' >> "$summary"
  fi
}

if [ $dry = 1 ]; then
  echo "build                  SKIP  (dry run: the installed build is used)" | tee -a "$summary"
else
  step build 240 env MAX_JOBS="$(nproc)" "$PY" -m pip install --no-build-isolation --no-deps -e .
  step cuda_kernels 60 "$PY" -c "import jacext, torch; assert torch.cuda.is_available(), 'no GPU visible'; \
assert jacext.ops.has_cuda_kernels(), 'built without CUDA kernels'; print(torch.cuda.get_device_name())"
fi
# The suite's CUDA half: every device-parametrized test's cuda case and the cuda-only tests (the
# CPU half runs in CI). In the dry run it selects the same tests, which skip without a GPU.
step tests 240 "$PY" -m pytest -q -x -p no:cacheprovider tests -k "cuda or nccl"
step checks 150 "$PY" bench/gpu_check.py checks --device $device --out "$out/gpu_check_$device.json"
sanitizer=$(command -v compute-sanitizer || echo "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")/compute-sanitizer")
for tool in memcheck racecheck; do
  if [ $dry = 1 ] || [ ! -x "$sanitizer" ]; then
    step "sanitize_$tool" 120 "$PY" bench/gpu_check.py sanitize --device $device  # the case, without the tool
  else
    step "sanitize_$tool" 120 "$sanitizer" --tool $tool --error-exitcode 1 "$PY" bench/gpu_check.py sanitize
  fi
done
if [ $dry = 1 ]; then size=(--smoke); else size=(--min-run-time 0.5); fi
for script in bench/bench_*.py; do
  name=$(basename "$script" .py); name=${name#bench_}
  extra=()
  # (--smoke replaces the cases with tiny ones; the rest of the command is the same)
  # on the GPU, the frobenius peers that matter there (a dry run smoke-tests every method)
  [ "$name" = frobenius ] && [ $dry = 0 ] && extra=(--cases P1,P2,P4,P5,P6 --methods jacext-auto,vmap-jacrev,vmap-jacfwd)
  [ "$name" = flows ] && extra=(--epoch-samples 6000)
  [ "$name" = tiles ] && continue  # a CPU tile sweep
  step "bench_$name" 150 bash -c "\"$PY\" $script --device $device ${size[*]} ${extra[*]} \
--out \"$out/${name}_$device.json\" > \"$out/${name}_$device.txt\" 2>&1 || { tail -n 20 \"$out/${name}_$device.txt\"; exit 1; }"
done
echo "total $(($(date +%s) - start)) s of $budget" | tee -a "$summary"
echo "summary: $summary"
exit $failed
