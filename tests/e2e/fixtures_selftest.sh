#!/usr/bin/env bash
# fixtures_selftest.sh: the test fixtures themselves. tests/fixtures/hf_tiny.py
# must write each model family as Hugging Face lays it out (config keys,
# parameter names and shapes, shards and index), and tests/fixtures/st_check.py
# must read it back bit for bit, see a single changed bit, and refuse
# malformed files. Skipped (77) when python3 cannot import torch.
set -euo pipefail
WSHOST=${WSHOST:-build/wshost}
PYTHON=${PYTHON:-/usr/bin/python3}
"$PYTHON" -c 'import torch' 2>/dev/null \
    || { echo "fixtures_selftest: $PYTHON cannot import torch"; exit 77; }
# shellcheck source=tests/e2e/fixtures/e2e_lib.sh
. "$(dirname "$0")/fixtures/e2e_lib.sh"
fx=tests/fixtures
gen() { "$PYTHON" $fx/hf_tiny.py "$@"; }
st() { "$PYTHON" $fx/st_check.py "$@"; }
# json FILE KEY...: the values of top-level keys, "absent" for a missing one.
json() {
    "$PYTHON" -c 'import json, sys; c = json.load(open(sys.argv[1]))
print(*(c.get(k, "absent") for k in sys.argv[2:]))' "$@"
}
# shape NAME DUMP: the dtype and shape of one tensor, as st_check dump prints them.
shape() { awk -v n="$1" '$1 == n { print $2, $3 }' "$2"; }
lora=base_model.model.model.layers

# Each process pays about two seconds to import torch, so the families are
# made by one process calling the CLI's main() in turn, each writing and then
# reading itself back (--check). Beside it, the CLI in processes of its own
# makes qwen3 again in one shard, then checks it (--verify) in a third.
"$PYTHON" - "$tmp" > "$tmp/batch.log" 2>&1 <<'EOF' &
import sys
sys.path.insert(0, "tests/fixtures")
import hf_tiny
t = sys.argv[1]
for argv in (
    f"{t}/qwen3 --family qwen3 --shards 3 --seed 7 --adapter {t}/qwen3_lora --rank 4 --alpha 8 "
    "--targets all-linear --rslora --check",
    f"{t}/qwen2 --family qwen2 --tied --check",
    f"{t}/llama --family llama --dtype f32 --check",
    f"{t}/mistral --family mistral --shards 2 --check",
    f"{t}/moe --family qwen3_moe --shards 2 --mlp-only-layers 1 --adapter {t}/moe_lora "
    "--targets q_proj,v_proj,gate_proj --check",
):
    print(argv.split()[0].rsplit("/", 1)[1], end=" ", flush=True)
    hf_tiny.main(argv.split())
EOF
again=("$tmp/qwen3_one" --family qwen3 --seed 7 --adapter "$tmp/qwen3_one_lora" --rank 4
       --alpha 8 --targets all-linear --rslora)
{ gen "${again[@]}" && gen "${again[@]}" --verify; } > "$tmp/again.log" 2>&1 &
for job in $(jobs -p); do wait "$job" || true; done
for m in qwen3 qwen2 llama mistral moe; do
    check "$m written and read back" "$m hf_tiny: verified" "$(cat "$tmp/batch.log")"
done
check "qwen3 made again and checked by other processes" "hf_tiny: verified 78 tensors" \
    "$(cat "$tmp/again.log")"
for m in qwen3 qwen3_lora qwen2 llama mistral moe moe_lora; do
    st dump "$tmp/$m" > "$tmp/$m.dump"
done

# qwen3: three shards, explicit head_dim (q_proj out 4 * 18 != hidden 70), q/k norms.
check "qwen3 config" "['Qwen3ForCausalLM'] qwen3 18 False" \
    "$(json "$tmp/qwen3/config.json" architectures model_type head_dim tie_word_embeddings)"
check "qwen3 index maps 36 tensors to three shards" "36 3" \
    "$(json "$tmp/qwen3/model.safetensors.index.json" weight_map |
       grep -o "model-0000[0-9]-of-00003" | sort | uniq -c | awk '{ n += $1 } END { print n, NR }')"
check "qwen3 q_proj [heads * head_dim, hidden]" "BF16 [72,70]" \
    "$(shape model.layers.2.self_attn.q_proj.weight "$tmp/qwen3.dump")"
check "qwen3 q_norm [head_dim]" "BF16 [18]" \
    "$(shape model.layers.0.self_attn.q_norm.weight "$tmp/qwen3.dump")"
