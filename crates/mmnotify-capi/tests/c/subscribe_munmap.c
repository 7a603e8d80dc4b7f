/* Subscribe to a mapping, unmap it three ways (libc munmap, raw syscall, the cooperative
 * wrapper), and see the callback each time, with the right range and event. The wrapper's
 * callback runs *before* the memory goes: it can still read it. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#include "check.h"

struct mirror {
    pthread_mutex_t lock;
    atomic_int calls;
    uint64_t start, end;
    uint32_t event;
    uint8_t may_block;
    int still_readable; /* -1 unknown, 1 if the first byte read 0x5a in the callback */
    volatile unsigned char *probe;
};

static int on_invalidate(void *ctx, const mmn_invalidation_t *inv) {
    struct mirror *m = ctx;
    pthread_mutex_lock(&m->lock);
    m->start = inv->start;
    m->end = inv->end;
    m->event = inv->event;
    m->may_block = inv->may_block;
    if (m->probe) {
        m->still_readable = m->probe[0] == 0x5a;
        m->probe = NULL;
    }
    pthread_mutex_unlock(&m->lock);
    atomic_fetch_add(&m->calls, 1);
    return 0;
}

static void *map_pages(size_t n) {
    void *p = mmap(NULL, n * page_size(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    memset(p, 0x5a, n * page_size());
    return p;
}

/* Waits (bounded) until the callback ran `want` times. Kernel events are delivered by the
 * watcher's dispatcher after the unmapping call returned; mmn_read_begin waits for that
 * delivery, so after it the count must already be there. */
static int calls_after_delivery(struct mirror *m, mmn_interval_t iv, int want) {
    mmn_seq_t seq;
    int rc = mmn_read_begin(iv, &seq);
    CHECK(rc == 0, "read_begin after the unmap returned %d", rc);
    int c = atomic_load(&m->calls);
    CHECK(c == want, "callback calls %d, want %d (right after read_begin)", c, want);
    CHECK(mmn_read_retry(iv, &seq) == 0, "no invalidation since read_begin");
    return c;
}

static void one_path(const char *name, int how) {
    const size_t n = 4;
    unsigned char *p = map_pages(n);
    uint64_t a = (uint64_t)(uintptr_t)p, len = n * (uint64_t)page_size();
    struct mirror m = {.lock = PTHREAD_MUTEX_INITIALIZER, .still_readable = -1};
    mmn_interval_t iv;
    OK(mmn_subscribe(a, len, on_invalidate, &m, 0, &iv));
    mmn_seq_t seq;
    OK(mmn_read_begin(iv, &seq));
    CHECK(mmn_read_retry(iv, &seq) == 0, "%s: fresh interval collides", name);

    double t0 = now_s();
    if (how == 0) {
        CHECK(munmap(p, len) == 0, "munmap");
    } else if (how == 1) {
        CHECK(syscall(SYS_munmap, p, len) == 0, "syscall(SYS_munmap)");
    } else {
        m.probe = p;
        OK(mmn_munmap(p, len));
        /* The wrapper calls back on this thread before munmap: already counted. */
        CHECK(atomic_load(&m.calls) >= 1, "%s: wrapper returned before its callback", name);
        CHECK(m.still_readable == 1, "%s: the callback could not read the memory before it went", name);
    }
    CHECK(mmn_read_retry(iv, &seq) != 0, "%s: the fill begun before the unmap must retry", name);
    int c = calls_after_delivery(&m, iv, how == 2 ? 2 : 1);
    double dt = now_s() - t0;
    CHECK(m.start <= a && m.end >= a + len, "%s: range [%#lx,%#lx) does not cover [%#lx,%#lx)", name,
          (unsigned long)m.start, (unsigned long)m.end, (unsigned long)a, (unsigned long)(a + len));
    CHECK(m.event == MMN_EVENT_UNMAP, "%s: event %u, want MMN_EVENT_UNMAP", name, m.event);
    CHECK(m.may_block == 1, "%s: watcher callbacks may block", name);

    mmn_interval_stats_t st;
    OK(mmn_interval_stats(iv, &st));
    CHECK(st.invalidations == (uint64_t)c && st.callback_errors == 0, "%s: stats %lu calls %lu errors", name,
          (unsigned long)st.invalidations, (unsigned long)st.callback_errors);
    OK(mmn_unsubscribe(iv));
    CHECK(mmn_unsubscribe(iv) == MMN_EBADF, "%s: second unsubscribe must be EBADF", name);
    printf("%-22s callback calls %d, event %u, range [%#lx, %#lx), %.0f us to delivery\n", name, c, m.event,
           (unsigned long)m.start, (unsigned long)m.end, dt * 1e6);
}

int main(void) {
    int refs = mmn_init(MMN_ABI_VERSION, NULL);
    OK(refs);
    mmn_features_t f;
    OK(mmn_features(&f));
    printf("features: supported %#lx enabled %#lx wp_async %u fork_events %u\n", (unsigned long)f.supported,
           (unsigned long)f.enabled, f.wp_async, f.fork_events);
    one_path("munmap", 0);
    one_path("syscall(SYS_munmap)", 1);
    one_path("mmn_munmap (wrapper)", 2);

    /* One handler over the whole address space (UCX's ucm_set_event_handler shape): subscribe
     * without watching, then watch each buffer of interest. */
    struct mirror all = {.lock = PTHREAD_MUTEX_INITIALIZER, .still_readable = -1};
    mmn_interval_t global;
    OK(mmn_subscribe(0, 1ULL << 47, on_invalidate, &all, MMN_SUBSCRIBE_NO_WATCH, &global));
    unsigned char *b = map_pages(2);
    uint64_t ba = (uint64_t)(uintptr_t)b, blen = 2 * (uint64_t)page_size();
    CHECK(mmn_watch(ba, blen) >= 0, "watch");
    CHECK(munmap(b, blen) == 0, "munmap");
    mmn_seq_t gs;
    OK(mmn_read_begin(global, &gs));
    CHECK(atomic_load(&all.calls) >= 1 && all.start <= ba && all.end >= ba + blen,
          "the global handler saw the unmap of a watched buffer (%d calls, [%#lx, %#lx))", atomic_load(&all.calls),
          (unsigned long)all.start, (unsigned long)all.end);
    printf("%-22s callback calls %d, last range [%#lx, %#lx)\n", "global handler", atomic_load(&all.calls),
           (unsigned long)all.start, (unsigned long)all.end);
    OK(mmn_unsubscribe(global));
    CHECK(mmn_fini() == 0, "the last fini returns 0 references");
    return finish("subscribe_munmap");
}
