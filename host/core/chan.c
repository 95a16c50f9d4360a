/* chan.c: the message channel of chan.h over an abstract Unix SEQPACKET socket.
 *
 * Sockets are non-blocking and every wait is a poll in slices of
 * WS_CHAN_LIVENESS_MS, so one loop gives the caller's timeout, the check
 * that the peer still runs, and a chance to stop on Ctrl-C. */
#include "chan.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "fault.h"

enum { FLAG_MORE = 1u }; /* another frame of this message follows */

typedef struct frame_header {
    uint32_t magic;
    uint16_t version;
    uint16_t type;
    uint32_t flags;
    uint32_t frame_len; /* payload bytes in this frame */
    uint64_t total_len; /* payload bytes of the whole message */
} frame_header;

struct ws_chan_listener {
    int fd;
    char name[WS_CHAN_NAME_MAX + 1];
    int (*interrupted)(void *ctx);
    void *interrupt_ctx;
};

struct ws_chan {
    int fd;
    pid_t peer_pid;
    char role[32];
    char label[80];
    int (*interrupted)(void *ctx);
    void *interrupt_ctx;
    unsigned char *frame; /* one frame's header and payload */
};

double ws_chan_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static ws_status make_addr(const char *name, struct sockaddr_un *a, socklen_t *len)
{
    size_t n = name ? strlen(name) : 0;
    if (n == 0 || n > WS_CHAN_NAME_MAX)
        return WS_ERR(WS_ERR_ARG, "channel name '%s' must hold 1 to %d characters",
                      name ? name : "(null)", WS_CHAN_NAME_MAX);
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    /* A leading NUL puts the name in the abstract namespace. */
    memcpy(a->sun_path + 1, name, n);
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
    return WS_OK;
}

static int open_socket(void)
{
    return socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
}

/* ---- peers ------------------------------------------------------------------------ */

static int pid_alive(pid_t pid)
{
    if (pid <= 0) return 1; /* unknown: only the socket can tell */
    if (kill(pid, 0) != 0 && errno == ESRCH) return 0;
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f) return 1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* A zombie has closed everything but is not reaped yet: it is gone. */
    const char *close_paren = strrchr(buf, ')');
    return !(close_paren && close_paren[1] == ' ' &&
             (close_paren[2] == 'Z' || close_paren[2] == 'X'));
}

static void update_label(ws_chan *c)
{
    snprintf(c->label, sizeof c->label, "%s process (pid %d)", c->role, (int)c->peer_pid);
}

pid_t ws_chan_peer_pid(const ws_chan *c) { return c->peer_pid; }

const char *ws_chan_peer_label(const ws_chan *c) { return c->label; }

int ws_chan_peer_alive(const ws_chan *c) { return pid_alive(c->peer_pid); }

void ws_chan_set_peer_role(ws_chan *c, const char *role)
{
    snprintf(c->role, sizeof c->role, "%s", role && *role ? role : "peer");
    update_label(c);
}

void ws_chan_set_interrupt(ws_chan *c, int (*interrupted)(void *ctx), void *ctx)
{
    c->interrupted = interrupted;
    c->interrupt_ctx = ctx;
}

static ws_status new_chan(int fd, ws_chan **out)
{
    ws_chan *c = ws_calloc(1, sizeof *c);
    unsigned char *frame = ws_malloc(sizeof(frame_header) + WS_CHAN_FRAME_BYTES);
    if (!c || !frame) {
        free(c);
        free(frame);
        close(fd);
        return WS_ERR(WS_ERR_NOMEM, "channel: out of memory for a connection");
    }
    c->fd = fd;
    c->frame = frame;
    struct ucred cred;
    socklen_t len = sizeof cred;
    c->peer_pid = getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0 ? cred.pid : 0;
    ws_chan_set_peer_role(c, "peer");
    *out = c;
    return WS_OK;
}

void ws_chan_close(ws_chan *c)
{
    if (!c) return;
    if (c->fd >= 0) close(c->fd);
    free(c->frame);
    free(c);
}

void ws_chan_shutdown_write(ws_chan *c)
{
    if (c && c->fd >= 0) (void)shutdown(c->fd, SHUT_WR);
}

/* ---- waiting ---------------------------------------------------------------------- */

/* Waits until fd is ready for `events` (or hung up: the next call then reports
 * it), the deadline passes (deadline < 0: none), the peer (c may be NULL) is
 * found dead, or `interrupted` says stop. */
