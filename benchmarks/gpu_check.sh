#!/usr/bin/env bash
# One prepared GPU check of calft, run from the repository root:
#
#     bash benchmarks/gpu_check.sh          # results + logs in $OUT if set, else benchmarks/results/
#
# Needs a Python that already has torch, triton, transformers and peft (no network is used).
# On a machine without CUDA it only checks that everything it needs imports, says so, and exits 0.
# On a GPU (budget: < 9 min on one H200; every stage has its own `timeout`):
#   0. wheels found in .whl/ (e.g. liger-kernel, cut-cross-entropy, brought along because the GPU
#      machine has no network) are installed into a private --target folder put on PYTHONPATH
#   1. install calft without dependencies (pip --no-deps; else an in-place build_ext)
#   2. the kernel tests on CUDA, compiled (TRITON_INTERPRET=0): tests/test_kernels_gpu.py, fp32,
#      bf16 and fp16, K = 11 and 1000, with and without bias, plus the gpu-marked tests
#   3. benchmarks/kernels.py --device cuda --shapes issue10 (N = 8192; (H, V) = (2048, 151936),
#      (4096, 128256), (896, 151936); K = 11 and 1000; torch.compile dense; Liger FLCE and Apple
#      CCE at K = 1 when importable)
#   4. benchmarks/profile_kernels.py: torch.profiler of the fused kernel's fwd+bwd at N=8192,
#      H=2048, V=151936, K=11 (where the time goes, kernel by kernel)
#   5. benchmarks/train_step.py --devices cuda on a Qwen3-0.6B-shaped model with random weights
# Each stage's log is $OUT/gpu_check_<stage>.log; a summary goes to $OUT/gpu_check.json.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" TRITON_DEFAULT_FP_FUSION=1

missing=$("$PY" - <<'EOF'
import importlib
mods = ["torch", "triton", "transformers", "peft", "numpy", "scipy", "safetensors", "tqdm", "pytest", "pybind11"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages: $missing (install them first; this script uses no network)" >&2
    exit 1
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: every needed package imports, but there is no CUDA device here: nothing to run (ok)."
    exit 0
fi

status=()
stage() {  # stage <name> <seconds> <command...>: run with a time limit, log, record the exit code
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/gpu_check_$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/gpu_check_$name.log"
    echo "== $name: exit $rc in $((SECONDS - t0)) s"
    status+=("\"$name\": {\"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
}

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/calft_wheels .whl/*.whl \
        && export PYTHONPATH="/tmp/calft_wheels${PYTHONPATH:+:$PYTHONPATH}"
fi
stage install 90 bash -c "$PY -m pip install --no-deps --no-build-isolation -e . || $PY setup.py build_ext --inplace"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stage kernel_tests 120 env TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_kernels_gpu.py tests/test_kernels.py -m gpu
stage kernels_bench 180 env TRITON_INTERPRET=0 "$PY" benchmarks/kernels.py --device cuda --shapes issue10 \
    --repeats 5 --out "$OUT/kernels_cuda_issue10.json"
stage profile 60 env TRITON_INTERPRET=0 "$PY" -m benchmarks.profile_kernels --out "$OUT/profile_linear_cuda.txt"
stage train_step 90 env TRITON_INTERPRET=0 "$PY" -m benchmarks.train_step --devices cuda \
    --model qwen3-0.6b-random --repeats 5 --out-dir "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu_check_device.txt" 2>&1

(IFS=,; echo "{${status[*]}}") > "$OUT/gpu_check.json"
echo "gpu_check: wrote $OUT/gpu_check.json and the logs"
