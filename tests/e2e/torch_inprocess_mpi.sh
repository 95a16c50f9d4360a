#!/bin/bash
# examples/torch/inprocess.py under mpirun -n 2: the trainer's row shards split
# across the ranks (gloo for the toy training, wshost's collectives for the
# sync), a full engine on each rank. Skipped (77) without MPI, torch or the
# wshost Python module.
cd "$(dirname "$0")" && while [ ! -f pipelines/verl_lora.lua ] && [ "$PWD" != / ]; do cd ..; done
[ "${WS_HAVE_MPI:-ON}" = "ON" ] || { echo "skip: built without MPI"; exit 77; }
command -v mpirun >/dev/null || { echo "skip: no mpirun"; exit 77; }
. tests/e2e/torch/torch_lib.sh
MPI=(mpirun --allow-run-as-root --oversubscribe -n 2 -x PYTHONPATH -x WSHOST_DEVICE -x OMP_NUM_THREADS)
run_matrix "${MPI[@]}"
run_buggy "${MPI[@]}"
finish
