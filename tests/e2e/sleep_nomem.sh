#!/bin/bash
# A level-1 sleep whose host backup cannot be allocated must stop the run with
# the out-of-memory message naming the pool, never report the engine asleep.
# The address-space limit sits between what the run needs without a backup
# (checked first, so the failure below is the sleep's) and what it needs with
# one: qwen3-0.6b holds 1.23 GB of trainer shards and 1.23 GB of engine
# weights, and the backup is another 1.23 GB.
cd "$(dirname "$0")/../.." || exit 1
. tests/e2e/fixtures/pipeline_lib.sh
# The sanitizers reserve terabytes of shadow memory, which no limit admits.
if grep -qs '^WS_SANITIZE:STRING=.\+' "${WS_BUILD_DIR:-build}/CMakeCache.txt"; then
    echo "skip: address-space limits do not apply to sanitizer builds"; exit 77
fi
limit_kb=3100000
# A fixed thread count and few malloc arenas keep the address space the
# same on machines with many cores (each arena reserves 64 MB).
export WSHOST_THREADS=2 MALLOC_ARENA_MAX=2
args="model=qwen3-0.6b steps=2 kv_cache_mb=16 progress=off"

# shellcheck disable=SC2086
(ulimit -v $limit_kb; exec "$WSHOST" pipelines/verl_lora.lua $args free_cache_engine=false) \
    >"$tmp/control" 2>&1
rc=$?
check_rc "without a backup the run fits under the limit" 0 "$rc"
[ $rc -eq 0 ] || cat "$tmp/control"

# shellcheck disable=SC2086
(ulimit -v $limit_kb; exec "$WSHOST" pipelines/verl_lora.lua $args sleep_level=1 \
    --json "$tmp/run.jsonl") >"$tmp/out" 2>&1
rc=$?
if [ $rc -ne 0 ]; then pass "a failed level-1 sleep fails the run (exit $rc)"
else fail "a failed level-1 sleep fails the run: exit 0"; fi
out=$(cat "$tmp/out")
check "the message says step 1 failed" "verl_lora: step 1 failed" "$out"
check "the message names the pool" "pool 'weights'" "$out"
check "the message says out of memory" "out of memory" "$out"
if grep -qs '"engine_asleep":true' "$tmp/run.jsonl"; then
    fail "no step is reported asleep"; cat "$tmp/run.jsonl"
else
    pass "no step is reported asleep"
fi
finish
