/* test_api.c: libwshost through ws.h alone, as an embedder uses it.
 *
 * Loads the pipeline named by argv[1] (default pipelines/verl_lora.lua,
 * preset "tiny"), lends a buffer for every tensor the trainer, the adapter
 * and the engine expect (the engine's half through ws_host_alloc), runs
 * steps with callbacks, and checks that every error names what is at fault
 * and that every lent buffer is released exactly once. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "ws.h"

static const char *pipeline = "pipelines/verl_lora.lua";
static const char *cfg_keys[] = {"model"};
static const char *cfg_values[] = {"tiny"};

static size_t dtype_size(const char *dt)
{
    if (!strcmp(dt, "f32") || !strcmp(dt, "i32")) return 4;
    if (!strcmp(dt, "bf16") || !strcmp(dt, "f16")) return 2;
    if (!strcmp(dt, "i64")) return 8;
    return 1; /* fp8, u8 */
}

static int released, lent;

static void release_buffer(void *ctx)
{
    free(ctx);
    released++;
}

/* Lends a fresh buffer of the tensor's shape and dtype. */
static int lend(ws_host *h, const char *role, const ws_host_param *p, const char *dtype)
{
    ws_host_memory m = {0};
    size_t n = dtype_size(dtype);
    for (int k = 0; k < p->ndim; k++) n *= (size_t)p->shape[k];
    m.data = calloc(1, n ? n : 1);
    m.nbytes = n;
    m.device_type = WS_HOST_CPU;
    m.dtype = dtype;
    m.ndim = p->ndim;
    memcpy(m.shape, p->shape, sizeof m.shape);
    m.release = release_buffer;
    m.release_ctx = m.data;
    lent++;
    return ws_host_register(h, role, p->name, &m, 0, NULL);
}

static ws_host *open_host(void)
{
    ws_host *h = ws_host_new();
    CHECK(h != NULL);
    if (ws_host_load(h, pipeline, 1, cfg_keys, cfg_values) != 0) {
        fprintf(stderr, "load: %s\n", ws_host_error(h));
        CHECK(!"load failed");
    }
    return h;
}

/* Registers everything the roles expect; returns the number of tensors. */
static int register_all(ws_host *h)
{
    static const char *roles[] = {"trainer", "adapter", "engine"};
    int count = 0;
    for (int r = 0; r < 3; r++) {
        ws_host_param p;
        int rc;
        for (size_t i = 0; (rc = ws_host_expected(h, roles[r], i, &p)) == 0; i++) {
            /* The strings of p live until the next i == 0 call: copy what the
             * registration needs before the next ws_host_expected. */
            ws_host_param q = p;
            char name[512], dtype[32];
            snprintf(name, sizeof name, "%s", p.name);
            snprintf(dtype, sizeof dtype, "%s", p.dtype);
            q.name = name;
            int ok;
            if (r == 2 && i % 2 == 0) {
                ws_host_memory out;
                ok = ws_host_alloc(h, name, q.ndim, q.shape, dtype, &out);
                CHECK(ok != 0 || (out.data != NULL && out.ndim == q.ndim && out.nbytes > 0));
            } else {
                ok = lend(h, roles[r], &q, dtype);
            }
            if (ok != 0) fprintf(stderr, "%s '%s': %s\n", roles[r], name, ws_host_error(h));
            CHECK(ok == 0);
            count++;
        }
        if (rc < 0) fprintf(stderr, "expected(%s): %s\n", roles[r], ws_host_error(h));
        CHECK(rc == 1);
    }
    return count;
}

static int train_calls;

static int on_train(void *ud, const char *event, long long arg, const char *sarg, char *err,
                    size_t errlen)
{
    (void)ud;
    (void)sarg;
    CHECK(!strcmp(event, "train"));
    CHECK(arg == train_calls + 1);
    train_calls++;
    return 0;
}

static int fail_train(void *ud, const char *event, long long arg, const char *sarg, char *err,
                      size_t errlen)
{
    snprintf(err, errlen, "the trainer's optimizer blew up at step %lld", arg);
    return 1;
}

