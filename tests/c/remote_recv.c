/* remote_recv.c: a scripted engine side (ws_receiver) for tests that run a
 * trainer in another process (tests/e2e/fault_remote.sh drives it with
 * tests/c/remote_send). Not a test by itself.
 *
 *   remote_recv NAME [-T TIMEOUT_MS] [-v VERSION] -t name:dtype:D0xD1 ...
 *
 * Listens on NAME with zeroed tensors of the given specs and prints
 * "ok listen" once a sender may connect; serves one sender until it closes
 * ("ok serve", or "error serve: message"); then, with -v, checks that every
 * tensor is valid and holds the values of weight version V (remote_script.h):
 * "ok check V", or "error check: ..." naming the tensor and element.
 * Exit status: 0 when all of it succeeded, 1 otherwise, 2 on bad usage. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "remote.h"
#include "remote_script.h"
#include "status.h"
#include "tensor.h"

#define MAX_TENSORS 64

static int usage(const char *why)
{
    fprintf(stderr, "remote_recv: %s\nusage: remote_recv NAME [-T TIMEOUT_MS] [-v VERSION] "
            "-t name:dtype:D0xD1 ...\n", why);
    return 2;
}

/* 0 when every tensor is valid and holds version v's values; prints why not. */
static int check(const ws_receiver *r, const ws_tensor *t, const ws_wire_tensor *spec, int n,
                 uint64_t v)
{
    for (int i = 0; i < n; i++) {
        char why[512];
        if (ws_receiver_tensor_state(r, spec[i].name, why, sizeof why) != 1) {
            printf("error check: tensor '%s' is not valid: %s\n", spec[i].name, why);
            return 1;
        }
        void *p;
        if (ws_tensor_access(&t[i], WS_ACCESS_READ, "checking", &p) != WS_OK) {
            printf("error check: %s\n", ws_errmsg());
            return 1;
        }
        size_t es = ws_dtype_size(spec[i].dtype);
        int64_t numel = ws_tensor_numel(&t[i]);
        for (int64_t k = 0; k < numel; k++) {
            double got = ws_load_scalar((const char *)p + (size_t)k * es, spec[i].dtype);
            if (got != script_value(k, i, v)) {
                printf("error check: tensor '%s' element %" PRId64 " holds %g, not %g\n",
                       spec[i].name, k, got, script_value(k, i, v));
                return 1;
            }
        }
    }
    printf("ok check %" PRIu64 "\n", v);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) return usage("no channel name");
    ws_wire_tensor spec[MAX_TENSORS];
    ws_tensor t[MAX_TENSORS];
    int n = 0, timeout_ms = 10000;
    long long version = -1;
    for (int i = 2; i < argc; i += 2) {
        if (argv[i][0] != '-' || i + 1 >= argc) return usage(argv[i]);
        char opt = argv[i][1];
        if (opt == 'T') timeout_ms = atoi(argv[i + 1]);
        else if (opt == 'v') version = atoll(argv[i + 1]);
        else if (opt != 't' || n == MAX_TENSORS || script_parse_tensor(argv[i + 1], &spec[n++]))
            return usage(argv[i + 1]);
    }
    memset(t, 0, sizeof t);
    ws_receiver_opts o = {.timeout_ms = timeout_ms};
    ws_receiver *r = NULL;
    ws_status rc = ws_receiver_create(argv[1], &o, &r);
    for (int i = 0; rc == WS_OK && i < n; i++) {
        ws_tensor_opts to = {.name = spec[i].name};
        rc = ws_tensor_empty(&t[i], spec[i].dtype, spec[i].ndim, spec[i].shape, &to);
        if (rc == WS_OK) rc = ws_tensor_fill(&t[i], 0);
        if (rc == WS_OK) rc = ws_receiver_add(r, spec[i].name, &t[i]);
    }
    int failed = 0;
    if (rc != WS_OK) {
        printf("error listen: %s\n", ws_errmsg());
        failed = 1;
    } else {
        printf("ok listen\n");
        rc = ws_receiver_serve(r, timeout_ms);
        if (rc == WS_OK) {
            printf("ok serve\n");
        } else {
            printf("error serve: %s\n", ws_errmsg());
            failed = 1;
        }
        if (version >= 0 && !failed) failed = check(r, t, spec, n, (uint64_t)version);
    }
    ws_receiver_free(r);
    for (int i = 0; i < n; i++) ws_tensor_free(&t[i]);
    return failed;
}
