#!/bin/bash
# Ranks started with different configurations must refuse to start, all of
# them, naming the key and each value, instead of running out of step until
# one waits forever. Skipped (77) without MPI.
cd "$(dirname "$0")/../.." || exit 1
[ "${WS_HAVE_MPI:-OFF}" = "ON" ] || { echo "skip: built without MPI"; exit 77; }
command -v mpirun >/dev/null || { echo "skip: no mpirun"; exit 77; }
. tests/e2e/fixtures/pipeline_lib.sh
export WSHOST
mpi=(timeout 120 mpirun --allow-run-as-root --oversubscribe -n 2)
tiny="model=tiny kv_cache_mb=1 progress=off"

# Each rank reads its own arguments (a launcher script that got them wrong).
per_rank() { # key value-on-rank-0 value-on-rank-1
    "${mpi[@]}" bash -c 'r=${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-0}}
        if [ "$r" = 0 ]; then v=$2; else v=$3; fi
        exec "$WSHOST" pipelines/verl_lora.lua $4 "$1=$v"' _ "$@" "$tiny" >"$tmp/out" 2>&1
}

per_rank steps 2 3
rc=$?
check_rc "ranks with different steps exit 2" 2 "$rc"
check "the message names the key and both values" \
    "verl_lora: config: ranks disagree on 'steps': rank 0 has 2, rank 1 has 3" "$(cat "$tmp/out")"
[ $rc -eq 2 ] || cat "$tmp/out"
if grep -q "^# setup\|^#step" "$tmp/out"; then fail "nothing is set up"; else pass "nothing is set up"; fi

per_rank target_modules q_proj q_proj,v_proj
rc=$?
check_rc "ranks with different target_modules exit 2" 2 "$rc"
check "a string value is quoted" \
    "ranks disagree on 'target_modules': rank 0 has \"q_proj\", rank 1 has \"q_proj,v_proj\"" \
    "$(cat "$tmp/out")"

# The same configuration on both ranks still runs.
# shellcheck disable=SC2086
if "${mpi[@]}" "$WSHOST" pipelines/verl_lora.lua $tiny steps=2 >"$tmp/out" 2>&1; then
    pass "equal configurations run"
else
    fail "equal configurations run"; cat "$tmp/out"
fi
finish
