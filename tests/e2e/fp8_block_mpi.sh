#!/bin/bash
# engine_dtype=fp8_block over two ranks (uneven FSDP shards on tiny-moe,
# gathers over MPI): verified every step, the staged checksums summed over the
# ranks. Apart from fp8_block.sh so the sanitizer build runs it with the Open
# MPI suppressions. Skipped (77) without MPI.
cd "$(dirname "$0")/../.." || exit 1
[ "${WS_HAVE_MPI:-OFF}" = "ON" ] || { echo "skip: built without MPI"; exit 77; }
command -v mpirun >/dev/null || { echo "skip: no mpirun"; exit 77; }
. tests/e2e/fixtures/pipeline_lib.sh
args="model=tiny-moe steps=3 kv_cache_mb=1 bucket_mb=0.25 progress=off engine_dtype=fp8_block free_cache_engine=true sleep_level=2 lora_rank=8"
# shellcheck disable=SC2086
if mpirun --allow-run-as-root --oversubscribe -n 2 "$WSHOST" pipelines/verl_lora.lua $args \
       --json "$tmp/mpi.jsonl" >"$tmp/log" 2>&1 &&
   "$WSHOST" tests/e2e/fixtures/check_run.lua "$tmp/mpi.jsonl" $args >>"$tmp/log" 2>&1; then
    pass "fp8_block: two ranks"
else
    fail "fp8_block: two ranks"; cat "$tmp/log"
fi
finish