static ws_status wait_fd(ws_chan *c, int fd, short events, double deadline, int timeout_ms,
                         const char *what, int (*interrupted)(void *), void *ictx)
{
    for (;;) {
        int slice = WS_CHAN_LIVENESS_MS;
        if (deadline >= 0) {
            double left = deadline - ws_chan_now_ms();
            if (left <= 0) {
                if (!c) return WS_ERR(WS_ERR_TIMEOUT, "%s: nothing came within %d ms", what,
                                      timeout_ms);
                return WS_ERR(WS_ERR_TIMEOUT, "%s did not answer within %d ms during %s; it "
                              "still runs but does not answer", c->label, timeout_ms, what);
            }
            if (left < slice) slice = (int)left + 1;
        }
        struct pollfd p = {.fd = fd, .events = events};
        int n = poll(&p, 1, slice);
        if (n > 0) return WS_OK;
        if (n < 0 && errno != EINTR)
            return WS_ERR(WS_ERR_COMM, "%s: poll failed: %s", what, strerror(errno));
        if (interrupted && interrupted(ictx))
            return WS_ERR(WS_ERR_INTERRUPTED, "%s: interrupted while waiting for %s", what,
                          c ? c->label : "a connection");
        if (c && !pid_alive(c->peer_pid))
            return WS_ERR(WS_ERR_COMM, "%s exited during %s (its end of the connection is "
                          "still open, held by another process)", c->label, what);
    }
}

static double deadline_of(int timeout_ms)
{
    return timeout_ms < 0 ? -1.0 : ws_chan_now_ms() + timeout_ms;
}

static ws_status peer_closed(ws_chan *c, const char *what)
{
    /* A process that dies closes its files a moment before it turns into a
     * zombie: give it that moment, so the message says which it was. */
    int alive = pid_alive(c->peer_pid);
    for (int i = 0; alive && i < 10; i++) {
        struct timespec nap = {0, 2 * 1000000L};
        nanosleep(&nap, NULL);
        alive = pid_alive(c->peer_pid);
    }
    return WS_ERR(WS_ERR_COMM, "%s closed the connection during %s (%s)", c->label, what,
                  alive ? "it still runs" : "it has exited");
}

/* ---- server and client ------------------------------------------------------------ */

ws_status ws_chan_listen(const char *name, ws_chan_listener **out)
{
    *out = NULL;
    struct sockaddr_un a;
    socklen_t alen = 0;
    WS_TRY(make_addr(name, &a, &alen));
    ws_chan_listener *l = ws_calloc(1, sizeof *l);
    if (!l) return WS_ERR(WS_ERR_NOMEM, "channel '%s': out of memory", name);
    snprintf(l->name, sizeof l->name, "%s", name);
    l->fd = open_socket();
    if (l->fd < 0) {
        free(l);
        return WS_ERR(WS_ERR_COMM, "channel '%s': socket: %s", name, strerror(errno));
    }
    if (bind(l->fd, (struct sockaddr *)&a, alen) != 0 || listen(l->fd, 8) != 0) {
        int e = errno;
        close(l->fd);
        free(l);
        if (e == EADDRINUSE)
            return WS_ERR(WS_ERR_COMM, "channel '%s' is in use by another process; pick "
                          "another name or stop that process", name);
        return WS_ERR(WS_ERR_COMM, "channel '%s': bind/listen: %s", name, strerror(e));
    }
    *out = l;
    return WS_OK;
}

const char *ws_chan_listener_name(const ws_chan_listener *l) { return l->name; }

void ws_chan_listener_set_interrupt(ws_chan_listener *l, int (*interrupted)(void *ctx),
                                    void *ctx)
{
    l->interrupted = interrupted;
    l->interrupt_ctx = ctx;
}

void ws_chan_listener_close(ws_chan_listener *l)
{
    if (!l) return;
    close(l->fd);
    free(l);
}

ws_status ws_chan_accept(ws_chan_listener *l, int timeout_ms, ws_chan **out)
{
    *out = NULL;
    char what[160];
    snprintf(what, sizeof what, "channel '%s': waiting for a connection", l->name);
    double deadline = deadline_of(timeout_ms);
    for (;;) {
        WS_TRY(wait_fd(NULL, l->fd, POLLIN, deadline, timeout_ms, what, l->interrupted,
                       l->interrupt_ctx));
        int fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd >= 0) return new_chan(fd, out);
        if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
            return WS_ERR(WS_ERR_COMM, "%s: accept: %s", what, strerror(errno));
    }
}

