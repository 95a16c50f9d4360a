#!/usr/bin/env bash
# fault_remote.sh: server mode survives every failed allocation on either
# side. An engine process (the scripted receiver tests/c/remote_recv) serves
# two trainers in turn:
#   script: the scripted sender tests/c/remote_send, two syncs, a wake and a
#           sleep over many small buckets (ws_sender_bucket);
#   runner: wshost itself, verl_lora.lua on the tiny model with
#           engine_address= (the plan packing the slots, ws_sender_submit,
#           proofs at FINISH, VERIFY at each rollout, level-2 sleeps), in a
#           few buckets of a size that is no multiple of 256 bytes.
# One run per N fails the N-th host allocation (the core's own bookkeeping:
# messages, manifests, plans, channel frames) of the engine, then of the
# trainer, N = 1, 2, ... until a run no longer reaches an N-th allocation,
# and that last run must succeed (the script's engine holding version 2
# exactly, the runner verifying both steps). Every run with a failed
# allocation must end on both sides within the time limit, by exit (not by a
# signal), with no sanitizer report (LeakSanitizer included in the ASan
# build), and say "out of memory" on one side or the other (the failing side,
# or the trainer the engine told).
# Skipped (77) unless the build has -DWS_FAULT_INJECTION=ON.
set -u
cd "$(dirname "$0")/../.." || exit 1
[ "${WS_FAULT_INJECTION:-OFF}" = "ON" ] || { echo "skip: built without WS_FAULT_INJECTION"; exit 77; }
: "${WS_BUILD_DIR:?WS_BUILD_DIR must name the build directory}"
: "${WSHOST:?WSHOST must name the wshost binary}"
send=$WS_BUILD_DIR/tests/remote_send
recv=$WS_BUILD_DIR/tests/remote_recv
[ -x "$send" ] && [ -x "$recv" ] || { echo "FAIL: $send or $recv not built"; exit 1; }
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}exitcode=86"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:+$UBSAN_OPTIONS:}print_stacktrace=1"
export WSHOST_DEVICE=cpu
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
MAX_N=3000 # far above either side's count
SHOW=3     # failing runs shown in full per trainer and side
LIMIT=30   # seconds a run may take; a live peer is noticed within 2 s

# The scripted pair: its own tensors.
script_tensors=(-t a:bf16:300x64 -t b:f32:1000 -t c:f16:7x9)
# The runner's engine: the tiny model's engine tensors, as wshost lays them out.
cat >"$tmp/engine_spec.lua" <<'LUA'
local models = require("ws.models")
local inprocess = require("ws.inprocess")
for _, e in ipairs(inprocess.expected(models.get("tiny"), nil, "engine")) do
    print("-t")
    print(e.name .. ":bf16:" .. table.concat(e.shape, "x"))
end
LUA
mapfile -t runner_tensors < <("$WSHOST" "$tmp/engine_spec.lua")
[ "${#runner_tensors[@]}" -gt 10 ] || { echo "FAIL: no engine layout for the tiny model"; exit 1; }

# run TRAINER SIDE N: the engine and TRAINER (script or runner) with the
# N-th host allocation of SIDE (engine, trainer; "none": no failure)
# failing; sets rrc and src, leaves the outputs in $tmp/{r,s}.{out,err}.
run() {
    local trainer=$1 side=$2 n=$3 name="wshost-fault-$$-$1-$2-$3" rpid i f
    local renv=(env) senv=(env) engine
    [ "$side" = engine ] && renv+=(WSHOST_FAIL_ALLOC="host:$n")
    [ "$side" = trainer ] && senv+=(WSHOST_FAIL_ALLOC="host:$n")
    # Every output starts empty: the last run's "ok listen" must not start
    # this run's trainer.
    for f in r.out r.err s.out s.err; do : >"$tmp/$f"; done
    if [ "$trainer" = script ]; then
        engine=("$recv" "$name" -T 5000 -v 2 "${script_tensors[@]}")
    else
        engine=("$recv" "$name-0" -T 5000 "${runner_tensors[@]}")
    fi
    "${renv[@]}" timeout -k 5 "$LIMIT" "${engine[@]}" >"$tmp/r.out" 2>"$tmp/r.err" &
    rpid=$!
    # The trainer connects once the engine listens (or not at all when the
    # engine failed before it could).
    for ((i = 0; i < 500; i++)); do
        grep -q '^ok listen' "$tmp/r.out" && break
        kill -0 "$rpid" 2>/dev/null || break
        sleep 0.01
    done
    src=0
    if grep -q '^ok listen' "$tmp/r.out"; then
        if [ "$trainer" = script ]; then
            "${senv[@]}" timeout -k 5 "$LIMIT" "$send" "$name" -T 5000 -C 5000 -s 4096 -p 700 \
                "${script_tensors[@]}" sync:1 wake:weights sync:2 sleep:1 close \
                >"$tmp/s.out" 2>"$tmp/s.err"
        else
            "${senv[@]}" timeout -k 5 "$LIMIT" "$WSHOST" pipelines/verl_lora.lua model=tiny \
                lora_rank=0 steps=2 sleep_level=2 bucket_mb=0.3 engine_address="$name" \
                engine_timeout_ms=5000 progress=off >"$tmp/s.out" 2>"$tmp/s.err"
        fi
        src=$?
    fi
    # A trainer that failed before it connected leaves the engine waiting
    # for one (its own doing is not at stake): end it, unless it ended itself.
    if [ "$src" -ne 0 ] && ! grep -q -e '^ok connect' -e '^# engine: process' "$tmp/s.out" &&
       kill -0 "$rpid" 2>/dev/null; then
        kill "$rpid" 2>/dev/null
        wait "$rpid"
        rrc=0
        return
    fi
    wait "$rpid"
    rrc=$?
}

