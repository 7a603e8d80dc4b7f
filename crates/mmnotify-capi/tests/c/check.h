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

/* A "quiet" address for memory the tests unmap and map again at the same place: far below
 * where the kernel places mappings without a hint (it searches top-down from below the stack,
 * and the executable and heap sit above this), and above AddressSanitizer's shadow memory
 * (which ends at 0x10007fff7fff on x86-64). Another thread's mmap can then not take the hole
 * an munmap leaves. Each call returns a fresh 16 MiB slot. */
static inline void *quiet_addr(void) {
    static unsigned long next;
    return (void *)(uintptr_t)(0x200000000000ULL + __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED) * 0x1000000ULL);
}

static inline int finish(const char *name) {
    if (check_failures) {
        printf("%s: %d check(s) FAILED\n", name, check_failures);
        return 1;
    }
    printf("%s: all checks passed\n", name);
    return 0;
}

#endif
