#!/usr/bin/env bash
# bench_copy.sh: bench/copy.lua runs small sizes, prints the nccl-tests style
# header and rows, verifies every copy (#wrong 0), writes valid JSON, and
# fails cleanly on a bad device.
set -euo pipefail
: "${WSHOST:?set WSHOST to the wshost binary}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
check() {
    if [[ "$3" == *"$2"* ]]; then echo "ok   $1"; else
        echo "FAIL $1: expected to contain [$2], got [$3]"; fails=$((fails + 1)); fi
}

out=$("$WSHOST" bench/copy.lua --device cpu --max-mib 4 --iters 2 --json "$tmp/copy.json")
echo "$out" | sed 's/^/     | /'
for h in "# version: wshost" "# device: cpu" "# threads:" "# startup:" "# reference: glibc memcpy"; do
    check "header has '$h'" "$h" "$out"
done
rows=$(echo "$out" | grep -c '^  h2h' || true)
[[ "$rows" == 2 ]] && echo "ok   two rows (1 MiB, 4 MiB)" || { echo "FAIL expected 2 rows, got $rows"; fails=$((fails + 1)); }
check "every copy verified" "# wrong copies: 0" "$out"
check "JSON parses with the rows" "2 0" "$(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
print(len(d["rows"]), sum(r["wrong"] for r in d["rows"]))' "$tmp/copy.json")"

set +e
out=$("$WSHOST" bench/copy.lua --device nope 2>&1); rc=$?
set -e
[[ $rc != 0 ]] && echo "ok   bad device fails (exit $rc)" || { echo "FAIL bad device exit 0"; fails=$((fails + 1)); }
check "bad device is named" "unknown device 'nope'" "$out"

echo "$fails failure(s)"
exit $(( fails > 0 ))
