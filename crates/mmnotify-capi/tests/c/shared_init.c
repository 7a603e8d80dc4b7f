/* Several "libraries" in one process, each with its own mmn_init / mmn_fini, concurrently:
 * threads that repeatedly take a reference, subscribe to their own memory, see an unmap, and
 * drop everything again, while others do the same. Every init succeeds and counts a reference,
 * every subscription sees its own unmap, and once the last reference is dropped the library is
 * uninitialised (MMN_ESHUTDOWN) and can be initialised again. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>

#include "check.h"

#define THREADS 4
#define ROUNDS 25

static atomic_int failures;

static int cb(void *ctx, const mmn_invalidation_t *inv) {
    (void)inv;
    atomic_fetch_add((atomic_int *)ctx, 1);
    return 0;
}

static void *library(void *arg) {
    (void)arg;
    long ps = page_size();
    for (int round = 0; round < ROUNDS; round++) {
        int refs = mmn_init(MMN_ABI_VERSION, NULL);
        if (refs < 1) {
            fprintf(stderr, "mmn_init: %d %s\n", refs, mmn_last_error());
            atomic_fetch_add(&failures, 1);
            continue;
        }
        void *p = mmap(NULL, (size_t)ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        *(volatile char *)p = 1;
        atomic_int calls = 0;
        mmn_interval_t iv;
        int rc = mmn_subscribe((uint64_t)(uintptr_t)p, (uint64_t)ps, cb, &calls, 0, &iv);
        if (rc != 0) {
            fprintf(stderr, "mmn_subscribe: %d %s\n", rc, mmn_last_error());
            atomic_fetch_add(&failures, 1);
        } else {
            munmap(p, (size_t)ps);
            mmn_seq_t seq;
            rc = mmn_read_begin(iv, &seq); /* waits for the unmap's delivery */
            if (rc != 0 || atomic_load(&calls) < 1) {
                fprintf(stderr, "round %d: read_begin %d, calls %d\n", round, rc, atomic_load(&calls));
                atomic_fetch_add(&failures, 1);
            }
            if (mmn_unsubscribe(iv) != 0) atomic_fetch_add(&failures, 1);
        }
        rc = mmn_fini();
        if (rc < 0) {
            fprintf(stderr, "mmn_fini: %d %s\n", rc, mmn_last_error());
            atomic_fetch_add(&failures, 1);
        }
    }
    return NULL;
}

int main(void) {
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) pthread_create(&t[i], NULL, library, NULL);
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    CHECK(atomic_load(&failures) == 0, "%d failures", atomic_load(&failures));
    mmn_features_t f;
    CHECK(mmn_features(&f) == MMN_ESHUTDOWN, "uninitialised after the last fini");
    OK(mmn_init(MMN_ABI_VERSION, NULL));
    OK(mmn_features(&f));
    CHECK(mmn_fini() == 0, "last fini");
    printf("%d libraries x %d rounds of init/subscribe/unmap/unsubscribe/fini: %d failures\n", THREADS, ROUNDS,
           atomic_load(&failures));
    return finish("shared_init");
}
