#!/usr/bin/env bash
# fault_remote.sh: server mode survives every failed allocation on either
# side. A scripted engine process (tests/c/remote_recv) serves a scripted
# trainer process (tests/c/remote_send) two syncs, a wake and a sleep, over
# many small buckets; one run per N fails the N-th host allocation (the
# core's own bookkeeping: messages, manifests, slots' records, channel
# frames) of the receiver, then of the sender, N = 1, 2, ... until a run no
# longer reaches an N-th allocation, and that last run must succeed, its
# engine holding version 2 exactly. Every run with a failed allocation must
# end on both sides within the time limit, by exit (not by a signal), with
# no sanitizer report (LeakSanitizer included in the ASan build), and say
# "out of memory" on one side or the other (the failing side, or the trainer
# the engine told).
# Skipped (77) unless the build has -DWS_FAULT_INJECTION=ON.
set -u
cd "$(dirname "$0")/../.." || exit 1
[ "${WS_FAULT_INJECTION:-OFF}" = "ON" ] || { echo "skip: built without WS_FAULT_INJECTION"; exit 77; }
: "${WS_BUILD_DIR:?WS_BUILD_DIR must name the build directory}"
send=$WS_BUILD_DIR/tests/remote_send
recv=$WS_BUILD_DIR/tests/remote_recv
[ -x "$send" ] && [ -x "$recv" ] || { echo "FAIL: $send or $recv not built"; exit 1; }
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}exitcode=86"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:+$UBSAN_OPTIONS:}print_stacktrace=1"
export WSHOST_DEVICE=cpu
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
MAX_N=3000 # far above either side's count
SHOW=3     # failing runs shown in full per side
LIMIT=30   # seconds a run may take; a live peer is noticed within 2 s

tensors=(-t a:bf16:300x64 -t b:f32:1000 -t c:f16:7x9)
actions=(sync:1 wake:weights sync:2 sleep:1 close)

# run SIDE N: the pair with the N-th host allocation of SIDE ("none": no
# failure) failing; sets rrc and src, leaves the outputs in $tmp/{r,s}.{out,err}.
run() {
    local side=$1 n=$2 name="wshost-fault-$$-$1-$2" rpid i
    local renv=(env) senv=(env)
    [ "$side" = recv ] && renv+=(WSHOST_FAIL_ALLOC="host:$n")
    [ "$side" = send ] && senv+=(WSHOST_FAIL_ALLOC="host:$n")
    # Every output starts empty: the last run's "ok listen" must not start
    # this run's trainer.
    local f
    for f in r.out r.err s.out s.err; do : >"$tmp/$f"; done
    "${renv[@]}" timeout -k 5 "$LIMIT" "$recv" "$name" -T 5000 -v 2 "${tensors[@]}" \
        >"$tmp/r.out" 2>"$tmp/r.err" &
    rpid=$!
    # The trainer connects once the engine listens (or not at all when the
    # engine failed before it could).
    for ((i = 0; i < 500; i++)); do
        grep -q '^ok listen' "$tmp/r.out" && break
        kill -0 "$rpid" 2>/dev/null || break
        sleep 0.01
    done
    src=0
    if grep -q '^ok listen' "$tmp/r.out"; then
        "${senv[@]}" timeout -k 5 "$LIMIT" "$send" "$name" -T 5000 -C 5000 -s 4096 -p 700 \
            "${tensors[@]}" "${actions[@]}" >"$tmp/s.out" 2>"$tmp/s.err"
        src=$?
    fi
    wait "$rpid"
    rrc=$?
}

show() {
    for f in r.out r.err s.out s.err; do
        echo "    --- $f"
        sed 's/^/    /' "$tmp/$f" | head -n 30
    done
}

fail=0
run none 0
if [ "$rrc" -ne 0 ] || [ "$src" -ne 0 ] || ! grep -q '^ok check 2' "$tmp/r.out"; then
    echo "FAIL: the run without a failed allocation: engine exit $rrc, trainer exit $src"
    show
    exit 1
fi

for side in recv send; do
    t0=$SECONDS
    shown=0
    nfail=0
    for ((n = 1; n <= MAX_N; n++)); do
        run "$side" "$n"
        inj=$tmp/r.err
        [ "$side" = send ] && inj=$tmp/s.err
        bad=""
        if ! grep -q "fault injection: failing host allocation #$n\$" "$inj"; then
            # Fewer than n allocations on that side: the run must have succeeded.
            if [ "$rrc" -ne 0 ] || [ "$src" -ne 0 ] || ! grep -q '^ok check 2' "$tmp/r.out"; then
                bad="exit $rrc (engine) / $src (trainer) without an injected failure"
            fi
        elif [ "$rrc" -eq 124 ] || [ "$src" -eq 124 ] || [ "$rrc" -eq 137 ] || [ "$src" -eq 137 ]; then
            bad="still running after ${LIMIT} s (engine exit $rrc, trainer exit $src)"
        elif [ "$rrc" -ge 128 ] || [ "$src" -ge 128 ]; then
            bad="killed by a signal (engine exit $rrc, trainer exit $src)"
        elif [ "$rrc" -eq 86 ] || [ "$src" -eq 86 ] ||
             grep -q -e "Sanitizer" -e "runtime error:" "$tmp/r.err" "$tmp/s.err"; then
            bad="sanitizer report (engine exit $rrc, trainer exit $src)"
        elif [ "$rrc" -eq 0 ] && [ "$src" -eq 0 ]; then
            bad="both sides exit 0: the failed allocation went unreported"
        elif ! cat "$tmp"/r.out "$tmp"/r.err "$tmp"/s.out "$tmp"/s.err |
               grep -Eqi "out of ([a-z]+ )?memory"; then
            bad="no out-of-memory message (engine exit $rrc, trainer exit $src)"
        fi
        if [ -n "$bad" ]; then
            nfail=$((nfail + 1))
            echo "FAIL $side host:$n: $bad"
            if [ "$shown" -lt "$SHOW" ]; then
                show
                shown=$((shown + 1))
            fi
        fi
        grep -q "fault injection: failing host allocation #$n\$" "$inj" || break
    done
    echo "$side: $((n - 1)) host allocations failed one at a time, $nfail bad runs," \
         "$((SECONDS - t0)) s"
    [ "$nfail" -eq 0 ] || fail=1
    [ "$n" -le "$MAX_N" ] || { echo "FAIL $side: more than $MAX_N allocations"; fail=1; }
done
exit $fail