ws_status ws_chan_connect(const char *name, int timeout_ms, int (*interrupted)(void *ctx),
                          void *ctx, ws_chan **out)
{
    *out = NULL;
    struct sockaddr_un a;
    socklen_t alen = 0;
    WS_TRY(make_addr(name, &a, &alen));
    double deadline = deadline_of(timeout_ms);
    for (;;) {
        int fd = open_socket();
        if (fd < 0) return WS_ERR(WS_ERR_COMM, "channel '%s': socket: %s", name, strerror(errno));
        if (connect(fd, (struct sockaddr *)&a, alen) == 0) {
            WS_TRY(new_chan(fd, out));
            ws_chan_set_interrupt(*out, interrupted, ctx);
            return WS_OK;
        }
        int e = errno;
        close(fd);
        /* Nobody listens yet (refused) or the backlog is full (again). */
        if (e != ECONNREFUSED && e != EAGAIN && e != EINTR && e != ENOENT)
            return WS_ERR(WS_ERR_COMM, "channel '%s': connect: %s", name, strerror(e));
        if (interrupted && interrupted(ctx))
            return WS_ERR(WS_ERR_INTERRUPTED, "channel '%s': interrupted while connecting",
                          name);
        if (deadline >= 0 && ws_chan_now_ms() >= deadline)
            return WS_ERR(WS_ERR_TIMEOUT, "channel '%s': no process accepted a connection "
                          "within %d ms; is the receiving process started and listening on "
                          "that name?", name, timeout_ms);
        struct timespec nap = {0, 10 * 1000000L};
        nanosleep(&nap, NULL);
    }
}

/* ---- messages --------------------------------------------------------------------- */

ws_status ws_chan_send(ws_chan *c, uint32_t type, const void *payload, size_t len,
                       const int *fds, int nfds, int timeout_ms, const char *what)
{
    if (type > UINT16_MAX || len > WS_CHAN_MAX_MESSAGE || nfds < 0 || nfds > WS_CHAN_MAX_FDS)
        return WS_ERR(WS_ERR_ARG, "%s: message type %u of %zu bytes with %d fds is out of "
                      "range", what, type, len, nfds);
    double deadline = deadline_of(timeout_ms);
    size_t done = 0;
    int first = 1;
    for (;;) {
        size_t n = len - done;
        if (n > WS_CHAN_FRAME_BYTES) n = WS_CHAN_FRAME_BYTES;
        frame_header h = {WS_CHAN_MAGIC, WS_CHAN_VERSION, (uint16_t)type,
                          done + n < len ? FLAG_MORE : 0u, (uint32_t)n, (uint64_t)len};
        struct iovec iov[2] = {{&h, sizeof h}, {n ? (char *)payload + done : NULL, n}};
        union {
            struct cmsghdr align;
            char buf[CMSG_SPACE(sizeof(int) * WS_CHAN_MAX_FDS)];
        } ctl;
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = n ? 2 : 1};
        if (first && nfds > 0) {
            memset(&ctl, 0, sizeof ctl);
            mh.msg_control = ctl.buf;
            mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
            struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
            cm->cmsg_level = SOL_SOCKET;
            cm->cmsg_type = SCM_RIGHTS;
            cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
            memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfds);
        }
        ssize_t sent = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                WS_TRY(wait_fd(c, c->fd, POLLOUT, deadline, timeout_ms, what, c->interrupted,
                               c->interrupt_ctx));
                continue; /* the same frame again */
            }
            if (errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN)
                return peer_closed(c, what);
            return WS_ERR(WS_ERR_COMM, "%s: sending to %s: %s", what, c->label,
                          strerror(errno));
        }
        if ((size_t)sent != sizeof h + n)
            return WS_ERR(WS_ERR_COMM, "%s: sending to %s: short send of %zd bytes", what,
                          c->label, sent);
        done += n;
        first = 0;
        if (done == len) return WS_OK; /* an empty message is one frame too */
    }
}

void ws_chan_msg_free(ws_chan_msg *msg)
{
    free(msg->payload);
    msg->payload = NULL;
    msg->len = 0;
    for (int i = 0; i < msg->nfds; i++)
        if (msg->fds[i] >= 0) close(msg->fds[i]);
    msg->nfds = 0;
}

/* Takes the fds a frame carried into msg; more than fit are closed and refused. */
static ws_status take_fds(ws_chan *c, struct msghdr *mh, ws_chan_msg *msg, const char *what)
{
    int refused = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(mh); cm; cm = CMSG_NXTHDR(mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
        size_t n = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < n; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
            if (msg->nfds < WS_CHAN_MAX_FDS) msg->fds[msg->nfds++] = fd;
            else {
                close(fd);
                refused = 1;
            }
        }
    }
    if (refused || (mh->msg_flags & MSG_CTRUNC))
        return WS_ERR(WS_ERR_FORMAT, "%s: %s sent more than %d file descriptors in one "
                      "message", what, c->label, WS_CHAN_MAX_FDS);
    return WS_OK;
}

