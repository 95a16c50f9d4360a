#!/bin/bash
# examples/torch/server.py on one rank, the engine in its own process: its
# logits equal the trainer's after every sync for free_cache_engine x
# sleep_level, LoRA on and off; the verl #3149 bug stops before the rollout;
# and the faults: the engine killed mid-sync (the trainer raises within 2 s
# naming its pid, nothing left in /dev/shm, no socket), the trainer killed
# mid-sync (the engine reports it, keeps running with its weights invalid,
# exits cleanly on SIGTERM), an engine shape that disagrees (refused naming
# the tensor before any byte moves); and the engine's weights in memory it
# shares (Receiver.alloc), written in place. Skipped (77) without torch, the wshost
# Python module, or a Session with engine_address.
cd "$(dirname "$0")" && while [ ! -f pipelines/verl_lora.lua ] && [ "$PWD" != / ]; do cd ..; done
. tests/e2e/torch/torch_lib.sh
. tests/e2e/torch/server_lib.sh

run_server_matrix
run_server_buggy

# --- the engine's weights in memory it shares (Receiver.alloc): written in
# place, proven by the engine process; the same logits, the same bug caught
for level in 1 2; do
    name="shared,level=$level"
    if server "$name" 0 -- --steps 3 --sleep-level "$level" --engine-memory shared; then
        every_step_equal "$name" 3
        check "$name: written in place" "its weights in memory it shares, written in place" \
            "$(cat "$tmp/$name.log")"
    fi
done
name="shared,buggy"
if server "$name" 1 -- --steps 3 --policy buggy --sleep-level 2 --engine-memory shared; then
    log=$(cat "$tmp/$name.log")
    check "shared,buggy: step 2 failed" "step 2 failed" "$log"
    check "shared,buggy: names the discarded tensor" \
        "engine tensor 'model.embed_tokens.weight' (from 'model.embed_tokens.weight') is not valid: discarded" "$log"
    if grep -q '^step 2 ' <<<"$log"; then fail "shared,buggy: step 2 reached its rollout"; fi
fi

# --- a stray write into the engine's weights after a sync's FINISH (during
# the KV cache's wake): verify=all proves the weights again at the rollout
name="fault,stray-write"
# (step 1 starts awake: the first wake, and so the write, is step 2's)
if server "$name" 1 -- --steps 3 --fault stray-write --verify all; then
    log=$(cat "$tmp/$name.log")
    check "stray-write: step 2 failed" "step 2 failed" "$log"
    check "stray-write: names the tensor" "engine tensor 'model.norm.weight'" "$log"
    if grep -q '^step 2 ' <<<"$log"; then fail "stray-write: step 2 reached its rollout"; fi
fi

# --- the engine killed in the middle of sync 3 (step 2's base)
shm_before=$(shm_entries)
name="fault,engine-dies"
if server "$name" 1 -- --steps 3 --fault engine-dies --fault-sync 3; then
    log=$(cat "$tmp/$name.log")
    epid=$(sed -n 's/^# server: rank 0, engine pid \([0-9]*\) on .*/\1/p' <<<"$log")
    chan=$(sed -n 's/^# server: rank 0, engine pid [0-9]* on \(.*\)/\1/p' <<<"$log")
    check "engine-dies: step 2 failed" "step 2 failed" "$log"
    check "engine-dies: names the engine's pid" "engine process (pid $epid)" "$log"
    died=$(sed -n 's/.*killing myself after bucket .* (t=\([0-9.]*\)).*/\1/p' <<<"$log")
    seen=$(sed -n 's/^server: step 2 failed (rank 0, t=\([0-9.]*\)).*/\1/p' <<<"$log")
    if [ -n "$died" ] && [ -n "$seen" ] && awk -v a="$died" -v b="$seen" 'BEGIN { exit !(b - a < 2) }'; then
        pass "engine-dies: noticed $(awk -v a="$died" -v b="$seen" 'BEGIN { printf "%.0f", (b - a) * 1000 }') ms after the engine died"
    else
        fail "engine-dies: died at [$died], noticed at [$seen] (want < 2 s)"
    fi
    shm_after=$(shm_entries)
    if [ "$shm_before" = "$shm_after" ]; then pass "engine-dies: nothing new in /dev/shm"
    else fail "engine-dies: /dev/shm gained: $(comm -13 <(echo "$shm_before") <(echo "$shm_after"))"; fi
    if [ -n "$chan" ] && ! listening "$chan"; then pass "engine-dies: no socket left on $chan"
    else fail "engine-dies: socket [$chan] still listed in /proc/net/unix"; fi
fi

# --- the trainer killed in the middle of sync 3 (by its engine, so mid-sync for sure)
name="fault,trainer-dies"
"$PY" examples/torch/server.py --address "wshost-e2e-$$-td" --steps 3 --fault trainer-dies \
    --fault-sync 3 --linger 60 >"$tmp/$name.log" 2>&1 &
tpid=$!
rc=0
wait "$tpid" || rc=$?
check_rc "trainer-dies: the trainer was killed" 137 "$rc"
log=$(cat "$tmp/$name.log")
epid=$(sed -n 's/^# server: rank 0, engine pid \([0-9]*\) on .*/\1/p' <<<"$log")
# The engine's serving thread reports the failed sync ("... still serving").
for _ in $(seq 50); do grep -q "still serving" "$tmp/$name.log" && break; sleep 0.1; done
log=$(cat "$tmp/$name.log")
check "trainer-dies: the engine reports it" "engine 0 (pid $epid): error: trainer process (pid $tpid)" "$log"
check "trainer-dies: that sync's tensors are invalid" "marked invalid" "$log"
check "trainer-dies: the engine says its weights are invalid" "weights invalid" "$log"
if [ -n "$epid" ] && kill -0 "$epid" 2>/dev/null; then
    pass "trainer-dies: the engine (pid $epid) is still running"
    kill -TERM "$epid"
    for _ in $(seq 50); do kill -0 "$epid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$epid" 2>/dev/null; then fail "trainer-dies: the engine ignored SIGTERM"; kill -KILL "$epid"
    else check "trainer-dies: the engine exited cleanly" "exiting cleanly" "$(cat "$tmp/$name.log")"; fi
    if listening "wshost-e2e-$$-td-0"; then fail "trainer-dies: the engine's socket is still listed"
    else pass "trainer-dies: no socket left"; fi
else
    fail "trainer-dies: the engine [$epid] is not running"; cat "$tmp/$name.log"
fi

# --- the engine registers a shape the trainer's tensors disagree with
name="fault,wrong-shape"
if server "$name" 1 -- --steps 2 --fault wrong-shape; then
    log=$(cat "$tmp/$name.log")
    check "wrong-shape: step 1 failed" "step 1 failed" "$log"
    check "wrong-shape: names the tensor" "'model.norm.weight'" "$log"
    check "wrong-shape: before any byte moved" "before any byte moved" "$log"
    check "wrong-shape: the engine's weights were not touched" "all still zero" "$log"
fi
finish