check "qwen3 untied has lm_head" "BF16 [613,70]" "$(shape lm_head.weight "$tmp/qwen3.dump")"
check "qwen3 tensor count" "36" "$(wc -l < "$tmp/qwen3.dump")"
check "sharding leaves the values alone" "same: 36 tensors" \
    "$(st compare "$tmp/qwen3" "$tmp/qwen3_one")"
check "the adapter made again is the same" "same: 42 tensors" \
    "$(st compare "$tmp/qwen3_lora" "$tmp/qwen3_one_lora")"
# all-linear: 7 modules x 3 layers x (A, B); A [r, in], B [out, r].
check "lora tensor count" "42" "$(wc -l < "$tmp/qwen3_lora.dump")"
check "lora_A [r, in]" "F32 [4,72]" \
    "$(shape $lora.1.self_attn.o_proj.lora_A.weight "$tmp/qwen3_lora.dump")"
check "lora_B [out, r]" "F32 [157,4]" \
    "$(shape $lora.0.mlp.gate_proj.lora_B.weight "$tmp/qwen3_lora.dump")"
check "adapter config" "LORA all-linear True 4 8 none CAUSAL_LM" \
    "$(json "$tmp/qwen3_lora/adapter_config.json" peft_type target_modules use_rslora r \
        lora_alpha bias task_type)"

# qwen2: tied (no lm_head saved), q/k/v biases, no head_dim in the config.
check "qwen2 config" "['Qwen2ForCausalLM'] True absent" \
    "$(json "$tmp/qwen2/config.json" architectures tie_word_embeddings head_dim)"
check "qwen2 saves no tied lm_head" "0" "$(grep -c '^lm_head' "$tmp/qwen2.dump" || true)"
check "qwen2 k_proj bias" "BF16 [34]" \
    "$(shape model.layers.1.self_attn.k_proj.bias "$tmp/qwen2.dump")"
check "qwen2 one file" "config.json model.safetensors" "$(ls "$tmp/qwen2" | tr '\n' ' ')"

# llama: no head_dim (hidden / heads = 19), f32.
check "llama config" "['LlamaForCausalLM'] absent float32" \
    "$(json "$tmp/llama/config.json" architectures head_dim torch_dtype)"
check "llama k_proj [kv_heads * 19, hidden]" "F32 [38,76]" \
    "$(shape model.layers.0.self_attn.k_proj.weight "$tmp/llama.dump")"

# mistral: head_dim 20 with hidden 90 (q_proj out 80).
check "mistral config" "['MistralForCausalLM'] 20 90" \
    "$(json "$tmp/mistral/config.json" architectures head_dim hidden_size)"
check "mistral o_proj [hidden, heads * head_dim]" "BF16 [90,80]" \
    "$(shape model.layers.1.self_attn.o_proj.weight "$tmp/mistral.dump")"

# qwen3_moe: layer 1 dense (mlp_only_layers), layers 0 and 2 with 4 experts.
check "moe config" "['Qwen3MoeForCausalLM'] [1] 1 4 2 37 131" \
    "$(json "$tmp/moe/config.json" architectures mlp_only_layers decoder_sparse_step \
        num_experts num_experts_per_tok moe_intermediate_size intermediate_size)"
check "moe router [experts, hidden]" "BF16 [4,66]" \
    "$(shape model.layers.0.mlp.gate.weight "$tmp/moe.dump")"
check "moe expert down_proj [hidden, moe_inter]" "BF16 [66,37]" \
    "$(shape model.layers.2.mlp.experts.3.down_proj.weight "$tmp/moe.dump")"
check "moe dense layer gate_proj" "BF16 [131,66]" \
    "$(shape model.layers.1.mlp.gate_proj.weight "$tmp/moe.dump")"
check "moe dense layer has no router nor experts" "0" \
    "$(grep -c '^model\.layers\.1\.mlp\.\(gate\.\|experts\)' "$tmp/moe.dump" || true)"
check "moe lora skips experts and router" "0" \
    "$(grep -c 'experts\|mlp\.gate\.' "$tmp/moe_lora.dump" || true)"
check "moe lora on the dense layer's gate_proj" "F32 [131,8]" \
    "$(shape $lora.1.mlp.gate_proj.lora_B.weight "$tmp/moe_lora.dump")"

# Without weights: config.json only, and no torch needed (-S hides it).
"$PYTHON" -S $fx/hf_tiny.py "$tmp/cfg_only" --family llama --no-weights 2>&1 \
    || fail "--no-weights failed"
