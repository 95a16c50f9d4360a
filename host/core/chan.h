/* chan.h: a message channel between two processes on one machine.
 *
 * A Unix-domain SOCK_SEQPACKET socket: the kernel keeps message boundaries,
 * delivers in order, and carries file descriptors (SCM_RIGHTS), which is how
 * shared-memory slots reach the other side (shm.h). Sockets are named in the
 * Linux abstract namespace: no file on disk, so a process that dies leaves
 * nothing stale behind and a restarted server can bind the same name at once.
 *
 * Every message starts with a header (magic, version, type, flags, lengths);
 * a payload longer than one frame (WS_CHAN_FRAME_BYTES) is split into frames
 * and joined again by ws_chan_recv, so callers see one message. Both ends are
 * on one machine, so integers travel in host byte order.
 *
 * Failure of the peer is noticed, and named:
 *   - it closed the socket or died with it: at once (EOF, ECONNRESET, EPIPE;
 *     sends use MSG_NOSIGNAL, never SIGPIPE);
 *   - it died while another process still holds its end (a child it forked):
 *     every wait checks the peer's pid (kill(pid, 0), zombies count as dead)
 *     every WS_CHAN_LIVENESS_MS, so death is reported within that time;
 *   - it stopped answering: the timeout the caller gives each wait.
 * Messages name the peer by role and pid, from SO_PEERCRED:
 *   "engine process (pid 1234) closed the connection during <what>".
 * No call aborts or raises a signal; all return a ws_status (status.h). */
#ifndef WS_CHAN_H
#define WS_CHAN_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "status.h"

#define WS_CHAN_MAGIC 0x48435357u /* "WSCH" in memory on little-endian hosts */
#define WS_CHAN_VERSION 1u
#define WS_CHAN_FRAME_BYTES 65536u /* payload bytes per frame */
#define WS_CHAN_MAX_MESSAGE (256u << 20) /* a larger payload is refused as malformed */
#define WS_CHAN_MAX_FDS 8
#define WS_CHAN_LIVENESS_MS 200
#define WS_CHAN_NAME_MAX 100      /* abstract names are at most 107 bytes */

typedef struct ws_chan ws_chan;
typedef struct ws_chan_listener ws_chan_listener;

/* One received message. payload is owned by the message (ws_chan_msg_free);
 * fds are owned by the receiver, who closes them or takes them (set the
 * entry to -1). */
typedef struct ws_chan_msg {
    uint32_t type;
    size_t len;
    unsigned char *payload;
    int fds[WS_CHAN_MAX_FDS];
    int nfds;
} ws_chan_msg;

/* Binds `name` in the abstract namespace and listens. A name in use by a
 * live server is WS_ERR_COMM naming it. */
ws_status ws_chan_listen(const char *name, ws_chan_listener **out);
/* Waits up to timeout_ms (-1: forever) for one connection. */
ws_status ws_chan_accept(ws_chan_listener *l, int timeout_ms, ws_chan **out);
void ws_chan_listener_close(ws_chan_listener *l); /* NULL is fine */
const char *ws_chan_listener_name(const ws_chan_listener *l);

/* Connects to `name`, retrying while nobody listens yet, until timeout_ms
 * has passed (the server may still be starting) or `interrupted` (may be
 * NULL) returns non-zero; the channel keeps that check for its waits. */
ws_status ws_chan_connect(const char *name, int timeout_ms, int (*interrupted)(void *ctx),
                          void *ctx, ws_chan **out);
void ws_chan_close(ws_chan *c); /* NULL is fine */
/* Ends this side's sending: the peer's next receive reports the connection
 * closed, while this side can still receive until the peer closes too. */
void ws_chan_shutdown_write(ws_chan *c);

/* The peer's pid (SO_PEERCRED) and how messages name it. The role defaults
 * to "peer" and is set once the peer said who it is ("engine"). */
pid_t ws_chan_peer_pid(const ws_chan *c);
void ws_chan_set_peer_role(ws_chan *c, const char *role);
/* "engine process (pid 1234)" */
const char *ws_chan_peer_label(const ws_chan *c);
/* Whether the peer process still runs (not exited, not a zombie). */
int ws_chan_peer_alive(const ws_chan *c);
/* Called on every liveness tick and when a wait is interrupted by a signal;
 * a non-zero return stops the wait with WS_ERR_INTERRUPTED (Ctrl-C). */
void ws_chan_set_interrupt(ws_chan *c, int (*interrupted)(void *ctx), void *ctx);
void ws_chan_listener_set_interrupt(ws_chan_listener *l, int (*interrupted)(void *ctx),
                                    void *ctx);

/* Sends one message; fds (may be NULL) travel with it and stay open here.
 * Waits up to timeout_ms (-1: forever) while the peer's buffer is full.
 * `what` names the step for messages ("sync: bucket 3"). */
ws_status ws_chan_send(ws_chan *c, uint32_t type, const void *payload, size_t len,
                       const int *fds, int nfds, int timeout_ms, const char *what);
/* Waits up to timeout_ms (-1: forever) for one message. On failure *msg is
 * empty and nothing needs freeing. */
ws_status ws_chan_recv(ws_chan *c, int timeout_ms, ws_chan_msg *msg, const char *what);
/* Frees the payload and closes the fds still held; idempotent. */
void ws_chan_msg_free(ws_chan_msg *msg);

/* Milliseconds on the monotonic clock (for deadlines and timings). */
double ws_chan_now_ms(void);

#endif
