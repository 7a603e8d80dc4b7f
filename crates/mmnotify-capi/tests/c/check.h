/* Small helpers shared by the C test programs. */
#ifndef MMN_TEST_CHECK_H
#define MMN_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "mmnotify.h"

static int check_failures;

#define CHECK(cond, ...)                                                         \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "%s:%d: CHECK FAILED: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                        \
            fprintf(stderr, " (last error: %s)\n", mmn_last_error());           \
            check_failures++;                                                    \
        }                                                                        \
    } while (0)

/* A call that must succeed (return >= 0). */
#define OK(call)                                                                 \
    do {                                                                         \
        int ok_rc_ = (call);                                                     \
        if (ok_rc_ < 0) {                                                        \
            fprintf(stderr, "%s:%d: %s failed: %d (%s): %s\n", __FILE__, __LINE__, \
                    #call, ok_rc_, mmn_strerror(ok_rc_), mmn_last_error());       \
            exit(1);                                                             \
        }                                                                        \
    } while (0)

static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static inline long page_size(void) { return sysconf(_SC_PAGESIZE); }

static inline int finish(const char *name) {
    if (check_failures) {
        printf("%s: %d check(s) FAILED\n", name, check_failures);
        return 1;
    }
    printf("%s: all checks passed\n", name);
    return 0;
}

#endif
