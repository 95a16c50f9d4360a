#!/bin/bash
# examples/torch/server.py under mpirun -n 2: the trainer's row shards split
# across the ranks, one engine process per rank (channels <address>-0 and
# <address>-1), logits equal after every sync; the verl #3149 bug stops on
# both ranks; each engine's weights also in memory it shares with its rank
# (Receiver.alloc); one rank's engine killed ends the whole job, no hang.
# Skipped (77) without MPI, torch, the wshost Python module, or a
# Session with engine_address.
cd "$(dirname "$0")" && while [ ! -f pipelines/verl_lora.lua ] && [ "$PWD" != / ]; do cd ..; done
[ "${WS_HAVE_MPI:-ON}" = "ON" ] || { echo "skip: built without MPI"; exit 77; }
command -v mpirun >/dev/null || { echo "skip: no mpirun"; exit 77; }
. tests/e2e/torch/torch_lib.sh
. tests/e2e/torch/server_lib.sh
MPI=(mpirun --allow-run-as-root --oversubscribe -n 2 -x PYTHONPATH -x WSHOST_DEVICE -x OMP_NUM_THREADS)

name="server,np=2,fce=1,level=2"
if server "$name" 0 "${MPI[@]}" -- --steps 4 --free-cache-engine 1 --sleep-level 2 --lora-rank 4; then
    every_step_equal "$name" 4
    log=$(cat "$tmp/$name.log")
    n=$(grep -Ec '^# server: rank [01], engine pid [0-9]+ on wshost-e2e-[0-9]+-[0-9]+-[01]$' <<<"$log")
    # At least one verified sync per step on each engine (LoRA: base and adapter are two).
    synced=$(sed -n 's/^# server: rank [01]: engine weights .*, \([0-9]*\) verified syncs.*/\1/p' <<<"$log" |
             awk '$1 >= 4' | wc -l)
    if [ "$n" = 2 ] && [ "$synced" = 2 ]; then
        pass "$name: one engine process per rank, each verified a sync per step"
    else
        fail "$name: expected two engines (-0 and -1), each with 4 or more verified syncs"; cat "$tmp/$name.log"
    fi
fi
name="server,np=2,fce=0,level=1"
server "$name" 0 "${MPI[@]}" -- --steps 3 --free-cache-engine 0 --sleep-level 1 && every_step_equal "$name" 3
name="server,np=2,lora=0"
server "$name" 0 "${MPI[@]}" -- --steps 3 --lora-rank 0 --tied 1 && every_step_equal "$name" 3
name="server,np=2,shared"
server "$name" 0 "${MPI[@]}" -- --steps 3 --sleep-level 2 --engine-memory shared &&
    every_step_equal "$name" 3
name="server,np=2,buggy"
if server "$name" 1 "${MPI[@]}" -- --steps 3 --policy buggy --sleep-level 2 --verify all; then
    check "np=2 buggy: step 2 failed" "step 2 failed" "$(cat "$tmp/$name.log")"
    if grep -q '^step 2 ' "$tmp/$name.log"; then fail "np=2 buggy: step 2 reached its rollout"; fi
fi
# One rank's engine dies (rank 0's, in sync 3): that rank's step fails naming
# the engine, and the whole job ends (the other rank waits in a collective
# that rank 0 will not join: wshost ends the job at exit), nothing left.
name="server,np=2,one-engine-dies"
start=$(date +%s)
if server "$name" 1 "${MPI[@]}" -- --steps 4 --fault engine-dies --fault-rank 0 --fault-sync 3; then
    log=$(cat "$tmp/$name.log")
    check "np=2 one engine dies: rank 0's step failed naming its engine" \
        "failed: engine process (pid" "$log"
    took=$(( $(date +%s) - start ))
    if [ "$took" -lt 60 ]; then pass "np=2 one engine dies: the job ended in ${took} s"
    else fail "np=2 one engine dies: the job took ${took} s to end"; fi
    sleep 1
    if pgrep -f "wshost-e2e-$$-$n_server" >/dev/null; then
        fail "np=2 one engine dies: processes left: $(pgrep -af "wshost-e2e-$$-$n_server")"
    else
        pass "np=2 one engine dies: no process left"
    fi
fi
finish
