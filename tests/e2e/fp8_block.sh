#!/bin/bash
# engine_dtype=fp8_block: pipelines/verl_lora.lua on tiny and tiny-moe, LoRA
# on and off, sleep levels 1 and 2, verified every step (check_run: base sent
# when the rule says, the base lands as about half the bf16 bytes, memory
# returned at sleep); the policy that skips the base after a level-2 sleep
# still fails with the stale-weights error.
cd "$(dirname "$0")/../.." || exit 1
. tests/e2e/fixtures/pipeline_lib.sh
for model in tiny tiny-moe; do
    for level in 1 2; do
        for rank in 0 8; do
            args="model=$model steps=3 kv_cache_mb=1 bucket_mb=0.25 progress=off engine_dtype=fp8_block free_cache_engine=true sleep_level=$level lora_rank=$rank"
            name="fp8_block model=$model sleep_level=$level lora_rank=$rank"
            out="$tmp/run-$model-$level-$rank.jsonl"
            # shellcheck disable=SC2086
            if "$WSHOST" pipelines/verl_lora.lua $args --json "$out" >"$tmp/log" 2>&1 &&
               "$WSHOST" tests/e2e/fixtures/check_run.lua "$out" $args >>"$tmp/log" 2>&1 &&
               grep -q "MB into engine" "$tmp/log"; then
                pass "$name"
            else
                fail "$name"; cat "$tmp/log"
            fi
        done
    done
done

tiny="model=tiny steps=3 kv_cache_mb=1 progress=off engine_dtype=fp8_block"
"$WSHOST" tests/e2e/fixtures/skip_base.lua $tiny sleep_level=2 >"$tmp/out" 2>&1
rc=$?
if [ $rc -ne 0 ] && grep -q "verify (step 2 rollout)" "$tmp/out" &&
   grep -q "pool 'weights'" "$tmp/out" && grep -q "sleep(level=2)" "$tmp/out"; then
    pass "fp8_block: skip_base after sleep(2) fails with the stale-weights error"
else
    fail "fp8_block: skip_base after sleep(2) (rc=$rc)"; cat "$tmp/out"
fi

args="model=tiny steps=3 kv_cache_mb=1 bucket_mb=0.25 progress=off engine_dtype=fp8_block free_cache_engine=true sleep_level=2"
# shellcheck disable=SC2086
if "$WSHOST" pipelines/full_sync.lua $args param_dtype=f32 --json "$tmp/full.jsonl" >"$tmp/log" 2>&1 &&
   "$WSHOST" tests/e2e/fixtures/check_run.lua "$tmp/full.jsonl" $args lora_rank=0 >>"$tmp/log" 2>&1; then
    pass "fp8_block: full_sync from f32 master weights"
else
    fail "fp8_block: full_sync from f32 master weights"; cat "$tmp/log"
fi
# The engine's file holds the fp8 weights and their scales under vLLM's names.
if "$WSHOST" pipelines/verl_lora.lua model=tiny steps=1 kv_cache_mb=1 progress=off lora_rank=0 \
       engine_dtype=fp8_block save_engine="$tmp/eng" >"$tmp/log" 2>&1 &&
   head -c 100000 "$tmp/eng/engine-rank-00000.safetensors" | grep -q '"F8_E4M3"' &&
   head -c 100000 "$tmp/eng/engine-rank-00000.safetensors" |
       grep -q 'model.layers.0.self_attn.qkv_proj.weight_scale_inv'; then
    pass "fp8_block: save_engine writes F8_E4M3 weights and weight_scale_inv"
else
    fail "fp8_block: save_engine"; cat "$tmp/log"
fi

finish
