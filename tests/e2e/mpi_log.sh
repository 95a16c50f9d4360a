#!/usr/bin/env bash
# mpi_log.sh: under mpirun, ws.log prints rank 0's lines as they are and
# prefixes every other rank's with "[rank k]"; ranks and sizes agree.
set -uo pipefail
[ "${WS_HAVE_MPI:-OFF}" = "ON" ] || { echo "skip: built without MPI"; exit 77; }
source "$(dirname "$0")/fixtures/e2e_lib.sh"
MPIRUN=$(command -v mpirun || command -v mpiexec) || { echo "skip: no mpirun"; exit 77; }
export WSHOST_DEVICE=cpu

out=$(timeout 60 "$MPIRUN" --allow-run-as-root --oversubscribe -n 3 "$WSHOST" -e \
      'local c = ws.comm(); ws.log("hello from %d of %d", c.rank, c.size)' 2>&1)
check_rc "mpirun -n 3" 0 $?
check "rank 0 unprefixed" $'hello from 0 of 3' "$out"
check "rank 1 prefixed" "[rank 1] hello from 1 of 3" "$out"
check "rank 2 prefixed" "[rank 2] hello from 2 of 3" "$out"
if grep -q '^\[rank 0\]' <<<"$out"; then fail "rank 0 must not be prefixed"; else pass "no [rank 0]"; fi
finish
