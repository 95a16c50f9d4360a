#!/usr/bin/env bash
# hf_models.sh: the main job on real Hugging Face model directories.
# tests/fixtures/hf_tiny.py writes tiny Qwen3 (three shards), Qwen2 (biases,
# tied), Llama (no head_dim), Mistral and Qwen3-MoE (a dense layer among
# sparse ones) directories with PEFT adapters; for each the LoRA pipeline must
# start from the checkpoint, verify every step, and save= must give the source
# back bit for bit (the base is frozen under LoRA), checked by the independent
# reader tests/fixtures/st_check.py. The engine's fused layout (qkv_proj,
# gate_up_proj, FusedMoE's w13/w2, Qwen2's qkv bias) is checked against the
# checkpoint by a few lines of torch; adapters round-trip through adapter= and
# save_adapter=; mismatches between config.json, the weights and the adapter
# stop with one line naming the tensor. Skipped (77) without python3 + torch.
set -euo pipefail
PYTHON=${PYTHON:-/usr/bin/python3}
"$PYTHON" -c 'import torch' 2>/dev/null \
    || { echo "hf_models: $PYTHON cannot import torch"; exit 77; }
# shellcheck source=tests/e2e/fixtures/e2e_lib.sh
. "$(dirname "$0")/fixtures/e2e_lib.sh"
fx=tests/fixtures
st() { "$PYTHON" $fx/st_check.py "$@"; }
run() { "$WSHOST" pipelines/verl_lora.lua progress=off "$@" 2>&1; }

# One process makes every directory (importing torch costs seconds).
"$PYTHON" - "$tmp" <<'EOF'
import sys
sys.path.insert(0, "tests/fixtures")
import hf_tiny
t = sys.argv[1]
for argv in (
    f"{t}/qwen3 --family qwen3 --shards 3 --seed 3 --adapter {t}/qwen3_lora --rank 4 --alpha 8 "
    "--targets q_proj,v_proj,down_proj --adapter-dtype bf16",
    f"{t}/qwen2 --family qwen2 --tied --seed 4",
    f"{t}/llama --family llama --seed 5",
    f"{t}/mistral --family mistral --shards 2 --seed 6",
    f"{t}/moe --family qwen3_moe --shards 2 --mlp-only-layers 1 --seed 8",
):
    hf_tiny.main(argv.split())
EOF

# Every family: verified each step, and save= reproduces the source exactly.
for m in qwen3 qwen2 llama mistral moe; do
    set +e
    out=$(run model="$tmp/$m" steps=3 lora_rank=4 save="$tmp/out_$m" save_shard_mb=0.05 \
          save_engine="$tmp/eng_$m")
    rc=$?
    set -e
    check_rc "$m: main job" 0 "$rc"
    check "$m: starts from the checkpoint" "# weights: checkpoint $tmp/$m/model.safetensors" "$out"
    check "$m: verified every step" "verified 3 of 3" "$out"
    check "$m: save= gives the source back bit for bit" "same:" \
        "$(st compare "$tmp/$m" "$tmp/out_$m" 2>&1)"
done
check "qwen3: save= shards and indexes like save_pretrained" "model.safetensors.index.json" \
    "$(ls "$tmp/out_qwen3")"
check "qwen3: config.json copied" "$(cat "$tmp/qwen3/config.json")" \
    "$(cat "$tmp/out_qwen3/config.json")"

