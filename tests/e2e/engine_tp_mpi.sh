#!/usr/bin/env bash
# engine_tp_mpi.sh: tensor- and expert-parallel engines (engine_tp=, engine_ep=)
# under `mpirun -n 4` on tiny Hugging Face directories (dense Qwen3, Qwen2 with
# biases and tied embeddings, Qwen3-MoE): every step verifies (checksums of
# the shards summed over their TP or EP group), and each engine rank's
# tensors, written by save_engine=, equal vLLM's shards of the checkpoint cut
# independently with torch (tests/fixtures/tp_check.py). The base weights are
# the source checkpoint under LoRA (frozen) and save='s checkpoint without it
# (trained); the adapters are save_adapter='s. A rank whose shard is wrong
# fails the rollout naming the tensor. Skipped (77) without MPI or python3 +
# torch.
set -euo pipefail
PYTHON=${PYTHON:-/usr/bin/python3}
[ "${WS_HAVE_MPI:-OFF}" = ON ] && command -v mpirun > /dev/null \
    || { echo "engine_tp_mpi: no MPI"; exit 77; }
"$PYTHON" -c 'import torch' 2>/dev/null \
    || { echo "engine_tp_mpi: $PYTHON cannot import torch"; exit 77; }
# shellcheck source=tests/e2e/fixtures/e2e_lib.sh
. "$(dirname "$0")/fixtures/e2e_lib.sh"
fx=tests/fixtures

# Intermediate sizes that 4 divides (vLLM's divide() asserts it); hidden
# sizes, head_dim and vocabularies stay odd, so FSDP shards are uneven and the
# last vocabulary shard is part padding.
"$PYTHON" - "$tmp" <<'EOF'
import sys
sys.path.insert(0, "tests/fixtures")
import hf_tiny
t = sys.argv[1]
for argv in (f"{t}/qwen3 --family qwen3 --intermediate 156 --shards 2 --seed 3",
             f"{t}/qwen2 --family qwen2 --intermediate 140 --tied --seed 4",
             f"{t}/moe --family qwen3_moe --intermediate 132 --moe-intermediate 36 "
             "--mlp-only-layers 1 --seed 8"):
    hf_tiny.main(argv.split())
EOF

# A hang fails its case after 120 s instead of the whole test.
mpi4() {
    timeout 120 mpirun --allow-run-as-root --oversubscribe -n 4 "$WSHOST" "$@"
}

# case NAME MODEL TP EP LORA [key=value...]: run, then check every rank's file.
case_() {
    local name=$1 model=$2 tp=$3 ep=$4 lora=$5
    shift 5
    local keys=(progress=off model="$tmp/$model" steps=2 engine_tp="$tp" engine_ep="$ep"
                lora_rank="$lora" save_engine="$tmp/e_$name" "$@")
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
    check "$name: verified every step" "verified 2 of 2" "$out"
    check "$name: each rank holds vLLM's shard" "tp_check: same: 4 ranks" \
        "$("$PYTHON" $fx/tp_check.py "$ref" "$tmp/e_$name" --world 4 --tp "$tp" --ep "$ep" \
            "${adapter[@]}" 2>&1)"
}

case_ qwen3_tp2_lora qwen3 2 1 4
case_ qwen3_tp4_lora qwen3 4 1 4 bucket_mb=0.01   # KV heads replicated; rows split by buckets
case_ qwen3_tp2 qwen3 2 1 0 sleep_level=2
case_ qwen2_tp4 qwen2 4 1 0                       # biases follow their rows; tied embeddings
case_ qwen2_tp2_lora qwen2 2 1 8 bucket_mb=0.02
case_ moe_tp2_lora moe 2 1 4                      # experts' intermediate split
case_ moe_tp4 moe 4 1 0
case_ moe_ep2 moe 1 2 0                           # whole experts, two per rank
case_ moe_tp2_ep2_lora moe 2 2 4 bucket_mb=0.01

# A wrong shard on one rank fails that group's verification, naming it.
corrupt() {
    local name=$1 spec=$2
    local tensor=${spec#* }
    tensor=${tensor%% *}
    shift 2
    set +e
    out=$(WS_TP_CORRUPT="$spec" mpi4 tests/e2e/fixtures/tp_corrupt.lua progress=off \
          model="$tmp/$1" steps=1 "${@:2}" 2>&1)
    rc=$?
    set -e
    [ "$rc" -ne 0 ] && pass "$name: fails (exit $rc)" || fail "$name: exit 0"
    check "$name: names the tensor" "engine tensor '$tensor" "$out"
    check "$name: says the shard is wrong" "summed over the" "$out"
}
corrupt "column block of o_proj on rank 1" "1 model.layers.0.self_attn.o_proj.weight" \
    qwen3 engine_tp=2 lora_rank=0
corrupt "replicated norm on rank 3" "3 model.norm.weight" qwen3 engine_tp=2 lora_rank=0
# Rank 2 of TP=4: one q head (18 rows of 70), then KV head 1, also held by rank 3.
corrupt "replicated KV head on rank 2" "2 model.layers.1.self_attn.qkv_proj.base_layer.weight 1261" \
    qwen3 engine_tp=4 lora_rank=4
corrupt "expert on EP rank 1" "1 model.layers.0.mlp.experts.w13_weight" moe engine_ep=2 \
    lora_rank=0

# Each rank receives only what its shard needs: at most 1.1x (the model / T
# plus what every rank holds whole), where a gather of whole tensors brings
# it T times that. Qwen3's proportions, small: head_dim 64 with more q than
# hidden columns, 4:1 GQA (KV heads replicated at TP=4), tied embeddings and
# an odd vocabulary; one bucket, then buckets that split tensors and rows.
mkdir -p "$tmp/qwenlike"
cat > "$tmp/qwenlike/config.json" <<'EOF'
{"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 256,
 "num_hidden_layers": 2, "intermediate_size": 768, "num_attention_heads": 8,
 "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 4099, "tie_word_embeddings": true,
 "rms_norm_eps": 1e-6}
EOF
for bucket in 512 0.05; do
    set +e
    out=$(mpi4 bench/parallel.lua model="$tmp/qwenlike" device=cpu iters=1 check=bytes \
          bucket_mb=$bucket 2>&1)
    rc=$?
    set -e
    check_rc "bytes per rank, bucket $bucket MB: bench/parallel.lua check=bytes" 0 "$rc"
    for tp in 2 4; do
        check "bytes per rank, bucket $bucket MB: tp=$tp within 1.1x" \
            "$(printf '#   %-18s %-20s %s' "colocated tp=$tp" "bytes per rank" "ok")" "$out"
        check "bytes per rank, bucket $bucket MB: tp=$tp exchanged" \
            "$(printf '  %-18s %-20s' "colocated tp=$tp" "all_to_all")" "$out"
    done
done

# The model must split as vLLM splits it.
set +e
out=$(mpi4 pipelines/verl_lora.lua progress=off model="$tmp/qwen3" steps=1 engine_tp=3 2>&1)
rc=$?
set -e
check_rc "engine_tp=3 on 4 ranks" 2 "$rc"
check "engine_tp=3 on 4 ranks: says why" "'engine_tp': 3 does not divide the 4 engine ranks" "$out"
set +e
out=$(mpi4 pipelines/verl_lora.lua progress=off model=tiny steps=1 engine_tp=2 2>&1)
rc=$?
set -e
check_rc "engine_tp=2 on an odd intermediate size" 2 "$rc"
check "odd intermediate: says why" "2 does not divide intermediate_size" "$out"
finish
