#!/bin/bash
# pipelines/verl_lora.lua on one rank, every free_cache_engine x sleep_level x
# LoRA combination on the tiny model, checked through --json: verification
# passes, the base is sent exactly when PR #5147's rule says, engine memory
# is released at sleep. Also full_sync with f32 master weights and offload.
cd "$(dirname "$0")/../.." || exit 1
. tests/e2e/fixtures/pipeline_lib.sh
run_matrix
args="model=tiny steps=3 kv_cache_mb=1 bucket_mb=0.25 progress=off free_cache_engine=true sleep_level=2"
if "$WSHOST" pipelines/full_sync.lua $args param_dtype=f32 param_offload=true --json "$tmp/full.jsonl" >"$tmp/log" 2>&1 &&
   "$WSHOST" tests/e2e/fixtures/check_run.lua "$tmp/full.jsonl" $args lora_rank=0 >>"$tmp/log" 2>&1 &&
   grep -q '"offload":[1-9]' "$tmp/full.jsonl"; then
    pass "full_sync f32 master weights + offload"
else
    fail "full_sync f32 master weights + offload"; cat "$tmp/log"
fi
finish