# The run without a failure succeeded: the engine holds what was sent.
whole() {
    [ "$rrc" -eq 0 ] && [ "$src" -eq 0 ] || return 1
    if [ "$1" = script ]; then grep -q '^ok check 2' "$tmp/r.out"
    else grep -q 'verified 2 of 2' "$tmp/s.out" "$tmp/s.err"; fi
}

show() {
    for f in r.out r.err s.out s.err; do
        echo "    --- $f"
        sed 's/^/    /' "$tmp/$f" | tail -n 30
    done
}

fail=0
for trainer in script runner; do
    run "$trainer" none 0
    if ! whole "$trainer"; then
        echo "FAIL $trainer: the run without a failed allocation: engine exit $rrc, trainer exit $src"
        show
        exit 1
    fi
    for side in engine trainer; do
        t0=$SECONDS
        shown=0
        nfail=0
        for ((n = 1; n <= MAX_N; n++)); do
            run "$trainer" "$side" "$n"
            inj=$tmp/r.err
            [ "$side" = trainer ] && inj=$tmp/s.err
            injected=0
            grep -q "fault injection: failing host allocation #$n\$" "$inj" && injected=1
            bad=""
            if [ "$injected" -eq 0 ]; then
                # Fewer than n allocations on that side: the run must have succeeded.
                whole "$trainer" || bad="exit $rrc (engine) / $src (trainer) without an injected failure"
            elif [ "$rrc" -eq 124 ] || [ "$src" -eq 124 ] || [ "$rrc" -eq 137 ] ||
                 [ "$src" -eq 137 ]; then
                bad="still running after ${LIMIT} s (engine exit $rrc, trainer exit $src)"
            elif [ "$rrc" -ge 128 ] || [ "$src" -ge 128 ]; then
                bad="killed by a signal (engine exit $rrc, trainer exit $src)"
            elif [ "$rrc" -eq 86 ] || [ "$src" -eq 86 ] ||
                 grep -q -e "Sanitizer" -e "runtime error:" "$tmp/r.err" "$tmp/s.err"; then
                bad="sanitizer report (engine exit $rrc, trainer exit $src)"
            elif [ "$rrc" -eq 0 ] && [ "$src" -eq 0 ]; then
                bad="both sides exit 0: the failed allocation went unreported"
            elif ! cat "$tmp"/r.out "$tmp"/r.err "$tmp"/s.out "$tmp"/s.err |
                   grep -Eqi "out of ([a-z]+ )?memory"; then
                bad="no out-of-memory message (engine exit $rrc, trainer exit $src)"
            fi
            if [ -n "$bad" ]; then
                nfail=$((nfail + 1))
                echo "FAIL $trainer $side host:$n: $bad"
                if [ "$shown" -lt "$SHOW" ]; then
                    show
                    shown=$((shown + 1))
                fi
            fi
            [ "$injected" -eq 1 ] || break
        done
        echo "$trainer, $side: $((n - 1)) host allocations failed one at a time, $nfail bad runs," \
             "$((SECONDS - t0)) s"
        [ "$nfail" -eq 0 ] || fail=1
        [ "$n" -le "$MAX_N" ] || { echo "FAIL $trainer $side: more than $MAX_N allocations"; fail=1; }
    done
done
exit $fail
