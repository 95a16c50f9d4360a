#!/usr/bin/env bash
# mpi_kill.sh: `kill -9` of one rank of a running `mpirun -n 2` main job, at
# random moments (setup, training, syncs, sleeps), 10 times. Every time the
# survivor must be gone within 2 s of the kill, the job must exit non-zero,
# and the output must name the rank that was lost: the survivor's own
# message once its world is up (host/core/comm_watch.c), the launcher's before.
# Prints each measured detection time (kill to survivor gone). Skipped (77)
# without MPI.
set -u
cd "$(dirname "$0")/../.." || exit 1
[ "${WS_HAVE_MPI:-OFF}" = "ON" ] || { echo "skip: built without MPI"; exit 77; }
MPIRUN=$(command -v mpirun || command -v mpiexec) || { echo "skip: no mpirun"; exit 77; }
. tests/e2e/fixtures/e2e_lib.sh
export WSHOST_DEVICE=cpu
ROUNDS=${WS_KILL_ROUNDS:-10}
LIMIT_MS=2000
# A seed per run, printed, so a failing moment can be replayed.
seed=${WS_KILL_SEED:-$(( $(date +%s) % 100000 ))}
RANDOM=$seed
echo "seed $seed (WS_KILL_SEED=$seed replays these moments)"

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# The wshost process of rank R under mpirun pid P, or nothing yet.
rank_pid() {
    local p
    for p in $(pgrep -P "$1" 2>/dev/null); do
        if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2"; then
            echo "$p"; return
        fi
    done
}

# Running (not a zombie): /proc/PID/stat's third field is the state.
alive() {
    local st
    st=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

times=()
by_survivor=0
for ((i = 1; i <= ROUNDS; i++)); do
    out="$tmp/round$i.out"
    "$MPIRUN" --allow-run-as-root --oversubscribe -n 2 "$WSHOST" pipelines/verl_lora.lua \
        model=tiny steps=100000 progress=off sleep_level=$((1 + RANDOM % 2)) >"$out" 2>&1 &
    job=$!
    victim=$((RANDOM % 2)); other=$((1 - victim))
    delay_ms=$((300 + RANDOM % 4000))   # from start-up to well into the steps
    vpid=""; spid=""
    t_start=$(now_ms)
    while [ $(( $(now_ms) - t_start )) -lt "$delay_ms" ] || [ -z "$vpid" ] || [ -z "$spid" ]; do
        [ -n "$vpid" ] || vpid=$(rank_pid "$job" "$victim")
        [ -n "$spid" ] || spid=$(rank_pid "$job" "$other")
        if [ $(( $(now_ms) - t_start )) -gt 20000 ]; then break; fi
        sleep 0.02
    done
    if [ -z "$vpid" ] || [ -z "$spid" ]; then
        fail "round $i: ranks did not start"; sed 's/^/    /' "$out"; kill "$job" 2>/dev/null; wait "$job"
        continue
    fi
    # The job's header names the world size once the world is up: from then
    # on the survivor itself must name the lost rank.
    world_up=0
    grep -q "world 2," "$out" && world_up=1
    t_kill=$(now_ms)
    kill -9 "$vpid"
    # The survivor must end by itself or be ended by the launcher within the
    # limit; a zombie not yet reaped by mpirun has ended.
    while alive "$spid" && [ $(( $(now_ms) - t_kill )) -lt 10000 ]; do sleep 0.01; done
    gone_ms=$(( $(now_ms) - t_kill ))
    if alive "$spid"; then
        kill -9 "$spid" 2>/dev/null
        gone_ms=">10000"
    fi
    for _ in $(seq 200); do kill -0 "$job" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$job" 2>/dev/null
    wait "$job"; rc=$?
    times+=("$gone_ms")
    name="round $i: killed rank $victim after ${delay_ms} ms, survivor gone after ${gone_ms} ms, exit $rc"
    if [[ "$gone_ms" == ">"* ]] || [ "$gone_ms" -gt "$LIMIT_MS" ]; then
        fail "$name: survivor outlived the ${LIMIT_MS} ms limit"; sed 's/^/    /' "$out"
    elif [ "$rc" -eq 0 ]; then
        fail "$name: the job exited 0"; sed 's/^/    /' "$out"
    elif grep -q "rank $other: lost rank $victim (pid $vpid" "$out"; then
        by_survivor=$((by_survivor + 1))
        pass "$name, named by the survivor"
    elif [ "$world_up" -eq 1 ]; then
        fail "$name: the world was up, but the survivor did not name rank $victim"
        sed 's/^/    /' "$out"
    elif grep -Eq "process rank $victim\b" "$out"; then
        pass "$name, named by the launcher (before the world was up)"
    else
        fail "$name: no message names rank $victim"; sed 's/^/    /' "$out"
    fi
done
echo "detection times (ms): ${times[*]}; the survivor named the lost rank in $by_survivor of $ROUNDS"
finish
