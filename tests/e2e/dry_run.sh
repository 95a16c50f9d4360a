#!/usr/bin/env bash
# dry_run.sh: dry_run=true plans a model far larger than this machine from
# address space alone. Qwen3-235B-A22B (94 layers of 128 experts: 36,945 base
# tensors, about 470 GB in bf16) must set up, print its plan table and exit 0
# while the process stays under 1 GB resident (dry_run_mpi.sh plans
# Qwen3-30B-A3B over two ranks). Nothing here touches weights.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/e2e/fixtures/e2e_lib.sh
. tests/e2e/fixtures/e2e_lib.sh

# The data row of plan KIND in a dry-run table: kind entries buckets
# MB_per_sync MB_gathered staging_MB build_ms.
row() { awk -v k="$1" '$1 == k && NF == 7 { print; exit }' <<< "$2"; }

# peak RSS (KB) from GNU time, when it is there.
timer=()
if [ -x /usr/bin/time ] && /usr/bin/time -f %M true > /dev/null 2>&1; then
    timer=(/usr/bin/time -f "peak_rss_kb %M" -o "$tmp/rss")
fi

set +e
out=$("${timer[@]}" "$WSHOST" pipelines/verl_lora.lua model=qwen3-235b-a22b dry_run=true \
      progress=off 2>&1)
rc=$?
set -e
check_rc "235b: dry run" 0 "$rc"
check "235b: the model line" "# verl_lora: model qwen3-235b-a22b (235093.6M params" "$out"
check "235b: the dry-run summary" "# dry run: " "$out"
check "235b: 36,945 base and 752 adapter trainer tensors" "(36945 base, 752 adapter)" "$out"
check "235b: the plan table header" \
    "#plan     entries buckets  MB_per_sync  MB_gathered  staging_MB  build_ms" "$out"
check "235b: no weight memory touched" "no weight memory was touched" "$out"
base=$(row base "$out")
adapter=$(row adapter "$out")
check "235b: the base plan has 36945 entries" "base 36945" "$(awk '{ print $1, $2 }' <<< "$base")"
check "235b: the adapter plan has 752 entries" "adapter 752" \
    "$(awk '{ print $1, $2 }' <<< "$adapter")"
# About 470 GB of bf16 weights per sync, planned without holding any of it.
check "235b: base bytes per sync" "470187.3" "$(awk '{ print $4 }' <<< "$base")"
if [ "$rc" -ne 0 ]; then
    fail "235b: peak RSS not measured: the dry run failed"
elif [ ${#timer[@]} -gt 0 ]; then
    rss=$(awk '/^peak_rss_kb/ { print $2 }' "$tmp/rss")
    if [ -n "$rss" ] && [ "$rss" -lt 1048576 ]; then
        pass "235b: peak RSS ${rss} KB < 1 GB"
    else
        fail "235b: peak RSS ${rss:-unknown} KB, want < 1048576 KB"
    fi
else
    echo "skip 235b: peak RSS (no GNU time at /usr/bin/time)"
fi

finish
