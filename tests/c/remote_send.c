/* remote_send.c: a scripted trainer side (ws_sender) for testing receivers
 * from other languages (tests/python/test_receiver.py drives wshost.Receiver
 * with it). Not a test by itself.
 *
 *   remote_send NAME [-s SLOT_BYTES] [-p PIECE_ELEMS] [-T TIMEOUT_MS] [-C CONNECT_MS]
 *               -t name:dtype:D0xD1... [-t ...] ACTION...
 *
 * Actions, run in order; each prints "ok ACTION <milliseconds> ms" or
 * "error ACTION: message" on stdout and the next one runs:
 *   wake:TAG  sleep:LEVEL  close
 *   sync:V        a full sync of every tensor at weight version V
 *   partial:V     the same for the first tensor only (WS_MANIFEST_PARTIAL)
 *   badshape:V    a manifest whose first tensor has one more row
 *   die:V         begins a sync, sends one bucket, then kills itself (SIGKILL)
 *   hang:MS       sleeps (a silent peer)
 *
 * Element k of tensor i at version V holds ((7k + 13i + 3V) mod 64) / 8 - 4
 * (remote_script.h), so the receiver's side can recompute it.
 * Exit status: 0 when every action succeeded, 1 otherwise, 2 on bad usage. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dtype.h"
#include "remote.h"
#include "remote_script.h"
#include "status.h"
#include "tensor.h"

#define MAX_TENSORS 64

static ws_wire_tensor spec[MAX_TENSORS];
static ws_tensor src[MAX_TENSORS];
static int n_tensors;
static int64_t piece_elems = 1 << 20;

static int usage(const char *why)
{
    fprintf(stderr, "remote_send: %s\nusage: remote_send NAME [-s SLOT_BYTES] [-p PIECE_ELEMS] "
            "[-T TIMEOUT_MS] [-C CONNECT_MS] -t name:dtype:D0xD1 ... ACTION...\n", why);
    return 2;
}

static int parse_tensor(char *arg)
{
    if (n_tensors == MAX_TENSORS || script_parse_tensor(arg, &spec[n_tensors]) != 0) return -1;
    n_tensors++;
    return 0;
}

static ws_status fill(uint64_t version)
{
    for (int i = 0; i < n_tensors; i++) {
        if (!src[i].storage) {
            ws_tensor_opts o = {0};
            WS_TRY(ws_tensor_empty(&src[i], spec[i].dtype, spec[i].ndim, spec[i].shape, &o));
        }
        void *p;
        WS_TRY(ws_tensor_access(&src[i], WS_ACCESS_WRITE, "filling", &p));
        size_t es = ws_dtype_size(spec[i].dtype);
        int64_t n = ws_tensor_numel(&src[i]);
        for (int64_t k = 0; k < n; k++)
            ws_store_scalar((char *)p + (size_t)k * es, spec[i].dtype, script_value(k, i, version));
        ws_tensor_mark_written(&src[i]);
    }
    return WS_OK;
}

/* One piece per bucket, at most piece_elems elements each; `die` kills the
 * process after the first bucket. */
static ws_status send_tensors(ws_sender *s, int n, int die)
{
    for (int i = 0; i < n; i++) {
        int64_t numel = ws_tensor_numel(&src[i]);
        ws_tensor flat;
        WS_TRY(ws_tensor_reshape(&flat, &src[i], 1, &numel));
        for (int64_t off = 0; off < numel; off += piece_elems) {
            int64_t len = numel - off < piece_elems ? numel - off : piece_elems;
            ws_tensor v;
            ws_status rc = ws_tensor_narrow(&v, &flat, 0, off, len);
            ws_sender_piece piece = {(uint32_t)i, (uint64_t)off, &v};
            if (rc == WS_OK) rc = ws_sender_bucket(s, &piece, 1);
            ws_tensor_free(&v);
            if (rc != WS_OK) {
                ws_tensor_free(&flat);
                return rc;
            }
            if (die) {
                fflush(stdout);
                raise(SIGKILL);
            }
        }
        ws_tensor_free(&flat);
    }
    return WS_OK;
}

static ws_status run(ws_sender *s, const char *action)
{
    const char *colon = strchr(action, ':');
    const char *arg = colon ? colon + 1 : "";
    size_t verb = colon ? (size_t)(colon - action) : strlen(action);
#define IS(v) (verb == strlen(v) && !strncmp(action, v, verb))
    if (IS("wake")) return ws_sender_wake(s, arg);
    if (IS("sleep")) return ws_sender_sleep(s, atoi(arg));
    if (IS("hang")) {
        struct timespec ts = {atoi(arg) / 1000, (atoi(arg) % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        return WS_OK;
    }
    uint64_t version = strtoull(arg, NULL, 10);
    if (IS("sync") || IS("partial") || IS("die") || IS("badshape")) {
        int n = IS("partial") ? 1 : n_tensors;
        WS_TRY(fill(version));
        ws_wire_tensor w[MAX_TENSORS];
        memcpy(w, spec, sizeof w);
        if (IS("badshape")) w[0].shape[0]++;
        WS_TRY(ws_sender_begin(s, w, (size_t)n, version, IS("partial") ? WS_MANIFEST_PARTIAL : 0));
        WS_TRY(send_tensors(s, n, IS("die")));
        return ws_sender_finish(s);
    }
#undef IS
    return WS_ERR(WS_ERR_ARG, "unknown action '%s'", action);
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) return usage("no channel name");
    ws_sender_opts so = {.connect_timeout_ms = 10000, .timeout_ms = 10000};
    int i = 2;
    for (; i < argc && argv[i][0] == '-'; i += 2) {
        if (i + 1 >= argc) return usage("an option lacks its value");
        char opt = argv[i][1];
        if (opt == 's') so.slot_bytes = (size_t)strtoull(argv[i + 1], NULL, 10);
        else if (opt == 'p') piece_elems = strtoll(argv[i + 1], NULL, 10);
        else if (opt == 'T') so.timeout_ms = atoi(argv[i + 1]);
        else if (opt == 'C') so.connect_timeout_ms = atoi(argv[i + 1]);
        else if (opt != 't' || parse_tensor(argv[i + 1]) != 0) return usage(argv[i + 1]);
    }
    if (piece_elems < 1) return usage("-p must be positive");
    ws_sender *s;
    if (ws_sender_connect(argv[1], &so, &s) != WS_OK) {
        printf("error connect: %s\n", ws_errmsg());
        return 1;
    }
    printf("ok connect %d\n", (int)ws_sender_peer_pid(s));
    int failed = 0;
    for (; i < argc; i++) {
        if (!strcmp(argv[i], "close")) {
            ws_sender_close(s);
            s = NULL;
            printf("ok close\n");
            break;
        }
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        ws_status rc = run(s, argv[i]);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (rc == WS_OK) {
            printf("ok %s %.3f ms\n", argv[i],
                   (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6);
        } else {
            printf("error %s: %s\n", argv[i], ws_errmsg());
            failed = 1;
        }
    }
    ws_sender_close(s);
    for (int k = 0; k < n_tensors; k++) ws_tensor_free(&src[k]);
    return failed;
}
