#!/usr/bin/env bash
# mpi_failure.sh: a failing rank ends the whole job quickly. A Lua error on one
# rank while the others wait in a collective, and a rank that exits early with
# os.exit(3), must both make every rank exit non-zero within 10 s (no hang),
# with the failing rank's message printed once; ranks that disagree (sizes,
# a relay plan's peers, WSHOST_COMM_CHECK) end it with a message saying so.
set -u
[ "${WS_HAVE_MPI:-OFF}" = "ON" ] || { echo "skip: built without MPI"; exit 77; }
: "${WSHOST:?WSHOST must name the wshost binary}"
MPIRUN=$(command -v mpirun || command -v mpiexec) || { echo "skip: no mpirun"; exit 77; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export WSHOST_DEVICE=cpu
fail=0

# run NAME NP SCRIPT: runs the job under `timeout 30`; sets rc and ms, keeps the output
run() {
    local name=$1 np=$2 script=$3
    local t0 t1
    t0=$(date +%s%N)
    timeout 30 "$MPIRUN" --allow-run-as-root --oversubscribe -n "$np" "$WSHOST" "$script" \
        >"$tmp/$name.out" 2>&1
    rc=$?
    t1=$(date +%s%N)
    ms=$(( (t1 - t0) / 1000000 ))
}

check() { # check NAME NEEDLE WANT_COUNT
    local name=$1 needle=$2 want=$3
    if [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ]; then
        echo "FAIL $name: exit code $rc (0 = failure went unnoticed, 124 = hang)"; fail=1
    fi
    if [ "$ms" -gt 10000 ]; then
        echo "FAIL $name: took ${ms} ms, more than 10 s"; fail=1
    fi
    if [ -n "$needle" ]; then
        local n
        n=$(grep -c -F -- "$needle" "$tmp/$name.out")
        if [ "$n" -ne "$want" ]; then
            echo "FAIL $name: '$needle' printed $n times, want $want"; fail=1
            sed 's/^/    /' "$tmp/$name.out"
        fi
    fi
    echo "$name: exit $rc after ${ms} ms"
}

cat >"$tmp/error.lua" <<'LUA'
local ws = require "ws"
local comm = ws.comm()
if comm.rank == 1 then error("boom on rank 1 before the all_gather") end
local t = ws.tensor{shape = {4}, device = "cpu"}
comm:all_gather(t, ws.tensor{shape = {4 * comm.size}, device = "cpu"})
comm:barrier()
LUA
for np in 2 4; do
    run "error_np$np" "$np" "$tmp/error.lua"
    check "error_np$np" "boom on rank 1 before the all_gather" 1
done

cat >"$tmp/exit.lua" <<'LUA'
local ws = require "ws"
local comm = ws.comm()
if comm.rank == comm.size - 1 then io.stderr:write("rank leaving early\n"); os.exit(3) end
comm:barrier()
local t = ws.tensor{shape = {1}, device = "cpu"}
comm:all_reduce(t)
LUA
for np in 2 4; do
    run "exit_np$np" "$np" "$tmp/exit.lua"
    check "exit_np$np" "rank leaving early" 1
done

# Ranks that disagree get a clear message (on every rank) and the job ends.
cat >"$tmp/mismatch.lua" <<'LUA'
local ws = require "ws"
local comm = ws.comm()
local n = comm.rank == 1 and 1000 or 1024
comm:all_gather(ws.tensor{shape = {n}, device = "cpu"},
                ws.tensor{shape = {n * comm.size}, device = "cpu"})
LUA
run "mismatch_np2" 2 "$tmp/mismatch.lua"
check "mismatch_np2" "" 0
if ! grep -q "all_gather: ranks disagree on the send size: rank 0 has 1024 elements, rank 1 has 1000" \
        "$tmp/mismatch_np2.out"; then
    echo "FAIL mismatch_np2: no mismatch message"; sed 's/^/    /' "$tmp/mismatch_np2.out"; fail=1
fi

# A disaggregated plan with peers on some ranks only: the ranks would call
# different agreements (and the direct messages would find no peer); every
# rank that can tell says so, and the job ends.
cat >"$tmp/peers.lua" <<'LUA'
local ws = require "ws"
local comm = ws.comm()
local rank, N = comm.rank, comm.size // 2
local trainer = rank < N
local tcomm = comm:split(trainer and 0 or 1, rank)
local relay = comm:split((rank == 0 or not trainer) and 0 or -1, rank)
local peers = rank ~= 1 and comm or nil
local plan = ws.plan{ bucket_bytes = 1 << 20, comm = trainer and tcomm or nil, device = "cpu",
                      name = "p", role = trainer and "sender" or "receiver", relay = relay,
                      gather_world = N, peers = peers }
local t = ws.tensor{ shape = { trainer and 50 or 100 }, dtype = "bf16", device = "cpu" }
if trainer then plan:add({ t }, nil, { 100 }, nil, nil, { "bf16" })
else plan:add(nil, { t }, { 100 }) end
plan:execute()
LUA
run "peers_np4" 4 "$tmp/peers.lua"
check "peers_np4" "" 0
if ! grep -q "plan 'p': some ranks' plans have peers and some do not" "$tmp/peers_np4.out"; then
    echo "FAIL peers_np4: no peers message"; sed 's/^/    /' "$tmp/peers_np4.out"; fail=1
fi

cat >"$tmp/ok.lua" <<'LUA'
local ws = require "ws"
local comm = ws.comm()
local t = ws.tensor{shape = {8}, device = "cpu"}:fill(1)
comm:all_reduce(t)
assert(t:get(1) == comm.size)
LUA
# WSHOST_COMM_CHECK on at one rank and off at another: the checking rank
# would wait in an agreement the other never joins. Both say so at ws.comm().
t0=$(date +%s%N)
timeout 30 "$MPIRUN" --allow-run-as-root --oversubscribe -n 1 -x WSHOST_COMM_CHECK=1 \
    "$WSHOST" "$tmp/ok.lua" : -n 1 -x WSHOST_COMM_CHECK=0 "$WSHOST" "$tmp/ok.lua" \
    >"$tmp/check_differs.out" 2>&1
rc=$?
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
check "check_differs" "" 0
if ! grep -q "ranks disagree on WSHOST_COMM_CHECK: rank 0 has the check on, rank 1 has it off" \
    "$tmp/check_differs.out"; then
    echo "FAIL check_differs: no message"; sed 's/^/    /' "$tmp/check_differs.out"; fail=1
fi

# A clean run exits 0 (the exit handler finalizes instead of aborting).
run "clean_np2" 2 "$tmp/ok.lua"
if [ "$rc" -ne 0 ]; then echo "FAIL clean_np2: exit $rc"; sed 's/^/    /' "$tmp/clean_np2.out"; fail=1; fi
echo "clean_np2: exit $rc"
exit $fail
