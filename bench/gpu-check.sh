#!/usr/bin/env bash
# gpu-check.sh: the whole GPU check in one run, for a machine with CUDA,
# CMake, ninja and PyTorch but no package registry (design-notes §5).
#
#   bench/gpu-check.sh [OUT_DIR]      (default: $OUT, else ./gpu-check-out)
#
# Configures without MPI (and with Lua from a carried .deps/lua when present:
# run bench/prepare-gpu-deps.sh on the build machine and carry .deps), builds
# into build-gpu with ninja, records nvidia-smi, runs the C tests (ctest -L c)
# and, when the binary and the script exist, bench/copy.lua. Writes
# OUT_DIR/gpu-check.log and OUT_DIR/summary.json. Every step runs under
# `timeout` against one overall budget (WS_GPU_CHECK_SECONDS, default 450 s)
# so the run ends well within 8 minutes. Exit status: 0 when the build
# succeeded and every C test passed. Extra configure arguments can be given in
# WS_GPU_CHECK_CMAKE_ARGS (split on spaces).
set -u -o pipefail

start=$(date +%s)
budget=${WS_GPU_CHECK_SECONDS:-450}
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-${OUT:-./gpu-check-out}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log=$out/gpu-check.log
build=$root/build-gpu
cd "$root" || exit 1
: >"$log"

note() { echo "gpu-check: $*" | tee -a "$log"; }

# Seconds left for a step: its own cap, or what remains of the budget.
left() {
    local cap=$1 rem=$((budget - ($(date +%s) - start)))
    [ "$rem" -lt 5 ] && rem=5
    [ "$cap" -lt "$rem" ] && echo "$cap" || echo "$rem"
}

# step NAME CAP_SECONDS CMD...: runs CMD under timeout, output to the log;
# sets step_rc and appends "NAME rc seconds" to the step list.
steps=()
step() {
    local name=$1 cap=$2 t0 lim
    shift 2
    lim=$(left "$cap")
    t0=$(date +%s)
    note "== $name (limit ${lim}s): $*"
    timeout --kill-after=10 "$lim" "$@" >>"$log" 2>&1
    step_rc=$?
    [ "$step_rc" -eq 124 ] && note "$name: TIMED OUT after ${lim}s"
    note "$name: exit $step_rc in $(($(date +%s) - t0))s"
    steps+=("$name $step_rc $(($(date +%s) - t0))")
}

# ---- the machine ----------------------------------------------------------------
gpu_name=unknown
driver=unknown
if command -v nvidia-smi >/dev/null 2>&1; then
    step nvidia-smi 30 nvidia-smi
    q=$(timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version \
        --format=csv,noheader 2>/dev/null | head -n1)
    if [ -n "$q" ]; then
        gpu_name=$(echo "$q" | cut -d, -f1 | sed 's/^ *//;s/ *$//')
        driver=$(echo "$q" | cut -d, -f3 | sed 's/^ *//;s/ *$//')
    fi
else
    note "nvidia-smi not found: no NVIDIA driver on this machine"
fi
note "gpu: $gpu_name, driver $driver"
{ command -v nvcc && nvcc --version | tail -n2; cmake --version | head -n1; ninja --version; } \
    >>"$log" 2>&1

