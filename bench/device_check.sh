#!/usr/bin/env bash
# One-shot check on a lent H100/H200 (no network, 15 minutes of device time in all), from the repository root:
#
#     bash bench/device_check.sh                    # every step, about 9 minutes; results in $OUT (default ./out)
#     bash bench/device_check.sh --only check,bench # rerun some steps (a failed or cut part)
#     bash bench/device_check.sh --dry-run          # the same steps on a CPU machine (TRITON_INTERPRET=1, tiny shapes)
#
# Options: --only STEP[,STEP...]  --budget SECONDS (whole run; default 450, dry run 240)
#          --bound STEP=SECONDS (one step's limit; repeatable)  --dry-run  --help
#
# Always first (about 15 s): the machine (CPU count, gcc --version, whether Python.h is there: Triton 3.6 builds a
# launcher with gcc against Python.h at each kernel's first launch, so without them no kernel runs; nvidia-smi;
# torch, CUDA, triton, transformers versions), then `iscse` made importable without pip: a shadow package tree in a
# temporary folder (iscse/* linked, iscse/kernels -> kernels/ as setup.py maps it) on PYTHONPATH, with
# PYTHONSAFEPATH=1 so that neither `python -c`, `python -m pytest` nor a script puts the repository's own ./iscse
# (which has no kernels/) first; where `iscse` and `iscse.kernels` were imported from is printed and checked, also
# in pytest's import context (collection), and a trivial Triton kernel is compiled and launched. Nothing is ever
# pip-installed (so a dry run cannot re-point an existing editable install either).
#
# Steps, in order of value; each has its own time limit (bound), cut further to what is left of --budget:
#   check  (bound 120 s) python -m iscse.check (the full mode; --quick in a dry run): environment, every backend
#          against the float64 reference (both modes of the fused step, a CUDA-graph replay), timings next to the
#          roofline floor -> check.json. Interrupted at its bound, it still writes what it checked (status 3:
#          "partial"). Its Triton compiles land in Triton's cache, which the next steps reuse.
#   tests  (bound 150 s) tests/test_triton_gpu.py (two pytest processes at once, so kernels compile in parallel):
#          the compiled kernels against the float64 reference, CUDA graph, 1M-row buffer, launch count. Fails
#          loudly if any of them is skipped or none is collected on CUDA.
#   bench  (bound 120 s) bench/gpu_bench.py: card rates, then triton / reference / torch / CUDA graph at
#          (512, 65536, 1024, 16) bf16+fp32, the paper's (64, 1024, 768, 16), and M = 1,048,576 -> gpu_bench.json
#   train  (bound  60 s) bench/train_step_bench.py: BERT-base steps/s, paper's recipe vs ours -> train_step.json
#   extra  (bound 120 s) bench/gpu_bench.py: fp32 dot-precision study, then torch.compile(reference) last
#          -> gpu_bench_extra.json
#   more   (bound  40 s) the rest of the suite's gpu tests, and bench/faiss_gpu_bench.py when FAISS imports
# A step that runs out of time is interrupted with SIGINT (pytest then prints its summary; the benchmarks write
# their JSON and table) and killed 20 s later. Every step's output is in $OUT/<step>.txt, everything in
# $OUT/device_check.log, the outcome in $OUT/device_check_summary.json; the exit status is 0 only if every step ran
# and passed ("partial": a benchmark measured its first items and ran out of time before the last ones). The last
# lines print the command that reruns what failed or did not run.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
STEPS=(check tests bench train extra more)
declare -A BOUND=([check]=120 [tests]=150 [bench]=120 [train]=60 [extra]=120 [more]=40)
declare -A DRY_BOUND=([check]=90 [tests]=40 [bench]=45 [train]=40 [extra]=45 [more]=40)
MIN_STEP=20  # a step with less time than this left is not started

