/* check.h: a tiny assertion harness for the C unit tests of the core.
 *
 * CHECK(cond) records a failure with its location and keeps going; a test
 * file's main() runs its cases with RUN(fn) and ends with `return
 * check_summary();`, which prints "N passed, N failed" and returns non-zero
 * when anything failed. SKIP(reason) ends a case as skipped, printing why. */
#ifndef WS_TEST_CHECK_H
#define WS_TEST_CHECK_H

#include <stdio.h>
#include <string.h>

/* A tensor's raw bytes, unchecked. Tests inspect memory the library itself
 * reaches only through ws_tensor_access (addresses of sleeping pools, bytes
 * just written by a backend). */
#define ws_tensor_data(t) ((void *)((char *)(t)->storage->data + (t)->offset))

static int check_passed_, check_failed_, check_skipped_, check_case_failed_, check_case_skipped_;
static const char *check_case_;

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "%s:%d: %s: check failed: %s\n", __FILE__, __LINE__,         \
                    check_case_, #cond);                                                 \
            check_case_failed_ = 1;                                                      \
        }                                                                                \
    } while (0)

#define CHECK_EQ_U64(a, b)                                                               \
    do {                                                                                 \
        unsigned long long check_a_ = (unsigned long long)(a);                           \
        unsigned long long check_b_ = (unsigned long long)(b);                           \
        if (check_a_ != check_b_) {                                                      \
            fprintf(stderr, "%s:%d: %s: %s == %s failed: 0x%llx != 0x%llx\n", __FILE__,   \
                    __LINE__, check_case_, #a, #b, check_a_, check_b_);                  \
            check_case_failed_ = 1;                                                      \
        }                                                                                \
    } while (0)

#define CHECK_OK(expr)                                                                   \
    do {                                                                                 \
        ws_status check_rc_ = (expr);                                                    \
        if (check_rc_ != WS_OK) {                                                        \
            fprintf(stderr, "%s:%d: %s: %s returned %s: %s\n", __FILE__, __LINE__,        \
                    check_case_, #expr, ws_status_name(check_rc_), ws_errmsg());         \
            check_case_failed_ = 1;                                                      \
        }                                                                                \
    } while (0)

/* The call fails with `code` and its message contains `needle`. */
#define CHECK_ERR(expr, code, needle)                                                    \
    do {                                                                                 \
        ws_status check_rc_ = (expr);                                                    \
        if (check_rc_ != (code) || !strstr(ws_errmsg(), (needle))) {                     \
            fprintf(stderr, "%s:%d: %s: %s: expected %s containing '%s', got %s: %s\n",  \
                    __FILE__, __LINE__, check_case_, #expr, ws_status_name(code),        \
                    (needle), ws_status_name(check_rc_), ws_errmsg());                   \
            check_case_failed_ = 1;                                                      \
        }                                                                                \
    } while (0)

#define SKIP(reason)                                                                     \
    do {                                                                                 \
        printf("  skip %s: %s\n", check_case_, (reason));                                \
        check_case_skipped_ = 1;                                                         \
        return;                                                                          \
    } while (0)

#define RUN(fn)                                                                          \
    do {                                                                                 \
        check_case_ = #fn;                                                               \
        check_case_failed_ = 0;                                                          \
        check_case_skipped_ = 0;                                                         \
        fn();                                                                            \
        if (check_case_failed_) {                                                        \
            check_failed_++;                                                             \
            printf("  FAIL %s\n", #fn);                                                  \
        } else if (check_case_skipped_) {                                                \
            check_skipped_++;                                                            \
        } else {                                                                         \
            check_passed_++;                                                             \
            printf("  ok   %s\n", #fn);                                                  \
        }                                                                                \
    } while (0)

static inline int check_summary(void)
{
    printf("%d passed, %d failed, %d skipped\n", check_passed_, check_failed_, check_skipped_);
    return check_failed_ ? 1 : 0;
}

#endif
