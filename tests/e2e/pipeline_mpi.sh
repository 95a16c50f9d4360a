#!/bin/bash
# The same matrix as pipeline_matrix.sh under mpirun -n 2 (uneven FSDP shards
# on the tiny model, gathers over MPI). Skipped (77) without MPI.
cd "$(dirname "$0")/../.." || exit 1
[ "${WS_HAVE_MPI:-OFF}" = "ON" ] || { echo "skip: built without MPI"; exit 77; }
command -v mpirun >/dev/null || { echo "skip: no mpirun"; exit 77; }
. tests/e2e/fixtures/pipeline_lib.sh
run_matrix mpirun --allow-run-as-root --oversubscribe -n 2
finish
