/* env.c: see env.h. Each accessor parses its variables once; the result,
 * or the message of an unusable value, is kept for every later call. */
#include "env.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MSG_CAP 256

const char *ws_env_get(const char *name)
{
    const char *v = getenv(name);
    return v && *v ? v : NULL;
}

/* Decimal integer in [lo, hi]: 1 set and valid, 0 unset, -1 invalid (msg filled). */
static int parse_int(const char *name, long lo, long hi, const char *expect, long *out,
                     char *msg)
{
    const char *v = ws_env_get(name);
    if (!v) return 0;
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || end == v || x < lo || x > hi) {
        snprintf(msg, MSG_CAP, "%s=%s: expected %s", name, v, expect);
        return -1;
    }
    *out = x;
    return 1;
}

/* 0/off or 1/on: 1 set and valid, 0 unset, -1 invalid (msg filled). */
static int parse_flag(const char *name, int *out, char *msg)
{
    const char *v = ws_env_get(name);
    if (!v) return 0;
    if (strcmp(v, "0") == 0 || strcmp(v, "off") == 0) *out = 0;
    else if (strcmp(v, "1") == 0 || strcmp(v, "on") == 0) *out = 1;
    else {
        snprintf(msg, MSG_CAP, "%s=%s: expected 1 or on, 0 or off", name, v);
        return -1;
    }
    return 1;
}

static ws_status result(const char *msg)
{
    return msg[0] ? WS_ERR(WS_ERR_ARG, "%s", msg) : WS_OK;
}

/* ---- the launcher ------------------------------------------------------------- */

static struct {
    pthread_once_t once;
    ws_launcher l;
    char msg[MSG_CAP];
} L = {.once = PTHREAD_ONCE_INIT};

/* The first valid variable of `vars` (NULL-terminated) into *out and *var. */
static void first_of(const char *const *vars, long lo, const char *expect, int *out,
                     const char **var)
{
    for (int i = 0; vars[i]; i++) {
        long x;
        char msg[MSG_CAP];
        int r = parse_int(vars[i], lo, 1 << 20, expect, &x, msg);
        if (r < 0 && !L.msg[0]) snprintf(L.msg, sizeof L.msg, "%s", msg);
        if (r > 0) {
            *out = (int)x;
            *var = vars[i];
            return;
        }
    }
}

static void parse_launcher(void)
{
    static const char *const mpi_vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK",
                                           "PMIX_RANK", "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD"};
    for (size_t i = 0; i < sizeof mpi_vars / sizeof mpi_vars[0]; i++)
        if (getenv(mpi_vars[i])) L.l.mpi = 1;
    /* SLURM_NTASKS is also set inside an allocation (salloc, sbatch); only a
     * task started by srun has SLURM_PROCID. */
    static const char *const task_vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", NULL};
    static const char *const slurm_tasks[] = {"SLURM_NTASKS", NULL};
    first_of(task_vars, 1, "a task count of at least 1", &L.l.tasks, &L.l.tasks_var);
    if (!L.l.tasks_var && getenv("SLURM_PROCID"))
        first_of(slurm_tasks, 1, "a task count of at least 1", &L.l.tasks, &L.l.tasks_var);
    static const char *const rank_vars[] = {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK",
                                            "SLURM_PROCID", NULL};
    L.l.rank = -1;
    first_of(rank_vars, 0, "a rank of at least 0", &L.l.rank, &L.l.rank_var);
    static const char *const local_vars[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                                             "SLURM_LOCALID", "LOCAL_RANK", NULL};
    L.l.local_rank = -1;
    first_of(local_vars, 0, "a local rank of at least 0", &L.l.local_rank, &L.l.local_var);
}

ws_status ws_env_launcher(const ws_launcher **out)
{
    pthread_once(&L.once, parse_launcher);
    *out = &L.l;
    return result(L.msg);
}

/* ---- wshost's own settings ----------------------------------------------------- */

#define SETTING(fn, type, body)                                                         \
    static struct {                                                                     \
        pthread_once_t once;                                                            \
        type v;                                                                         \
        char msg[MSG_CAP];                                                              \
    } fn##_s = {.once = PTHREAD_ONCE_INIT};                                             \
    static void fn##_parse(void) body

static int threads_max;
SETTING(threads, int, {
    long x = 0;
    char expect[96];
    snprintf(expect, sizeof expect, "a number of threads from 1 to %d (or unset: one per CPU)",
             threads_max);
    if (parse_int("WSHOST_THREADS", 1, threads_max, expect, &x, threads_s.msg) > 0)
        threads_s.v = (int)x;
})

ws_status ws_env_threads(int *out, int max)
{
    threads_max = max;
    pthread_once(&threads_s.once, threads_parse);
    *out = threads_s.v;
    return result(threads_s.msg);
}

SETTING(check, int, {
    check_s.v = 1;
    parse_flag("WSHOST_COMM_CHECK", &check_s.v, check_s.msg);
})

ws_status ws_env_comm_check(int *on)
{
    pthread_once(&check_s.once, check_parse);
    *on = check_s.v;
    return result(check_s.msg);
}

SETTING(nccl, int, { parse_flag("WSHOST_COMM_NCCL", &nccl_s.v, nccl_s.msg); })

ws_status ws_env_comm_nccl(int *on)
{
    pthread_once(&nccl_s.once, nccl_parse);
    *on = nccl_s.v;
    return result(nccl_s.msg);
}

static size_t chunk_max;
SETTING(chunk, long, {
    char expect[96];
    snprintf(expect, sizeof expect, "a number of bytes from 1 to %zu", chunk_max);
    if (parse_int("WSHOST_COMM_CHUNK_BYTES", 1, (long)chunk_max, expect, &chunk_s.v,
                  chunk_s.msg) <= 0)
        chunk_s.v = 0;
})

ws_status ws_env_comm_chunk_bytes(size_t *out, size_t def, size_t max)
{
    chunk_max = max;
    pthread_once(&chunk_s.once, chunk_parse);
    *out = chunk_s.v > 0 ? (size_t)chunk_s.v : def;
    return result(chunk_s.msg);
}

SETTING(memcpy_min, long, {
    if (parse_int("WSHOST_CUDA_MEMCPY_MIN_BYTES", 1, LONG_MAX, "a number of bytes of at least 1",
                  &memcpy_min_s.v, memcpy_min_s.msg) <= 0)
        memcpy_min_s.v = 0;
})

ws_status ws_env_cuda_memcpy_min_bytes(size_t *out, size_t def)
{
    pthread_once(&memcpy_min_s.once, memcpy_min_parse);
    *out = memcpy_min_s.v > 0 ? (size_t)memcpy_min_s.v : def;
    return result(memcpy_min_s.msg);
}
