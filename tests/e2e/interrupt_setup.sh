#!/bin/bash
# Ctrl-C while the engine is being set up must say that the run was
# interrupted and exit 130; the cleanup of the half-built engine must not
# replace that message with one of its own. The signal is sent once the
# process holds more than the trainer's shards, i.e. while the engine's
# weights are being filled.
cd "$(dirname "$0")/../.." || exit 1
. tests/e2e/fixtures/pipeline_lib.sh
# qwen3-0.6b: 1.23 GB of trainer shards, then 1.23 GB of engine weights.
engine_started_kb=1300000

rss_kb() { # pid -> resident kB, or nothing once the process is gone
    local k v _
    while read -r k v _; do
        [ "$k" = "VmRSS:" ] && { echo "$v"; return; }
    done <"/proc/$1/status" 2>/dev/null
}

hit=0
for attempt in 1 2 3; do
    "$WSHOST" pipelines/verl_lora.lua model=qwen3-0.6b steps=1000 progress=off \
        >"$tmp/out" 2>&1 &
    pid=$!
    while kill -0 $pid 2>/dev/null; do
        r=$(rss_kb $pid)
        [ -n "$r" ] && [ "$r" -gt $engine_started_kb ] && break
        sleep 0.005
    done
    kill -INT $pid 2>/dev/null
    wait $pid
    rc=$?
    # Landed after setup: the run was already stepping; try again.
    if grep -q "^# setup" "$tmp/out"; then echo "attempt $attempt: setup had ended"; continue; fi
    hit=1
    break
done
if [ $hit -eq 0 ]; then
    echo "skip: setup ended before the signal arrived in 3 attempts"; exit 77
fi
out=$(cat "$tmp/out")
check_rc "Ctrl-C during setup exits 130" 130 "$rc"
check "the message says interrupted" "interrupted" "$out"
if [[ "$out" == *"live tensor"* ]]; then
    fail "the cleanup does not replace the message: $out"
else
    pass "the cleanup does not replace the message"
fi
finish
