#!/usr/bin/env bash
# The NCCL path on one GPU (world of one, forced with WSHOST_COMM_NCCL=1).
# Skips (77) where no GPU is usable, as on CI.
set -euo pipefail
: "${WSHOST:?WSHOST must name the wshost binary}"
if ! "$WSHOST" -e 'os.exit(ws.device("cuda") and 0 or 1)' 2>/dev/null; then
    echo "skip: no usable GPU ($("$WSHOST" -v 2>&1 | tail -n1))"
    exit 77
fi
out=$(WSHOST_COMM_NCCL=1 "$WSHOST" tests/e2e/fixtures/nccl_world1.lua 2>&1) || {
    echo "$out"
    echo "FAIL: NCCL collectives in a world of one"
    exit 1
}
echo "$out"
grep -q "nccl world-1 collectives ok" <<<"$out"
echo "1 passed, 0 failed"
