#!/bin/bash
# Values that would build something absurd or meaningless are configuration
# errors (one line, exit 2) that say what is accepted; an unusable
# WSHOST_THREADS stops wshost at startup, naming the variable and the value.
cd "$(dirname "$0")/../.." || exit 1
. tests/e2e/fixtures/pipeline_lib.sh

usage_error() { # name expected-message args...
    local name=$1 want=$2; shift 2
    timeout 60 "$WSHOST" pipelines/verl_lora.lua progress=off "$@" >"$tmp/out" 2>&1
    local rc=$?
    if [ $rc -eq 2 ] && grep -qF -- "$want" "$tmp/out" && [ "$(wc -l <"$tmp/out")" -eq 1 ]; then
        pass "$name"
    else
        fail "$name (exit $rc, want 2 and one line with [$want])"; cat "$tmp/out"
    fi
}

usage_error "lora_rank above the smallest targeted layer" \
    "verl_lora: config key 'lora_rank': LoRA rank 100000 is larger than the smallest targeted layer (k_proj [32, 99]); the rank must be <= 32" \
    model=tiny lora_rank=100000
usage_error "the bound follows the targeted layers" \
    "config key 'lora_rank': LoRA rank 65 is larger than the smallest targeted layer (q_proj [64, 99]); the rank must be <= 64" \
    model=tiny lora_rank=65 target_modules=q_proj,gate_proj
usage_error "a negative lora_alpha" "config key 'lora_alpha' must be > 0, got -16" \
    model=tiny lora_alpha=-16
usage_error "a zero lora_alpha" "config key 'lora_alpha' must be > 0, got 0" \
    model=tiny lora_alpha=0
usage_error "steps above 1e6" "config key 'steps' must be <= 1000000, got 1000001" \
    model=tiny steps=1000001

# The largest rank the layers allow still runs.
if "$WSHOST" pipelines/verl_lora.lua model=tiny steps=1 kv_cache_mb=1 progress=off \
       lora_rank=64 target_modules=q_proj,gate_proj >"$tmp/out" 2>&1; then
    pass "lora_rank equal to the bound runs"
else
    fail "lora_rank equal to the bound runs"; cat "$tmp/out"
fi

for v in abc 0 -2 4x 257 99999999999999999999; do
    WSHOST_THREADS=$v "$WSHOST" -e 'print(ws.default_device())' >"$tmp/out" 2>&1
    rc=$?
    if [ $rc -ne 0 ] && grep -qF "WSHOST_THREADS=$v" "$tmp/out" &&
       grep -qF "1 to 256" "$tmp/out"; then
        pass "WSHOST_THREADS=$v is an error at startup (exit $rc)"
    else
        fail "WSHOST_THREADS=$v (exit $rc)"; cat "$tmp/out"
    fi
done
WSHOST_THREADS=3 "$WSHOST" -e 'print(ws.default_device())' >"$tmp/out" 2>&1
check "WSHOST_THREADS=3 is used" "3 threads" "$(cat "$tmp/out")"
WSHOST_THREADS='' "$WSHOST" -e 'print(ws.default_device())' >"$tmp/out" 2>&1
check_rc "an empty WSHOST_THREADS means unset" 0 $?
finish
