# tests/e2e/torch/torch_lib.sh: shared by the examples/torch e2e tests (sourced
# from the repository root). Skips (77) unless /usr/bin/python3 has torch and
# can import the wshost module from $WS_BUILD_DIR/python.
set -u
: "${WSHOST:=build/wshost}"
export WSHOST
. tests/e2e/fixtures/e2e_lib.sh
PY=/usr/bin/python3
export PYTHONPATH="${WS_BUILD_DIR:-build}/python${PYTHONPATH:+:$PYTHONPATH}"
export WSHOST_DEVICE=cpu OMP_NUM_THREADS=1
"$PY" -c 'import torch' 2>/dev/null || { echo "skip: no torch for $PY"; exit 77; }
"$PY" -c 'import wshost' 2>/dev/null || { echo "skip: wshost module not importable from $PYTHONPATH"; exit 77; }

# inprocess NAME WANT_RC LAUNCHER... -- ARGS...: runs examples/torch/inprocess.py,
# checks its exit status; the output is left in $tmp/NAME.log.
inprocess() {
    local name=$1 want=$2 launcher=()
    shift 2
    while [ "$1" != "--" ]; do launcher+=("$1"); shift; done
    shift
    local rc=0
    "${launcher[@]}" "$PY" examples/torch/inprocess.py "$@" >"$tmp/$name.log" 2>&1 || rc=$?
    if [ "$rc" = "$want" ]; then pass "$name (exit $rc)"; return 0; fi
    fail "$name: expected exit $want, got $rc"
    cat "$tmp/$name.log"
    return 1
}

# every_step_equal NAME STEPS: each of the STEPS step lines compared equal logits.
every_step_equal() {
    local n
    n=$(grep -c '^step [0-9]* .*max|diff| 0 ' "$tmp/$1.log")
    if [ "$n" = "$2" ] && grep -q 'max |logit diff| 0 over all rollouts' "$tmp/$1.log"; then
        pass "$1: logits equal in all $2 steps"
    else
        fail "$1: $n of $2 steps with equal logits"; cat "$tmp/$1.log"
    fi
}

# run_matrix LAUNCHER...: free_cache_engine x sleep_level x memory, LoRA on, and
# LoRA off (every parameter trains, the base goes every step) at a level-2 sleep.
run_matrix() {
    local free level memory name
    for free in 0 1; do
        for level in 1 2; do
            for memory in callbacks wshost; do
                name="fce=$free,level=$level,memory=$memory"
                inprocess "$name" 0 "$@" -- --steps 4 --free-cache-engine "$free" \
                    --sleep-level "$level" --memory "$memory" --lora-rank 4 &&
                    every_step_equal "$name" 4
            done
        done
    done
    for memory in callbacks wshost; do
        name="lora=0,fce=1,level=2,memory=$memory"
        inprocess "$name" 0 "$@" -- --steps 3 --sleep-level 2 --memory "$memory" --lora-rank 0 --tied 1 &&
            every_step_equal "$name" 3
    done
    name="verify=sent,fce=1,level=2"
    inprocess "$name" 0 "$@" -- --steps 3 --sleep-level 2 --verify sent && every_step_equal "$name" 3
}

# run_buggy LAUNCHER...: verl #3149 (the base skipped after a level-2 sleep).
run_buggy() {
    local log memory
    for memory in callbacks wshost; do
        # verify=all: wshost stops before step 2's rollout, naming the discarded tensor.
        if inprocess "buggy,verify=all,memory=$memory" 1 "$@" -- --steps 3 --policy buggy \
            --sleep-level 2 --memory "$memory" --verify all; then
            log=$(cat "$tmp/buggy,verify=all,memory=$memory.log")
            check "buggy verify=all ($memory): step 1 matched" "max|diff| 0 " "$log"
            check "buggy verify=all ($memory): step 2 failed" "step 2 failed" "$log"
            check "buggy verify=all ($memory): says the contents were discarded" "discarded" "$log"
            check "buggy verify=all ($memory): names the tensor" "tensor '" "$log"
            if grep -q '^step 2 ' <<<"$log"; then fail "buggy verify=all ($memory): step 2 reached its rollout"; fi
        fi
        # verify=off: the rollout runs on discarded weights; the logits are far off.
        if inprocess "buggy,verify=off,memory=$memory" 0 "$@" -- --steps 3 --policy buggy \
            --sleep-level 2 --memory "$memory" --verify off --check-logits report; then
            local d
            d=$(sed -n 's/^step 2 .*max|diff| \([^ ]*\) .*/\1/p' "$tmp/buggy,verify=off,memory=$memory.log")
            if [ "$d" = nan ] || awk -v d="$d" 'BEGIN { exit !(d + 0 > 1) }'; then
                pass "buggy verify=off ($memory): step 2's logits are wrong (max |diff| $d)"
            else
                fail "buggy verify=off ($memory): step 2's max |diff| is [$d], expected nan or > 1"
                cat "$tmp/buggy,verify=off,memory=$memory.log"
            fi
        fi
    done
    # A level-1 sleep keeps the base: the same policy is then right.
    inprocess "buggy,level=1" 0 "$@" -- --steps 3 --policy buggy --sleep-level 1 &&
        every_step_equal "buggy,level=1" 3
}
