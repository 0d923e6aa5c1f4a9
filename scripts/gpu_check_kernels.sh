#!/usr/bin/env bash
# One-shot GPU check of kernels/ on a lent CUDA machine (written for an H200; no network needed).
#   1. finds a Python with torch (CUDA build) + triton, prints versions and the GPU;
#   2. runs the CUDA-parametrised kernel tests (pytest -m gpu; KERNELS_AUTOTUNE=0: one config per kernel, so the
#      step is mostly compilation), log in $OUT/gpu_tests.log;
#   3. runs scripts/bench_kernels.py --quick with a time budget, tables printed and written to
#      $OUT/bench_kernels/results.{json,md} (the autotuned kernels' outputs are checked against references there too;
#      every time twice: plain do_bench and CUDA-graph replay);
#   4. prints the targets table last (read back from $OUT/bench_kernels/results.json, so it appears even if the
#      benchmark was stopped by its timeout).
# Whole script: under 5 minutes (tests <= 80 s, run 1 took 49 s; bench: no new case after 150 s, hard stop at
# 200 s, results saved after every stage, so a stopped run keeps what it measured; the fused LoRA GEMM autotunes
# over 24 candidates per new shape, compilation included).
#
#   OUT=/some/dir bash scripts/gpu_check_kernels.sh          # OUT defaults to ./gpu_check_out
# Exit status: that of the tests (the benchmark runs either way).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1  # silences Triton 3.9's notice; every launch here sets fp fusion explicitly
export TRITON_INTERPRET=0          # compiled kernels (one mode per process; tests/conftest.py picks this on a GPU too)

PY=""
for candidate in "${PYTHON:-}" .venv/bin/python python3 python; do
  [ -n "$candidate" ] || continue
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch, triton" >/dev/null 2>&1; then
    PY="$candidate"; break
  fi
done
if [ -z "$PY" ]; then
  echo "no Python with both torch and triton found (tried \$PYTHON, .venv/bin/python, python3, python)"; exit 2
fi
echo "== python: $(command -v "$PY")"
"$PY" - <<'EOF'
import platform, torch, triton
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
try:
    import bitsandbytes
    print(f"bitsandbytes {bitsandbytes.__version__}")
except Exception as e:  # noqa: BLE001
    print(f"bitsandbytes: not available ({type(e).__name__})")
if not torch.cuda.is_available():
    raise SystemExit("torch sees no CUDA device: nothing to check here")
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}")
EOF
[ $? -eq 0 ] || exit 2

echo "== 1/2 CUDA kernel tests (pytest -m gpu, KERNELS_AUTOTUNE=0)"
start=$SECONDS
if "$PY" -c "import pytest" >/dev/null 2>&1; then
  parallel=""   # pytest-xdist, when present: test processes compile their kernels side by side
  "$PY" -c "import xdist" >/dev/null 2>&1 && parallel="-n 6"
  KERNELS_AUTOTUNE=0 timeout 80 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" $parallel \
      tests/test_kernels_lora.py tests/test_kernels_qlora.py tests/test_kernels_dequant.py \
      > "$OUT/gpu_tests.log" 2>&1
  tests_rc=$?
  if [ $tests_rc -eq 0 ]; then tail -n 3 "$OUT/gpu_tests.log"; else tail -n 60 "$OUT/gpu_tests.log"; fi
  [ $tests_rc -eq 124 ] && echo "(tests stopped by the 80 s timeout; see $OUT/gpu_tests.log)"
else
  echo "pytest is not installed here: skipping the test step; the benchmark still checks every output"
  tests_rc=3
fi
echo "   tests: rc=$tests_rc, $((SECONDS - start)) s"

echo "== 2/2 benchmark (quick sweep, 150 s budget)"
start=$SECONDS
timeout 200 "$PY" scripts/bench_kernels.py --quick --budget-s 150 --seed 0 --out "$OUT/bench_kernels" \
    2>&1 | tee "$OUT/bench.log" | grep -v "^W[0-9]* " | tail -n 120
echo "   bench: rc=${PIPESTATUS[0]}, $((SECONDS - start)) s; results in $OUT"

echo "== targets (do_bench: plain Python call, host overhead included; graph: CUDA-graph replay, device time)"
"$PY" - "$OUT/bench_kernels/results.json" <<'EOF'
import json, sys
try:
    targets = json.load(open(sys.argv[1])).get("targets", [])
except (OSError, ValueError) as e:
    raise SystemExit(f"no benchmark results ({e})")
met = {True: "yes", False: "NO", None: ""}
for t in targets:
    print(f"{t['target']:<72} {t['value']:>9} {met[t['met']]:>4}   graph {t.get('graph_value', '-'):>9} "
          f"{met[t.get('graph_met')]:>4}")
EOF
exit $tests_rc
