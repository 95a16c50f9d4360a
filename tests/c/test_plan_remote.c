/* test_plan_remote.c: sync plans into an engine in another process
 * (plan.h, WS_PLAN_REMOTE; remote.h).
 *
 * A forked child runs a ws_receiver over bf16 engine tensors, one of them
 * fused (qkv_proj from three parameters); the parent's plan packs f32 and
 * bf16 trainer parameters into the sender's slots over many small buckets
 * (a parameter split across buckets, pieces converted to bf16 on the way)
 * and finishes with proofs computed from its own sources. The child checks
 * that every byte equals the conversion of the parent's values. A wrong
 * proof is refused naming the tensor and the parameter; a bucket larger
 * than a slot is refused before anything is sent. With the engine's tensors
 * in memory it shares (ws_receiver_alloc), a plain plan writes them in place
 * (WS_MANIFEST_DIRECT) and the engine process proves them the same way. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "plan.h"
#include "remote.h"
#include "tensor.h"

/* Trainer parameters and where they land in the engine's tensors. */
#define NP 5
#define NE 3
static const struct {
    const char *name;
    ws_dtype dtype;
    int64_t rows, cols;
    int engine;     /* index into ENGINE */
    int64_t offset; /* element where it starts there */
} PARAM[NP] = {
    {"model.layers.0.self_attn.q_proj.weight", WS_F32, 64, 33, 0, 0},
    {"model.layers.0.self_attn.k_proj.weight", WS_F32, 16, 33, 0, 64 * 33},
    {"model.layers.0.self_attn.v_proj.weight", WS_BF16, 16, 33, 0, 80 * 33},
    {"model.embed_tokens.weight", WS_BF16, 1000, 64, 1, 0},
    {"model.norm.weight", WS_F32, 1, 64, 2, 0},
};
static const struct {
    const char *name;
    int64_t rows, cols;
} ENGINE[NE] = {
    {"model.layers.0.self_attn.qkv_proj.weight", 96, 33},
    {"model.embed_tokens.weight", 1000, 64},
    {"model.norm.weight", 1, 64},
};

static char chan_name_[64];

static pid_t fork_child(void)
{
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        abort();
    }
    if (pid == 0) alarm(20);
    return pid;
}

