/* parallel.h: a small fork-join thread pool for CPU byte loops.
 *
 * Large copies, conversions and checksums on the cpu device are split across
 * threads to reach memory bandwidth. The number of threads is WSHOST_THREADS,
 * else the number of online CPUs. */
#ifndef WS_PARALLEL_H
#define WS_PARALLEL_H

#include <stddef.h>

#include "status.h"

typedef void (*ws_range_fn)(void *ctx, size_t begin, size_t end, int worker);

int ws_parallel_threads(void);
/* WS_ERR_ARG naming the variable and its value when WSHOST_THREADS is set to
 * anything but a whole number from 1 to 256 (the count then falls back to the
 * number of online CPUs); WS_OK otherwise. */
ws_status ws_parallel_check_env(void);
/* Calls fn over [0, n) in chunks of at least `grain`; runs inline when the
 * work is small or there is one thread. Blocks until all chunks are done. */
void ws_parallel_for(size_t n, size_t grain, ws_range_fn fn, void *ctx);

#endif
