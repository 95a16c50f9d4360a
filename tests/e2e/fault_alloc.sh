#!/usr/bin/env bash
# fault_alloc.sh: every allocation the core makes may fail, and wshost then
# exits cleanly. For each allocation site class (host, device, pinned, map,
# backup; see host/core/fault.h) the tiny LoRA pipeline runs with the N-th
# allocation of that site failing, N = 1, 2, ... until a run no longer
# reaches an N-th allocation. Each run that had an allocation fail must exit
# non-zero (not by a signal) saying "out of memory" (or "out of host memory"),
# with no sanitizer report (LeakSanitizer included in the ASan build); the
# last run must succeed.
# Two configurations run side by side: sleep level 1 (the backup path) and
# sleep level 2 with trainer params offloaded to pinned memory.
# Skipped (77) unless the build has -DWS_FAULT_INJECTION=ON.
set -u
cd "$(dirname "$0")/../.." || exit 1
[ "${WS_FAULT_INJECTION:-OFF}" = "ON" ] || { echo "skip: built without WS_FAULT_INJECTION"; exit 77; }
. tests/e2e/fixtures/e2e_lib.sh
export WSHOST_DEVICE=cpu
# Sanitizer reports must be seen as such, not as an ordinary exit 1.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}exitcode=86"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:+$UBSAN_OPTIONS:}print_stacktrace=1"
MAX_N=5000        # far above any site's count today (host: about 560)
SHOW=3            # failing runs shown in full per site

base="model=tiny steps=2 lora_rank=8 kv_cache_mb=1 bucket_mb=0.25 progress=off"
configs=("sleep_level=1" "sleep_level=2 param_offload=true")
# WS_FAULT_SITES="device map" narrows a run by hand while debugging.
read -r -a sites <<<"${WS_FAULT_SITES:-host device pinned map backup}"

# sweep CONFIG_INDEX: all sites for one configuration; writes $tmp/sweep-I.log
# (a line per site, then the failures) and $tmp/sweep-I.fails (their count).
sweep() {
    local ci=$1 cfg=${configs[$1]} site n rc out bad shown nfail=0
    local log="$tmp/sweep-$ci.log" errf="$tmp/run-$ci.err"
    : >"$log"
    for site in "${sites[@]}"; do
        local t0=$SECONDS
        shown=0
        for ((n = 1; n <= MAX_N; n++)); do
            # shellcheck disable=SC2086
            WSHOST_FAIL_ALLOC="$site:$n" "$WSHOST" pipelines/verl_lora.lua $base $cfg \
                >/dev/null 2>"$errf"
            rc=$?
            out=$(cat "$errf")
            bad=""
            if [[ "$out" != *"fault injection: failing $site allocation #$n"* ]]; then
                # The run made fewer than n such allocations: it must have succeeded.
                [ "$rc" -eq 0 ] || bad="exit $rc without an injected failure"
            elif [ "$rc" -ge 128 ]; then
                bad="killed by signal $((rc - 128))"
            elif [ "$rc" -eq 86 ] || grep -q -e "Sanitizer" -e "runtime error:" "$errf"; then
                bad="sanitizer report (exit $rc)"
            elif [ "$rc" -eq 0 ]; then
                bad="exit 0: the failed allocation went unreported"
            elif ! grep -Eqi "out of ([a-z]+ )?memory" "$errf"; then
                bad="exit $rc without an out-of-memory message"
            fi
            if [ -n "$bad" ]; then
                nfail=$((nfail + 1))
                echo "FAIL $cfg $site:$n: $bad" >>"$log"
                if [ "$shown" -lt "$SHOW" ]; then
                    sed -n '1,40s/^/    /p' "$errf" >>"$log"
                    shown=$((shown + 1))
                fi
            fi
            [[ "$out" == *"fault injection: failing"* ]] || break
        done
        if [ "$n" -gt "$MAX_N" ]; then
            nfail=$((nfail + 1))
            echo "FAIL $cfg $site: still failing allocations at N=$MAX_N" >>"$log"
        fi
        echo "$cfg $site: $((n - 1)) allocations, each failed once, in $((SECONDS - t0)) s" >>"$log"
    done
    echo "$nfail" >"$tmp/sweep-$ci.fails"
}

t0=$SECONDS
for ci in "${!configs[@]}"; do sweep "$ci" & done
wait
for ci in "${!configs[@]}"; do
    cat "$tmp/sweep-$ci.log"
    k=$(cat "$tmp/sweep-$ci.fails" 2>/dev/null || echo 1)
    if [ "$k" -eq 0 ]; then pass "${configs[$ci]}: every injected failure ended cleanly"
    else fail "${configs[$ci]}: $k runs did not end cleanly"; fi
done
echo "fault sweep took $((SECONDS - t0)) s"
finish
