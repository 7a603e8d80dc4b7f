/* read_begin / read_retry collide after a remap: sequentially for mremap (move), munmap +
 * MAP_FIXED_NOREPLACE and MAP_FIXED over live memory; then two threads for about a second,
 * one filling a mirror of the page's contents with the collision-retry protocol, the other
 * unmapping and re-mapping the page with new contents: zero stale commits, judged by which
 * generations' unmaps had returned before the commit. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>

#include "check.h"

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

struct mirror {
    pthread_mutex_t lock;
    int valid;
    uint64_t value;
    atomic_int calls;
};

static int on_invalidate(void *ctx, const mmn_invalidation_t *inv) {
    (void)inv;
    struct mirror *m = ctx;
    pthread_mutex_lock(&m->lock);
    m->valid = 0;
    pthread_mutex_unlock(&m->lock);
    atomic_fetch_add(&m->calls, 1);
    return 0;
}

static int mem_fd;

/* Reads a word of this process's memory without faulting: -1 if unmapped. */
static int peek(uint64_t addr, uint64_t *out) {
    return pread(mem_fd, out, sizeof *out, (off_t)addr) == (ssize_t)sizeof *out ? 0 : -1;
}

static void sequential(void) {
    long ps = page_size();
    struct mirror m = {.lock = PTHREAD_MUTEX_INITIALIZER};
    uint64_t *p = mmap(quiet_addr(), (size_t)ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    CHECK(p != MAP_FAILED, "mmap");
    p[0] = 1;
    uint64_t a = (uint64_t)(uintptr_t)p;
    mmn_interval_t iv;
    OK(mmn_subscribe(a, (uint64_t)ps, on_invalidate, &m, 0, &iv));
    mmn_seq_t s;

    /* 1. mremap away: the old range is invalidated. */
    OK(mmn_read_begin(iv, &s));
    void *moved = mremap(p, (size_t)ps, (size_t)ps, MREMAP_MAYMOVE | MREMAP_FIXED,
                         mmap(quiet_addr(), (size_t)ps, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0));
    CHECK(moved != MAP_FAILED, "mremap");
    CHECK(mmn_read_retry(iv, &s) == 1, "mremap: a fill begun before it must collide");
    OK(mmn_read_begin(iv, &s));
    CHECK(mmn_read_retry(iv, &s) == 0, "mremap: a fill begun after the delivery commits");
    printf("mremap move:           collision seen, %d callback(s)\n", atomic_load(&m.calls));

    /* 2. munmap + MAP_FIXED_NOREPLACE at the same address. */
    p = mmap((void *)(uintptr_t)a, (size_t)ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    CHECK(p == (void *)(uintptr_t)a, "re-map at the old address");
    OK(mmn_watch(a, (uint64_t)ps)); /* a new VMA: the kernel does not register it by itself */
    int before = atomic_load(&m.calls);
    OK(mmn_read_begin(iv, &s));
    CHECK(munmap(p, (size_t)ps) == 0, "munmap");
    p = mmap((void *)(uintptr_t)a, (size_t)ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    CHECK(p == (void *)(uintptr_t)a, "re-map at the old address");
    CHECK(mmn_read_retry(iv, &s) == 1, "munmap + re-map: collision");
    OK(mmn_watch(a, (uint64_t)ps));
    OK(mmn_read_begin(iv, &s));
    CHECK(atomic_load(&m.calls) > before, "munmap + re-map: callback");
    CHECK(mmn_read_retry(iv, &s) == 0, "munmap + re-map: quiet afterwards");
    printf("munmap + re-map:       collision seen, %d callback(s)\n", atomic_load(&m.calls));

    /* 3. MAP_FIXED over live memory. */
    before = atomic_load(&m.calls);
    OK(mmn_read_begin(iv, &s));
    void *q = mmap(p, (size_t)ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    CHECK(q == p, "MAP_FIXED over");
    CHECK(mmn_read_retry(iv, &s) == 1, "MAP_FIXED over: collision");
    OK(mmn_read_begin(iv, &s));
    CHECK(atomic_load(&m.calls) > before, "MAP_FIXED over: callback");
    printf("MAP_FIXED over live:   collision seen, %d callback(s)\n", atomic_load(&m.calls));

    OK(mmn_unsubscribe(iv));
    munmap(p, (size_t)ps);
    munmap(moved, (size_t)ps);
}

/* ---- the race ---- */

static uint64_t race_addr;
static atomic_uint_fast64_t returned_upto; /* mapping generations < this have been unmapped (call returned) */
static atomic_int stop;
static atomic_long remaps;

static void *remapper(void *arg) {
    (void)arg;
    long ps = page_size();
    uint64_t gen = 0;
    while (!atomic_load(&stop)) {
        void *p = (void *)(uintptr_t)race_addr;
        if (gen % 2 == 0) {
            CHECK(munmap(p, (size_t)ps) == 0, "munmap");
            atomic_store(&returned_upto, gen + 1);
            void *q = mmap(p, (size_t)ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
            CHECK(q == p, "re-map");
        } else {
            void *q = mmap(p, (size_t)ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
            CHECK(q == p, "MAP_FIXED over");
            atomic_store(&returned_upto, gen + 1);
        }
        gen++;
        /* contents = generation + 1; 0 is a fresh page not yet written */
        *(volatile uint64_t *)p = gen + 1;
        int rc = mmn_watch(race_addr, (uint64_t)ps);
        CHECK(rc >= 0, "re-watch: %d", rc);
        atomic_fetch_add(&remaps, 1);
        usleep((useconds_t)(rand() % 300));
    }
    return NULL;
}

static void race(double seconds) {
    long ps = page_size();
    uint64_t *p = mmap(quiet_addr(), (size_t)ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    CHECK(p != MAP_FAILED, "mmap");
    *p = 1; /* generation 0 */
    race_addr = (uint64_t)(uintptr_t)p;
    struct mirror m = {.lock = PTHREAD_MUTEX_INITIALIZER};
    mmn_interval_t iv;
    OK(mmn_subscribe(race_addr, (uint64_t)ps, on_invalidate, &m, 0, &iv));
    pthread_t b;
    pthread_create(&b, NULL, remapper, NULL);
    long commits = 0, retries = 0, unreadable = 0, fresh = 0, stale = 0;
    /* At least `seconds`, and until the remapper made 50 remaps (a loaded machine may starve
     * it), at most 10 s. */
    double start = now_s();
    for (;;) {
        double t = now_s() - start;
        if (t >= 10 || (t >= seconds && atomic_load(&remaps) >= 50)) break;
        mmn_seq_t s;
        int rc = mmn_read_begin(iv, &s);
        CHECK(rc == 0, "read_begin %d", rc);
        uint64_t v;
        if (peek(race_addr, &v) != 0) {
            unreadable++;
            continue;
        }
        pthread_mutex_lock(&m.lock);
        uint64_t upto = atomic_load(&returned_upto);
        if (mmn_read_retry(iv, &s) != 0) {
            pthread_mutex_unlock(&m.lock);
            retries++;
            continue;
        }
        m.valid = 1;
        m.value = v;
        if (v == 0) {
            fresh++;
        } else if (v - 1 < upto) {
            /* The mapping of generation v-1 was unmapped and the call returned before this
             * commit: a stale commit. */
            stale++;
        }
        commits++;
        pthread_mutex_unlock(&m.lock);
    }
    atomic_store(&stop, 1);
    pthread_join(b, NULL);
    printf("race: %ld remaps, %ld commits (%ld of fresh zero pages), %ld retries, %ld unreadable, %ld STALE\n",
           atomic_load(&remaps), commits, fresh, retries, unreadable, stale);
    CHECK(stale == 0, "%ld stale commits", stale);
    CHECK(atomic_load(&remaps) >= 20 && commits > 100 && retries > 0,
          "the race must have raced (remaps %ld commits %ld retries %ld)", atomic_load(&remaps), commits, retries);
    OK(mmn_unsubscribe(iv));
    munmap((void *)(uintptr_t)race_addr, (size_t)ps);
}

int main(void) {
    mem_fd = open("/proc/self/mem", O_RDONLY);
    if (mem_fd < 0) {
        perror("/proc/self/mem");
        return 1;
    }
    OK(mmn_init(MMN_ABI_VERSION, NULL));
    sequential();
    race(1.0);
    OK(mmn_fini());
    close(mem_fd);
    return finish("read_retry_remap");
}
