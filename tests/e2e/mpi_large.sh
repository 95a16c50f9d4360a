#!/usr/bin/env bash
# mpi_large.sh: messages that do not fit MPI's int counts. First the multi-rank
# scripts again with WSHOST_COMM_CHUNK_BYTES=4093, so every chunked code path
# (resized datatypes for all_gather, per-root reduces for reduce_scatter, chunk
# loops everywhere else, the direct messages of exchange and relay plans) runs
# on small tensors; then real tensors of more than
# 2^31 elements when the machine has the memory (about 8 GiB for 2 ranks).
set -u
[ "${WS_HAVE_MPI:-OFF}" = "ON" ] || { echo "skip: built without MPI"; exit 77; }
: "${WSHOST:?WSHOST must name the wshost binary}"
MPIRUN=$(command -v mpirun || command -v mpiexec) || { echo "skip: no mpirun"; exit 77; }
here=$(cd "$(dirname "$0")" && pwd)
export WSHOST_DEVICE=cpu
fail=0

for script in "$here"/../mpi/comm_*.lua "$here"/../mpi/exchange.lua "$here"/../mpi/relay.lua; do
    for np in 2 4; do
        if WSHOST_COMM_CHUNK_BYTES=4093 timeout 300 "$MPIRUN" --allow-run-as-root --oversubscribe \
                -x WSHOST_COMM_CHUNK_BYTES -n "$np" "$WSHOST" "$script"; then
            echo "chunked $(basename "$script") np$np: ok"
        else
            echo "FAIL chunked $(basename "$script") np$np"; fail=1
        fi
    done
done

avail_kib=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
if [ "${avail_kib:-0}" -lt $((10 * 1024 * 1024)) ]; then
    echo "large: skipped, needs 10 GiB available, have $((avail_kib / 1024)) MiB"
    exit $fail
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/large.lua" <<'LUA'
local ws = require "ws"
local comm = ws.comm()
local n = (1 << 31) + 77 -- elements, more than an int can count
local function u8(k) return ws.tensor{shape = {k}, dtype = "u8", device = "cpu"} end
local t = u8(n)
if comm.rank == 0 then t:random_(3) else t:fill(0) end
comm:broadcast(t, 0)
local want = u8(n):random_(3)
assert(t:checksum() == want:checksum(), "broadcast over 2^31 elements")
want:free()
t:fill(1)
comm:all_reduce(t, "sum")
assert(t:get(n) == comm.size and t:get(1) == comm.size, "all_reduce over 2^31 elements")
t:free()
-- all_gather: 1.125 GiB per rank (over the 1 GiB chunk), more than 2^31 elements in recv;
-- checksums of the pieces compose, so the check needs no second full copy
n = (1 << 30) + (1 << 27)
local send, recv = u8(n):random_(4, 1.0, comm.rank * n), u8(n * comm.size)
comm:all_gather(send, recv)
local sum = 0
for r = 0, comm.size - 1 do sum = sum + send:random_(4, 1.0, r * n):checksum(r * n) end
assert(recv:checksum() == sum, "all_gather into more than 2^31 elements")
if comm.rank == 0 then print("large: ok") end
LUA
if timeout 600 "$MPIRUN" --allow-run-as-root --oversubscribe -n 2 "$WSHOST" "$tmp/large.lua"; then
    echo "large np2: ok"
else
    echo "FAIL large np2"; fail=1
fi
exit $fail