check "--no-weights writes config.json only" "config.json" "$(ls "$tmp/cfg_only")"

# slice: element ranges compose; norm weights near 1.0 are bf16 0x3f.. or 0x40..
a=$(st slice "$tmp/qwen3" model.embed_tokens.weight 100 105)
b=$(st slice "$tmp/qwen3" model.embed_tokens.weight 105 111)
check "slice ranges compose" "$a$b" "$(st slice "$tmp/qwen3" model.embed_tokens.weight 100 111)"
check "slice of 5 bf16 elements" "20" "${#a}"
norm=$(st slice "$tmp/qwen3" model.norm.weight 0 4)
if [[ "$norm" =~ ^(..(3f|40)){4}$ ]]; then pass "norm weights near 1.0"
else fail "norm weights far from 1.0: $norm"; fi
set +e
out=$(st slice "$tmp/qwen3" model.norm.weight 60 71 2>&1); rc=$?
set -e
check_rc "slice past the end" 1 "$rc"
check "slice past the end says why" "outside its 70 elements" "$out"

# compare: one flipped bit in one shard is found and named.
cp -r "$tmp/qwen3" "$tmp/flip"
"$PYTHON" - "$tmp/flip/model-00002-of-00003.safetensors" <<'EOF'
import json, struct, sys
with open(sys.argv[1], "r+b") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    h = json.loads(f.read(n))
    begin = h["model.layers.1.mlp.up_proj.weight"]["data_offsets"][0]
    f.seek(8 + n + begin + 2 * 33)
    b = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([b[0] ^ 1]))
EOF
set +e
out=$(st compare "$tmp/qwen3" "$tmp/flip" 2>&1); rc=$?
set -e
check_rc "compare sees one flipped bit" 1 "$rc"
check "compare names the tensor and element" \
    "'model.layers.1.mlp.up_proj.weight' at element 33" "$out"
set +e
out=$(st compare "$tmp/qwen3" "$tmp/qwen2" 2>&1); rc=$?
set -e
check_rc "compare of different models" 1 "$rc"
check "compare names a tensor only on one side" "differ: 'lm_head.weight' is only in" "$out"
check "compare --names-map peft" "same: 42 tensors" \
    "$(st compare "$tmp/qwen3_lora" "$tmp/qwen3_lora/adapter_model.safetensors" --names-map peft)"

# Malformed input is refused with the fault named.
bad() { # NAME EXPECTED: st_check dump of $tmp/bad.safetensors must fail with EXPECTED
    set +e; out=$(st dump "$tmp/bad.safetensors" 2>&1); rc=$?; set -e
    if [[ $rc == 1 && "$out" == *"$2"* ]]; then pass "$1"; else fail "$1: exit $rc, [$out]"; fi
}
good=$tmp/qwen2/model.safetensors
head -c -2 "$good" > "$tmp/bad.safetensors"
bad "truncated file" "past the data area"
cat "$good" <(printf 'xx') > "$tmp/bad.safetensors"
bad "trailing bytes" "end at byte"
head -c 4 "$good" > "$tmp/bad.safetensors"
bad "shorter than the length" "too short"
mkhdr() { # HEADER DATA_BYTES
    "$PYTHON" - "$tmp/bad.safetensors" "$1" "$2" <<'EOF'
import struct, sys
h = sys.argv[2].encode()
open(sys.argv[1], "wb").write(struct.pack("<Q", len(h)) + h + b"\0" * int(sys.argv[3]))
EOF
}
f32() { echo "{\"dtype\":\"${3:-F32}\",\"shape\":[$1],\"data_offsets\":[$2]}"; }
mkhdr "{\"a\":$(f32 2 0,8),\"a\":$(f32 2 8,16)}" 16
bad "duplicate name" "duplicate name 'a'"
mkhdr "{\"a\":$(f32 2 4,12)}" 12
bad "hole" "hole in the data area at byte 0"
mkhdr "{\"a\":$(f32 2 0,8),\"b\":$(f32 2 4,12)}" 12
bad "overlap" "overlap in the data area at byte 8"
mkhdr "{\"a\":$(f32 3 0,8)}" 8
bad "offsets against the shape" "hold 8 bytes, the shape needs 12"
mkhdr "{\"a\":$(f32 2 0,2 Q4)}" 2
bad "unknown dtype" "unknown dtype 'Q4'"
finish
