#!/bin/bash
# Policy variants and the command line: skipping the base after a level-2
# sleep must fail with the stale-weights error (naming tensor, pool, sleep);
# the same skip without sleeping passes; configuration mistakes exit 2 with a
# clear message; a sweep can load a pipeline and run it in-process.
cd "$(dirname "$0")/../.." || exit 1
. tests/e2e/fixtures/pipeline_lib.sh
tiny="model=tiny steps=3 kv_cache_mb=1 progress=off"

"$WSHOST" tests/e2e/fixtures/skip_base.lua $tiny sleep_level=2 >"$tmp/out" 2>&1
rc=$?
if [ $rc -ne 0 ] && grep -q "verify (step 2 rollout)" "$tmp/out" &&
   grep -q "'model.embed_tokens.weight'" "$tmp/out" && grep -q "pool 'weights'" "$tmp/out" &&
   grep -q "sleep(level=2)" "$tmp/out" && grep -q "(step 1)" "$tmp/out"; then
    pass "skip_base after sleep(2) fails with the stale-weights error"
else
    fail "skip_base after sleep(2) (rc=$rc)"; cat "$tmp/out"
fi

if "$WSHOST" tests/e2e/fixtures/skip_base.lua $tiny sleep_level=2 free_cache_engine=false \
       --json "$tmp/skip.jsonl" >"$tmp/out" 2>&1 &&
   "$WSHOST" tests/e2e/fixtures/check_run.lua "$tmp/skip.jsonl" $tiny sleep_level=2 \
       free_cache_engine=false lora_rank=32 >>"$tmp/out" 2>&1; then
    pass "skip_base with free_cache_engine=false passes"
else
    fail "skip_base with free_cache_engine=false"; cat "$tmp/out"
fi

if "$WSHOST" tests/e2e/fixtures/skip_base.lua $tiny sleep_level=1 >"$tmp/out" 2>&1; then
    pass "skip_base after sleep(1) passes (weights restored from the backup)"
else
    fail "skip_base after sleep(1)"; cat "$tmp/out"
fi

# verify=sent: the skipped base is caught by the readable check (no bytes
# hashed), with the same tensor, pool and sleep named.
"$WSHOST" tests/e2e/fixtures/skip_base.lua $tiny sleep_level=2 verify=sent >"$tmp/out" 2>&1
rc=$?
if [ $rc -ne 0 ] &&
   grep -qF "verify (step 2 rollout): readable: tensor 'model.embed_tokens.weight' in pool 'weights'" "$tmp/out" &&
   grep -q "sleep(level=2)" "$tmp/out" && grep -q "(step 1)" "$tmp/out"; then
    pass "verify=sent: skip_base after sleep(2) fails with the stale-weights error"
else
    fail "verify=sent: skip_base after sleep(2) (rc=$rc)"; cat "$tmp/out"
fi

# A sent plan that leaves a tensor out (the engine keeps last step's adapter).
for mode in all sent; do
    "$WSHOST" tests/e2e/fixtures/drop_sent.lua $tiny verify=$mode >"$tmp/out" 2>&1
    rc=$?
    if [ $rc -ne 0 ] && grep -q "verify (step 2 rollout): engine tensor '.*lora_[AB].*' does not hold trainer parameter" "$tmp/out"; then
        pass "verify=$mode: a sent plan that did not write a tensor fails naming it"
    else
        fail "verify=$mode: drop_sent (rc=$rc)"; cat "$tmp/out"
    fi
done

# verify=sent passes the runs check_run checks, for both sleep levels.
for level in 1 2; do
    if "$WSHOST" pipelines/verl_lora.lua $tiny sleep_level=$level verify=sent \
           --json "$tmp/sent.jsonl" >"$tmp/out" 2>&1 &&
       "$WSHOST" tests/e2e/fixtures/check_run.lua "$tmp/sent.jsonl" $tiny sleep_level=$level \
           free_cache_engine=true lora_rank=32 >>"$tmp/out" 2>&1 &&
       [ "$(grep -c '"verify":"sent"' "$tmp/sent.jsonl")" -eq 3 ]; then
        pass "verify=sent sleep_level=$level runs and verifies"
    else
        fail "verify=sent sleep_level=$level"; cat "$tmp/out"
    fi
