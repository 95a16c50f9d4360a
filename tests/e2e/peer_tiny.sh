#!/usr/bin/env bash
# peer_tiny.sh: the PyTorch peer (bench/peer_torch.py) against wshost on the
# tiny model. The peer must leave the engine with the same checksum as wshost
# (same trainer values, same fused layout, same hash), and a changed trainer
# value must change it. Skipped (77) when python3 cannot import torch.
set -euo pipefail
WSHOST=${WSHOST:-build/wshost}
PYTHON=${PYTHON:-/usr/bin/python3}
export WSHOST_DEVICE=${WSHOST_DEVICE:-cpu}
"$PYTHON" -c 'import torch' 2>/dev/null || { echo "peer_tiny: $PYTHON cannot import torch"; exit 77; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "peer_tiny: $*" >&2; exit 1; }
field() { "$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

# One wshost rank writes its result and the peer's spec (seeds, shapes, slices).
"$WSHOST" bench/compare.lua --worker dir="$tmp" model=tiny iters=2 lora_rank=8 param_dtype=f32 \
    || fail "wshost worker failed"
want=$(field "$tmp/wshost.json" checksum)
[ "$want" != 0000000000000000 ] || fail "wshost checksum is zero"
for world in 1 2; do
    "$PYTHON" bench/peer_torch.py --spec "$tmp/spec.json" --world $world --iters 2 \
        --trainer-dtype f32 --out "$tmp/t$world.json" >/dev/null 2>"$tmp/t$world.log" \
        || { cat "$tmp/t$world.log"; fail "peer at world $world failed"; }
    got=$(field "$tmp/t$world.json" checksum)
    [ "$got" = "$want" ] || fail "world $world: torch checksum $got, wshost $want"
    [ "$(field "$tmp/t$world.json" bytes_moved)" = "$(field "$tmp/wshost.json" bytes_moved)" ] \
        || fail "world $world: bytes moved differ"
done
# The comparison can fail: one different seed gives a different checksum.
"$PYTHON" - "$tmp/spec.json" "$tmp/bad.json" <<'PY'
import json, sys
spec = json.load(open(sys.argv[1]))
spec["base"][5]["seed"] += 1
json.dump(spec, open(sys.argv[2], "w"))
PY
"$PYTHON" bench/peer_torch.py --spec "$tmp/bad.json" --iters 1 --out "$tmp/bad_out.json" \
    >/dev/null 2>&1 || fail "peer on the changed spec failed"
[ "$(field "$tmp/bad_out.json" checksum)" != "$want" ] || fail "a changed seed kept the checksum"

# The driver: wshost and the peer side by side, world 1 (and 2 with MPI).
worlds=1
if [ "${WS_HAVE_MPI:-ON}" = ON ] && command -v mpirun >/dev/null; then worlds=1,2; fi
WSHOST="$WSHOST" "$WSHOST" bench/compare.lua model=tiny worlds=$worlds iters=2 python="$PYTHON" \
    json="$tmp/c.json" >"$tmp/c.txt" 2>"$tmp/c.err" || { cat "$tmp/c.txt" "$tmp/c.err"; fail "compare failed"; }
cat "$tmp/c.txt"
n=$(tr ',' '\n' <<<"$worlds" | wc -l)
[ "$(grep -o '"checksums_equal":true' "$tmp/c.json" | wc -l)" -eq "$n" ] || fail "checksums differ: $(cat "$tmp/c.json")"
[ "$(grep -o '"bytes_equal":true' "$tmp/c.json" | wc -l)" -eq "$n" ] || fail "bytes differ"
grep -q '0 mismatch(es) or failure(s)' "$tmp/c.txt" || fail "compare reported a mismatch"
echo "peer_tiny: ok"
