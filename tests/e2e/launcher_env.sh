#!/usr/bin/env bash
# A task that its launcher counts as one of several, but that cannot reach
# the others (srun without PMI, or a build without MPI), must stop with an
# error instead of syncing alone as a world of one.
set -uo pipefail
source "$(dirname "$0")/fixtures/e2e_lib.sh"

out=$(env -u OMPI_COMM_WORLD_SIZE -u PMI_RANK -u PMIX_RANK -u PMI_SIZE \
      SLURM_NTASKS=2 SLURM_PROCID=1 "$WSHOST" -e 'ws.comm()' 2>&1)
check_rc "srun task without PMI" 1 $?
check "names the task count" "one of 2 tasks (SLURM_NTASKS)" "$out"
if [ "${WS_HAVE_MPI:-ON}" = ON ]; then
    check "says how to launch" "srun --mpi=pmix" "$out"
fi

out=$(env -u OMPI_COMM_WORLD_SIZE -u PMI_RANK -u PMIX_RANK -u PMI_SIZE -u SLURM_PROCID \
      SLURM_NTASKS=4 "$WSHOST" -e 'local c = ws.comm(); print(c.size)' 2>&1)
check_rc "inside an allocation, not a task" 0 $?
check "a world of one there" "1" "$out"

finish
