/* comm.h: collectives over tensors, behind a small backend vtable.
 *
 * One process per rank under a standard launcher (mpirun, srun). The world is
 * created lazily: without a launcher it is a world of one that needs neither
 * MPI nor NCCL. Tensors on the cpu go over MPI; cuda tensors go over NCCL,
 * which is loaded at run time (dlopen) and bootstrapped by broadcasting its
 * unique id over MPI. Both backends give bitwise-identical results.
 *
 * Every call validates its tensors (live, readable, sizes consistent) and
 * marks outputs written. A failure on one rank must not hang the others:
 * ws_comm_abort() tears the job down (MPI_Abort / ncclCommAbort). */
#ifndef WS_COMM_H
#define WS_COMM_H

#include "status.h"
#include "tensor.h"

typedef struct ws_comm ws_comm;
typedef struct ws_comm_request ws_comm_request;

typedef enum ws_reduce_op { WS_REDUCE_SUM = 0, WS_REDUCE_MAX = 1 } ws_reduce_op;

/* The world communicator (created on first call, lives until exit). */
ws_status ws_comm_world(ws_comm **out);
int ws_comm_rank(const ws_comm *c);
int ws_comm_size(const ws_comm *c);
int ws_comm_local_rank(const ws_comm *c);
/* Name of the backend(s) in use: "self", "mpi", "mpi+nccl". */
const char *ws_comm_backend(const ws_comm *c);
/* Like MPI_Comm_split; every rank of `c` must call it. */
ws_status ws_comm_split(ws_comm *c, int color, int key, ws_comm **out);
void ws_comm_free(ws_comm *c); /* not the world */

/* `req` NULL: blocking. Otherwise the call returns at once and *req must be
 * completed with ws_comm_wait (which frees it). Tensors must be contiguous
 * and stay alive until then. recv of all_gather: size * numel(send) elements,
 * rank r's piece at offset r * numel(send). */
ws_status ws_comm_all_gather(ws_comm *c, const ws_tensor *send, ws_tensor *recv,
                             ws_comm_request **req);
ws_status ws_comm_broadcast(ws_comm *c, ws_tensor *t, int root, ws_comm_request **req);
ws_status ws_comm_send(ws_comm *c, const ws_tensor *t, int peer, ws_comm_request **req);
ws_status ws_comm_recv(ws_comm *c, ws_tensor *t, int peer, ws_comm_request **req);
/* In place. i64 sums wrap modulo 2^64 (checksums rely on it). */
ws_status ws_comm_all_reduce(ws_comm *c, ws_tensor *t, ws_reduce_op op, ws_comm_request **req);
/* recv: numel(send) / size elements; rank r gets block r of the reduction. */
ws_status ws_comm_reduce_scatter(ws_comm *c, const ws_tensor *send, ws_tensor *recv,
                                 ws_reduce_op op, ws_comm_request **req);
/* Each rank sends send_counts[q] bytes at byte send_displs[q] of send to
 * rank q and receives recv_counts[q] bytes from rank q at byte
 * recv_displs[q] of recv (MPI_Alltoallv in bytes). Every pair must agree:
 * rank s's send_counts[q] == rank q's recv_counts[s] (with the check on,
 * ranks exchange their counts first and a mismatch is an error naming both
 * ranks). Each array has size entries and may be freed once the call returns. */
ws_status ws_comm_all_to_all(ws_comm *c, const ws_tensor *send, const size_t *send_counts,
                             const size_t *send_displs, ws_tensor *recv,
                             const size_t *recv_counts, const size_t *recv_displs,
                             ws_comm_request **req);
/* Point-to-point messages straight between memory the caller owns, with no
 * staging: each message carries `bytes` to (send = 1) or from `peer`, laid
 * over its runs in order. A scattered message travels as one message over
 * its runs' addresses (any number of runs, under 2 GiB in all); any other
 * has exactly one run, of any size, which travels in chunks (MPI may copy a
 * contiguous one once, process to process). Every rank must post the
 * messages it exchanges with a peer in the order that peer posts the
 * matching ones, each of the same byte count and both scattered or both
 * not (the runs themselves may differ); with the check on, ranks compare
 * their per-peer totals first and a mismatch is an error naming both
 * ranks. Raw pointers: the caller keeps the memory alive, and does not
 * touch what is received or change what is sent, until ws_comm_wait. The
 * messages and their runs may be freed once the call returns.
 * WS_ERR_UNSUPPORTED where ws_comm_can_transfer says no. */
typedef struct ws_comm_run {
    void *ptr;
    size_t bytes;
} ws_comm_run;
typedef struct ws_comm_msg {
    int peer, send, scattered;
    const ws_comm_run *runs;
    size_t n_runs, bytes;
} ws_comm_msg;
ws_status ws_comm_transfer(ws_comm *c, ws_device *d, const ws_comm_msg *msgs, size_t n,
                           ws_comm_request **req);
/* 1 when ws_comm_transfer can move memory of device d over c (several
 * ranks, and a backend that sends scattered memory: MPI for cpu memory). */
int ws_comm_can_transfer(const ws_comm *c, const ws_device *d);
ws_status ws_comm_barrier(ws_comm *c);
ws_status ws_comm_wait(ws_comm_request *req);

/* all_gather into a list of `n` = size tensors of numel(send) each (one
 * collective; gathers straight into them when they are consecutive slices of
 * one buffer, else through a staging buffer). */
ws_status ws_comm_all_gather_list(ws_comm *c, const ws_tensor *send, ws_tensor *const *recvs,
                                  size_t n, ws_comm_request **req);
/* Element-wise max over the ranks of `c` of a small vector (n <= 16), in
 * place, over the host backend: no tensor and no device round trip. For
 * ranks agreeing before a collective; runs whether the check is on or not. */
ws_status ws_comm_max_i64(ws_comm *c, int64_t *v, int n);

/* The mismatch check (one tiny all-reduce per collective, on by default when
 * size > 1 unless WSHOST_COMM_CHECK=0). */
void ws_comm_set_check(ws_comm *c, int on);
int ws_comm_get_check(const ws_comm *c);
/* Seconds per iteration of raw MPI_Allgather ("all_gather", `bytes` = total
 * output), MPI_Bcast ("broadcast") or MPI_Alltoall ("all_to_all", `bytes` =
 * what each rank receives, an equal part from every rank) on malloc'd
 * buffers: the benchmark's reference. WS_ERR_UNSUPPORTED without the MPI backend. */
ws_status ws_comm_reference(ws_comm *c, const char *op, size_t bytes, int iters,
                            double *seconds_per_iter);

/* 1 when the world exists and has more than one rank: main() then ends the
 * whole job with ws_comm_abort after a Lua error. */
int ws_comm_is_multi(void);

/* Ends every rank of the job with `exit_code`; prints nothing itself. */
void ws_comm_abort(int exit_code);
/* Called at normal exit: finalizes NCCL and MPI if they were started. */
void ws_comm_shutdown(void);

#endif