/* Reads one frame into c->frame; *h is its header. */
static ws_status recv_frame(ws_chan *c, double deadline, int timeout_ms, ws_chan_msg *msg,
                            frame_header *h, const char *what)
{
    int reset = 0;
    for (;;) {
        struct iovec iov = {c->frame, sizeof *h + WS_CHAN_FRAME_BYTES};
        union {
            struct cmsghdr align;
            char buf[CMSG_SPACE(sizeof(int) * WS_CHAN_MAX_FDS)];
        } ctl;
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                            .msg_controllen = sizeof ctl.buf};
        ssize_t got = recvmsg(c->fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (got < 0) {
            /* A reset is reported once, ahead of messages still queued:
             * deliver those first, then say the peer is gone. */
            if (errno == ECONNRESET && !reset) {
                reset = 1;
                continue;
            }
            if (errno == ECONNRESET || (reset && errno == EAGAIN)) return peer_closed(c, what);
            if (errno == EAGAIN || errno == EINTR) {
                WS_TRY(wait_fd(c, c->fd, POLLIN, deadline, timeout_ms, what, c->interrupted,
                               c->interrupt_ctx));
                continue;
            }
            return WS_ERR(WS_ERR_COMM, "%s: receiving from %s: %s", what, c->label,
                          strerror(errno));
        }
        if (got == 0) return peer_closed(c, what);
        WS_TRY(take_fds(c, &mh, msg, what));
        if ((size_t)got < sizeof *h || (mh.msg_flags & MSG_TRUNC))
            return WS_ERR(WS_ERR_FORMAT, "%s: %s sent a malformed frame of %zd bytes", what,
                          c->label, got);
        memcpy(h, c->frame, sizeof *h);
        if (h->magic != WS_CHAN_MAGIC || h->version != WS_CHAN_VERSION)
            return WS_ERR(WS_ERR_FORMAT, "%s: %s speaks another protocol (magic 0x%08x, "
                          "version %u; this side: 0x%08x, version %u)", what, c->label,
                          h->magic, h->version, WS_CHAN_MAGIC, WS_CHAN_VERSION);
        if (h->frame_len != (size_t)got - sizeof *h)
            return WS_ERR(WS_ERR_FORMAT, "%s: %s sent a frame whose length field says %u "
                          "bytes but holds %zu", what, c->label, h->frame_len,
                          (size_t)got - sizeof *h);
        return WS_OK;
    }
}

ws_status ws_chan_recv(ws_chan *c, int timeout_ms, ws_chan_msg *msg, const char *what)
{
    memset(msg, 0, sizeof *msg);
    double deadline = deadline_of(timeout_ms);
    frame_header h;
    size_t done = 0;
    ws_status rc = WS_OK;
    for (int first = 1;; first = 0) {
        rc = recv_frame(c, deadline, timeout_ms, msg, &h, what);
        if (rc != WS_OK) break;
        if (first) {
            if (h.total_len > WS_CHAN_MAX_MESSAGE) {
                rc = WS_ERR(WS_ERR_FORMAT, "%s: %s announced a message of %llu bytes (at most "
                            "%u)", what, c->label, (unsigned long long)h.total_len,
                            WS_CHAN_MAX_MESSAGE);
                break;
            }
            msg->type = h.type;
            msg->len = (size_t)h.total_len;
            msg->payload = ws_malloc(msg->len ? msg->len : 1);
            if (!msg->payload) {
                rc = WS_ERR(WS_ERR_NOMEM, "%s: out of memory for a message of %zu bytes from "
                            "%s", what, msg->len, c->label);
                break;
            }
        } else if (h.type != msg->type || h.total_len != msg->len) {
            rc = WS_ERR(WS_ERR_FORMAT, "%s: %s interleaved frames of two messages", what,
                        c->label);
            break;
        }
        if (h.frame_len > msg->len - done) {
            rc = WS_ERR(WS_ERR_FORMAT, "%s: %s sent more bytes than its message announced",
                        what, c->label);
            break;
        }
        memcpy(msg->payload + done, c->frame + sizeof h, h.frame_len);
        done += h.frame_len;
        if (!(h.flags & FLAG_MORE)) {
            if (done != msg->len)
                rc = WS_ERR(WS_ERR_FORMAT, "%s: %s ended a message of %zu bytes after %zu",
                            what, c->label, msg->len, done);
            break;
        }
    }
    if (rc != WS_OK) ws_chan_msg_free(msg);
    return rc;
}