# ---- configure and build ------------------------------------------------------------
cfg=(-S "$root" -B "$build" -G Ninja -DWS_WITH_MPI=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo)
if [ -z "$(command -v nvcc)" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    cfg+=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
fi
if [ -f "$root/.deps/lua/include/lua.h" ] && [ -f "$root/.deps/lua/liblua5.4.a" ]; then
    cfg+=(-DLUA_INCLUDE_DIR="$root/.deps/lua/include"
          -DLUA_STATIC_LIBRARY="$root/.deps/lua/liblua5.4.a")
    note "lua: carried .deps/lua"
else
    note "lua: no .deps/lua (run bench/prepare-gpu-deps.sh where Lua is installed and" \
         "carry .deps); relying on a system Lua"
fi
# shellcheck disable=SC2206 # word splitting is the point
[ -n "${WS_GPU_CHECK_CMAKE_ARGS:-}" ] && cfg+=(${WS_GPU_CHECK_CMAKE_ARGS})
step configure 120 cmake "${cfg[@]}"
configure_rc=$step_rc
build_rc=1
if [ "$configure_rc" -eq 0 ]; then
    # -k 0: a broken target elsewhere must not hide the C tests that do build.
    step build 300 ninja -C "$build" -k 0
    build_rc=$step_rc
fi

# ---- C tests --------------------------------------------------------------------------
tests_total=0
tests_failed=0
tests_passed=0
ctest_rc=1
if [ "$configure_rc" -eq 0 ]; then
    step ctest 240 ctest --test-dir "$build" -L c -V --timeout 200
    ctest_rc=$step_rc
    # "100% tests passed out of 7" or "71% tests passed, 2 tests failed out of 7"
    line=$(grep -E '[0-9]+% tests passed.* out of [0-9]+' "$log" | tail -n1)
    if [ -n "$line" ]; then
        tests_total=$(echo "$line" | sed -E 's/.*out of ([0-9]+).*/\1/')
        tests_failed=0
        if echo "$line" | grep -qE '[0-9]+ tests? failed'; then
            tests_failed=$(echo "$line" | sed -E 's/.* ([0-9]+) tests? failed.*/\1/')
        fi
        tests_passed=$((tests_total - tests_failed))
    fi
fi

# ---- bench/copy.lua ------------------------------------------------------------------
bench_rc=skipped
if [ -x "$build/wshost" ] && [ -f "$root/bench/copy.lua" ]; then
    step copy-bench 120 "$build/wshost" bench/copy.lua --json "$out/copy.json"
    bench_rc=$step_rc
else
    note "copy-bench skipped: $( [ -x "$build/wshost" ] || echo 'no build-gpu/wshost; ')$( \
        [ -f "$root/bench/copy.lua" ] || echo 'no bench/copy.lua')"
fi

# ---- summary ----------------------------------------------------------------------------
elapsed=$(($(date +%s) - start))
export GC_GPU="$gpu_name" GC_DRIVER="$driver" GC_CONFIGURE="$configure_rc" GC_BUILD="$build_rc" \
    GC_CTEST="$ctest_rc" GC_TOTAL="$tests_total" GC_PASSED="$tests_passed" \
    GC_FAILED="$tests_failed" GC_BENCH="$bench_rc" GC_ELAPSED="$elapsed" GC_LOG="$log" \
    GC_OUT="$out" GC_STEPS="$(printf '%s\n' "${steps[@]}")"
if command -v python3 >/dev/null 2>&1; then
    python3 - <<'PY' >>"$log" 2>&1
import json, os, re
e = os.environ
log = open(e["GC_LOG"], errors="replace").read()
def num(s):
    try: return int(s)
    except ValueError: return s
figures = {}
# Lines the C tests print with measured numbers (test_cuda and others).
for m in re.finditer(r"^(?:\d+: )?\s+(copy_batch: .*|fill 256 MiB: .*|sleep\(1\): .*|\(cuda:\d+: .*\))$", log, re.M):
    figures.setdefault("c_tests", []).append(m.group(1))
results = {}
for m in re.finditer(r"Test\s+#\d+: (\S+) \.+\s*(?:\*\*\*)?(Not Run|[A-Za-z]+)", log):
    results[m.group(1)] = m.group(2)
copy = None
path = os.path.join(e["GC_OUT"], "copy.json")
if os.path.exists(path):
    try: copy = json.load(open(path))
    except Exception as ex: copy = {"error": "copy.json is not valid JSON: %s" % ex}
summary = {
    "device": e["GC_GPU"], "driver": e["GC_DRIVER"],
    "configure_rc": num(e["GC_CONFIGURE"]), "build_rc": num(e["GC_BUILD"]),
    "ctest_rc": num(e["GC_CTEST"]),
    "tests": {"total": num(e["GC_TOTAL"]), "passed": num(e["GC_PASSED"]),
              "failed": num(e["GC_FAILED"]), "results": results},
    "copy_bench_rc": num(e["GC_BENCH"]), "copy_bench": copy,
    "figures": figures,
    "steps": [dict(zip(("name", "rc", "seconds"), map(num, s.split())))
              for s in e["GC_STEPS"].splitlines() if s.strip()],
    "elapsed_s": num(e["GC_ELAPSED"]),
}
json.dump(summary, open(os.path.join(e["GC_OUT"], "summary.json"), "w"), indent=2)
PY
else
    printf '{"device": "%s", "configure_rc": %s, "build_rc": %s, "ctest_rc": %s, "tests": {"total": %s, "passed": %s, "failed": %s}, "copy_bench_rc": "%s", "elapsed_s": %s}\n' \
        "$gpu_name" "$configure_rc" "$build_rc" "$ctest_rc" "$tests_total" "$tests_passed" \
        "$tests_failed" "$bench_rc" "$elapsed" >"$out/summary.json"
fi
note "done in ${elapsed}s: configure $configure_rc, build $build_rc, C tests" \
     "$tests_passed/$tests_total passed ($tests_failed failed), copy bench $bench_rc"
note "log: $log; summary: $out/summary.json"
[ "$configure_rc" -eq 0 ] && [ "$build_rc" -eq 0 ] && [ "$ctest_rc" -eq 0 ]
