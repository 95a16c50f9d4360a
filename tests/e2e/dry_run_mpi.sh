#!/usr/bin/env bash
# dry_run_mpi.sh: dry_run=true over two ranks: Qwen3-30B-A3B's FSDP shards
# are planned as gathers that need staging memory, from address space alone.
# Apart from dry_run.sh so the sanitizer build runs it with the Open MPI leak
# suppressions. Skipped (77) without MPI.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "${WS_HAVE_MPI:-OFF}" = ON ] && command -v mpirun > /dev/null \
    || { echo "dry_run_mpi: built without MPI or no mpirun"; exit 77; }
# shellcheck source=tests/e2e/fixtures/e2e_lib.sh
. tests/e2e/fixtures/e2e_lib.sh

# The data row of plan KIND in a dry-run table: kind entries buckets
# MB_per_sync MB_gathered staging_MB build_ms.
row() { awk -v k="$1" '$1 == k && NF == 7 { print; exit }' <<< "$2"; }

# Two ranks: every base tensor is gathered, which needs staging memory.
set +e
out=$(mpirun --allow-run-as-root --oversubscribe -n 2 "$WSHOST" pipelines/verl_lora.lua \
      model=qwen3-30b-a3b dry_run=true progress=off 2>&1)
rc=$?
set -e
check_rc "30b: mpirun -n 2 dry run" 0 "$rc"
check "30b: world 2" "world 2" "$out"
check "30b: 18,867 base trainer tensors" "(18867 base, 384 adapter)" "$out"
base=$(row base "$out")
check "30b: the base plan has 18867 entries" "base 18867" \
    "$(awk '{ print $1, $2 }' <<< "$base")"
staging=$(awk '{ print $6 }' <<< "$base")
if awk -v s="${staging:-0}" 'BEGIN { exit !(s > 0) }'; then
    pass "30b: base staging_MB ${staging} > 0"
else
    fail "30b: base staging_MB is '${staging}', want > 0 (row: $base)"
fi
gathered=$(awk '{ print $5 }' <<< "$base")
if awk -v g="${gathered:-0}" 'BEGIN { exit !(g > 0) }'; then
    pass "30b: base MB_gathered ${gathered} > 0"
else
    fail "30b: base MB_gathered is '${gathered}', want > 0 (row: $base)"
fi
finish
