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

# A launcher or comm variable that is set but unusable is an error naming it
# and its value, not silently a world of one or a default.
out=$(env -u OMPI_COMM_WORLD_SIZE -u PMI_RANK -u PMIX_RANK -u PMI_SIZE \
      SLURM_NTASKS=two SLURM_PROCID=0 "$WSHOST" -e 'ws.comm()' 2>&1)
check_rc "task count that is not a number" 1 $?
check "names the variable and value" "SLURM_NTASKS=two: expected a task count" "$out"

out=$(WSHOST_COMM_CHECK=yes "$WSHOST" -e 'ws.comm()' 2>&1)
check_rc "check flag that is not a flag" 1 $?
check "names the flag and value" "WSHOST_COMM_CHECK=yes: expected 1 or on, 0 or off" "$out"

out=$(WSHOST_COMM_CHECK=off "$WSHOST" -e 'print(ws.comm().check)' 2>&1)
check_rc "check off" 0 $?
check "a valid flag still works" "false" "$out"

finish
