#!/usr/bin/env bash
# safetensors_invalid.sh: one malformed checkpoint per validation rule,
# written by independent Python (struct + json only). Each must make wshost
# fail cleanly: a non-zero exit below 128 (no crash), and exactly one line of
# output naming the file and, where the rule is about one, the tensor.
set -euo pipefail
. "$(dirname "$0")/fixtures/e2e_lib.sh"
[ -x /usr/bin/python3 ] || { echo "skip: /usr/bin/python3 not found"; exit 77; }
fixture="$(cd "$(dirname "$0")" && pwd)/fixtures/st_open.lua"

# Writes <case>.safetensors (or a <case>/ directory) and cases.txt:
# "case<TAB>tensor or -<TAB>what the message says".
/usr/bin/python3 - "$tmp" <<'PY'
import json, os, struct, sys
out = sys.argv[1]
T = "model.layers.0.mlp.down_proj.weight"
cases = []

def raw(case, data, tensor, says):
    with open(os.path.join(out, case + ".safetensors"), "wb") as f:
        f.write(data)
    cases.append((case, tensor, says))

def hdr(case, header, data_len, tensor, says):
    h = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    raw(case, struct.pack("<Q", len(h)) + h + bytes(data_len), tensor, says)

def ent(dtype="F32", shape=(2,), offs=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}

raw("short", b"\x01\x02\x03", "-", "shorter than the 8-byte header length")
raw("hlen_past_end", struct.pack("<Q", 64) + b"{}", "-", "goes past the end of the file")
raw("hlen_huge", struct.pack("<Q", 1 << 40) + b"{}", "-", "above the limit")
hdr("not_json", '{"a": ', 0, "-", "not valid JSON")
hdr("trailing", '{} }', 0, "-", "bytes after its JSON value")
hdr("not_object", [1, 2], 0, "-", "must be a JSON object")
hdr("entry_not_object", {T: [1, 2]}, 0, T, "must be an object")
for key in ("dtype", "shape", "data_offsets"):
    e = ent(); del e[key]
    hdr("no_" + key, {T: e}, 8, T, 'lacks "%s"' % key)
hdr("dtype_not_string", {T: dict(ent(), dtype=7)}, 8, T, '"dtype" must be a string')
for dt in ("F64", "F8_E5M2", "BOOL", "I8"):
    hdr("dtype_" + dt, {T: ent(dtype=dt)}, 8, T, "dtype '%s' is not supported" % dt)
hdr("shape_not_list", {T: dict(ent(), shape=2)}, 8, T, '"shape" must be a list')
hdr("shape_float", {T: ent(shape=(2.5,))}, 8, T, "shape[0] must be a non-negative integer")
hdr("shape_negative", {T: ent(shape=(-2,))}, 8, T, "shape[0] must be a non-negative integer")
hdr("shape_above_2_53", {T: ent(shape=(2**53 + 2,))}, 8, T, "must be a non-negative integer")
hdr("shape_9_dims", {T: ent(shape=(1,) * 9, offs=(0, 4))}, 4, T, "9 dimensions; at most 8")
hdr("shape_overflow", {T: ent(shape=(2**40, 2**40))}, 8, T, "too large")
hdr("offsets_one", {T: ent(offs=(0,))}, 8, T, '"data_offsets" must be two')
hdr("offsets_negative", {T: ent(offs=(-8, 0))}, 8, T, '"data_offsets" must be two')
hdr("offsets_reversed", {T: ent(shape=(0,), offs=(8, 0))}, 8, T, "end before they begin")
hdr("offsets_past_data", {T: ent(offs=(0, 8))}, 4, T, "reach past the data region")
hdr("offsets_wrong_size", {T: ent(offs=(0, 4))}, 8, T, "but f32[2] needs 8")
hdr("overlap", {"a.weight": ent(), T: ent(offs=(4, 12))}, 12, T, "overlap")
hdr("metadata_not_object", {"__metadata__": "pt", T: ent()}, 8, "-",
    '"__metadata__" must be an object')
hdr("metadata_not_string", {"__metadata__": {"step": 3}, T: ent()}, 8, "-",
    "must map strings to strings")
e = json.dumps(ent())
hdr("duplicate", '{"%s": %s, "%s": %s}' % (T, e, T, e), 8, T, "appears twice")

# Sharded checkpoints: the index's rules and its shards.
def index(case, weight_map, shards, tensor, says):
    d = os.path.join(out, case)
    os.mkdir(d)
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        f.write(weight_map if isinstance(weight_map, str) else
                json.dumps({"metadata": {"total_size": 8}, "weight_map": weight_map}))
    for name, header in shards.items():
        h = json.dumps(header).encode()
        with open(os.path.join(d, name), "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h + bytes(8))
    cases.append((case, tensor, says))

s1, s2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
index("index_missing_shard", {"a.weight": s1, T: s2}, {s1: {"a.weight": ent()}}, T,
      "shard '%s'" % s2)
index("index_tensor_not_in_shard", {"a.weight": s1, T: s2},
      {s1: {"a.weight": ent()}, s2: {"other": ent()}}, T, "which does not hold it")
index("index_bad_shard", {T: s1}, {s1: {T: ent(dtype="F64")}}, T, "dtype 'F64' is not supported")
index("index_escape", {T: "../x.safetensors"}, {}, T, "must be a plain name")
index("index_not_json", '{"weight_map": ', {}, "-", "not valid JSON")
index("index_no_weight_map", '{"metadata": {}}', {}, "-", '"weight_map" must be an object')

with open(os.path.join(out, "cases.txt"), "w") as f:
    for c in cases:
        f.write("\t".join(c) + "\n")
PY

while IFS=$'\t' read -r case tensor says; do
    target="$tmp/$case.safetensors"
    [ -d "$tmp/$case" ] && target="$tmp/$case"
    set +e
    out=$("$WSHOST" "$fixture" "$target" 2>&1); rc=$?
    set -e
    if (( rc == 0 || rc >= 128 )); then
        fail "$case: expected a clean failure, got exit $rc: $out"
        continue
    fi
    lines=$(printf '%s\n' "$out" | wc -l)
    [ "$lines" -eq 1 ] || { fail "$case: expected one line, got $lines: $out"; continue; }
    [[ "$out" == *"'$target"* ]] || { fail "$case: the message does not name $target: $out"; continue; }
    if [ "$tensor" != "-" ] && [[ "$out" != *"'$tensor'"* ]]; then
        fail "$case: the message does not name tensor '$tensor': $out"
        continue
    fi
    check "$case (exit $rc)" "$says" "$out"
done < "$tmp/cases.txt"

# Control: a valid file of the same shape opens.
/usr/bin/python3 - "$tmp/valid.safetensors" <<'PY'
import json, struct, sys
h = json.dumps({"__metadata__": {"format": "pt"},
                "w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
open(sys.argv[1], "wb").write(struct.pack("<Q", len(h)) + h + bytes(8))
PY
out=$("$WSHOST" "$fixture" "$tmp/valid.safetensors" 2>&1)
check "a valid file opens" "1" "$out"
finish
