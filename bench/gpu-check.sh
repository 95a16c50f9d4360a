#!/usr/bin/env bash
# gpu-check.sh: the whole GPU check in one run, for a machine with CUDA,
# CMake, ninja and PyTorch but no package registry.
#
#   bench/gpu-check.sh [OUT_DIR]      (default: $OUT, else ./gpu-check-out)
#
# Configures without MPI (and with Lua from a carried .deps/lua when present:
# run bench/prepare-gpu-deps.sh on the build machine and carry .deps), builds
# into build-gpu with ninja, records nvidia-smi, runs the C tests (ctest -L c),
# the Lua specs (busted carried in .deps), the e2e tests that need no extra
# packages, the main job with 8B shapes, bench/sync.lua and bench/compare.lua
# (1.7B and 8B shapes, against PyTorch)
# and, when the binary and the script exist, bench/copy.lua. Writes
# OUT_DIR/gpu-check.log and OUT_DIR/summary.json. Every step runs under
# `timeout` against one overall budget (WS_GPU_CHECK_SECONDS, default 470 s)
# so the run ends well within 8 minutes. Exit status: 0 when the build
# succeeded and every C test passed. Extra configure arguments can be given in
# WS_GPU_CHECK_CMAKE_ARGS (split on spaces).
set -u -o pipefail

start=$(date +%s)
budget=${WS_GPU_CHECK_SECONDS:-470}
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
# The Python module is built for the python3 the steps below run (a conda or
# venv one with torch, not necessarily /usr/bin/python3).
py3=$(command -v python3 || true)
if [ -n "$py3" ]; then
    cfg+=(-DPython3_EXECUTABLE="$py3")
    "$py3" -c 'import sys; print("python:", sys.executable, sys.version.split()[0])' >>"$log" 2>&1
    "$py3" -c 'import torch; print("torch:", torch.__version__, "cuda", torch.version.cuda)' \
        >>"$log" 2>&1 || note "python3 ($py3) has no torch"