static void test_steps(void)
{
    released = lent = train_calls = 0;
    ws_host *h = open_host();
    int n = register_all(h);
    CHECK(n > 0);
    CHECK(ws_host_on(h, "train", on_train, NULL) == 0);
    for (int s = 1; s <= 3; s++) {
        char *rec = NULL;
        int rc = ws_host_step(h, &rec);
        if (rc != 0) fprintf(stderr, "step %d: %s\n", s, ws_host_error(h));
        CHECK(rc == 0);
        CHECK(rec && rec[0] == '{' && strstr(rec, "\"step\""));
        CHECK(!strcmp(ws_host_error(h), ""));
        ws_host_free_string(rec);
    }
    CHECK(train_calls == 3);
    char *summary = NULL;
    if (ws_host_close(h, &summary) != 0) {
        fprintf(stderr, "close: %s\n", ws_host_error(h));
        CHECK(!"close failed");
    }
    CHECK(summary && summary[0] == '{');
    ws_host_free_string(summary);
    /* Closed: no more steps, and the message says why. */
    CHECK(ws_host_step(h, NULL) != 0);
    CHECK(strstr(ws_host_error(h), "closed") != NULL);
    ws_host_free(h);
    CHECK(released == lent);
}

static void test_errors_name_the_culprit(void)
{
    released = lent = 0;
    /* An unknown config key is named. */
    ws_host *h = ws_host_new();
    const char *k[] = {"bucket_MiB_typo"}, *v[] = {"4"};
    CHECK(ws_host_load(h, pipeline, 1, k, v) != 0);
    CHECK(strstr(ws_host_error(h), "bucket_MiB_typo") != NULL);
    ws_host_free(h);

    /* A missing pipeline file is named. */
    h = ws_host_new();
    CHECK(ws_host_load(h, "no/such/pipeline.lua", 0, NULL, NULL) != 0);
    CHECK(strstr(ws_host_error(h), "no/such/pipeline.lua") != NULL);
    ws_host_free(h);

    h = open_host();
    /* A name the trainer does not have, and a dtype wshost does not know:
     * both named, and the memory still released exactly once. */
    ws_host_param p = {.name = "model.no_such_layer.weight", .dtype = "f32", .ndim = 1,
                       .shape = {4}};
    int rc = lend(h, "trainer", &p, "f32");
    if (rc == 0) rc = ws_host_step(h, NULL); /* may be caught at the first step instead */
    CHECK(rc != 0);
    CHECK(strstr(ws_host_error(h), "model.no_such_layer.weight") != NULL);
    p.name = "model.embed_tokens.weight";
    CHECK(lend(h, "trainer", &p, "complex128") != 0);
    CHECK(strstr(ws_host_error(h), "complex128") != NULL);
    CHECK(strstr(ws_host_error(h), "model.embed_tokens.weight") != NULL);
    /* Wrong use of the API itself. */
    CHECK(ws_host_load(h, pipeline, 0, NULL, NULL) != 0);
    CHECK(strstr(ws_host_error(h), "already") != NULL);
    ws_host_free(h);
    CHECK(released == lent);

    h = ws_host_new();
    CHECK(ws_host_step(h, NULL) != 0);
    CHECK(strstr(ws_host_error(h), "ws_host_load") != NULL);
    ws_host_free(h);
}

static void test_callback_failure_fails_the_step(void)
{
    released = lent = 0;
    ws_host *h = open_host();
    register_all(h);
    CHECK(ws_host_on(h, "train", fail_train, NULL) == 0);
    char *rec = (char *)"untouched";
    CHECK(ws_host_step(h, &rec) != 0);
    CHECK(rec == NULL);
    const char *e = ws_host_error(h);
    CHECK(strstr(e, "train") != NULL);
    CHECK(strstr(e, "optimizer blew up at step 1") != NULL);
    ws_host_free(h);
    CHECK(released == lent);
}

/* ws_host_free from inside a callback is refused (the host stays usable). */
static int free_in_train(void *ud, const char *event, long long arg, const char *sarg, char *err,
                         size_t errlen)
{
    ws_host *h = ud;
    ws_host_free(h);
    CHECK(strstr(ws_host_error(h), "inside a callback") != NULL);
    return 0;
}

static void test_reentry_and_stale_interrupt(void)
{
    released = lent = 0;
    ws_host *h = open_host();
    register_all(h);
    CHECK(ws_host_on(h, "train", free_in_train, h) == 0);
    CHECK(ws_host_step(h, NULL) == 0);
    /* An interrupt while no call runs fails no later call. */
    ws_host_interrupt(h);
    CHECK(ws_host_step(h, NULL) == 0);
    CHECK(!strcmp(ws_host_error(h), ""));
    ws_host_free(h);
    CHECK(released == lent);
}

int main(int argc, char **argv)
{
    if (argc > 1) pipeline = argv[1];
    RUN(test_steps);
    RUN(test_errors_name_the_culprit);
    RUN(test_callback_failure_fails_the_step);
    RUN(test_reentry_and_stale_interrupt);
    return check_summary();
}