static int wait_child(pid_t pid)
{
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static ws_status make_params(ws_tensor *p)
{
    memset(p, 0, NP * sizeof *p);
    for (int i = 0; i < NP; i++) {
        int64_t shape[2] = {PARAM[i].rows, PARAM[i].cols};
        ws_tensor_opts o = {.name = PARAM[i].name};
        WS_TRY(ws_tensor_empty(&p[i], PARAM[i].dtype, 2, shape, &o));
        WS_TRY(ws_tensor_random(&p[i], 7 + (uint64_t)i, 3.0f, 0));
    }
    return WS_OK;
}

static ws_status make_engine(ws_tensor *e)
{
    memset(e, 0, NE * sizeof *e);
    for (int i = 0; i < NE; i++) {
        int64_t shape[2] = {ENGINE[i].rows, ENGINE[i].cols};
        ws_tensor_opts o = {.name = ENGINE[i].name};
        WS_TRY(ws_tensor_empty(&e[i], WS_BF16, 2, shape, &o));
        WS_TRY(ws_tensor_fill(&e[i], 0));
    }
    return WS_OK;
}

/* The engine process: serves one trainer until it closes, then checks that
 * its tensors hold the parameters converted to bf16. Exit status: 0 when
 * they do and the last sync was proven. */
static int engine_main(int shared)
{
    ws_tensor p[NP], e[NE];
    ws_receiver *r = NULL;
    if (make_params(p) != WS_OK) return 2;
    if (ws_receiver_create(chan_name_, NULL, &r) != WS_OK) return 3;
    if (shared) {
        for (int i = 0; i < NE; i++) {
            int64_t shape[2] = {ENGINE[i].rows, ENGINE[i].cols};
            if (ws_receiver_alloc(r, ENGINE[i].name, WS_BF16, 2, shape, &e[i]) != WS_OK) return 4;
        }
    } else {
        if (make_engine(e) != WS_OK) return 2;
        for (int i = 0; i < NE; i++)
            if (ws_receiver_add(r, ENGINE[i].name, &e[i]) != WS_OK) return 4;
    }
    ws_status rc = ws_receiver_serve(r, 10000);
    if (rc != WS_OK) {
        fprintf(stderr, "engine: %s\n", ws_errmsg());
        return 5;
    }
    uint64_t version = 0;
    if (ws_receiver_state(r, &version) != WS_WEIGHTS_VALID) return 6;
    int bad = 0;
    for (int i = 0; i < NP; i++) {
        ws_tensor want = {0}, flat = {0}, got = {0};
        int64_t n = PARAM[i].rows * PARAM[i].cols, shape[2] = {PARAM[i].rows, PARAM[i].cols};
        ws_tensor_opts o = {.name = "want"};
        if (ws_tensor_empty(&want, WS_BF16, 2, shape, &o) != WS_OK ||
            ws_tensor_copy(&want, &p[i]) != WS_OK ||
            ws_tensor_reshape(&flat, &e[PARAM[i].engine], 1,
                              (int64_t[]){ENGINE[PARAM[i].engine].rows *
                                          ENGINE[PARAM[i].engine].cols}) != WS_OK ||
            ws_tensor_narrow(&got, &flat, 0, PARAM[i].offset, n) != WS_OK)
            return 7;
        if (memcmp(ws_tensor_data(&want), ws_tensor_data(&got), (size_t)n * 2) != 0) {
            fprintf(stderr, "engine: '%s' differs from '%s'\n", ENGINE[PARAM[i].engine].name,
                    PARAM[i].name);
            bad = 1;
        }
        ws_tensor_free(&want);
        ws_tensor_free(&flat);
        ws_tensor_free(&got);
    }
    ws_receiver_free(r);
    for (int i = 0; i < NP; i++) ws_tensor_free(&p[i]);
    for (int i = 0; i < NE; i++) ws_tensor_free(&e[i]);
    return bad ? 8 : 0;
}

/* The trainer's proofs: each parameter's checksum as bf16, its elements
 * indexed from its offset in the engine tensor. */
static ws_status make_proofs(const ws_tensor *p, ws_proof *pr)
{
    for (int i = 0; i < NP; i++) {
        uint64_t sum = 0;
        WS_TRY(ws_tensor_checksum(&p[i], (uint64_t)PARAM[i].offset, WS_BF16, &sum));
        pr[i] = (ws_proof){ENGINE[PARAM[i].engine].name, PARAM[i].name,
                           (uint64_t)PARAM[i].offset,
                           (uint64_t)(PARAM[i].rows * PARAM[i].cols), sum};
    }
    return WS_OK;
}

static void test_sync_into_engine_process(void)
{
    snprintf(chan_name_, sizeof chan_name_, "wshost-test-plan-remote-%d", (int)getpid());
    pid_t child = fork_child();
    if (child == 0) _exit(engine_main(0));

    ws_tensor p[NP];
    ws_sender *s = NULL;
    ws_plan *plan = NULL;
    CHECK_OK(make_params(p));
    /* Small buckets: the embedding streams through many slots. Of a size
     * that is no multiple of the plan's alignment (as bucket_mb=0.02 gives):
     * the bucket still fits a slot of that size. */
    ws_sender_opts so = {.slot_bytes = 16383};
    CHECK_OK(ws_sender_connect(chan_name_, &so, &s));
    CHECK_OK(ws_plan_create(NULL, ws_device_cpu(), 16383, "base", &plan));
    CHECK_OK(ws_plan_set_remote(plan, s));
    const ws_tensor *srcs[NP];
    int64_t numel[NP], offset[NP];
    uint32_t target[NP];
    ws_dtype wire[NP];
    for (int i = 0; i < NP; i++) {
        srcs[i] = &p[i];
        numel[i] = PARAM[i].rows * PARAM[i].cols;
        target[i] = (uint32_t)PARAM[i].engine;
        offset[i] = PARAM[i].offset;
        wire[i] = WS_BF16;
    }
    CHECK_OK(ws_plan_add_blocks(plan, srcs, NULL, numel, NULL, NULL, wire, NP));
    CHECK_OK(ws_plan_set_targets(plan, target, offset, NP));
    ws_wire_tensor man[NE];
    for (int i = 0; i < NE; i++) man[i] = (ws_wire_tensor){ENGINE[i].name, WS_BF16, 2,
                                                           {ENGINE[i].rows, ENGINE[i].cols}};
    ws_proof pr[NP];
    CHECK_OK(make_proofs(p, pr));
    for (int round = 1; round <= 2; round++) {
        CHECK_OK(ws_sender_begin(s, man, NE, (uint64_t)round, 0));
        CHECK_OK(ws_plan_execute(plan, NULL, NULL));
        ws_plan_stats st;
        ws_plan_get_stats(plan, &st);
        CHECK(st.buckets > 8);
        CHECK_EQ_U64(st.bytes_relayed, (96 * 33 + 1000 * 64 + 64) * 2);
        CHECK_OK(ws_sender_finish_proven(s, pr, NP));
    }
    /* Its own memory cannot be written in place. */
    CHECK_ERR(ws_sender_begin(s, man, NE, 9, WS_MANIFEST_DIRECT), WS_ERR_COMM,
              "own memory, not memory it shares");
    /* A proof the engine's bytes do not satisfy: refused, naming both. */
    ws_proof wrong[NP];
    memcpy(wrong, pr, sizeof wrong);
    wrong[1].checksum ^= 1;
    CHECK_OK(ws_sender_begin(s, man, NE, 3, 0));
    CHECK_OK(ws_plan_execute(plan, NULL, NULL));
    CHECK_ERR(ws_sender_finish_proven(s, wrong, NP), WS_ERR_COMM,
              "model.layers.0.self_attn.k_proj.weight");
    CHECK(strstr(ws_errmsg(), "qkv_proj") != NULL);
    /* ... and then proven again. */
    CHECK_OK(ws_sender_begin(s, man, NE, 4, 0));
    CHECK_OK(ws_plan_execute(plan, NULL, NULL));
    CHECK_OK(ws_sender_finish_proven(s, pr, NP));

    /* A bucket larger than a slot: refused at planning, nothing sent; the
     * sync then goes on with the plan that fits. */
    ws_plan *big = NULL;
    CHECK_OK(ws_plan_create(NULL, ws_device_cpu(), 65536, "big", &big));
    CHECK_OK(ws_plan_set_remote(big, s));
    CHECK_OK(ws_plan_add_blocks(big, srcs, NULL, numel, NULL, NULL, wire, NP));
    CHECK_OK(ws_plan_set_targets(big, target, offset, NP));
    CHECK_OK(ws_sender_begin(s, man, NE, 5, 0));
    CHECK_ERR(ws_plan_execute(big, NULL, NULL), WS_ERR_ARG, "does not fit");
    CHECK_OK(ws_plan_execute(plan, NULL, NULL));
    CHECK_OK(ws_sender_finish_proven(s, pr, NP));
    ws_plan_destroy(big);
    ws_plan_destroy(plan);

    ws_sender_close(s);
    CHECK(wait_child(child) == 0);
    for (int i = 0; i < NP; i++) ws_tensor_free(&p[i]);
}

/* The engine's weights in memory it shares: a colocated plan writes them in
 * place, FINISH proves them; a manifest of the engine's own memory cannot
 * be direct. */
static void test_direct_into_shared_memory(void)
{
    snprintf(chan_name_, sizeof chan_name_, "wshost-test-plan-direct-%d", (int)getpid());
    pid_t child = fork_child();
    if (child == 0) _exit(engine_main(1));

    ws_tensor p[NP], dst[NE], views[NP];
    memset(dst, 0, sizeof dst);
    memset(views, 0, sizeof views);
    ws_sender *s = NULL;
    ws_plan *plan = NULL;
    CHECK_OK(make_params(p));
    CHECK_OK(ws_sender_connect(chan_name_, NULL, &s));
    CHECK(ws_sender_shared_count(s) == NE);
    int64_t bad_shape[2] = {7, 7};
    CHECK_ERR(ws_sender_shared(s, ENGINE[0].name, WS_BF16, 2, bad_shape, &dst[0]), WS_ERR_ARG,
              "bytes");
    CHECK_ERR(ws_sender_shared(s, "model.nothing", WS_BF16, 2, bad_shape, &dst[0]), WS_ERR_ARG,
              "model.nothing");
    for (int i = 0; i < NE; i++) {
        int64_t shape[2] = {ENGINE[i].rows, ENGINE[i].cols};
        CHECK_OK(ws_sender_shared(s, ENGINE[i].name, WS_BF16, 2, shape, &dst[i]));
    }
    const ws_tensor *srcs[NP], *dsts[NP];
    int64_t numel[NP];
    for (int i = 0; i < NP; i++) {
        int64_t n = PARAM[i].rows * PARAM[i].cols, all = ENGINE[PARAM[i].engine].rows *
                                                         ENGINE[PARAM[i].engine].cols;
        ws_tensor flat = {0};
        CHECK_OK(ws_tensor_reshape(&flat, &dst[PARAM[i].engine], 1, &all));
        CHECK_OK(ws_tensor_narrow(&views[i], &flat, 0, PARAM[i].offset, n));
        ws_tensor_free(&flat);
        srcs[i] = &p[i];
        dsts[i] = &views[i];
        numel[i] = n;
    }
    CHECK_OK(ws_plan_create(NULL, ws_device_cpu(), 16384, "direct", &plan));
    CHECK_OK(ws_plan_add(plan, srcs, dsts, numel, NP));
    ws_wire_tensor man[NE];
    for (int i = 0; i < NE; i++) man[i] = (ws_wire_tensor){ENGINE[i].name, WS_BF16, 2,
                                                           {ENGINE[i].rows, ENGINE[i].cols}};
    ws_proof pr[NP], wrong[NP];
    CHECK_OK(make_proofs(p, pr));
    memcpy(wrong, pr, sizeof wrong);
    wrong[3].checksum ^= 1;
    CHECK_OK(ws_sender_begin(s, man, NE, 1, WS_MANIFEST_DIRECT));
    CHECK_OK(ws_plan_execute(plan, NULL, NULL));
    CHECK_OK(ws_sender_finish_proven(s, pr, NP));
    CHECK_OK(ws_sender_begin(s, man, NE, 2, WS_MANIFEST_DIRECT));
    CHECK_OK(ws_plan_execute(plan, NULL, NULL));
    CHECK_ERR(ws_sender_finish_proven(s, wrong, NP), WS_ERR_COMM, "model.embed_tokens.weight");
    CHECK_ERR(ws_sender_verify(s, pr, NP, WS_VERIFY_VALIDITY), WS_ERR_COMM, "not valid");
    CHECK_OK(ws_sender_begin(s, man, NE, 3, WS_MANIFEST_DIRECT | WS_MANIFEST_UNPROVEN));
    CHECK_OK(ws_plan_execute(plan, NULL, NULL));
    CHECK_OK(ws_sender_finish_proven(s, NULL, 0));
    CHECK_OK(ws_sender_begin(s, man, NE, 4, WS_MANIFEST_DIRECT));
    CHECK_OK(ws_plan_execute(plan, NULL, NULL));
    CHECK_OK(ws_sender_finish_proven(s, pr, NP));
    CHECK_OK(ws_sender_verify(s, pr, NP, 0));
    ws_plan_destroy(plan);
    ws_sender_close(s);
    /* The views outlive the sender: its mapping goes with the last of them. */
    CHECK(((uint16_t *)ws_tensor_data(&views[3]))[5] != 0 ||
          ((uint16_t *)ws_tensor_data(&views[3]))[6] != 0);
    CHECK(wait_child(child) == 0);
    for (int i = 0; i < NP; i++) {
        ws_tensor_free(&p[i]);
        ws_tensor_free(&views[i]);
    }
    for (int i = 0; i < NE; i++) ws_tensor_free(&dst[i]);
}

static void test_refusals(void)
{
    ws_plan *plan = NULL;
    CHECK_OK(ws_plan_create(NULL, ws_device_cpu(), 16384, "x", &plan));
    CHECK_ERR(ws_plan_set_remote(plan, NULL), WS_ERR_ARG, "no sender");
    uint32_t t = 0;
    int64_t o = 0;
    CHECK_ERR(ws_plan_set_targets(plan, &t, &o, 1), WS_ERR_ARG, "server mode");
    ws_plan_destroy(plan);
}


/* Review: two pieces that land on the same elements, in two buckets, with a
 * proof each, while the rest of the tensor is never written. The element
 * count (2 x N = the tensor's 2N) and the landed sums (each taken as its
 * piece landed) both agree with the proofs, so FINISH must look at which
 * elements arrived and which the proofs cover, not only how many. */
#define OV_N 2048
static int overlap_engine_main(void)
{
    ws_tensor w = {0};
    ws_receiver *r = NULL;
    int64_t n = 2 * OV_N;
    ws_tensor_opts o = {.name = "w"};
    if (ws_tensor_empty(&w, WS_BF16, 1, &n, &o) != WS_OK || ws_tensor_fill(&w, -7) != WS_OK)
        return 2;
    if (ws_receiver_create(chan_name_, NULL, &r) != WS_OK) return 3;
    if (ws_receiver_add(r, "w", &w) != WS_OK) return 4;
    ws_status rc = ws_receiver_serve(r, 10000);
    int valid = ws_receiver_tensor_valid(r, "w");
    ws_receiver_free(r);
    ws_tensor_free(&w);
    if (rc != WS_OK) return 5;
    return valid == 1 ? 10 : 0; /* 10: the half-written tensor is trusted */
}

/* Sends two N-element halves of "w" to an overlap engine, each in its own
 * slot with a proof of [0, N): apart = 0 lands both on elements [0, N) (the
 * second half never arrives); apart = 1 lands them on [0, N) and [N, 2N),
 * the second proof carrying the checksum of [N, 2N). Returns FINISH's
 * status. */
static ws_status send_overlapping(const char *tag, uint64_t seed, int apart)
{
    snprintf(chan_name_, sizeof chan_name_, "wshost-test-plan-remote-%s-%d", tag, (int)getpid());
    pid_t child = fork_child();
    if (child == 0) _exit(overlap_engine_main());
    ws_sender *s = NULL;
    ws_sender_opts so = {.slot_bytes = OV_N * 2};
    CHECK_OK(ws_sender_connect(chan_name_, &so, &s));
    ws_wire_tensor man = {"w", WS_BF16, 1, {2 * OV_N}};
    CHECK_OK(ws_sender_begin(s, &man, 1, 1, 0));
    ws_proof pr[2];
    const char *labels[2] = {"a", "b"};
    for (int k = 0; k < 2; k++) {
        ws_tensor v = {0};
        int64_t n = OV_N;
        uint64_t at = apart ? (uint64_t)k * OV_N : 0;
        ws_tensor_opts o = {.name = labels[k]};
        CHECK_OK(ws_tensor_empty(&v, WS_BF16, 1, &n, &o));
        CHECK_OK(ws_tensor_random(&v, seed + (uint64_t)k, 3.0f, 0));
        uint64_t sum = 0;
        CHECK_OK(ws_tensor_checksum(&v, at, WS_BF16, &sum));
        pr[k] = (ws_proof){"w", labels[k], 0, OV_N, sum}; /* both claim [0, N) */
        void *base = NULL;
        size_t bytes = 0;
        CHECK_OK(ws_sender_slot(s, k, &base, &bytes));
        memcpy(base, ws_tensor_data(&v), OV_N * 2);
        ws_wire_piece piece = {0, at, OV_N, 0};
        CHECK_OK(ws_sender_submit(s, k, &piece, 1));
        ws_tensor_free(&v);
    }
    ws_status rc = ws_sender_finish_proven(s, pr, 2);
    char msg[512];
    snprintf(msg, sizeof msg, "%s", ws_errmsg());
    ws_sender_close(s);
    CHECK(wait_child(child) == 0);
    return rc == WS_OK ? rc : WS_ERR(rc, "%s", msg); /* FINISH's own message */
}

static void test_overlapping_pieces_refused(void)
{
    ws_status rc = send_overlapping("ov", 11, 0); /* elements [N, 2N) never arrive */
    CHECK(rc != WS_OK);
    if (rc == WS_OK) fprintf(stderr, "  FINISH accepted a tensor half of which was never written\n");
}

/* Review: every element lands once, but the proofs name [0, N) twice (the
 * second with the checksum of [N, 2N)): counts and sums agree, the proofs
 * do not cover the tensor exactly; refused. */
static void test_overlapping_proofs_refused(void)
{
    CHECK_ERR(send_overlapping("op", 21, 1), WS_ERR_COMM, "more than once");
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    RUN(test_refusals);
    RUN(test_sync_into_engine_process);
    RUN(test_direct_into_shared_memory);
    RUN(test_overlapping_pieces_refused);
    RUN(test_overlapping_proofs_refused);
    return check_summary();
}
