/* env.h: the one place that reads the process environment.
 *
 * Every variable wshost reads is parsed once, on first use, and validated
 * strictly: a value that is set but unusable is an error that names the
 * variable and the value, never silently a default. Whoever needs a setting
 * asks here; nothing else calls getenv. (The Lua host's -E, which ignores
 * WSHOST_DEVICE, WSHOST_PATH and LUA_INIT, is applied by its callers: the
 * settings below are not affected by it.) */
#ifndef WS_ENV_H
#define WS_ENV_H

#include <stddef.h>

#include "status.h"

/* A variable's raw value; NULL when unset or empty. For string settings
 * without a fixed syntax (search paths, library paths, LUA_INIT). */
const char *ws_env_get(const char *name);

/* What the launcher (mpirun, srun, torchrun) says about this process. */
typedef struct ws_launcher {
    int mpi;                /* started by an MPI launcher: the comm world uses MPI */
    int tasks;              /* 0: no launcher */
    const char *tasks_var;
    int rank;               /* -1: none */
    const char *rank_var;
    int local_rank;         /* -1: none */
    const char *local_var;  /* "LOCAL_RANK" (torchrun) only when no MPI or Slurm one is set */
} ws_launcher;

/* *out is always filled; a variable whose value is not a rank or count
 * counts as unset there, and is reported as the error. */
ws_status ws_env_launcher(const ws_launcher **out);

/* WSHOST_THREADS: 0 when unset. */
ws_status ws_env_threads(int *out, int max);
/* WSHOST_COMM_CHECK: 1 unless it is 0 or off. */
ws_status ws_env_comm_check(int *on);
/* WSHOST_COMM_NCCL: 1 forces NCCL for cuda tensors in a world of one. */
ws_status ws_env_comm_nccl(int *on);
/* WSHOST_COMM_CHUNK_BYTES: the largest MPI transfer in bytes (def when unset). */
ws_status ws_env_comm_chunk_bytes(size_t *out, size_t def, size_t max);
/* WSHOST_CUDA_MEMCPY_MIN_BYTES: from which size a plain device-to-device copy
 * uses cudaMemcpyAsync instead of the batched kernel (def when unset). */
ws_status ws_env_cuda_memcpy_min_bytes(size_t *out, size_t def);

#endif
