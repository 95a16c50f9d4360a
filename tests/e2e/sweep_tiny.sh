#!/usr/bin/env bash
# sweep_tiny.sh: bench/sweep_sleep.lua through the real binary on the tiny
# model: one row per point (JSON lines + CSV), the policy visible in the rows
# (level 2 resends the base every step), charts, resume after an interruption,
# and a failing point recorded without stopping the sweep.
set -euo pipefail
WSHOST=${WSHOST:-build/wshost}
export WSHOST_DEVICE=${WSHOST_DEVICE:-cpu}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "sweep_tiny: $*" >&2; exit 1; }

out=$tmp/s
grid=(model=tiny free_cache_engine=true sleep_level=1,2 lora_rank=8 bucket_mb=16 steps=3 repeats=2)
"$WSHOST" bench/sweep_sleep.lua "${grid[@]}" out="$out" >"$tmp/run1.txt" 2>"$tmp/err1.txt" \
    || { cat "$tmp/run1.txt" "$tmp/err1.txt"; fail "2-point sweep failed"; }

[ "$(wc -l <"$out.jsonl")" -eq 2 ] || fail "expected 2 JSON lines, got $(wc -l <"$out.jsonl")"
[ "$(wc -l <"$out.csv")" -eq 3 ] || fail "expected a header and 2 CSV rows"
head -1 "$out.csv" | grep -q '^model,free_cache_engine,sleep_level,lora_rank,bucket_mb,status,repeats,steps,step_ms_median,' \
    || fail "CSV header: $(head -1 "$out.csv")"
l1=$(grep '"sleep_level":1' "$out.jsonl") || fail "no row for sleep_level=1"
l2=$(grep '"sleep_level":2' "$out.jsonl") || fail "no row for sleep_level=2"
for row in "$l1" "$l2"; do
    for want in '"status":"ok"' '"verified":true' '"verified_steps":6' '"repeats":2' \
                '"steps":3' '"leaked_bytes":0' '"step_ms":{' '"peak_device_bytes":'; do
        grep -qF "$want" <<<"$row" || fail "row lacks $want: $row"
    done
done
# PR #5147's rule, seen in the rows: level 1 sends the base once, level 2 every step.
grep -qF '"base_sent_steps":1' <<<"$l1" || fail "sleep_level=1 should send the base once: $l1"
grep -qF '"base_sent_steps":3' <<<"$l2" || fail "sleep_level=2 should send the base every step: $l2"
grep -q 'FAILED:' "$tmp/run1.txt" && fail "unexpected failure: $(cat "$tmp/run1.txt")"
grep -q '# 2 points (2 run, 0 already done), 0 failed, 0 left memory held' "$tmp/run1.txt" \
    || fail "summary line: $(tail -5 "$tmp/run1.txt")"
grep -q 'ETA' "$tmp/err1.txt" || fail "no progress bar on stderr"
if command -v gnuplot >/dev/null; then
    [ "$(head -c 4 "$out.png" | od -An -c | tr -d ' ')" = '211PNG' ] || fail "no PNG chart"
    grep -q '<svg' "$out.svg" || fail "no SVG chart"
fi

# Resume: the same command again runs nothing ...
"$WSHOST" bench/sweep_sleep.lua "${grid[@]}" out="$out" >"$tmp/run2.txt" 2>"$tmp/err2.txt"
grep -q '(0 run, 2 already done)' "$tmp/run2.txt" || fail "resume reran points: $(cat "$tmp/run2.txt")"
[ "$(wc -l <"$out.jsonl")" -eq 2 ] || fail "resume appended rows"
# ... and after an interruption (the second row never written) runs only what is missing.
head -1 "$out.jsonl" >"$tmp/one" && cp "$tmp/one" "$out.jsonl"
"$WSHOST" bench/sweep_sleep.lua "${grid[@]}" out="$out" >"$tmp/run3.txt" 2>"$tmp/err3.txt"
grep -q '(1 run, 1 already done)' "$tmp/run3.txt" || fail "resume after interruption: $(cat "$tmp/run3.txt")"
[ "$(wc -l <"$out.csv")" -eq 3 ] || fail "CSV after resume should hold both points"

# A failing point (kv_cache_mb=0 is out of range) is recorded; the next still runs.
set +e
"$WSHOST" bench/sweep_sleep.lua model=tiny free_cache_engine=false lora_rank=8 bucket_mb=16 \
    kv_cache_mb=0,1 steps=2 repeats=1 out="$tmp/f" charts=false >"$tmp/run4.txt" 2>"$tmp/err4.txt"
rc=$?
set -e
[ "$rc" -eq 1 ] || fail "a sweep with a failed point should exit 1, got $rc"
grep -q '"kv_cache_mb":0' "$tmp/f.jsonl" || fail "failed point not recorded"
grep '"kv_cache_mb":0' "$tmp/f.jsonl" | grep -q '"status":"failed"' || fail "failed point status"
grep '"kv_cache_mb":0' "$tmp/f.jsonl" | grep -q '"error":"[^"]*kv_cache_mb' \
    || fail "error message should name the key: $(cat "$tmp/f.jsonl")"
grep '"kv_cache_mb":1' "$tmp/f.jsonl" | grep -q '"status":"ok"' || fail "point after the failure did not run"
echo "sweep_tiny: ok"
