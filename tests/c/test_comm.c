/* test_comm.c: the comm layer in a world of one (no launcher, no MPI, no
 * NCCL): every collective is a local copy or a no-op, and argument checks
 * give the documented messages. Multi-rank behaviour is in tests/mpi/. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "comm.h"
#include "tensor.h"

static ws_comm *world(void)
{
    ws_comm *c = NULL;
    CHECK_OK(ws_comm_world(&c));
    return c;
}

static void make(ws_tensor *t, ws_dtype dt, int64_t n, const char *name, uint64_t seed)
{
    ws_tensor_opts o = {.name = name};
    CHECK_OK(ws_tensor_empty(t, dt, 1, &n, &o));
    CHECK_OK(ws_tensor_random(t, seed, 1.0f, 0));
}

static int same_bytes(const ws_tensor *a, const ws_tensor *b)
{
    return ws_tensor_nbytes(a) == ws_tensor_nbytes(b) &&
           memcmp(ws_tensor_data(a), ws_tensor_data(b), ws_tensor_nbytes(a)) == 0;
}

static void test_world_of_one(void)
{
    ws_comm *c = world();
    CHECK(ws_comm_rank(c) == 0);
    CHECK(ws_comm_size(c) == 1);
    CHECK(ws_comm_local_rank(c) == 0);
    CHECK(strcmp(ws_comm_backend(c), "self") == 0);
    CHECK(!ws_comm_is_multi());
    CHECK(!ws_comm_get_check(c)); /* nothing to disagree with */
    ws_comm *again = world();
    CHECK(again == c);
}

static void test_all_gather_copies(void)
{
    ws_comm *c = world();
    ws_tensor s = {0}, r = {0}, bad = {0};
    make(&s, WS_BF16, 1000, "send", 1);
    make(&r, WS_BF16, 1000, "recv", 2);
    CHECK_OK(ws_comm_all_gather(c, &s, &r, NULL));
    CHECK(same_bytes(&s, &r));
    make(&bad, WS_BF16, 999, "short", 3);
    CHECK_ERR(ws_comm_all_gather(c, &s, &bad, NULL), WS_ERR_ARG, "'short' must have 1 x 1000");
    ws_comm_request *q = NULL;
    CHECK_OK(ws_tensor_random(&s, 9, 1.0f, 0));
    CHECK_OK(ws_comm_all_gather(c, &s, &r, &q));
    CHECK(q != NULL);
    CHECK_OK(ws_comm_wait(q));
    CHECK(same_bytes(&s, &r));
    ws_tensor_free(&s);
    ws_tensor_free(&r);
    ws_tensor_free(&bad);
}

static void test_all_gather_list(void)
{
    ws_comm *c = world();
    ws_tensor s = {0}, r = {0}, whole = {0}, view = {0};
    make(&s, WS_F32, 33, "send", 4);
    make(&r, WS_F32, 33, "piece", 5);
    ws_tensor *list[1] = {&r};
    CHECK_OK(ws_comm_all_gather_list(c, &s, list, 1, NULL));
    CHECK(same_bytes(&s, &r));
    /* A view into a bigger buffer: gathered straight into it. */
    make(&whole, WS_F32, 66, "whole", 6);
    CHECK_OK(ws_tensor_narrow(&view, &whole, 0, 33, 33));
    list[0] = &view;
    CHECK_OK(ws_comm_all_gather_list(c, &s, list, 1, NULL));
    CHECK(memcmp((char *)ws_tensor_data(&whole) + 33 * 4, ws_tensor_data(&s), 33 * 4) == 0);
    ws_tensor *two[2] = {&r, &r};
    CHECK_ERR(ws_comm_all_gather_list(c, &s, two, 2, NULL), WS_ERR_ARG, "one per rank (1)");
    ws_tensor_free(&view);
    ws_tensor_free(&whole);
    ws_tensor_free(&s);
    ws_tensor_free(&r);
}

static void test_reductions_are_identity(void)
{
    ws_comm *c = world();
    ws_tensor t = {0}, copy = {0}, out = {0};
    make(&t, WS_I64, 17, "sums", 7);
    make(&copy, WS_I64, 17, "copy", 7);
    CHECK_OK(ws_comm_all_reduce(c, &t, WS_REDUCE_SUM, NULL));
    CHECK(same_bytes(&t, &copy));
    CHECK_OK(ws_comm_all_reduce(c, &t, WS_REDUCE_MAX, NULL));
    CHECK(same_bytes(&t, &copy));
    make(&out, WS_I64, 17, "out", 8);
    CHECK_OK(ws_comm_reduce_scatter(c, &t, &out, WS_REDUCE_SUM, NULL));
    CHECK(same_bytes(&t, &out));
    CHECK_OK(ws_comm_reduce_scatter(c, &t, &t, WS_REDUCE_SUM, NULL)); /* in place: one rank */
    ws_tensor_free(&t);
    ws_tensor_free(&copy);
    ws_tensor_free(&out);
}

