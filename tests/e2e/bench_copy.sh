#!/usr/bin/env bash
# bench_copy.sh: bench/copy.lua runs small sizes, prints the nccl-tests style
# header and rows, verifies every copy (#wrong 0), writes valid JSON, and
# fails cleanly on a bad device.
set -euo pipefail
. "$(dirname "$0")/fixtures/e2e_lib.sh"

out=$("$WSHOST" bench/copy.lua --device cpu --max-mib 4 --iters 2 --json "$tmp/copy.json")
echo "$out" | sed 's/^/     | /'
for h in "# version: wshost" "# device: cpu" "# threads:" "# startup:" "# reference: glibc memcpy"; do
    check "header has '$h'" "$h" "$out"
done
rows=$(echo "$out" | grep -c '^  h2h' || true)
if [[ "$rows" == 2 ]]; then pass "two rows (1 MiB, 4 MiB)"; else fail "expected 2 rows, got $rows"; fi
check "every copy verified" "# wrong copies: 0" "$out"
check "JSON parses with the rows" "2 0" "$(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
print(len(d["rows"]), sum(r["wrong"] for r in d["rows"]))' "$tmp/copy.json")"

set +e
out=$("$WSHOST" bench/copy.lua --device nope 2>&1); rc=$?
set -e
if [[ $rc != 0 ]]; then pass "bad device fails (exit $rc)"; else fail "bad device exit 0"; fi
check "bad device is named" "unknown device 'nope'" "$out"

finish
