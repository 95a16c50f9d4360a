/* test_chan.c: the engine in another process (chan.h, shm.h, remote.h).
 *
 * Each case forks: one process runs a ws_receiver over its own tensors, the
 * other a ws_sender, as a trainer and an engine would. They check that the
 * bytes arrive equal over many double-buffered buckets; that a manifest
 * which disagrees is refused before any byte moves; that either side's death
 * mid-sync is reported by the other within 2 s naming its pid (also when the
 * dead process's socket lives on in a child of it), with the receiver's
 * weights marked invalid; that a wrong byte fails the checksums; that a
 * caller packing slots in place (ws_sender_slot, ws_sender_submit) proves
 * what it sent with labelled proofs (more than one channel frame of them),
 * and that VERIFY and the level-2 sleep say which tensor is not to be
 * trusted and why; that another thread may ask for the state while one
 * serves (ThreadSanitizer runs it); and that no descriptor or /dev/shm entry is left behind.
 * A child's checks end up in its exit status. */
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/mman.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "chan.h"
#include "check.h"
#include "remote.h"
#include "remote_wire.h"
#include "shm.h"
#include "tensor.h"

/* ---- helpers ---------------------------------------------------------------------- */

static int count_dir(const char *path)
{
    DIR *d = opendir(path);
    if (!d) return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));) n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

static int count_fds(void) { return count_dir("/proc/self/fd") - 1; /* the DIR's own */ }

/* Entries of /dev/shm whose name holds "wshost" (other programs on the
 * machine come and go there; none of ours may). */
static int count_wshost_shm(void)
{
    DIR *d = opendir("/dev/shm");
    if (!d) return 0;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));) n += strstr(e->d_name, "wshost") != NULL;
    closedir(d);
    return n;
}

/* Mappings of this process whose line in /proc/self/maps holds `needle`. */
static int count_maps(const char *needle)
{
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f) return -1;
    char line[512];
    int n = 0;
    while (fgets(line, sizeof line, f)) n += strstr(line, needle) != NULL;
    fclose(f);
    return n;
}

static const char *chan_name(void)
{
    static char name[64];
    static int n;
    snprintf(name, sizeof name, "wshost-test-chan-%d-%d", (int)getpid(), ++n);
    return name;
}

static int in_child_;

static pid_t fork_child(void)
{
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        abort();
    }
    if (pid == 0) {
        in_child_ = 1;
        alarm(20); /* never outlives a parent that gave up on it for long */
    }
    return pid;
}