static void test_roots_and_peers(void)
{
    ws_comm *c = world();
    ws_tensor t = {0};
    make(&t, WS_U8, 8, "buf", 9);
    CHECK_OK(ws_comm_broadcast(c, &t, 0, NULL));
    CHECK_ERR(ws_comm_broadcast(c, &t, 1, NULL), WS_ERR_ARG, "root 1 is out of range; ranks are 0..0");
    CHECK_ERR(ws_comm_send(c, &t, 0, NULL), WS_ERR_ARG, "peer 0 is this rank");
    CHECK_ERR(ws_comm_recv(c, &t, 3, NULL), WS_ERR_ARG, "peer 3 is out of range");
    CHECK_OK(ws_comm_barrier(c));
    ws_tensor_free(&t);
}

static void test_rejects_freed_and_strided(void)
{
    ws_comm *c = world();
    ws_tensor t = {0}, r = {0}, m = {0}, col = {0};
    make(&t, WS_F32, 4, "gone", 10);
    make(&r, WS_F32, 4, "recv", 11);
    ws_tensor_free(&t);
    ws_status rc = ws_comm_all_gather(c, &t, &r, NULL);
    CHECK(rc == WS_ERR_FREED || rc == WS_ERR_ARG);
    int64_t shape[2] = {4, 4};
    ws_tensor_opts o = {.name = "matrix"};
    CHECK_OK(ws_tensor_empty(&m, WS_F32, 2, shape, &o));
    CHECK_OK(ws_tensor_fill(&m, 1.0));
    CHECK_OK(ws_tensor_narrow(&col, &m, 1, 0, 1));
    CHECK_ERR(ws_comm_all_reduce(c, &col, WS_REDUCE_SUM, NULL), WS_ERR_ARG, "not contiguous");
    ws_tensor_free(&col);
    ws_tensor_free(&m);
    ws_tensor_free(&r);
}

/* An op outside the enum is an argument error, not a silent max. */
static void test_bad_op(void)
{
    ws_comm *c = world();
    ws_tensor t = {0}, out = {0};
    make(&t, WS_F32, 4, "grads", 43);
    make(&out, WS_F32, 4, "out", 44);
    CHECK_ERR(ws_comm_all_reduce(c, &t, (ws_reduce_op)7, NULL), WS_ERR_ARG, "op 7");
    CHECK_ERR(ws_comm_reduce_scatter(c, &t, &out, (ws_reduce_op)-1, NULL), WS_ERR_ARG, "op -1");
    ws_tensor_free(&t);
    ws_tensor_free(&out);
}

static void test_split_and_reference(void)
{
    ws_comm *c = world(), *sub = NULL;
    CHECK_OK(ws_comm_split(c, 5, 0, &sub));
    CHECK(sub != NULL && ws_comm_size(sub) == 1 && ws_comm_rank(sub) == 0);
    ws_comm_free(sub);
    CHECK_OK(ws_comm_split(c, -1, 0, &sub));
    CHECK(sub == NULL);
    double s;
    CHECK_ERR(ws_comm_reference(c, "all_gather", 1024, 1, &s), WS_ERR_UNSUPPORTED, "mpirun");
}

/* A world of one sends itself its one piece: bytes at its displacements. */
static void test_all_to_all(void)
{
    ws_comm *c = world();
    ws_tensor s = {0}, r = {0};
    make(&s, WS_U8, 600, "send", 4);
    make(&r, WS_U8, 700, "recv", 5);
    size_t sc[1] = {300}, sd[1] = {256}, rc[1] = {300}, rd[1] = {16};
    ws_comm_request *q = NULL;
    CHECK_OK(ws_comm_all_to_all(c, &s, sc, sd, &r, rc, rd, &q));
    CHECK(q != NULL);
    CHECK_OK(ws_comm_wait(q));
    const uint8_t *sp = ws_tensor_data(&s), *rp = ws_tensor_data(&r);
    CHECK(memcmp(rp + 16, sp + 256, 300) == 0);
    size_t empty[1] = {0};
    CHECK_OK(ws_comm_all_to_all(c, &s, empty, empty, &r, empty, empty, NULL));
    size_t far[1] = {400};
    CHECK_ERR(ws_comm_all_to_all(c, &s, sc, far, &r, rc, rd, NULL), WS_ERR_ARG,
              "send bytes [400, 700) for rank 0 lie outside 'send' (600 bytes)");
    size_t other[1] = {200};
    CHECK_ERR(ws_comm_all_to_all(c, &s, sc, sd, &r, other, rd, NULL), WS_ERR_ARG,
              "sends itself 300 bytes but expects 200");
    CHECK_ERR(ws_comm_all_to_all(c, &s, sc, sd, &s, rc, rd, NULL), WS_ERR_ARG, "overlap");
    ws_tensor_free(&s);
    ws_tensor_free(&r);
}

int main(void)
{
    RUN(test_world_of_one);
    RUN(test_all_gather_copies);
    RUN(test_all_gather_list);
    RUN(test_reductions_are_identity);
    RUN(test_roots_and_peers);
    RUN(test_rejects_freed_and_strided);
    RUN(test_bad_op);
    RUN(test_split_and_reference);
    RUN(test_all_to_all);
    ws_comm_shutdown();
    return check_summary();
}