die() { echo "device_check.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
is_int() { [[ $1 =~ ^[0-9]+$ ]]; }

DRY=0
ONLY=""
BUDGET=""
declare -A OVERRIDE=()
while (($#)); do
    case "$1" in
        --dry-run) DRY=1 ;;
        --only) (($# >= 2)) || die "--only needs a list of steps, e.g. --only bench,train"; ONLY=$2; shift ;;
        --only=*) ONLY=${1#*=} ;;
        --budget) (($# >= 2)) || die "--budget needs seconds"; BUDGET=$2; shift ;;
        --budget=*) BUDGET=${1#*=} ;;
        --bound) (($# >= 2)) || die "--bound needs STEP=SECONDS"; spec=$2; shift
                 is_int "${spec#*=}" && [[ " ${STEPS[*]} " == *" ${spec%%=*} "* ]] \
                     || die "--bound $spec: expected STEP=SECONDS with STEP one of ${STEPS[*]}"
                 OVERRIDE[${spec%%=*}]=${spec#*=} ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
SELECTED=("${STEPS[@]}")
if [[ -n $ONLY ]]; then
    IFS=, read -r -a wanted <<<"$ONLY"
    for s in "${wanted[@]}"; do
        [[ " ${STEPS[*]} " == *" $s "* ]] || die "--only: unknown step '$s'; steps: ${STEPS[*]}"
    done
    SELECTED=()
    for s in "${STEPS[@]}"; do [[ ",$ONLY," == *",$s,"* ]] && SELECTED+=("$s"); done
fi
[[ -z $BUDGET ]] && BUDGET=$(( DRY ? 240 : 450 ))
is_int "$BUDGET" && ((BUDGET > 0)) || die "--budget must be a positive number of seconds, got '$BUDGET'"

OUT="${OUT:-$REPO/out}"
mkdir -p "$OUT" || die "cannot create OUT=$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/device_check.log") 2>&1
TEE_PID=$!
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
section() { printf '\n==== %s (at %s s)\n' "$*" "$(elapsed)"; }
WARN=()
declare -A STATUS=() TOOK=() LIMIT=()

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
if ((DRY)); then
    export TRITON_INTERPRET=1  # before triton is imported anywhere: the interpreter is chosen at import
else
    unset TRITON_INTERPRET     # the compiled kernels, not the interpreter
fi

echo "device_check.sh $(date -u '+%Y-%m-%dT%H:%M:%SZ') | steps: ${SELECTED[*]} | budget ${BUDGET}s" \
     "$( ((DRY)) && echo '| DRY RUN (CPU)')"
echo "repository: $REPO ($(git rev-parse --short HEAD 2>/dev/null || echo 'no git')," \
     "$(git status --porcelain 2>/dev/null | wc -l) changed files) | OUT=$OUT"

# ---------------------------------------------------------------------------------------------------- environment
section "machine and versions"
echo "CPUs: $(nproc) | $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ //')"
if command -v gcc >/dev/null 2>&1; then
    echo "gcc: $(gcc --version | head -1)"
else
    msg="gcc NOT FOUND: Triton builds each kernel's launcher with a C compiler at its first launch"
    WARN+=("$msg (CC=${CC:-unset}, cc: $(command -v cc || echo none), clang: $(command -v clang || echo none))")
    echo "!! ${WARN[-1]}"
fi
pyh=$(python - <<'EOF'
import os, sysconfig
h = os.path.join(sysconfig.get_paths()["include"], "Python.h")
print(("found: " if os.path.exists(h) else "MISSING: ") + h)
EOF
)
echo "Python.h $pyh"
if [[ $pyh == MISSING* ]]; then
    WARN+=("Python.h $pyh: Triton compiles its launcher against it at each kernel's first launch, so no kernel can run")
    echo "!! ${WARN[-1]}"
fi
echo "libcuda (Triton finds it with ldconfig -p, or TRITON_LIBCUDA_PATH=${TRITON_LIBCUDA_PATH:-unset}):" \
     "$(ldconfig -p 2>/dev/null | grep -m1 -o '/[^ ]*libcuda\.so\.1' || echo 'not in ldconfig -p')"
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 30 nvidia-smi || echo "nvidia-smi failed (status $?)"
else
    echo "nvidia-smi: not found"
fi
versions=$(timeout 120 python - <<'EOF'
import platform
from importlib import metadata
import torch
print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda})")
for name in ("triton", "transformers", "numpy", "sentence-transformers", "accelerate", "faiss-cpu", "faiss-gpu",
             "setuptools", "pytest"):
    try:
        print(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name}: not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
else:
    print("device: no CUDA device")
print(f"cuda_available={int(torch.cuda.is_available())}")
EOF
)
echo "$versions"
CUDA=$(grep -m1 -o 'cuda_available=[01]' <<<"$versions" | cut -d= -f2)
CUDA=${CUDA:-0}
if ((!DRY && !CUDA)); then
    echo "!! no CUDA device: nothing to check here; use --dry-run on a CPU machine"
    exit 1
fi

# ---------------------------------------------------------------------------------------------- import set-up
section "making iscse and iscse.kernels importable (no pip)"
SHADOW=$(mktemp -d "${TMPDIR:-/tmp}/iscse-shadow.XXXXXX") || die "mktemp failed"
cleanup() { [[ -n ${SHADOW:-} && -d $SHADOW ]] && rm -rf "$SHADOW"; }
trap cleanup EXIT
mkdir "$SHADOW/iscse"
for f in "$REPO"/iscse/*; do
    name=$(basename "$f")
    [[ $name == kernels || $name == __pycache__ ]] && continue
    ln -s "$f" "$SHADOW/iscse/$name"
done
ln -s "$REPO/kernels" "$SHADOW/iscse/kernels"
export PYTHONPATH="$SHADOW${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1  # Python >= 3.11: no cwd / script folder first on sys.path, so ./iscse cannot shadow it
echo "PYTHONPATH=$PYTHONPATH PYTHONSAFEPATH=1"
# Where iscse and iscse.kernels come from, then one trivial Triton kernel compiled and launched (gcc, Python.h and
# libcuda at work; interpreted in a dry run). A file, not stdin: triton.jit reads its function's source.
cat >"$SHADOW/check_imports.py" <<'EOF'
import os
import sys
import time

repo = os.path.realpath(sys.argv[1])
ok = bool(sys.flags.safe_path)
print(f"python {sys.version.split()[0]}, safe_path={sys.flags.safe_path}, sys.path[:2]={sys.path[:2]}")
import iscse  # noqa: E402
import iscse.kernels  # noqa: E402

for name, mod, want in (("iscse", iscse, "iscse/__init__.py"), ("iscse.kernels", iscse.kernels, "kernels/__init__.py")):
    real = os.path.realpath(mod.__file__)
    good = real == os.path.join(repo, want)
    ok = ok and good
    print(f"{name:14s} from {mod.__file__} -> {real} {'ok' if good else '!! expected ' + os.path.join(repo, want)}")
try:
    import iscse.backends.triton_fused as t
    print("iscse.backends.triton_fused: kernels", "interpreted (TRITON_INTERPRET=1)" if t.INTERPRETED else "compiled")
except Exception as exc:
    ok = False
    print(f"!! iscse.backends.triton_fused does not import: {type(exc).__name__}: {exc}")
if not ok:
    sys.exit(1)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _add_one(X, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < N) + 1.0, mask=offs < N)


try:
    x = torch.zeros(1000, device="cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    _add_one[(triton.cdiv(1000, 256),)](x, 1000, BLOCK=256)
    assert x.sum().item() == 1000.0, "wrong result"
    print(f"Triton probe kernel: compiled and ran in {time.time() - t0:.1f}s on {x.device}")
except Exception as exc:
    print(f"!! TRITON PROBE FAILED: {type(exc).__name__}: {str(exc)[-1500:]}")
    sys.exit(3)
EOF
timeout 150 python "$SHADOW/check_imports.py" "$REPO"
import_rc=$?
if ((import_rc == 3)); then
    WARN+=("a trivial Triton kernel did not compile or run (see the probe above): every Triton step will fail")
    echo "!! ${WARN[-1]}"
    import_rc=0
fi
# The same check in pytest's own import context (its rootdir / conftest handling of sys.path): collect the kernel
# test files. test_triton_interpret.py imports iscse.backends.triton_fused at module level (a collection error if it fails);
# a module-level importorskip in test_triton_gpu.py (CUDA only) leaves none of its tests collected.
collect=$(timeout 120 python -m pytest --co -q -p no:cacheprovider tests/test_triton_gpu.py \
          tests/test_triton_interpret.py 2>&1)
collect_rc=$?
n_gpu=$(grep -c '^tests/test_triton_gpu.py::' <<<"$collect")
echo "pytest --co: $(tail -1 <<<"$collect") ($n_gpu in tests/test_triton_gpu.py)"
if ((import_rc != 0 || collect_rc != 0 || n_gpu == 0)); then
    tail -30 <<<"$collect"
    echo "!! iscse / iscse.kernels are not importable as the tests need them: stopping (nothing else can pass)"
    exit 1
fi

# ----------------------------------------------------------------------------------------------------- the steps
bound_of() {  # the step's limit: its bound (or --bound), cut to what is left of the budget
    local b=${BOUND[$1]}
    ((DRY)) && b=${DRY_BOUND[$1]}
    [[ -n ${OVERRIDE[$1]:-} ]] && b=${OVERRIDE[$1]}
    local left=$(( BUDGET - $(elapsed) ))
    ((left < b)) && b=$left
    echo "$b"
}

check_junit() {  # junit XML files. On CUDA every collected test must have run (no skip), and at least one collected.
    python - "$CUDA" "$@" <<'EOF'
import collections, sys, xml.etree.ElementTree as ET
cuda, paths = sys.argv[1] == "1", sys.argv[2:]
cases = []
for path in paths:
    try:
        cases += list(ET.parse(path).getroot().iter("testcase"))
    except (OSError, ET.ParseError) as exc:
        print(f"!! no pytest report ({type(exc).__name__}): pytest was killed before it could write {path}")
        sys.exit(1)
skips = collections.Counter(" ".join(filter(None, (s.get("message"), (s.text or "")[-200:])))
                            for c in cases for s in c.findall("skipped"))
bad = sum(1 for c in cases if c.find("failure") is not None or c.find("error") is not None)
print(f"junit: {len(cases)} tests, {sum(skips.values())} skipped, {bad} failed or errors")
if cuda and (not cases or skips):
    print("!! FAILED: GPU tests were skipped or not collected on a CUDA machine: "
          + ("; ".join(f"{n} x {m}" for m, n in skips.items()) or "none collected"))
    sys.exit(1)
if not cuda and any("needs a CUDA GPU" not in m for m in skips):
    print("!! skipped for another reason than the missing GPU: " + "; ".join(skips))
    sys.exit(1)
EOF
}

PYTEST=(-rfEs --tb=short --durations=15 -p no:cacheprovider)
# Two shards of tests/test_triton_gpu.py at once: the first launch of each kernel specialisation compiles it on the
# CPU (single-threaded), which is most of this step's time; two processes compile in parallel. The two -k
# expressions are complements, so every test runs whatever the file holds. (SIGINT still reaches a background
# pytest: `timeout` handles SIGINT itself, and its child starts with the default action, not an ignored signal.)
TEST_SHARDS=("fused_step or filling or graph or launches" "not (fused_step or filling or graph or launches)")

step_check() {
    local b=$1 args=(--json "$OUT/check.json")
    ((DRY)) && args+=(--quick)  # the interpreter: tiny shapes, no Triton timing
    timeout -s INT -k 20 "$b" python -m iscse.check "${args[@]}"
}

step_tests() {
    local b=$1 rc=0 r i pids=() xmls=()
    for i in "${!TEST_SHARDS[@]}"; do
        xmls+=("$OUT/pytest_tests_$i.xml")
        timeout -s INT -k 20 "$b" python -m pytest "${PYTEST[@]}" -m gpu -k "${TEST_SHARDS[$i]}" \
            --junitxml="${xmls[$i]}" tests/test_triton_gpu.py >"$OUT/tests_shard$i.txt" 2>&1 &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}"
        r=$?
        echo "================ shard $i (-k '${TEST_SHARDS[$i]}'): pytest exit status $r"
        cat "$OUT/tests_shard$i.txt"
        ((r == 5)) && r=0  # this -k selected nothing; check_junit still needs tests in all shards together
        ((r == 124 || r == 137)) && rc=$r
        ((r != 0 && rc == 0)) && rc=$r
    done
    check_junit "${xmls[@]}" || { ((rc == 0)) && rc=1; }
    return $rc
}

step_bench() {
    local b=$1 args=(--no-precision --impls triton,reference,torch,triton_graph --budget $((b > 50 ? b - 25 : b / 2)))
    if ((DRY)); then
        args+=(--cpu-smoke --shapes 5x37x13x7 --json "$OUT/gpu_bench_smoke.json")
    else
        args+=(--json "$OUT/gpu_bench.json")
    fi
    timeout -s INT -k 20 "$b" python bench/gpu_bench.py "${args[@]}"
}

step_train() {
    local b=$1 args=(--budget $((b > 60 ? b - 40 : b / 3)))  # no new round after it; building BERT comes first
    if ((DRY)); then
        args+=(--dry-run --json "$OUT/train_step_dry_run.json")
    else
        args+=(--json "$OUT/train_step.json")
    fi
    timeout -s INT -k 20 "$b" python bench/train_step_bench.py "${args[@]}"
}

step_extra() {
    local b=$1 args=(--impls compile --budget $((b > 50 ? b - 25 : b / 2)))
    if ((DRY)); then
        args+=(--cpu-smoke --shapes 5x37x13x7 --json "$OUT/gpu_bench_extra_smoke.json")
    else
        args+=(--json "$OUT/gpu_bench_extra.json")
    fi
    timeout -s INT -k 20 "$b" python bench/gpu_bench.py "${args[@]}"
}

step_more() {
    local b=$1 start rc
    start=$(date +%s)
    timeout -s INT -k 20 $((b > 60 ? b - 30 : b * 2 / 3)) python -m pytest "${PYTEST[@]}" -m gpu \
        --continue-on-collection-errors \
        --junitxml="$OUT/pytest_more.xml" --ignore=tests/test_triton_gpu.py tests
    rc=$?
    ((rc == 5)) && rc=0  # no gpu test collected in the other files
    if python -c 'import faiss' >/dev/null 2>&1; then
        local left=$(( b - ($(date +%s) - start) ))
        if ((left > 15)); then
            timeout -s INT -k 10 "$left" python bench/faiss_gpu_bench.py --out "$OUT/faiss_gpu.json" || rc=1
        fi
    else
        echo "FAISS is not installed: bench/faiss_gpu_bench.py not run"
    fi
    return $rc
}

for step in "${SELECTED[@]}"; do
    b=$(bound_of "$step")
    LIMIT[$step]=$b
    if ((b < MIN_STEP)); then
        STATUS[$step]="not run (budget spent)"
        TOOK[$step]=0
        section "$step: not run, ${b}s left of the ${BUDGET}s budget"
        continue
    fi
    section "$step (limit ${b}s)"
    s0=$(date +%s)
    "step_$step" "$b" 2>&1 | tee "$OUT/$step.txt"
    rc=${PIPESTATUS[0]}
    TOOK[$step]=$(( $(date +%s) - s0 ))
    case $rc in
        0) STATUS[$step]=ok ;;
        124|137) STATUS[$step]="timeout after ${TOOK[$step]}s (limit ${b}s)" ;;
        3) STATUS[$step]="partial: the time ran out before its last items" ;;
        *) STATUS[$step]="failed (exit status $rc)" ;;
    esac
    echo "---- $step: ${STATUS[$step]} in ${TOOK[$step]}s"
done

# --------------------------------------------------------------------------------------------------------- summary
section "summary"
rerun=()
for w in "${WARN[@]}"; do echo "!! $w"; done
printf '%-6s %-44s %7s %7s  %s\n' step status seconds limit output
summary="{\"date\": \"$(date -u '+%Y-%m-%dT%H:%M:%SZ')\", \"dry_run\": $DRY, \"budget_s\": $BUDGET,"
summary+=" \"elapsed_s\": $(elapsed), \"steps\": {"
sep=""
for step in "${SELECTED[@]}"; do
    printf '%-6s %-44s %7s %7s  %s\n' "$step" "${STATUS[$step]}" "${TOOK[$step]}" "${LIMIT[$step]}" "$OUT/$step.txt"
    [[ ${STATUS[$step]} == ok ]] || rerun+=("$step")
    summary+="$sep\"$step\": {\"status\": \"${STATUS[$step]}\", \"seconds\": ${TOOK[$step]},"
    summary+=" \"limit_s\": ${LIMIT[$step]}}"
    sep=", "
done
summary+="}, \"warnings\": ["
sep=""
for w in "${WARN[@]}"; do summary+="$sep\"${w//\"/\'}\""; sep=", "; done
summary+="]}"
echo "$summary" >"$OUT/device_check_summary.json"
echo "total $(elapsed)s of the ${BUDGET}s budget; results in $OUT"
if ((${#rerun[@]})); then
    list=$(IFS=,; echo "${rerun[*]}")
    echo "to rerun what failed or did not run: bash bench/device_check.sh --only $list$( ((DRY)) && echo ' --dry-run')"
    rc=1
else
    rc=0
fi
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $rc
