#!/usr/bin/env bash
# One-shot check on a lent H100/H200 (no network), from the repository root:
#
#     bash bench/device_check.sh            # writes into $OUT (default ./out)
#
# 1. prints the card and versions (nvidia-smi, torch, triton);
# 2. makes `iscse` (with `iscse.kernels`, which setup.py maps from kernels/) importable without the network:
#    `pip install --no-deps --no-build-isolation -e .`, else a shadow package tree on PYTHONPATH;
# 3. runs the GPU tests, `python -m pytest -m gpu -q`: tests/test_triton_gpu.py first (it also compiles the kernels
#    the benchmark uses), then the rest of the suite's gpu tests (reports in $OUT/pytest_gpu_*.txt);
# 4. runs bench/gpu_bench.py: copy bandwidth, bf16 matmul rate, then reference / torch.compile(reference) / torch /
#    triton at the four benchmark shapes, forward / backward / forward+backward (do_bench medians with 20th/80th
#    percentiles), launches, peak memory, roofline floor; JSON in $OUT/gpu_bench.json, table in $OUT/gpu_bench.txt;
# 5. if time is left, bench/faiss_gpu_bench.py (FAISS kNN vs torch/triton) into $OUT/faiss_gpu.json.
# Every step has its own time limit, so the whole script ends within about 8 minutes.
#
# `bash bench/device_check.sh --dry-run` runs the same steps on a machine without a GPU (the GPU tests skip, the
# benchmark runs its --cpu-smoke mode under TRITON_INTERPRET=1): a check of the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT"
BENCH_ARGS=()
if [[ "${1:-}" == "--dry-run" ]]; then
    export TRITON_INTERPRET=1
    BENCH_ARGS=(--cpu-smoke)
else
    unset TRITON_INTERPRET  # the compiled kernels, not the interpreter
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONUNBUFFERED=1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

echo "== card and versions"
nvidia-smi || echo "nvidia-smi failed"
python - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: not importable:", exc)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
EOF

echo "== making iscse importable (offline)"
if python -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip_install.txt" 2>&1 \
        && (cd / && python -c "import iscse.kernels.knn_topk") 2>>"$OUT/pip_install.txt"; then
    echo "editable install ok"
else
    # No setuptools / no write access: a shadow tree where iscse/kernels points at kernels/.
    shadow="$(mktemp -d)/site"
    mkdir -p "$shadow/iscse"
    for f in "$PWD"/iscse/*; do ln -s "$f" "$shadow/iscse/$(basename "$f")"; done
    ln -s "$PWD/kernels" "$shadow/iscse/kernels"
    export PYTHONPATH="$shadow${PYTHONPATH:+:$PYTHONPATH}"
    echo "editable install failed (see $OUT/pip_install.txt); using PYTHONPATH=$shadow"
fi
python -c "import iscse, iscse.triton_ops as t; print('iscse', iscse.__version__, 'from', iscse.__file__, '| kernels interpreted:', t.INTERPRETED)"

echo "== GPU tests of the Triton kernels (limit 150 s)"
timeout 150 python -m pytest -m gpu -q -p no:cacheprovider tests/test_triton_gpu.py 2>&1 \
    | tee "$OUT/pytest_gpu_triton.txt" | tail -40
echo "pytest exit status: ${PIPESTATUS[0]} (after $(elapsed) s)"

echo "== the other GPU tests (limit 60 s)"
timeout 60 python -m pytest -m gpu -q -p no:cacheprovider --ignore=tests/test_triton_gpu.py 2>&1 \
    | tee "$OUT/pytest_gpu_other.txt" | tail -20
echo "pytest exit status: ${PIPESTATUS[0]} (after $(elapsed) s)"

left=$(( 430 - $(elapsed) ))
(( left < 120 )) && left=120
echo "== benchmark (limit $left s)"
timeout "$left" python bench/gpu_bench.py --out "$OUT" --budget $(( left - 45 )) "${BENCH_ARGS[@]}" 2>&1 \
    | tee "$OUT/gpu_bench.txt"
echo "benchmark exit status: ${PIPESTATUS[0]} (after $(elapsed) s)"

left=$(( 470 - $(elapsed) ))
if [[ -f bench/faiss_gpu_bench.py ]] && (( left > 20 )); then
    echo "== FAISS kNN benchmark (limit $left s)"
    timeout "$left" python bench/faiss_gpu_bench.py --out "$OUT/faiss_gpu.json" 2>&1 | tail -30
fi
echo "== done in $(elapsed) s; results in $OUT"
