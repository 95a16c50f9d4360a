#!/usr/bin/env bash
# disagg_mpi.sh: placement=disaggregated under `mpirun -n 4` on tiny Hugging
# Face directories: 2+2 and 1+3 trainer + engine ranks, engines with TP=2 or
# EP=2, LoRA on and off. The trainer ranks gather, the first broadcasts each
# bucket to the engine ranks; every step verifies (the trainer ranks' sums,
# broadcast, against the engine shards' sums over their group), and each
# engine rank's tensors (save_engine=) equal vLLM's shards of the checkpoint
# cut independently with torch (tests/fixtures/tp_check.py). A wrong shard on
# an engine rank fails the rollout naming the tensor. Skipped (77) without MPI
# or python3 + torch.
set -euo pipefail
PYTHON=${PYTHON:-/usr/bin/python3}
[ "${WS_HAVE_MPI:-OFF}" = ON ] && command -v mpirun > /dev/null \
    || { echo "disagg_mpi: no MPI"; exit 77; }
"$PYTHON" -c 'import torch' 2>/dev/null \
    || { echo "disagg_mpi: $PYTHON cannot import torch"; exit 77; }
# shellcheck source=tests/e2e/fixtures/e2e_lib.sh
. "$(dirname "$0")/fixtures/e2e_lib.sh"
fx=tests/fixtures

"$PYTHON" - "$tmp" <<'PY'
import sys
sys.path.insert(0, "tests/fixtures")
import hf_tiny
t = sys.argv[1]
for argv in (f"{t}/qwen3 --family qwen3 --intermediate 156 --shards 2 --seed 3",
             f"{t}/moe --family qwen3_moe --intermediate 132 --moe-intermediate 36 "
             "--mlp-only-layers 1 --seed 8"):
    hf_tiny.main(argv.split())
PY

# A hang fails its case after 120 s instead of the whole test.
mpi4() { timeout 120 mpirun --allow-run-as-root --oversubscribe -n 4 "$WSHOST" "$@"; }

# case NAME MODEL TRAINERS TP EP LORA [key=value...]
case_() {
    local name=$1 model=$2 n=$3 tp=$4 ep=$5 lora=$6
    shift 6
    local keys=(progress=off model="$tmp/$model" steps=2 placement=disaggregated
                trainer_ranks="$n" engine_tp="$tp" engine_ep="$ep" lora_rank="$lora"
                save_engine="$tmp/e_$name" "$@")
    local ref="$tmp/$model" adapter=()
    if [ "$lora" -gt 0 ]; then
        keys+=(save_adapter="$tmp/a_$name")
        adapter=(--adapter "$tmp/a_$name")
    else
        keys+=(save="$tmp/s_$name")
        ref="$tmp/s_$name"
    fi
    set +e
    out=$(mpi4 pipelines/verl_lora.lua "${keys[@]}" 2>&1)
    rc=$?
    set -e
    check_rc "$name: mpirun -n 4" 0 "$rc"
    check "$name: placement" "placement disaggregated: $n trainer + $((4 - n)) engine ranks" "$out"
    check "$name: verified every step" "verified 2 of 2" "$out"
    check "$name: each engine rank holds vLLM's shard" "tp_check: same: $((4 - n)) ranks" \
        "$("$PYTHON" $fx/tp_check.py "$ref" "$tmp/e_$name" --world $((4 - n)) --tp "$tp" \
            --ep "$ep" "${adapter[@]}" 2>&1)"
}

case_ dense_2x2_tp2_lora qwen3 2 2 1 4
case_ dense_1x3_full qwen3 1 1 1 0 bucket_mb=0.01 sleep_level=2
case_ moe_2x2_ep2 moe 2 1 2 0
case_ moe_2x2_tp2_lora moe 2 2 1 4 bucket_mb=0.01

# A wrong shard on engine rank 3 (TP rank 1 of the engine group) is found.
set +e
out=$(WS_TP_CORRUPT="3 model.layers.0.self_attn.o_proj.weight" mpi4 \
      tests/e2e/fixtures/tp_corrupt.lua progress=off model="$tmp/qwen3" steps=1 \
      placement=disaggregated trainer_ranks=2 engine_tp=2 lora_rank=0 2>&1)
rc=$?
set -e
[ "$rc" -ne 0 ] && pass "corrupt shard on an engine rank: fails (exit $rc)" \
    || fail "corrupt shard on an engine rank: exit 0"
check "corrupt shard: names the tensor" \
    "engine tensor 'model.layers.0.self_attn.o_proj.weight' does not hold" "$out"

# Placements that cannot be.
bad() {
    local name=$1 want=$2
    shift 2
    set +e
    out=$(mpi4 pipelines/verl_lora.lua progress=off model="$tmp/qwen3" steps=1 \
          placement=disaggregated "$@" 2>&1)
    rc=$?
    set -e
    check_rc "$name" 2 "$rc"
    check "$name: says why" "$want" "$out"
}
bad "every rank a trainer" "'trainer_ranks': 4 of 4 ranks leaves no engine rank" trainer_ranks=4
bad "engine_tp over 3 engine ranks" "'engine_tp': 2 does not divide the 3 engine ranks" \
    trainer_ranks=1 engine_tp=2
finish
