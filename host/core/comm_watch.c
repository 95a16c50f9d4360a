/* comm_watch.c: a rank on this node that vanished without leaving the job.
 *
 * A rank killed by a signal (kill -9, the OOM killer, a crash) never runs
 * its exit handler, and Open MPI hands its peers no error: they wait in a
 * collective until the launcher tears the job down, about a second later,
 * without a word of their own. So when the world starts, every rank learns
 * the pids of the ranks on its node, and a watcher thread checks every
 * WATCH_MS that they still run. When one is gone, the rank says which and
 * exits at once; the launcher then ends the rest. Ranks on other nodes are
 * left to the launcher. The watch stops before the backend finalizes, after
 * which ranks may leave in any order. The thread makes no comm calls. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "comm_internal.h"
#include "fault.h"

#define WATCH_MS 50

static struct {
    int rank, n;
    int *ranks;  /* watched peers: world rank and pid */
    pid_t *pids;
    int stop;    /* set (atomically) before the backend finalizes */
    int started;
    pthread_t thread;
} W;

static uint64_t host_id(void)
{
    char name[256] = {0};
    gethostname(name, sizeof name - 1);
    uint64_t h = 1469598103934665603ull; /* FNV-1a: equal names, equal ids */
    for (const char *p = name; *p; p++) h = (h ^ (unsigned char)*p) * 1099511628211ull;
    return h;
}

/* Running (or stopped): not reaped and not a zombie awaiting its parent. */
static int pid_alive(pid_t pid)
{
    if (kill(pid, 0) != 0 && errno == ESRCH) return 0;
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f) return kill(pid, 0) == 0 || errno != ESRCH;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *close = strrchr(buf, ')'); /* the command name may hold spaces */
    return !(close && close[1] == ' ' && (close[2] == 'Z' || close[2] == 'X'));
}

static int stopping(void) { return __atomic_load_n(&W.stop, __ATOMIC_ACQUIRE); }

static void *watch_main(void *arg)
{
    (void)arg;
    const struct timespec nap = {0, WATCH_MS * 1000000L};
    while (!stopping()) {
        for (int i = 0; i < W.n && !stopping(); i++) {
            if (pid_alive(W.pids[i])) continue;
            if (stopping()) break;
            char msg[256];
            int len = snprintf(msg, sizeof msg,
                               "wshost: rank %d: lost rank %d (pid %d on this node): it ended "
                               "without leaving the job (killed or crashed); ending rank %d\n",
                               W.rank, W.ranks[i], (int)W.pids[i], W.rank);
            /* write(2), not stdio: the main thread may hold stdout's lock. */
            if (len > 0 && write(2, msg, (size_t)len) < 0) { /* nothing left to tell */ }
            _exit(1);
        }
        nanosleep(&nap, NULL);
    }
    return NULL;
}

ws_status ws_comm_watch_peers(ws_comm *c)
{
    if (W.started || c->size < 2) return WS_OK;
    int64_t mine[2] = {(int64_t)host_id(), (int64_t)getpid()};
    int64_t *all = ws_malloc((size_t)c->size * 2 * sizeof *all);
    W.ranks = ws_malloc((size_t)c->size * sizeof *W.ranks);
    W.pids = ws_malloc((size_t)c->size * sizeof *W.pids);
    ws_status rc = WS_OK;
    if (!all || !W.ranks || !W.pids) {
        /* The peers wait in the gather below; this rank's failing exit
         * aborts the job (comm.c's exit handler), so none hangs. */
        rc = WS_ERR(WS_ERR_NOMEM, "comm: out of host memory watching %d ranks", c->size);
        goto out;
    }
    rc = c->host->gather_i64(c, mine, 2, all);
    if (rc != WS_OK) goto out;
    W.rank = c->rank;
    for (int r = 0; r < c->size; r++) {
        pid_t pid = (pid_t)all[2 * r + 1];
        /* Same host name, and a pid this process can see: in another pid
         * namespace (a container per rank) the number would mean nothing. */
        if (r == c->rank || all[2 * r] != mine[0] || pid <= 0 || pid == getpid() ||
            !pid_alive(pid))
            continue;
        W.ranks[W.n] = r;
        W.pids[W.n++] = pid;
    }
    if (W.n > 0) {
        /* No thread, no watch: the launcher still ends the job, only later. */
        W.started = pthread_create(&W.thread, NULL, watch_main, NULL) == 0;
    }
out:
    free(all);
    if (!W.started) {
        free(W.ranks);
        free(W.pids);
        W.ranks = NULL;
        W.pids = NULL;
        W.n = 0;
    }
    return rc;
}

/* Joins the watcher (one nap at most), so no thread of ours is still running
 * or exiting when the process ends: LeakSanitizer's exit-time scan stops
 * every thread and crashed on one caught halfway out. */
void ws_comm_unwatch_peers(void)
{
    __atomic_store_n(&W.stop, 1, __ATOMIC_RELEASE);
    if (W.started && !pthread_equal(W.thread, pthread_self())) pthread_join(W.thread, NULL);
    W.started = 0;
}