done

# verify=off: every step row says off under `verified`, the summary says
# nothing was verified, every --json record carries verify="off".
if "$WSHOST" pipelines/verl_lora.lua $tiny verify=off --json "$tmp/off.jsonl" >"$tmp/out" 2>&1 &&
   [ "$(awk '/^#step /{for(i=1;i<=NF;i++) if($i=="verified") c=i; next}
             /^ +[0-9]+ /{n++; if($c=="off") k++} END{print k "/" n}' "$tmp/out")" = "3/3" ] &&
   grep -q "verify=off: nothing verified" "$tmp/out" &&
   [ "$(grep -c '"verify":"off"' "$tmp/off.jsonl")" -eq 3 ] &&
   [ "$(grep -c '"verified":false' "$tmp/off.jsonl")" -eq 3 ]; then
    pass "verify=off says so on every row, in the summary and in every record"
else
    fail "verify=off"; cat "$tmp/out"
fi

check_usage() { # expected-message args...
    local want=$1; shift
    "$WSHOST" pipelines/verl_lora.lua "$@" >"$tmp/out" 2>&1
    local rc=$?
    # One line, no traceback.
    if [ $rc -eq 2 ] && grep -qF "$want" "$tmp/out" && [ "$(wc -l <"$tmp/out")" -eq 1 ]; then
        pass "usage: $*"; else
        fail "usage: $* (rc=$rc)"; cat "$tmp/out"; fi
}
check_usage "verl_lora: unknown config key 'sleeplevel' (known: " sleeplevel=2
check_usage "verl_lora: config key 'sleep_level' must be one of 1, 2, got '3'" sleep_level=3
check_usage "verl_lora: config key 'steps' expects an integer, got 'ten'" steps=ten
check_usage "verl_lora: config key 'free_cache_engine' expects a boolean (true/false), got 'yes please'" "free_cache_engine=yes please"
check_usage "verl_lora: config key 'target_modules': unknown LoRA target module 'qkv'" target_modules=qkv $tiny
check_usage "verl_lora: config key 'device': " device=tpu $tiny
check_usage "verl_lora: config key 'steps' must be >= 0, got -1" steps=-1
check_usage "verl_lora: config key 'verify' must be one of all, sent, off, got 'some'" verify=some
check_usage "verl_lora: config key 'steps' expects an integer, got ''" steps=
check_usage "verl_lora: config key 'bucket_mb' must be <= 1048576, got 1e+308" bucket_mb=1e308 $tiny
check_usage "verl_lora: config key 'target_modules': unknown LoRA target module 'bogus'" "target_modules=q_proj, bogus" lora_rank=0 $tiny
check_usage "verl_lora: --json needs a file name" --json= $tiny
check_usage "verl_lora: --json: cannot write $tmp/no-such-dir/x.jsonl: No such file or directory" --json "$tmp/no-such-dir/x.jsonl" $tiny

if "$WSHOST" pipelines/verl_lora.lua --help | grep -q "sleep_level"; then pass "--help"; else fail "--help"; fi

# In-process sweep: load the pipeline (it must not run itself), run it twice.
cat >"$tmp/sweep.lua" <<'LUA'
local P = dofile("pipelines/verl_lora.lua")
local quiet = { quiet = true }
local _, s1 = P.run({ model = "tiny", steps = 2, kv_cache_mb = 1, sleep_level = 2 }, quiet)
local _, s2 = P.run({ model = "tiny", steps = 2, kv_cache_mb = 1, free_cache_engine = false }, quiet)
assert(s1.base_steps == 2 and s1.verified_steps == 2, "sleep_level=2 sweep point")
assert(s2.base_steps == 1 and s2.verified_steps == 2, "free_cache_engine=false sweep point")
print("sweep ok")
LUA
if "$WSHOST" "$tmp/sweep.lua" 2>&1 | grep -q "sweep ok"; then pass "in-process sweep"; else
    fail "in-process sweep"; "$WSHOST" "$tmp/sweep.lua"; fi
finish
