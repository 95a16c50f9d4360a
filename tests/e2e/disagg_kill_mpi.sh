#!/usr/bin/env bash
# disagg_kill_mpi.sh: `kill -9` of an engine rank of a running disaggregated
# job (`mpirun -n 4 ... placement=disaggregated trainer_ranks=2`, small
# buckets so most of the time is spent relaying), at random moments, 4 times.
# Every time the three survivors (both trainer ranks, the other engine rank)
# must be gone within 2 s of the kill and the job must exit non-zero: the
# failure machinery of colocated runs (host/core/comm_watch.c) holds when the
# ranks do different work. Every other round kills any rank of a colocated
# engine_tp=2 job instead, whose syncs run as all_to_all exchanges.
# Skipped (77) without MPI.
set -u
cd "$(dirname "$0")/../.." || exit 1
[ "${WS_HAVE_MPI:-OFF}" = "ON" ] || { echo "skip: built without MPI"; exit 77; }
MPIRUN=$(command -v mpirun || command -v mpiexec) || { echo "skip: no mpirun"; exit 77; }
. tests/e2e/fixtures/e2e_lib.sh
export WSHOST_DEVICE=cpu
ROUNDS=${WS_KILL_ROUNDS:-4}
LIMIT_MS=2000
seed=${WS_KILL_SEED:-$(( $(date +%s) % 100000 ))}
RANDOM=$seed
echo "seed $seed (WS_KILL_SEED=$seed replays these moments)"

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

rank_pid() {
    local p
    for p in $(pgrep -P "$1" 2>/dev/null); do
        if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2"; then
            echo "$p"; return
        fi
    done
}

alive() {
    local st
    st=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# A Qwen3-shaped model that splits over engine_tp=2 (random weights).
mkdir -p "$tmp/qwenlike"
echo '{"architectures": ["Qwen3ForCausalLM"], "hidden_size": 256, "num_hidden_layers": 2,
 "intermediate_size": 768, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
 "vocab_size": 4099, "tie_word_embeddings": true}' > "$tmp/qwenlike/config.json"

for ((i = 1; i <= ROUNDS; i++)); do
    out="$tmp/round$i.out"
    if ((i % 2)); then
        what="engine rank"
        args=(model=tiny placement=disaggregated trainer_ranks=2)
        victim=$((2 + RANDOM % 2))
    else
        what="engine_tp=2 rank"
        args=(model="$tmp/qwenlike" engine_tp=2)
        victim=$((RANDOM % 4))
    fi
    "$MPIRUN" --allow-run-as-root --oversubscribe -n 4 "$WSHOST" pipelines/verl_lora.lua \
        steps=100000 progress=off lora_rank=0 bucket_mb=0.01 "${args[@]}" >"$out" 2>&1 &
    job=$!
    delay_ms=$((1500 + RANDOM % 3000))
    pids=()
    t_start=$(now_ms)
    while [ $(( $(now_ms) - t_start )) -lt "$delay_ms" ] || [ "${#pids[@]}" -lt 4 ]; do
        if [ "${#pids[@]}" -lt 4 ]; then
            pids=()
            for r in 0 1 2 3; do
                p=$(rank_pid "$job" "$r")
                [ -n "$p" ] && pids+=("$p")
            done
        fi
        if [ $(( $(now_ms) - t_start )) -gt 20000 ]; then break; fi
        sleep 0.02
    done
    if [ "${#pids[@]}" -lt 4 ]; then
        fail "round $i: ranks did not start"; sed 's/^/    /' "$out"; kill "$job" 2>/dev/null
        wait "$job"
        continue
    fi
    vpid=${pids[$victim]}
    t_kill=$(now_ms)
    kill -9 "$vpid"
    for r in 0 1 2 3; do
        [ "$r" -eq "$victim" ] && continue
        while alive "${pids[$r]}" && [ $(( $(now_ms) - t_kill )) -lt 10000 ]; do sleep 0.01; done
    done
    gone_ms=$(( $(now_ms) - t_kill ))
    for r in 0 1 2 3; do alive "${pids[$r]}" && { kill -9 "${pids[$r]}" 2>/dev/null; gone_ms=">10000"; }; done
    for _ in $(seq 200); do kill -0 "$job" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$job" 2>/dev/null
    wait "$job"; rc=$?
    name="round $i: killed $what $victim after ${delay_ms} ms, survivors gone after ${gone_ms} ms, exit $rc"
    if [[ "$gone_ms" == ">"* ]] || [ "$gone_ms" -gt "$LIMIT_MS" ]; then
        fail "$name: a survivor outlived the ${LIMIT_MS} ms limit"; sed 's/^/    /' "$out"
    elif [ "$rc" -eq 0 ]; then
        fail "$name: the job exited 0"; sed 's/^/    /' "$out"
    elif grep -q "lost rank $victim" "$out"; then
        pass "$name, named by a survivor"
    else
        fail "$name: no survivor named rank $victim"; sed 's/^/    /' "$out" | tail -20
    fi
done
finish