# The engine's tensors against the checkpoint, computed here independently.
layout=$("$PYTHON" - "$tmp" <<'EOF' 2>&1
import sys, torch
sys.path.insert(0, "tests/fixtures")
import st_check
t = sys.argv[1]
bad = []
def eq(what, a, b):
    if a.shape != b.shape or not torch.equal(a, b):
        bad.append(what)
def load(path):
    return {k: v.to_torch() for k, v in st_check.load(path).items()}
for m in ("qwen3", "qwen2", "llama", "mistral", "moe"):
    ck = load(f"{t}/{m}")
    en = load(f"{t}/eng_{m}/engine-rank-00000.safetensors")
    for l in range(3):
        p = f"model.layers.{l}."
        if p + "self_attn.q_proj.weight" not in ck:
            continue
        qkv = torch.cat([ck[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        eq(f"{m} {l} qkv_proj", en[p + "self_attn.qkv_proj.base_layer.weight"], qkv)
        if p + "self_attn.q_proj.bias" in ck:
            bias = torch.cat([ck[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
            eq(f"{m} {l} qkv bias", en[p + "self_attn.qkv_proj.base_layer.bias"], bias)
        if p + "mlp.gate.weight" in ck:
            eq(f"{m} {l} router", en[p + "mlp.gate.weight"], ck[p + "mlp.gate.weight"])
            e = 0
            while p + f"mlp.experts.{e}.gate_proj.weight" in ck:
                x = p + f"mlp.experts.{e}."
                w13 = torch.cat([ck[x + "gate_proj.weight"], ck[x + "up_proj.weight"]])
                eq(f"{m} {l} w13[{e}]", en[p + "mlp.experts.w13_weight"][e], w13)
                eq(f"{m} {l} w2[{e}]", en[p + "mlp.experts.w2_weight"][e], ck[x + "down_proj.weight"])
                e += 1
            if e == 0:
                bad.append(f"{m} {l}: no experts")
        else:
            gu = torch.cat([ck[p + "mlp.gate_proj.weight"], ck[p + "mlp.up_proj.weight"]])
            eq(f"{m} {l} gate_up_proj", en[p + "mlp.gate_up_proj.base_layer.weight"], gu)
    eq(f"{m} embed", en["model.embed_tokens.weight"], ck["model.embed_tokens.weight"])
print("layout mismatches:", bad if bad else "none")
EOF
)
check "engine layouts equal the checkpoint's slices" "layout mismatches: none" "$layout"

# Adapters: adapter= loads exactly (steps=0 writes it straight back), and
# what save_adapter= writes after training loads back through adapter=.
set +e
out=$(run model="$tmp/qwen3" adapter="$tmp/qwen3_lora" steps=0 save_adapter="$tmp/a0")
check_rc "adapter= with steps=0" 0 $?
set -e
check "the adapter's config sets the rank" "lora_rank=4" "$out"
check "adapter= then save_adapter= is the same adapter" "same: 18 tensors" \
    "$(st compare "$tmp/qwen3_lora" "$tmp/a0" 2>&1)"
check "adapter_config.json in PEFT's keys" '"peft_type":"LORA"' "$(cat "$tmp/a0/adapter_config.json")"
run model="$tmp/qwen3" adapter="$tmp/qwen3_lora" steps=2 save_adapter="$tmp/a1" > /dev/null
run model="$tmp/qwen3" adapter="$tmp/a1" steps=0 save_adapter="$tmp/a2" > /dev/null
check "save_adapter= round-trips through adapter=" "same: 18 tensors" \
    "$(st compare "$tmp/a1" "$tmp/a2" 2>&1)"

# Mismatches: exit 2 for configuration, 1 for files; one line naming the tensor.
expect() { # NAME RC TEXT ARGS...
    local name=$1 want=$2 text=$3
    shift 3
    set +e
    local got
    got=$(run "$@")
    local rc=$?
    set -e
    check_rc "$name" "$want" "$rc"
    check "$name: message" "$text" "$got"
}
expect "adapter with another lora_rank" 2 \
    "config key 'lora_rank' is 8 but adapter $tmp/qwen3_lora has r 4" \
    model="$tmp/qwen3" adapter="$tmp/qwen3_lora" lora_rank=8
expect "LoRA on experts" 2 "LoRA on the experts of a mixture-of-experts model is not supported" \
    model="$tmp/moe" target_modules=q_proj,up_proj
cp -r "$tmp/llama" "$tmp/llama_more"
sed -i 's/"num_hidden_layers": 2/"num_hidden_layers": 3/' "$tmp/llama_more/config.json"
expect "config.json with a layer the weights lack" 1 \
    "implies tensor 'model.layers.2.self_attn.q_proj.weight' [" model="$tmp/llama_more" steps=1
cp -r "$tmp/llama" "$tmp/llama_less"
sed -i 's/"num_hidden_layers": 2/"num_hidden_layers": 1/' "$tmp/llama_less/config.json"
expect "weights with a layer config.json lacks" 1 \
    "the checkpoint has tensor 'model.layers.1." model="$tmp/llama_less" steps=1
cp -r "$tmp/llama" "$tmp/llama_wide"
sed -i 's/"intermediate_size": \([0-9]*\)/"intermediate_size": 1\1/' "$tmp/llama_wide/config.json"
expect "a shape config.json disagrees with" 1 "tensor 'model.layers.0.mlp.gate_proj.weight' is [" \
    model="$tmp/llama_wide" steps=1
cp -r "$tmp/llama" "$tmp/other"
sed -i 's/LlamaForCausalLM/GPT2LMHeadModel/; s/"model_type": "llama"/"model_type": "gpt2"/' \
    "$tmp/other/config.json"
expect "an unknown architecture" 2 "architecture 'GPT2LMHeadModel' is not supported (known: " \
    model="$tmp/other" steps=1
rm "$tmp/mistral/model-00002-of-00002.safetensors"
expect "a missing shard" 1 "model-00002-of-00002.safetensors" model="$tmp/mistral" steps=1

finish