fi
if [ -z "$(command -v nvcc)" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    cfg+=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
fi
if [ -f "$root/.deps/lua/include/lua.h" ] && [ -f "$root/.deps/lua/liblua5.4.a" ]; then
    cfg+=(-DLUA_INCLUDE_DIR="$root/.deps/lua/include"
          -DLUA_STATIC_LIBRARY="$root/.deps/lua/liblua5.4.a")
    if [ -f "$root/.deps/lua/liblua5.4.so.0" ]; then
        cfg+=(-DLUA_SHARED_LIBRARY="$root/.deps/lua/liblua5.4.so.0")
    fi
    note "lua: carried .deps/lua"
else
    note "lua: no .deps/lua (run bench/prepare-gpu-deps.sh where Lua is installed and" \
         "carry .deps); relying on a system Lua"
fi
if [ -f "$root/.deps/cjson/include/cjson/cJSON.h" ]; then
    cfg+=(-DWS_CJSON_INCLUDE_DIR="$root/.deps/cjson/include"
          -DWS_CJSON_LIBRARY="$root/.deps/cjson/lib/libcjson.so.1")
    note "cjson: carried .deps/cjson"
fi
if [ -x "$root/.deps/busted/busted" ]; then
    cfg+=(-DBUSTED="$root/.deps/busted/busted")
    note "busted: carried .deps/busted"
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

# ---- NCCL: wshost loads libnccl.so.2 at run time; find PyTorch's copy if the
# loader does not know one, so the NCCL e2e test (world of one) can run.
if [ -z "${WSHOST_NCCL_LIBRARY:-}" ] && ! ldconfig -p 2>/dev/null | grep -q 'libnccl.so.2'; then
    nccl=$(python3 - <<'PY' 2>/dev/null
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
for r in roots:
    hits = glob.glob(os.path.join(r, "nvidia", "nccl", "lib", "libnccl.so*"))
    if hits:
        print(sorted(hits)[0]); break
PY
)
    [ -z "$nccl" ] && nccl=$(ls /usr/local/cuda/lib*/libnccl.so.2 /usr/lib/x86_64-linux-gnu/libnccl.so.2 \
        2>/dev/null | head -n1)
    if [ -n "$nccl" ]; then
        export WSHOST_NCCL_LIBRARY=$nccl
        note "nccl: $nccl"
    else
        note "nccl: libnccl.so.2 not found; the NCCL test will fail"
    fi
fi

# ---- Lua specs and end-to-end tests on the GPU ------------------------------------------
# Specs run inside wshost (busted carried in .deps); the e2e tests that need
# packages the GPU machine lacks (lua5.4, mpirun, gnuplot, Debian's torch) are
# left to CI. The pipeline e2e tests run on the default device: the GPU.
lua_rc=skipped
e2e_rc=skipped
if [ "$configure_rc" -eq 0 ] && [ -x "$build/wshost" ]; then
    step lua-specs 150 ctest --test-dir "$build" -L lua --output-on-failure --timeout 120
    lua_rc=$step_rc
    step e2e 150 env -u WSHOST_DEVICE ctest --test-dir "$build" -L e2e \
        -E 'lua_module|mpi_|sweep|peer|bench_copy' --output-on-failure --timeout 120
    e2e_rc=$step_rc
fi

# ---- the Python module on the GPU: DLPack with CUDA tensors, an in-process
# session on CUDA and the torch_sync benchmark; needs a python3 with torch and
# the module built for it (python3-dev headers at configure time).
python_rc=skipped
if [ "$configure_rc" -eq 0 ] && ls "$build"/python/wshost*.so >/dev/null 2>&1 && \
   python3 -c 'import torch' >/dev/null 2>&1; then
    step python-cuda 120 env PYTHONPATH="$build/python" python3 tests/python/test_cuda.py
    python_rc=$step_rc
    step python-session 120 env PYTHONPATH="$build/python" WSHOST_DEVICE=cpu \
        python3 tests/python/test_session.py
    [ "$step_rc" -ne 0 ] && python_rc=$step_rc
    # The in-process example on CUDA: logits equal after every sync, for both
    # kinds of engine memory; and verl #3149's policy must be stopped.
    for mem in callbacks wshost; do
        step "example-cuda-$mem" 120 env PYTHONPATH="$build/python" python3 \
            examples/torch/inprocess.py --device cuda --memory "$mem" --steps 4 --sleep-level 2
        [ "$step_rc" -ne 0 ] && python_rc=$step_rc
    done
    # FSDP2 (torch >= 2.4): fully_shard's DTensor parameters registered as they are.
    if python3 -c 'import torch.distributed.fsdp as f; f.fully_shard' >/dev/null 2>&1 ||
       python3 -c 'import torch.distributed._composable.fsdp as f; f.fully_shard' >/dev/null 2>&1; then
        step example-cuda-fsdp2 120 env PYTHONPATH="$build/python" python3 \
            examples/torch/inprocess.py --device cuda --trainer fsdp2 --steps 4 --sleep-level 2
        [ "$step_rc" -ne 0 ] && python_rc=$step_rc
    else
        note "example-cuda-fsdp2 skipped: this torch has no fully_shard"
    fi
    # The buggy policies must fail for the right reason: the discarded tensor named.
    bug="model.embed_tokens.weight.*discarded"
    step example-cuda-buggy 120 bash -c "! PYTHONPATH='$build/python' python3 \
        examples/torch/inprocess.py --device cuda --policy buggy --steps 3 --sleep-level 2 \
        >'$out/example-cuda-buggy.txt' 2>&1 && grep -q '$bug' '$out/example-cuda-buggy.txt'"
    [ "$step_rc" -ne 0 ] && python_rc=$step_rc
    # Server mode on the GPU: the slots are cudaMalloc'ed and shared through
    # CUDA IPC with the engine process, whose weights are on the same GPU.
    for level in 1 2; do
        step "server-cuda-level$level" 120 env PYTHONPATH="$build/python" python3 \
            examples/torch/server.py --device cuda --steps 4 --sleep-level "$level"
        [ "$step_rc" -ne 0 ] && python_rc=$step_rc
    done
    step server-cuda-buggy 120 bash -c "! PYTHONPATH='$build/python' python3 \
        examples/torch/server.py --device cuda --policy buggy --steps 3 --sleep-level 2 \
        >'$out/server-cuda-buggy.txt' 2>&1 && grep -q '$bug' '$out/server-cuda-buggy.txt'"
    [ "$step_rc" -ne 0 ] && python_rc=$step_rc
else
    note "python skipped: no wshost module in $build/python or no python3 with torch"
fi

# ---- the main job on the GPU: the verl LoRA loop with 8B shapes -------------------------
main_rc=skipped
if [ -x "$build/wshost" ]; then
    step main-8b-level2 90 "$build/wshost" pipelines/verl_lora.lua model=qwen3-8b steps=4 \
        sleep_level=2 --json "$out/verl_lora_8b_level2.jsonl"
    main_rc=$step_rc
    step main-8b-level1 90 "$build/wshost" pipelines/verl_lora.lua model=qwen3-8b steps=4 \
        sleep_level=1 --json "$out/verl_lora_8b_level1.jsonl"
    [ "$step_rc" -ne 0 ] && main_rc=$step_rc
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

# ---- sync benchmark and the PyTorch peer, 1.7B and 8B shapes ----------------------------
sync_rc=skipped
compare_rc=skipped
if [ -x "$build/wshost" ]; then
    for m in qwen3-1.7b qwen3-8b; do
        step "sync-$m" 90 "$build/wshost" bench/sync.lua model=$m iters=3 tiny_tensors=100000 \
            --json "$out/sync_$m.json"
        [ "$sync_rc" = skipped ] || [ "$sync_rc" -eq 0 ] && sync_rc=$step_rc
    done
    py=$(command -v python3 || true)
    if [ -n "$py" ] && "$py" -c 'import torch' >/dev/null 2>&1; then
        for m in qwen3-1.7b qwen3-8b; do
            step "compare-$m" 120 "$build/wshost" bench/compare.lua model=$m worlds=1 iters=3 \
                python="$py" json="$out/compare_$m.json"
            [ "$compare_rc" = skipped ] || [ "$compare_rc" -eq 0 ] && compare_rc=$step_rc
        done
    else
        note "compare skipped: no python3 with torch"
    fi
fi

# ---- summary ----------------------------------------------------------------------------
elapsed=$(($(date +%s) - start))
export GC_GPU="$gpu_name" GC_DRIVER="$driver" GC_CONFIGURE="$configure_rc" GC_BUILD="$build_rc" \
    GC_CTEST="$ctest_rc" GC_TOTAL="$tests_total" GC_PASSED="$tests_passed" \
    GC_FAILED="$tests_failed" GC_BENCH="$bench_rc" GC_ELAPSED="$elapsed" GC_LOG="$log" \
    GC_OUT="$out" GC_STEPS="$(printf '%s\n' "${steps[@]}")" GC_LUA="$lua_rc" GC_E2E="$e2e_rc" GC_PY="$python_rc" \
    GC_MAIN="$main_rc" GC_SYNC="$sync_rc" GC_COMPARE="$compare_rc"
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
benches = {}
for name in sorted(os.listdir(e["GC_OUT"])):
    if name.startswith(("sync_", "compare_")) and name.endswith(".json"):
        try: benches[name[:-5]] = json.load(open(os.path.join(e["GC_OUT"], name)))
        except Exception as ex: benches[name[:-5]] = {"error": str(ex)}
summary = {
    "device": e["GC_GPU"], "driver": e["GC_DRIVER"],
    "configure_rc": num(e["GC_CONFIGURE"]), "build_rc": num(e["GC_BUILD"]),
    "ctest_rc": num(e["GC_CTEST"]),
    "tests": {"total": num(e["GC_TOTAL"]), "passed": num(e["GC_PASSED"]),
              "failed": num(e["GC_FAILED"]), "results": results},
    "copy_bench_rc": num(e["GC_BENCH"]), "copy_bench": copy,
    "figures": figures, "benches": benches,
    "lua_specs_rc": num(e["GC_LUA"]), "e2e_rc": num(e["GC_E2E"]), "python_rc": num(e["GC_PY"]),
    "main_job_rc": num(e["GC_MAIN"]), "sync_bench_rc": num(e["GC_SYNC"]),
    "compare_rc": num(e["GC_COMPARE"]),
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
     "$tests_passed/$tests_total passed ($tests_failed failed), lua specs $lua_rc, e2e $e2e_rc," \
     "main job $main_rc, copy bench $bench_rc, sync bench $sync_rc, compare $compare_rc"
note "log: $log; summary: $out/summary.json"
[ "$configure_rc" -eq 0 ] && [ "$build_rc" -eq 0 ] && [ "$ctest_rc" -eq 0 ]