/* Exit status of a child: its checks' verdict. */
static int wait_child(pid_t pid)
{
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

#define CHILD_EXIT() _exit(check_case_failed_)

/* Setup that the rest of a case needs: on failure the case ends (a child
 * exits), as when the allocation fault sweep makes it fail. */
#define REQUIRE_OK(expr)                                                                 \
    do {                                                                                 \
        ws_status require_rc_ = (expr);                                                  \
        if (require_rc_ != WS_OK) {                                                      \
            CHECK_OK(require_rc_);                                                       \
            if (in_child_) _exit(1);                                                     \
            return;                                                                      \
        }                                                                                \
    } while (0)

/* The model both sides agree on. */
#define NT 6
static const struct {
    const char *name;
    ws_dtype dtype;
    int ndim;
    int64_t shape[2];
} SPEC[NT] = {
    {"model.embed_tokens.weight", WS_BF16, 2, {1000, 64}},
    {"model.layers.0.self_attn.qkv_proj.weight", WS_F32, 2, {96, 33}},
    {"model.layers.0.mlp.down_proj.weight", WS_F16, 2, {17, 129}},
    {"model.norm.weight", WS_F32, 1, {64}},
    {"model.layers.0.position_ids", WS_I32, 1, {7}},
    {"lm_head.scale", WS_F32, 0, {0}},
};

static void wire_spec(ws_wire_tensor *w)
{
    for (int i = 0; i < NT; i++) {
        w[i] = (ws_wire_tensor){SPEC[i].name, SPEC[i].dtype, SPEC[i].ndim, {0}};
        for (int d = 0; d < SPEC[i].ndim; d++) w[i].shape[d] = SPEC[i].shape[d];
    }
}

static ws_status make_tensors(ws_tensor *ts, uint64_t seed)
{
    memset(ts, 0, NT * sizeof *ts);
    ws_status rc = WS_OK;
    for (int i = 0; i < NT && rc == WS_OK; i++) {
        ws_tensor_opts o = {.name = SPEC[i].name};
        rc = ws_tensor_empty(&ts[i], SPEC[i].dtype, SPEC[i].ndim, SPEC[i].shape, &o);
        if (rc == WS_OK)
            rc = seed ? ws_tensor_random(&ts[i], seed * 100 + (uint64_t)i, 50.0f, 0)
                      : ws_tensor_fill(&ts[i], 0);
    }
    if (rc != WS_OK)
        for (int i = 0; i < NT; i++) ws_tensor_free(&ts[i]);
    return rc;
}

static void free_tensors(ws_tensor *ts)
{
    for (int i = 0; i < NT; i++) ws_tensor_free(&ts[i]);
}

static int same_bytes(const ws_tensor *a, const ws_tensor *b)
{
    return ws_tensor_nbytes(a) == ws_tensor_nbytes(b) &&
           memcmp(ws_tensor_data(a), ws_tensor_data(b), ws_tensor_nbytes(a)) == 0;
}

static ws_status add_all(ws_receiver *r, ws_tensor *ts)
{
    for (int i = 0; i < NT; i++) WS_TRY(ws_receiver_add(r, SPEC[i].name, &ts[i]));
    return WS_OK;
}

/* Sends every tensor of `src` as element ranges of at most `chunk`
 * elements, as many per bucket as fit in a slot; `stop_after` > 0 returns
 * after that many buckets (the sync left unfinished). Returns the first
 * error, or WS_OK. */
static ws_status send_model(ws_sender *s, ws_tensor *src, int64_t chunk, int stop_after,
                            int *buckets)
{
    size_t slot = ws_sender_slot_bytes(s);
    ws_sender_piece pieces[64];
    ws_tensor views[64];
    size_t n = 0, used = 0;
    ws_status rc = WS_OK;
    *buckets = 0;
    for (int i = 0; i <= NT && rc == WS_OK; i++) {
        int64_t numel = i < NT ? ws_tensor_numel(&src[i]) : 0;
        for (int64_t off = 0; (off < numel || i == NT) && rc == WS_OK; off += chunk) {
            int64_t count = i < NT ? (numel - off < chunk ? numel - off : chunk) : 0;
            size_t bytes = i < NT ? (size_t)count * ws_dtype_size(SPEC[i].dtype) : 0;
            size_t need = (used + WS_REMOTE_ALIGN - 1) / WS_REMOTE_ALIGN * WS_REMOTE_ALIGN;
            if (n > 0 && (i == NT || need + bytes > slot || n == 64)) {
                rc = ws_sender_bucket(s, pieces, n);
                for (size_t k = 0; k < n; k++) ws_tensor_free(&views[k]);
                n = 0;
                used = 0;
                need = 0;
                if (rc != WS_OK) break;
                if (++*buckets == stop_after) return WS_OK;
            }
            if (i == NT) break;
            ws_tensor flat = {0};
            int64_t all = numel;
            rc = ws_tensor_reshape(&flat, &src[i], 1, &all);
            if (rc == WS_OK) rc = ws_tensor_narrow(&views[n], &flat, 0, off, count);
            ws_tensor_free(&flat);
            if (rc != WS_OK) break;
            pieces[n] = (ws_sender_piece){(uint32_t)i, (uint64_t)off, &views[n]};
            n++;
            used = need + bytes;
        }
    }
    for (size_t k = 0; k < n; k++) ws_tensor_free(&views[k]);
    return rc;
}

static ws_status sync_model(ws_sender *s, ws_tensor *src, uint64_t version, int *buckets)
{
    ws_wire_tensor w[NT];
    wire_spec(w);
    WS_TRY(ws_sender_begin(s, w, NT, version, 0));
    WS_TRY(send_model(s, src, 700, 0, buckets));
    return ws_sender_finish(s);
}

/* ---- the channel alone ------------------------------------------------------------ */

static int always(void *ctx)
{
    (void)ctx;
    return 1;
}

static void test_channel_messages(void)
{
    const char *name = chan_name();
    ws_chan_listener *l;
    REQUIRE_OK(ws_chan_listen(name, &l));
    ws_chan_listener *again;
    CHECK_ERR(ws_chan_listen(name, &again), WS_ERR_COMM, "in use");
    static unsigned char big[300000];
    for (size_t i = 0; i < sizeof big; i++) big[i] = (unsigned char)(i * 7 + 3);
    pid_t child = fork_child();
    if (child == 0) {
        ws_chan *c;
        REQUIRE_OK(ws_chan_connect(name, 2000, NULL, NULL, &c));
        int p[2];
        CHECK(pipe(p) == 0);
        CHECK(write(p[1], "fd!", 3) == 3);
        CHECK_OK(ws_chan_send(c, 7, "hi", 2, &p[0], 1, 1000, "a small message"));
        CHECK_OK(ws_chan_send(c, 8, big, sizeof big, NULL, 0, 5000, "a large message"));
        CHECK_OK(ws_chan_send(c, 9, NULL, 0, NULL, 0, 1000, "an empty message"));
        ws_chan_msg go;
        CHECK_OK(ws_chan_recv(c, 5000, &go, "waiting to be let go"));
        ws_chan_msg_free(&go);
        ws_chan_close(c);
        CHILD_EXIT();
    }
    ws_chan *c = NULL;
    REQUIRE_OK(ws_chan_accept(l, 2000, &c));
    CHECK(ws_chan_peer_pid(c) == child);
    ws_chan_set_peer_role(c, "engine");
    char want[64];
    snprintf(want, sizeof want, "engine process (pid %d)", (int)child);
    CHECK(strcmp(ws_chan_peer_label(c), want) == 0);
    ws_chan_msg m;
    CHECK_OK(ws_chan_recv(c, 2000, &m, "a small message"));
    CHECK(m.type == 7 && m.len == 2 && memcmp(m.payload, "hi", 2) == 0 && m.nfds == 1);
    char buf[4] = {0};
    if (m.nfds == 1) CHECK(read(m.fds[0], buf, 3) == 3 && strcmp(buf, "fd!") == 0);
    ws_chan_msg_free(&m);
    CHECK_OK(ws_chan_recv(c, 2000, &m, "a large message"));
    CHECK(m.type == 8 && m.len == sizeof big && memcmp(m.payload, big, sizeof big) == 0);
    ws_chan_msg_free(&m);
    CHECK_OK(ws_chan_recv(c, 2000, &m, "an empty message"));
    CHECK(m.type == 9 && m.len == 0);
    ws_chan_msg_free(&m);
    /* Alive but silent: the caller's timeout, naming the peer. */
    double t0 = ws_chan_now_ms();
    CHECK_ERR(ws_chan_recv(c, 300, &m, "a silent wait"), WS_ERR_TIMEOUT,
              "did not answer within 300 ms during a silent wait");
    CHECK(strstr(ws_errmsg(), want));
    CHECK(ws_chan_now_ms() - t0 < 1000);
    /* A wait stops when the caller's interrupt check says so (Ctrl-C). */
    ws_chan_set_interrupt(c, always, NULL);
    CHECK_ERR(ws_chan_recv(c, -1, &m, "an interrupted wait"), WS_ERR_INTERRUPTED, "interrupted");
    ws_chan_set_interrupt(c, NULL, NULL);
    CHECK_OK(ws_chan_send(c, 1, "go", 2, NULL, 0, 1000, "letting the child go"));
    CHECK(wait_child(child) == 0);
    /* The peer is gone: said at once, with its pid. */
    CHECK_ERR(ws_chan_recv(c, 2000, &m, "the next request"), WS_ERR_COMM, want);
    CHECK(strstr(ws_errmsg(), "closed the connection during the next request (it has exited)"));
    ws_chan_close(c);
    ws_chan_listener_close(l);
    /* Nobody listening: the client gives up at its deadline. */
    t0 = ws_chan_now_ms();
    CHECK_ERR(ws_chan_connect(name, 150, NULL, NULL, &c), WS_ERR_TIMEOUT, "no process accepted");
    CHECK(ws_chan_now_ms() - t0 < 1000);
}

static int after_three(void *ctx)
{
    return ++*(int *)ctx > 3;
}

/* Ctrl-C reaches every wait: for a sender to connect, for a receiver. */
static void test_interrupt(void)
{
    int calls = 0;
    ws_receiver_opts o = {.interrupted = after_three, .ctx = &calls};
    ws_receiver *r;
    REQUIRE_OK(ws_receiver_create(chan_name(), &o, &r));
    double t0 = ws_chan_now_ms();
    CHECK_ERR(ws_receiver_accept(r, -1), WS_ERR_INTERRUPTED, "interrupted");
    CHECK(ws_chan_now_ms() - t0 < 2000);
    ws_receiver_free(r);
    calls = 0;
    ws_sender_opts so = {.interrupted = after_three, .ctx = &calls};
    ws_sender *s;
    CHECK_ERR(ws_sender_connect(chan_name(), &so, &s), WS_ERR_INTERRUPTED, "interrupted");
}

static void test_shm_slots(void)
{
    ws_shm a, b;
    CHECK_OK(ws_shm_create(&a, 12345, "test slot"));
    memset(a.data, 0x5A, a.nbytes);
    int fd = dup(a.fd);
    CHECK_OK(ws_shm_map(&b, fd, 12345, "mapped slot"));
    CHECK(b.data && !b.writable && ((unsigned char *)b.data)[12344] == 0x5A);
    ws_shm_free(&b);
    /* More bytes than the memfd holds is refused (and the fd still closed). */
    fd = dup(a.fd);
    CHECK_ERR(ws_shm_map(&b, fd, 99999, "mapped slot"), WS_ERR_FORMAT, "holds 12345 bytes");
    ws_shm_free(&a);
    ws_shm_free(&a); /* idempotent */
}

/* ---- remote ----------------------------------------------------------------------- */

typedef struct callbacks {
    int wakes, sleeps, last_level;
    char last_tag[32];
} callbacks;

static ws_status on_wake(void *ctx, const char *tag)
{
    callbacks *cb = ctx;
    cb->wakes++;
    snprintf(cb->last_tag, sizeof cb->last_tag, "%s", tag);
    if (strcmp(tag, "nonsense") == 0)
        return WS_ERR(WS_ERR_ARG, "no memory pool is tagged 'nonsense'");
    return WS_OK;
}

static ws_status on_sleep(void *ctx, int level)
{
    callbacks *cb = ctx;
    cb->sleeps++;
    cb->last_level = level;
    return WS_OK;
}

static void test_round_trip(void)
{
    const char *name = chan_name();
    pid_t child = fork_child();
    if (child == 0) {
        /* The engine: its own tensors, zeroed, filled only by the syncs. */
        ws_tensor dst[NT], want[NT];
        REQUIRE_OK(make_tensors(dst, 0));
        callbacks cb = {0};
        ws_receiver_opts o = {.on_wake = on_wake, .on_sleep = on_sleep, .ctx = &cb};
        ws_receiver *r;
        REQUIRE_OK(ws_receiver_create(name, &o, &r));
        REQUIRE_OK(add_all(r, dst));
        CHECK(ws_receiver_state(r, NULL) == WS_WEIGHTS_NONE);
        CHECK_OK(ws_receiver_serve(r, 5000));
        /* The level-2 sleep at the end discarded what version 2 wrote. */
        uint64_t version = 0;
        CHECK(ws_receiver_state(r, &version) == WS_WEIGHTS_INVALID && version == 2);
        char why[512];
        CHECK(ws_receiver_tensor_state(r, SPEC[1].name, why, sizeof why) == 0 &&
              strcmp(why, "discarded by the level-2 sleep after weight version 2") == 0);
        REQUIRE_OK(make_tensors(want, 2));
        for (int i = 0; i < NT; i++) CHECK(same_bytes(&dst[i], &want[i]));
        CHECK(cb.wakes == 4 && strcmp(cb.last_tag, "kv_cache") == 0);
        CHECK(cb.sleeps == 1 && cb.last_level == 2);
        ws_receiver_free(r);
        free_tensors(dst);
        free_tensors(want);
        CHILD_EXIT();
    }
    ws_sender_opts so = {.slot_bytes = 4096, .connect_timeout_ms = 3000, .timeout_ms = 3000};
    ws_sender *s = NULL;
    REQUIRE_OK(ws_sender_connect(name, &so, &s));
    CHECK(ws_sender_peer_pid(s) == child);
    ws_tensor src[NT];
    int buckets = 0;
    double t0 = ws_chan_now_ms();
    for (uint64_t v = 1; v <= 2; v++) {
        REQUIRE_OK(make_tensors(src, v));
        CHECK_OK(ws_sender_wake(s, "weights"));
        CHECK_OK(sync_model(s, src, v, &buckets));
        free_tensors(src);
    }
    double ms = ws_chan_now_ms() - t0;
    CHECK(buckets > 40);
    /* A failing callback is the receiver's error, told to the sender, and
     * the connection stays usable. */
    CHECK_ERR(ws_sender_wake(s, "nonsense"), WS_ERR_COMM, "no memory pool is tagged 'nonsense'");
    CHECK_OK(ws_sender_wake(s, "kv_cache"));
    CHECK_OK(ws_sender_sleep(s, 2));
    ws_sender_stats st = ws_sender_get_stats(s);
    CHECK(st.buckets == (uint64_t)buckets * 2);
    printf("    %llu buckets of up to 4 KiB, %.1f KiB, in %.1f ms (%.3f ms per bucket; "
           "%.1f ms waiting for acknowledgements)\n", (unsigned long long)st.buckets,
           (double)st.bytes / 1024, ms, ms / (double)st.buckets, st.wait_ms);
    ws_sender_close(s);
    CHECK(wait_child(child) == 0);
}

static void test_manifest_mismatch(void)
{
    const char *name = chan_name();
    pid_t child = fork_child();
    if (child == 0) {
        ws_tensor dst[NT];
        REQUIRE_OK(make_tensors(dst, 0));
        CHECK_OK(ws_tensor_fill(&dst[1], 7));
        ws_receiver *r;
        REQUIRE_OK(ws_receiver_create(name, NULL, &r));
        REQUIRE_OK(add_all(r, dst));
        ws_receiver_event ev;
        CHECK_OK(ws_receiver_next(r, 3000, &ev));
        CHECK(ev.kind == WS_RECV_CONNECTED);
        /* Three refusals, each naming its tensor; nothing written, no slots. */
        CHECK_ERR(ws_receiver_next(r, 3000, &ev), WS_ERR_ARG,
                  "tensor 'model.layers.0.self_attn.qkv_proj.weight' is f32[96,34] on the "
                  "sender but f32[96,33]");
        CHECK(strstr(ws_errmsg(), "refused before any byte moved"));
        CHECK_ERR(ws_receiver_next(r, 3000, &ev), WS_ERR_ARG,
                  "tensor 'model.layers.9.mlp.up_proj.weight' (entry 7) is not a parameter");
        CHECK_ERR(ws_receiver_next(r, 3000, &ev), WS_ERR_ARG,
                  "tensor 'lm_head.scale' is not in it");
        CHECK(ws_receiver_state(r, NULL) == WS_WEIGHTS_NONE);
        double v;
        CHECK_OK(ws_tensor_get(&dst[1], 5, &v));
        CHECK(v == 7);
        /* Then a sync that agrees goes through on the same connection. */
        CHECK_OK(ws_receiver_serve(r, 3000));
        CHECK(ws_receiver_state(r, NULL) == WS_WEIGHTS_VALID);
        ws_receiver_free(r);
        free_tensors(dst);
        CHILD_EXIT();
    }
    ws_sender_opts so = {.slot_bytes = 8192, .timeout_ms = 3000};
    ws_sender *s = NULL;
    REQUIRE_OK(ws_sender_connect(name, &so, &s));
    int fds_before = count_fds();
    ws_wire_tensor w[NT + 1];
    wire_spec(w);
    w[1].shape[1] = 34;
    CHECK_ERR(ws_sender_begin(s, w, NT, 1, 0), WS_ERR_COMM, "f32[96,34] on the sender");
    char pid[32];
    snprintf(pid, sizeof pid, "engine process (pid %d) refused", (int)child);
    CHECK(strstr(ws_errmsg(), pid));
    w[1].shape[1] = 33;
    w[NT] = (ws_wire_tensor){"model.layers.9.mlp.up_proj.weight", WS_BF16, 2, {4, 4}};
    CHECK_ERR(ws_sender_begin(s, w, NT + 1, 1, 0), WS_ERR_COMM, "up_proj.weight");
    CHECK_ERR(ws_sender_begin(s, w, NT - 1, 1, 0), WS_ERR_COMM, "'lm_head.scale'");
    /* No slot was made for a refused sync. */
    CHECK(count_fds() == fds_before);
    ws_tensor src[NT];
    REQUIRE_OK(make_tensors(src, 3));
    int buckets;
    CHECK_OK(sync_model(s, src, 1, &buckets));
    free_tensors(src);
    ws_sender_close(s);
    CHECK(wait_child(child) == 0);
}

/* The engine dies mid-sync. With `grandchild`, it first forks a process
 * that keeps its end of the socket open, so only the pid check can tell. */
static void receiver_killed(int grandchild)
{
    const char *name = chan_name();
    int gp[2];
    CHECK(pipe(gp) == 0);
    pid_t child = fork_child();
    if (child == 0) {
        close(gp[0]);
        ws_tensor dst[NT];
        REQUIRE_OK(make_tensors(dst, 0));
        ws_receiver *r;
        REQUIRE_OK(ws_receiver_create(name, NULL, &r));
        REQUIRE_OK(add_all(r, dst));
        ws_receiver_event ev;
        int buckets = 0;
        while (buckets < 3 && ws_receiver_next(r, 3000, &ev) == WS_OK)
            buckets += ev.kind == WS_RECV_BUCKET;
        pid_t g = 0;
        if (grandchild && (g = fork()) == 0) {
            alarm(10); /* never outlives a broken test for long */
            pause();
            _exit(0);
        }
        CHECK(write(gp[1], &g, sizeof g) == sizeof g);
        pause(); /* stops answering; the parent kills it */
        _exit(1);
    }
    close(gp[1]);
    ws_sender_opts so = {.slot_bytes = 4096, .timeout_ms = 20000};
    ws_sender *s = NULL;
    REQUIRE_OK(ws_sender_connect(name, &so, &s));
    ws_tensor src[NT];
    REQUIRE_OK(make_tensors(src, 1));
    ws_wire_tensor w[NT];
    wire_spec(w);
    CHECK_OK(ws_sender_begin(s, w, NT, 1, 0));
    int buckets;
    /* Two buckets in flight fill both slots; the engine acknowledges three. */
    CHECK_OK(send_model(s, src, 700, 5, &buckets));
    pid_t g = 0;
    CHECK(read(gp[0], &g, sizeof g) == sizeof g);
    close(gp[0]);
    double t0 = ws_chan_now_ms();
    kill(child, SIGKILL);
    ws_status rc = send_model(s, src, 700, 0, &buckets);
    if (rc == WS_OK) rc = ws_sender_finish(s);
    double ms = ws_chan_now_ms() - t0;
    char want[64];
    snprintf(want, sizeof want, "engine process (pid %d)", (int)child);
    CHECK_ERR(rc, WS_ERR_COMM, want);
    CHECK(strstr(ws_errmsg(), grandchild ? "exited during" : "closed the connection"));
    printf("    engine killed%s: reported after %.0f ms: %s\n",
           grandchild ? " (its socket held by a child)" : "", ms, ws_errmsg());
    CHECK(ms < 2000);
    /* Broken now: later calls say why instead of waiting again. */
    CHECK_ERR(ws_sender_finish(s), WS_ERR_COMM, "ended after an earlier error");
    ws_sender_close(s);
    free_tensors(src);
    CHECK(wait_child(child) == 128 + SIGKILL);
    if (g > 0) {
        kill(g, SIGKILL);
        waitpid(g, NULL, 0); /* reparented to init once its parent died: may fail */
    }
}

static void test_receiver_killed(void) { receiver_killed(0); }

static void test_receiver_killed_socket_held(void) { receiver_killed(1); }

/* A trainer that syncs version `version` and, with stop_after > 0, stops
 * answering after that many buckets (to be killed). */
static void run_sender_child(const char *name, uint64_t version, int stop_after)
{
    ws_sender_opts so = {.slot_bytes = 4096, .timeout_ms = 3000};
    ws_sender *s;
    REQUIRE_OK(ws_sender_connect(name, &so, &s));
    ws_tensor src[NT];
    REQUIRE_OK(make_tensors(src, version));
    int buckets;
    if (stop_after) {
        ws_wire_tensor w[NT];
        wire_spec(w);
        CHECK_OK(ws_sender_begin(s, w, NT, version, 0));
        CHECK_OK(send_model(s, src, 700, stop_after, &buckets));
        pause();
    }
    CHECK_OK(sync_model(s, src, version, &buckets));
    ws_sender_close(s);
    free_tensors(src);
    CHILD_EXIT();
}

/* A trainer child sends version `version` whole; this side serves it. */
static void serve_version(ws_receiver *r, const char *name, uint64_t version)
{
    pid_t child = fork_child();
    if (child == 0) run_sender_child(name, version, 0);
    CHECK_OK(ws_receiver_serve(r, 3000));
    CHECK(wait_child(child) == 0);
}

/* An engine in this process over zeroed tensors dst, served version 1 whole.
 * NULL when it could not be made. */
static ws_receiver *engine_at_version1(const char *name, ws_tensor *dst)
{
    ws_receiver *r = NULL;
    if (make_tensors(dst, 0) != WS_OK) return NULL;
    ws_status rc = ws_receiver_create(name, NULL, &r);
    if (rc == WS_OK) rc = add_all(r, dst);
    if (rc != WS_OK) {
        CHECK_OK(rc);
        ws_receiver_free(r);
        free_tensors(dst);
        return NULL;
    }
    serve_version(r, name, 1);
    uint64_t version = 0;
    CHECK(ws_receiver_state(r, &version) == WS_WEIGHTS_VALID && version == 1);
    return r;
}

/* The engine holds version `version`, valid and byte for byte; then it is freed. */
static void holds_then_free(ws_receiver *r, ws_tensor *dst, uint64_t version)
{
    uint64_t got = 0;
    ws_tensor want[NT];
    CHECK(ws_receiver_state(r, &got) == WS_WEIGHTS_VALID && got == version);
    if (make_tensors(want, version) == WS_OK) {
        for (int i = 0; i < NT; i++) CHECK(same_bytes(&dst[i], &want[i]));
        free_tensors(want);
    }
    ws_receiver_free(r);
    free_tensors(dst);
}

static void test_sender_killed(void)
{
    const char *name = chan_name();
    ws_tensor dst[NT];
    ws_receiver *r = engine_at_version1(name, dst);
    if (!r) return;
    uint64_t version;
    /* Version 2's sender dies after 4 buckets. */
    pid_t child = fork_child();
    if (child == 0) run_sender_child(name, 2, 4);
    ws_receiver_event ev;
    int buckets = 0;
    ws_status rc = WS_OK;
    while (buckets < 4 && (rc = ws_receiver_next(r, 3000, &ev)) == WS_OK)
        buckets += ev.kind == WS_RECV_BUCKET;
    REQUIRE_OK(rc);
    CHECK(ws_receiver_state(r, NULL) == WS_WEIGHTS_SYNCING);
    /* The slots are memfds: mapped here, named nowhere in /dev/shm. */
    CHECK(count_maps("/memfd:wshost-slot") == 2);
    CHECK(count_maps("/dev/shm/") == 0);
    double t0 = ws_chan_now_ms();
    kill(child, SIGKILL);
    rc = ws_receiver_next(r, 10000, &ev); /* the check below wants it within 2 s */
    double ms = ws_chan_now_ms() - t0;
    char want_pid[64];
    snprintf(want_pid, sizeof want_pid, "trainer process (pid %d)", (int)child);
    CHECK_ERR(rc, WS_ERR_COMM, want_pid);
    CHECK(strstr(ws_errmsg(), "marked invalid"));
    printf("    trainer killed: reported after %.0f ms: %s\n", ms, ws_errmsg());
    CHECK(ms < 2000);
    CHECK(wait_child(child) == 128 + SIGKILL);
    /* Half-written, not trusted: the version stays the last verified one. */
    CHECK(ws_receiver_state(r, &version) == WS_WEIGHTS_INVALID && version == 1);
    CHECK(ws_receiver_tensor_valid(r, SPEC[0].name) == 0);
    char why[512];
    CHECK(ws_receiver_tensor_state(r, SPEC[0].name, why, sizeof why) == 0 &&
          strstr(why, "the sync of weight version 2 failed: ") && strstr(why, want_pid));
    CHECK(ws_receiver_tensor_valid(r, "no.such.tensor") == -1);
    CHECK(ws_receiver_peer_pid(r) == 0);
    /* The engine keeps running: the next trainer makes it whole again. */
    serve_version(r, name, 3);
    holds_then_free(r, dst, 3);
}

/* Another thread asks for the state while this one serves, as an engine's
 * rollout thread does (wshost.Receiver.valid and why): every answer is
 * whole, and ThreadSanitizer sees no race. */
typedef struct watcher {
    ws_receiver *r;
    volatile int stop; /* written before the join only; read as a hint */
    int asks, syncing, bad;
} watcher;

static void *watch_state(void *ctx)
{
    watcher *w = ctx;
    char why[512];
    while (!__atomic_load_n(&w->stop, __ATOMIC_ACQUIRE)) {
        ws_weights_state st = ws_receiver_state(w->r, NULL);
        w->syncing += st == WS_WEIGHTS_SYNCING;
        int v = ws_receiver_tensor_state(w->r, SPEC[0].name, why, sizeof why);
        /* Invalid always comes with its reason, valid with none. */
        if (v < 0 || (v == 0 && !strstr(why, "weight version")) || (v == 1 && why[0]))
            w->bad++;
        w->asks++;
    }
    return NULL;
}

static void test_state_while_serving(void)
{
    const char *name = chan_name();
    ws_tensor dst[NT];
    ws_receiver *r = engine_at_version1(name, dst); /* every reason then names a version */
    if (!r) return;
    watcher w = {.r = r};
    pthread_t th;
    if (pthread_create(&th, NULL, watch_state, &w) != 0) {
        CHECK(!"pthread_create");
        return;
    }
    serve_version(r, name, 2);
    __atomic_store_n(&w.stop, 1, __ATOMIC_RELEASE);
    pthread_join(th, NULL);
    printf("    %d state queries from another thread during a sync, %d while syncing\n", w.asks,
           w.syncing);
    CHECK(w.asks > 0 && w.bad == 0);
    holds_then_free(r, dst, 2);
}

/* One proof per tensor: its whole checksum, no label. */
static ws_status whole_proofs(ws_tensor *src, ws_proof *proofs)
{
    for (int i = 0; i < NT; i++) {
        proofs[i] = (ws_proof){SPEC[i].name, NULL, 0, (uint64_t)ws_tensor_numel(&src[i]), 0};
        WS_TRY(ws_tensor_checksum(&src[i], 0, SPEC[i].dtype, &proofs[i].checksum));
    }
    return WS_OK;
}

static size_t align_up(size_t x)
{
    return (x + WS_REMOTE_ALIGN - 1) / WS_REMOTE_ALIGN * WS_REMOTE_ALIGN;
}

/* Wrong bytes are caught both ways: a slot changed after the sender packed
 * and summed it fails FINISH (the landed sums differ from the packing sums),
 * and a tensor changed on the engine after its sync fails a VERIFY. */
static void test_checksum_mismatch(void)
{
    const char *name = chan_name();
    ws_tensor dst[NT];
    REQUIRE_OK(make_tensors(dst, 0));
    ws_receiver *r;
    REQUIRE_OK(ws_receiver_create(name, NULL, &r));
    REQUIRE_OK(add_all(r, dst));
    int go[2];
    CHECK(pipe(go) == 0);
    pid_t child = fork_child();
    if (child == 0) {
        close(go[0]);
        ws_sender_opts so = {.slot_bytes = 1 << 20, .timeout_ms = 3000};
        ws_sender *s;
        REQUIRE_OK(ws_sender_connect(name, &so, &s));
        ws_tensor src[NT];
        REQUIRE_OK(make_tensors(src, 5));
        ws_wire_tensor w[NT];
        wire_spec(w);
        int buckets;
        CHECK_OK(ws_sender_begin(s, w, NT, 5, 0));
        void *base;
        size_t bytes;
        CHECK_OK(ws_sender_slot(s, 0, &base, &bytes)); /* where the one bucket goes */
        CHECK_OK(send_model(s, src, 1 << 20, 0, &buckets)); /* one piece per tensor */
        CHECK(buckets == 1);
        /* Tensor 2 lies after tensors 0 and 1 in the slot. */
        size_t at = align_up(align_up(ws_tensor_nbytes(&src[0])) + ws_tensor_nbytes(&src[1]));
        ((unsigned char *)base)[at + 10] ^= 0x40;
        CHECK(write(go[1], "k", 1) == 1);
        CHECK_ERR(ws_sender_finish(s), WS_ERR_COMM, "are not the bytes sent");
        /* Refused, not broken: the next sync goes through on this connection. */
        CHECK_OK(sync_model(s, src, 6, &buckets));
        ws_proof proofs[NT];
        CHECK_OK(whole_proofs(src, proofs));
        CHECK_ERR(ws_sender_verify(s, proofs, NT, 0), WS_ERR_COMM,
                  "engine tensor 'model.norm.weight', elements [0, +64), holds checksum");
        CHECK(strstr(ws_errmsg(), "; it is marked invalid"));
        CHECK_ERR(ws_sender_verify(s, proofs, NT, WS_VERIFY_VALIDITY), WS_ERR_COMM,
                  "engine tensor 'model.norm.weight' is not valid: elements [0, +64) held "
                  "checksum");
        ws_sender_close(s);
        free_tensors(src);
        CHILD_EXIT();
    }
    close(go[1]);
    ws_receiver_event ev = {0};
    ws_status rc = WS_OK;
    while (ev.kind != WS_RECV_SLOTS && (rc = ws_receiver_next(r, 3000, &ev)) == WS_OK) {}
    CHECK_OK(rc);
    char k;
    CHECK(read(go[0], &k, 1) == 1); /* the slot is changed: take the bucket */
    close(go[0]);
    CHECK_OK(ws_receiver_next(r, 3000, &ev));
    CHECK(ev.kind == WS_RECV_BUCKET);
    CHECK_ERR(ws_receiver_next(r, 3000, &ev), WS_ERR_ARG,
              "tensor 'model.layers.0.mlp.down_proj.weight', elements [0, +2193), holds "
              "checksum 0x");
    CHECK(strstr(ws_errmsg(), "the tensors of that sync are marked invalid"));
    CHECK(ws_receiver_state(r, NULL) == WS_WEIGHTS_INVALID);
    char why[512];
    CHECK(ws_receiver_tensor_state(r, SPEC[0].name, why, sizeof why) == 0 &&
          strstr(why, "the sync of weight version 5 failed: tensor "
                 "'model.layers.0.mlp.down_proj.weight'"));
    /* Version 6 arrives whole; then a byte changes here, and VERIFY sees it. */
    while (ev.kind != WS_RECV_SYNCED && (rc = ws_receiver_next(r, 3000, &ev)) == WS_OK) {}
    CHECK_OK(rc);
    CHECK(ws_receiver_state(r, NULL) == WS_WEIGHTS_VALID);
    CHECK_OK(ws_tensor_set(&dst[3], 5, 1234.5));
    CHECK_ERR(ws_receiver_next(r, 3000, &ev), WS_ERR_ARG, "'model.norm.weight'");
    CHECK(ws_receiver_tensor_valid(r, SPEC[3].name) == 0);
    CHECK(ws_receiver_tensor_valid(r, SPEC[2].name) == 1);
    CHECK(ws_receiver_state(r, NULL) == WS_WEIGHTS_INVALID);
    CHECK_OK(ws_receiver_serve(r, 3000));
    CHECK(wait_child(child) == 0);
    ws_receiver_free(r);
    free_tensors(dst);
}

/* ---- packing in place: slot, submit, proofs, verify ------------------------------- */

#define CHUNK 64 /* elements per piece and per proof: about 1100 proofs, > one frame */
#define MAX_PROOFS 2048

typedef struct proof_set {
    ws_proof p[MAX_PROOFS];
    char label[MAX_PROOFS][128];
    size_t n;
} proof_set;

/* Sends `src` the way a plan that packs by itself does: takes a free slot,
 * writes the pieces into it at aligned offsets, submits them, and keeps a
 * labelled proof per piece (its checksum taken from the source). */
static ws_status submit_model(ws_sender *s, ws_tensor *src, proof_set *ps)
{
    int slot = 0;
    unsigned char *base = NULL;
    size_t bytes = 0, used = 0, n = 0;
    ws_wire_piece pieces[64];
    ps->n = 0;
    for (int i = 0; i <= NT; i++) {
        int64_t numel = i < NT ? ws_tensor_numel(&src[i]) : 0;
        for (int64_t off = 0; off < numel || i == NT; off += CHUNK) {
            int64_t count = i < NT ? (numel - off < CHUNK ? numel - off : CHUNK) : 0;
            size_t esize = i < NT ? ws_dtype_size(SPEC[i].dtype) : 0, nb = (size_t)count * esize;
            if (n > 0 && (i == NT || align_up(used) + nb > bytes || n == 64)) {
                WS_TRY(ws_sender_submit(s, slot, pieces, n));
                slot = 1 - slot;
                n = 0;
                base = NULL;
            }
            if (i == NT) break;
            if (!base) {
                void *b;
                WS_TRY(ws_sender_slot(s, slot, &b, &bytes));
                base = b;
                used = 0;
            }
            used = align_up(used);
            memcpy(base + used, (const char *)ws_tensor_data(&src[i]) + (size_t)off * esize, nb);
            pieces[n++] = (ws_wire_piece){(uint32_t)i, (uint64_t)off, (uint64_t)count, used};
            used += nb;
            /* Its proof: the range's checksum with its indices in the whole tensor. */
            ws_tensor flat = {0}, view = {0};
            int64_t all = numel;
            ws_proof *p = &ps->p[ps->n];
            snprintf(ps->label[ps->n], sizeof ps->label[ps->n],
                     "trainer.layers.%d.some_rather_long_parameter_name.weight[%lld:%lld]", i,
                     (long long)off, (long long)(off + count));
            *p = (ws_proof){SPEC[i].name, ps->label[ps->n], (uint64_t)off, (uint64_t)count, 0};
            ws_status rc = ws_tensor_reshape(&flat, &src[i], 1, &all);
            if (rc == WS_OK) rc = ws_tensor_narrow(&view, &flat, 0, off, count);
            if (rc == WS_OK) rc = ws_tensor_checksum(&view, (uint64_t)off, SPEC[i].dtype,
                                                     &p->checksum);
            ws_tensor_free(&view);
            ws_tensor_free(&flat);
            WS_TRY(rc);
            if (++ps->n == MAX_PROOFS) return WS_ERR(WS_ERR_ARG, "test: too many proofs");
        }
    }
    return WS_OK;
}

static ws_status on_sleep_ok(void *ctx, int level)
{
    (void)ctx;
    (void)level;
    return WS_OK;
}

static void test_submit_and_verify(void)
{
    const char *name = chan_name();
    pid_t child = fork_child();
    if (child == 0) {
        ws_tensor dst[NT], want[NT];
        REQUIRE_OK(make_tensors(dst, 0));
        ws_receiver_opts o = {.on_sleep = on_sleep_ok};
        ws_receiver *r;
        REQUIRE_OK(ws_receiver_create(name, &o, &r));
        REQUIRE_OK(add_all(r, dst));
        CHECK(ws_receiver_count(r) == NT && strcmp(ws_receiver_name(r, 2), SPEC[2].name) == 0 &&
              ws_receiver_name(r, NT) == NULL);
        char why[512];
        CHECK(ws_receiver_tensor_state(r, SPEC[0].name, why, sizeof why) == 0 &&
              strcmp(why, "not written by any sync yet") == 0);
        CHECK(ws_receiver_tensor_state(r, "no.such.tensor", why, sizeof why) == -1 && why[0] == 0);
        CHECK_OK(ws_receiver_serve(r, 5000));
        /* Version 2 came without proofs; a level-2 sleep discarded it. */
        REQUIRE_OK(make_tensors(want, 2));
        for (int i = 0; i < NT; i++) CHECK(same_bytes(&dst[i], &want[i]));
        uint64_t version;
        CHECK(ws_receiver_state(r, &version) == WS_WEIGHTS_INVALID && version == 2);
        ws_receiver_free(r);
        free_tensors(dst);
        free_tensors(want);
        CHILD_EXIT();
    }
    ws_sender_opts so = {.slot_bytes = 16384, .timeout_ms = 3000};
    ws_sender *s = NULL;
    REQUIRE_OK(ws_sender_connect(name, &so, &s));
    ws_tensor src[NT];
    REQUIRE_OK(make_tensors(src, 1));
    proof_set *ps = calloc(1, sizeof *ps);
    REQUIRE_OK(ps ? WS_OK : WS_ERR(WS_ERR_NOMEM, "test: out of memory"));
    ws_wire_tensor w[NT];
    wire_spec(w);
    void *base;
    size_t bytes;
    CHECK_ERR(ws_sender_slot(s, 0, &base, &bytes), WS_ERR_ARG, "no slots yet");
    CHECK_OK(ws_sender_begin(s, w, NT, 1, 0));
    /* Pieces that do not fit are refused before anything is sent. */
    ws_wire_piece bad = {3, 0, 64, 32};
    CHECK_ERR(ws_sender_submit(s, 0, &bad, 1), WS_ERR_ARG, "at a multiple of 64");
    bad = (ws_wire_piece){3, 10, 64, 0};
    CHECK_ERR(ws_sender_submit(s, 0, &bad, 1), WS_ERR_ARG,
              "elements [10, +64), is not inside 'model.norm.weight' (64 elements)");
    bad = (ws_wire_piece){0, 0, 10000, 0}; /* 20000 bytes */
    CHECK_ERR(ws_sender_submit(s, 0, &bad, 1), WS_ERR_ARG, "does not fit a slot of 16384");
    CHECK_OK(submit_model(s, src, ps));
    CHECK(ps->n > 1000);
    CHECK_ERR(ws_sender_finish(s), WS_ERR_ARG, "finish with ws_sender_finish_proven");
    CHECK_OK(ws_sender_finish_proven(s, ps->p, ps->n));
    ws_sender_stats st = ws_sender_get_stats(s);
    CHECK(st.buckets > 10);
    /* VERIFY: the same proofs hold, checksums computed afresh. */
    CHECK_OK(ws_sender_verify(s, ps->p, ps->n, 0));
    CHECK_OK(ws_sender_verify(s, ps->p, ps->n, WS_VERIFY_VALIDITY));
    ws_proof unknown = {"model.layers.7.mlp.gate_proj.weight", "trainer.gate", 0, 1, 0};
    CHECK_ERR(ws_sender_verify(s, &unknown, 1, WS_VERIFY_VALIDITY), WS_ERR_COMM,
              "engine tensor 'model.layers.7.mlp.gate_proj.weight' (from 'trainer.gate'): no "
              "such tensor");
    /* A proof that says otherwise: named, and that tensor is no longer trusted. */
    size_t k = ps->n - 2; /* a range of 'model.layers.0.position_ids' */
    ps->p[k].checksum ^= 1;
    CHECK_ERR(ws_sender_verify(s, ps->p, ps->n, 0), WS_ERR_COMM,
              "engine tensor 'model.layers.0.position_ids' (from "
              "'trainer.layers.4.some_rather_long_parameter_name.weight[0:7]'), elements "
              "[0, +7), holds checksum");
    ps->p[k].checksum ^= 1;
    CHECK_ERR(ws_sender_verify(s, ps->p, ps->n, WS_VERIFY_VALIDITY), WS_ERR_COMM,
              "engine tensor 'model.layers.0.position_ids' (from 'trainer.layers.4.");
    CHECK(strstr(ws_errmsg(), "is not valid: elements [0, +7) (from 'trainer.layers.4."));
    CHECK(strstr(ws_errmsg(), "when verified after weight version 1"));
    /* Version 2 without proofs (verify off): every element arrived is enough. */
    free_tensors(src);
    REQUIRE_OK(make_tensors(src, 2));
    CHECK_OK(ws_sender_begin(s, w, NT, 2, WS_MANIFEST_UNPROVEN));
    CHECK_OK(submit_model(s, src, ps));
    CHECK_OK(ws_sender_finish_proven(s, NULL, 0));
    CHECK_OK(ws_sender_verify(s, ps->p, ps->n, 0));
    /* A level-1 sleep keeps the weights; a level-2 one discards them. */
    CHECK_OK(ws_sender_sleep(s, 1));
    CHECK_OK(ws_sender_verify(s, ps->p, ps->n, WS_VERIFY_VALIDITY));
    CHECK_OK(ws_sender_sleep(s, 2));
    CHECK_ERR(ws_sender_verify(s, ps->p, ps->n, WS_VERIFY_VALIDITY), WS_ERR_COMM,
              "engine tensor 'model.embed_tokens.weight' (from 'trainer.layers.0.some_rather_"
              "long_parameter_name.weight[0:64]') is not valid: discarded by the level-2 sleep "
              "after weight version 2");
    ws_sender_close(s);
    free(ps);
    free_tensors(src);
    CHECK(wait_child(child) == 0);
}

/* Proofs that disagree or do not cover the tensors end the sync with its
 * tensors invalid, and the connection lives on. */
static void test_proof_refusals(void)
{
    const char *name = chan_name();
    ws_tensor dst[NT];
    REQUIRE_OK(make_tensors(dst, 0));
    ws_receiver *r;
    REQUIRE_OK(ws_receiver_create(name, NULL, &r));
    REQUIRE_OK(add_all(r, dst));
    pid_t child = fork_child();
    if (child == 0) {
        ws_sender_opts so = {.slot_bytes = 16384, .timeout_ms = 3000};
        ws_sender *s;
        REQUIRE_OK(ws_sender_connect(name, &so, &s));
        ws_tensor src[NT];
        REQUIRE_OK(make_tensors(src, 7));
        proof_set *ps = calloc(1, sizeof *ps);
        REQUIRE_OK(ps ? WS_OK : WS_ERR(WS_ERR_NOMEM, "test: out of memory"));
        ws_wire_tensor w[NT];
        wire_spec(w);
        /* A wrong checksum in one proof. */
        CHECK_OK(ws_sender_begin(s, w, NT, 7, 0));
        CHECK_OK(submit_model(s, src, ps));
        ps->p[40].checksum += 1; /* model.embed_tokens.weight, elements [2560, +64) */
        CHECK_ERR(ws_sender_finish_proven(s, ps->p, ps->n), WS_ERR_COMM,
                  "tensor 'model.embed_tokens.weight' (from 'trainer.layers.0.some_rather_long_"
                  "parameter_name.weight[2560:2624]'), elements [2560, +64), holds checksum 0x");
        /* A proof missing: its tensor is not covered. */
        ps->p[40].checksum -= 1;
        CHECK_OK(ws_sender_begin(s, w, NT, 8, 0));
        CHECK_OK(submit_model(s, src, ps));
        ps->p[ps->n - 3] = ps->p[ps->n - 1]; /* drops one of 'model.norm.weight' */
        CHECK_ERR(ws_sender_finish_proven(s, ps->p, ps->n - 2), WS_ERR_COMM,
                  "the proofs cover 0 of the 64 elements of tensor 'model.norm.weight'");
        /* A proof for a tensor outside the manifest. */
        CHECK_OK(ws_sender_begin(s, &w[3], 1, 9, WS_MANIFEST_PARTIAL));
        ws_wire_piece piece = {0, 0, 64, 0};
        void *base;
        size_t bytes;
        CHECK_OK(ws_sender_slot(s, 1, &base, &bytes));
        memcpy(base, ws_tensor_data(&src[3]), 64 * 4);
        CHECK_OK(ws_sender_submit(s, 1, &piece, 1));
        ws_proof p[NT];
        CHECK_OK(whole_proofs(src, p)); /* the first names tensor 0: only 3 is in this sync */
        CHECK_ERR(ws_sender_finish_proven(s, p, 1), WS_ERR_COMM,
                  "proof 1 names tensor 'model.embed_tokens.weight', which is not in the "
                  "manifest");
        /* Proofs for a sync announced without them: nothing was summed to check them by. */
        CHECK_OK(ws_sender_begin(s, w, NT, 10, WS_MANIFEST_UNPROVEN));
        CHECK_OK(submit_model(s, src, ps));
        CHECK_ERR(ws_sender_finish_proven(s, ps->p, ps->n), WS_ERR_COMM,
                  "whose manifest said none would");
        /* Still usable: a sync that proves itself goes through. */
        CHECK_OK(ws_sender_begin(s, w, NT, 10, 0));
        CHECK_OK(submit_model(s, src, ps));
        CHECK_OK(ws_sender_finish_proven(s, ps->p, ps->n));
        ws_sender_close(s);
        free(ps);
        free_tensors(src);
        CHILD_EXIT();
    }
    ws_receiver_event ev;
    ws_status rc;
    while ((rc = ws_receiver_next(r, 3000, &ev)) == WS_OK) {}
    CHECK_ERR(rc, WS_ERR_ARG, "(from 'trainer.layers.0.some_rather_long_parameter_name.weight"
              "[2560:2624]'), elements [2560, +64), holds checksum 0x");
    char why[512];
    CHECK(ws_receiver_tensor_state(r, SPEC[0].name, why, sizeof why) == 0 &&
          strstr(why, "the sync of weight version 7 failed: "));
    CHECK(ws_receiver_state(r, NULL) == WS_WEIGHTS_INVALID);
    CHECK(ws_receiver_peer_pid(r) == child); /* the connection lives on */
    while ((rc = ws_receiver_next(r, 3000, &ev)) == WS_OK) {}
    CHECK_ERR(rc, WS_ERR_ARG, "cover 0 of the 64 elements");
    while ((rc = ws_receiver_next(r, 3000, &ev)) == WS_OK) {}
    CHECK_ERR(rc, WS_ERR_ARG, "not in the manifest");
    CHECK(ws_receiver_tensor_valid(r, SPEC[3].name) == 0);
    while ((rc = ws_receiver_next(r, 3000, &ev)) == WS_OK) {}
    CHECK_ERR(rc, WS_ERR_ARG, "(WS_MANIFEST_UNPROVEN)");
    CHECK_OK(ws_receiver_serve(r, 3000));
    uint64_t version;
    CHECK(ws_receiver_state(r, &version) == WS_WEIGHTS_VALID && version == 10);
    CHECK(wait_child(child) == 0);
    ws_tensor want[NT];
    REQUIRE_OK(make_tensors(want, 7));
    for (int i = 0; i < NT; i++) CHECK(same_bytes(&dst[i], &want[i]));
    free_tensors(want);
    ws_receiver_free(r);
    free_tensors(dst);
}

/* A sender that breaks the protocol, written by hand: the receiver checks
 * what it is sent and refuses it, naming the sender, before copying a byte. */
static ws_status fake_send(ws_chan *c, uint32_t type, ws_wbuf *w, const int *fds, int nfds)
{
    ws_status rc = ws_chan_send(c, type, w->data, w->len, fds, nfds, 2000, "a fake sender");
    ws_wbuf_free(w);
    return rc;
}

static ws_status fake_reply(ws_chan *c, uint32_t type, const char *needle)
{
    ws_chan_msg m;
    WS_TRY(ws_chan_recv(c, 2000, &m, "a fake sender"));
    int ok = m.type == type &&
             (!needle || (m.len && memmem(m.payload, m.len, needle, strlen(needle))));
    if (!ok) fprintf(stderr, "fake sender: got %s: %.*s\n", ws_remote_msg_name(m.type),
                     (int)m.len, (const char *)m.payload);
    ws_chan_msg_free(&m);
    return ok ? WS_OK : WS_ERR(WS_ERR_FORMAT, "unexpected reply");
}

/* One connection: hello, manifest, slots (sealed or not), and with sealed
 * slots one bucket whose piece runs past the end of 'model.norm.weight'. */
static void fake_sender(const char *name, int sealed)
{
    ws_chan *c;
    REQUIRE_OK(ws_chan_connect(name, 2000, NULL, NULL, &c));
    ws_wbuf w = {0};
    ws_wbuf_u32(&w, WS_REMOTE_PROTOCOL);
    ws_wbuf_u32(&w, (uint32_t)getpid());
    ws_wbuf_str(&w, "trainer");
    CHECK_OK(fake_send(c, WS_MSG_HELLO, &w, NULL, 0));
    CHECK_OK(fake_reply(c, WS_MSG_HELLO, NULL));
    CHECK_OK(fake_reply(c, WS_MSG_SHARED, NULL)); /* none: this receiver shares nothing */
    ws_wire_tensor t[NT];
    wire_spec(t);
    ws_wbuf_u64(&w, 9);
    ws_wbuf_u32(&w, 0);
    ws_wbuf_u32(&w, NT);
    for (int i = 0; i < NT; i++) {
        ws_wbuf_str(&w, t[i].name);
        ws_wbuf_u8(&w, (uint8_t)t[i].dtype);
        ws_wbuf_u8(&w, (uint8_t)t[i].ndim);
        for (int d = 0; d < t[i].ndim; d++) ws_wbuf_u64(&w, (uint64_t)t[i].shape[d]);
    }
    CHECK_OK(fake_send(c, WS_MSG_MANIFEST, &w, NULL, 0));
    CHECK_OK(fake_reply(c, WS_MSG_ACK, NULL));
    ws_shm slots[2];
    int fds[2];
    for (int i = 0; i < 2; i++) {
        if (sealed) {
            CHECK_OK(ws_shm_create(&slots[i], 4096, "fake slot"));
            fds[i] = slots[i].fd;
        } else {
            slots[i] = (ws_shm)WS_SHM_INIT;
            fds[i] = memfd_create("unsealed", MFD_CLOEXEC);
            CHECK(ftruncate(fds[i], 4096) == 0);
        }
    }
    ws_wbuf_u32(&w, 2);
    ws_wbuf_u64(&w, 4096);
    ws_wbuf_u64(&w, 4096);
    ws_wbuf_u8(&w, WS_SLOTS_HOST);
    CHECK_OK(fake_send(c, WS_MSG_SLOTS, &w, fds, 2));
    if (!sealed) {
        CHECK_OK(fake_reply(c, WS_MSG_ERROR, "not sealed"));
        close(fds[0]);
        close(fds[1]);
    } else {
        CHECK_OK(fake_reply(c, WS_MSG_ACK, NULL));
        ws_wbuf_u64(&w, 0);
        ws_wbuf_u32(&w, 0);
        ws_wbuf_u32(&w, 1);
        ws_wbuf_u32(&w, 3);   /* model.norm.weight, 64 elements */
        ws_wbuf_u64(&w, 60);  /* elements 60..69 */
        ws_wbuf_u64(&w, 10);
        ws_wbuf_u64(&w, 0);
        CHECK_OK(fake_send(c, WS_MSG_BUCKET, &w, NULL, 0));
        CHECK_OK(fake_reply(c, WS_MSG_ERROR, "out of range"));
        ws_shm_free(&slots[0]);
        ws_shm_free(&slots[1]);
    }
    ws_chan_close(c);
}

static void test_protocol_errors(void)
{
    const char *name = chan_name();
    ws_tensor dst[NT];
    REQUIRE_OK(make_tensors(dst, 0));
    ws_receiver *r;
    REQUIRE_OK(ws_receiver_create(name, NULL, &r));
    REQUIRE_OK(add_all(r, dst));
    pid_t child = fork_child();
    if (child == 0) {
        fake_sender(name, 0);
        fake_sender(name, 1);
        CHILD_EXIT();
    }
    char who[64];
    snprintf(who, sizeof who, "trainer process (pid %d)", (int)child);
    ws_receiver_event ev;
    ws_status rc;
    while ((rc = ws_receiver_next(r, 3000, &ev)) == WS_OK) {}
    CHECK_ERR(rc, WS_ERR_FORMAT, "size is not sealed");
    CHECK(ws_receiver_state(r, NULL) == WS_WEIGHTS_INVALID);
    while ((rc = ws_receiver_next(r, 3000, &ev)) == WS_OK) {}
    CHECK_ERR(rc, WS_ERR_FORMAT, "'model.norm.weight' out of range: elements [60, +10) of 64");
    CHECK(strstr(ws_errmsg(), who));
    CHECK(ws_receiver_state(r, NULL) == WS_WEIGHTS_INVALID);
    CHECK(wait_child(child) == 0);
    ws_receiver_free(r);
    free_tensors(dst);
}

/* A sync of some tensors (adapters only) leaves the others as they were. */
static void test_partial_sync(void)
{
    const char *name = chan_name();
    ws_tensor dst[NT], want[NT];
    REQUIRE_OK(make_tensors(dst, 0));
    ws_receiver *r;
    REQUIRE_OK(ws_receiver_create(name, NULL, &r));
    REQUIRE_OK(add_all(r, dst));
    pid_t child = fork_child();
    if (child == 0) {
        ws_sender *s;
        REQUIRE_OK(ws_sender_connect(name, NULL, &s));
        ws_tensor src[NT];
        REQUIRE_OK(make_tensors(src, 4));
        int buckets;
        CHECK_OK(sync_model(s, src, 4, &buckets));
        /* Versions 5 and 6 change tensor 3 only, in one bucket each (an odd
         * count: the next sync starts on the other slot's turn). */
        ws_wire_tensor w[NT];
        wire_spec(w);
        for (uint64_t v = 5; v <= 6; v++) {
            CHECK_OK(ws_tensor_fill(&src[3], (double)v / 2));
            CHECK_OK(ws_sender_begin(s, &w[3], 1, v, WS_MANIFEST_PARTIAL));
            ws_sender_piece p = {0, 0, &src[3]};
            CHECK_OK(ws_sender_bucket(s, &p, 1));
            CHECK_OK(ws_sender_finish(s));
        }
        ws_sender_close(s);
        free_tensors(src);
        CHILD_EXIT();
    }
    CHECK_OK(ws_receiver_serve(r, 3000));
    CHECK(wait_child(child) == 0);
    uint64_t version;
    CHECK(ws_receiver_state(r, &version) == WS_WEIGHTS_VALID && version == 6);
    REQUIRE_OK(make_tensors(want, 4));
    CHECK_OK(ws_tensor_fill(&want[3], 3.0));
    for (int i = 0; i < NT; i++) CHECK(same_bytes(&dst[i], &want[i]));
    ws_receiver_free(r);
    free_tensors(dst);
    free_tensors(want);
}

/* Pieces of several MiB: the receiver copies and checksums them in chunks
 * spread over threads, and the landed sums still equal the sender's. */
static void test_large_pieces(void)
{
    const char *name = chan_name();
    int64_t big_shape[2] = {3, 1 << 19}, small_n = 100;
    ws_tensor src[2], dst[2];
    REQUIRE_OK(ws_tensor_empty(&src[0], WS_F32, 2, big_shape, NULL));
    REQUIRE_OK(ws_tensor_empty(&src[1], WS_BF16, 1, &small_n, NULL));
    REQUIRE_OK(ws_tensor_empty(&dst[0], WS_F32, 2, big_shape, NULL));
    REQUIRE_OK(ws_tensor_empty(&dst[1], WS_BF16, 1, &small_n, NULL));
    for (int i = 0; i < 2; i++) {
        REQUIRE_OK(ws_tensor_random(&src[i], 11 + (uint64_t)i, 3.0f, 0));
        REQUIRE_OK(ws_tensor_fill(&dst[i], 0));
    }
    const char *names[2] = {"model.layers.0.mlp.experts.w13", "model.norm.bias"};
    ws_receiver *r;
    REQUIRE_OK(ws_receiver_create(name, NULL, &r));
    for (int i = 0; i < 2; i++) REQUIRE_OK(ws_receiver_add(r, names[i], &dst[i]));
    pid_t child = fork_child();
    if (child == 0) {
        ws_sender_opts so = {.slot_bytes = 5 << 20, .timeout_ms = 5000};
        ws_sender *s;
        REQUIRE_OK(ws_sender_connect(name, &so, &s));
        ws_wire_tensor w[2] = {{names[0], WS_F32, 2, {3, 1 << 19}}, {names[1], WS_BF16, 1, {100}}};
        CHECK_OK(ws_sender_begin(s, w, 2, 1, 0));
        ws_tensor flat = {0}, a = {0}, b = {0};
        int64_t all = 3 << 19, cut = 1000003;
        REQUIRE_OK(ws_tensor_reshape(&flat, &src[0], 1, &all));
        REQUIRE_OK(ws_tensor_narrow(&a, &flat, 0, 0, cut));
        REQUIRE_OK(ws_tensor_narrow(&b, &flat, 0, cut, all - cut));
        ws_sender_piece p1[2] = {{1, 0, &src[1]}, {0, 0, &a}};
        ws_sender_piece p2 = {0, (uint64_t)cut, &b};
        CHECK_OK(ws_sender_bucket(s, p1, 2));
        CHECK_OK(ws_sender_bucket(s, &p2, 1));
        CHECK_OK(ws_sender_finish(s));
        /* Ranges that cross the receiver's chunks, proven afresh. */
        ws_proof pf[3] = {{names[0], "w1", 0, 777777, 0},
                          {names[0], "w3", 777777, (uint64_t)(all - 777777), 0},
                          {names[1], NULL, 0, 100, 0}};
        ws_tensor v = {0};
        REQUIRE_OK(ws_tensor_narrow(&v, &flat, 0, 0, 777777));
        CHECK_OK(ws_tensor_checksum(&v, 0, WS_F32, &pf[0].checksum));
        ws_tensor_free(&v);
        REQUIRE_OK(ws_tensor_narrow(&v, &flat, 0, 777777, all - 777777));
        CHECK_OK(ws_tensor_checksum(&v, 777777, WS_F32, &pf[1].checksum));
        ws_tensor_free(&v);
        CHECK_OK(ws_tensor_checksum(&src[1], 0, WS_BF16, &pf[2].checksum));
        CHECK_OK(ws_sender_verify(s, pf, 3, 0));
        ws_tensor_free(&a);
        ws_tensor_free(&b);
        ws_tensor_free(&flat);
        ws_sender_close(s);
        CHILD_EXIT();
    }
    CHECK_OK(ws_receiver_serve(r, 5000));
    CHECK(wait_child(child) == 0);
    CHECK(ws_receiver_state(r, NULL) == WS_WEIGHTS_VALID);
    for (int i = 0; i < 2; i++) CHECK(same_bytes(&dst[i], &src[i]));
    ws_receiver_free(r);
    for (int i = 0; i < 2; i++) {
        ws_tensor_free(&src[i]);
        ws_tensor_free(&dst[i]);
    }
}

/* ---- GPU slots (CUDA IPC) --------------------------------------------------------- */

/* The slots in GPU memory, shared through CUDA IPC with an engine process
 * whose tensors are on that GPU: host sources (copied into the slot across
 * devices) and GPU sources (copied on the GPU) arrive equal, and the sender
 * leaves only after the receiver let go of the slots. Both processes start
 * CUDA after the fork (CUDA does not survive one). Skipped without a GPU. */
static ws_status to_gpu(ws_device *dev, ws_tensor *host, ws_tensor *gpu)
{
    memset(gpu, 0, NT * sizeof *gpu);
    ws_status rc = WS_OK;
    for (int i = 0; i < NT && rc == WS_OK; i++) {
        ws_tensor_opts o = {.name = SPEC[i].name, .device = dev};
        rc = ws_tensor_empty(&gpu[i], SPEC[i].dtype, SPEC[i].ndim, SPEC[i].shape, &o);
        if (rc == WS_OK) rc = ws_tensor_copy(&gpu[i], &host[i]);
    }
    if (rc == WS_OK) rc = ws_device_synchronize(dev);
    return rc;
}

static void test_gpu_slots(void)
{
    const char *name = chan_name();
    pid_t child = fork_child();
    if (child == 0) {
        ws_device *dev;
        if (ws_device_get("cuda", &dev) != WS_OK) _exit(77);
        ws_tensor zero[NT], dst[NT], got[NT], want[NT];
        REQUIRE_OK(make_tensors(zero, 0));
        REQUIRE_OK(to_gpu(dev, zero, dst));
        ws_receiver *r;
        REQUIRE_OK(ws_receiver_create(name, NULL, &r));
        REQUIRE_OK(add_all(r, dst));
        CHECK_OK(ws_receiver_serve(r, 10000));
        uint64_t version = 0;
        CHECK(ws_receiver_state(r, &version) == WS_WEIGHTS_VALID && version == 2);
        REQUIRE_OK(make_tensors(want, 2));
        REQUIRE_OK(make_tensors(got, 0));
        for (int i = 0; i < NT; i++) {
            CHECK_OK(ws_tensor_copy(&got[i], &dst[i]));
            CHECK(same_bytes(&got[i], &want[i]));
        }
        ws_receiver_free(r);
        free_tensors(zero);
        free_tensors(dst);
        free_tensors(got);
        free_tensors(want);
        CHILD_EXIT();
    }
    ws_device *dev;
    if (ws_device_get("cuda", &dev) != WS_OK) {
        kill(child, SIGKILL);
        (void)wait_child(child);
        SKIP(ws_device_cuda_unavailable_reason());
    }
    ws_sender_opts so = {.slot_bytes = 16384, .connect_timeout_ms = 10000, .timeout_ms = 10000,
                         .slot_device = dev};
    ws_sender *s = NULL;
    REQUIRE_OK(ws_sender_connect(name, &so, &s));
    CHECK(ws_sender_slot_device(s) == dev);
    ws_tensor src[NT], gsrc[NT];
    int buckets = 0;
    /* Version 1 from host memory, version 2 from the GPU. */
    REQUIRE_OK(make_tensors(src, 1));
    CHECK_OK(sync_model(s, src, 1, &buckets));
    free_tensors(src);
    REQUIRE_OK(make_tensors(src, 2));
    REQUIRE_OK(to_gpu(dev, src, gsrc));
    CHECK_OK(sync_model(s, gsrc, 2, &buckets));
    CHECK(buckets > 4);
    double t0 = ws_chan_now_ms();
    ws_sender_close(s);
    printf("    closed after the engine let go of the GPU slots: %.1f ms\n",
           ws_chan_now_ms() - t0);
    free_tensors(src);
    free_tensors(gsrc);
    CHECK(wait_child(child) == 0);
}

int main(void)
{
    signal(SIGPIPE, SIG_DFL); /* a SIGPIPE would kill the test: none may be raised */
    int fds = count_fds();
    RUN(test_channel_messages);
    RUN(test_interrupt);
    RUN(test_shm_slots);
    RUN(test_round_trip);
    RUN(test_manifest_mismatch);
    RUN(test_receiver_killed);
    RUN(test_receiver_killed_socket_held);
    RUN(test_sender_killed);
    RUN(test_state_while_serving);
    RUN(test_checksum_mismatch);
    RUN(test_protocol_errors);
    RUN(test_partial_sync);
    RUN(test_submit_and_verify);
    RUN(test_proof_refusals);
    RUN(test_large_pieces);
    /* Nothing left behind: every descriptor closed, every slot unmapped,
     * nothing named in /dev/shm. */
    check_case_ = "leftovers";
    int fds_after = count_fds(), maps = count_maps("/memfd:wshost-slot");
    int shm = count_wshost_shm();
    if (fds_after != fds || maps != 0 || shm != 0) {
        fprintf(stderr, "leftovers: %d descriptors before, %d after; %d slots still mapped; "
                "%d wshost entries in /dev/shm\n", fds, fds_after, maps, shm);
        check_failed_++;
    }
    /* Last, after the count: the only case that starts CUDA in this process
     * (whose driver keeps descriptors of its own open). */
    RUN(test_gpu_slots);
    return check_summary();
}
