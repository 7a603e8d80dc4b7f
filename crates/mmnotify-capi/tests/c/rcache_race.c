/* Two threads: A loops get -> judge -> put on a buffer; B unmaps and re-maps the same address
 * with new contents (munmap + MAP_FIXED_NOREPLACE, and MAP_FIXED over live memory). B keeps a
 * sequence counter, odd while a remap is in progress. A get is judged when the counter was the
 * same even value before the get and after the check: the last remap had returned before the
 * get began, so the registration must record what is mapped now: the same page frames (where
 * this process may read frame numbers: as root), and the same contents (for registrations
 * whose contents did not change while `reg` recorded them; B writes new memory after mapping
 * it, so a registration made in between legitimately saw it before the write). Zero stale
 * hits; the counts show that the race happened. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/mman.h>

#include "registrar.h"

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

#define PAGES 2

static atomic_ulong seq; /* odd: a remap is in progress */
static struct registrar reg;
static mmn_rcache_t cache;
static char *base;
static size_t len;
static atomic_int stop;
static atomic_long remaps;
static atomic_long a_gets; /* gets completed by the getting thread */
static int control_fd = -1; /* control run: punch holes in this memfd instead of remapping */

static void fill(uint64_t gen) {
    for (size_t i = 0; i < PAGES; i++)
        *(volatile uint64_t *)(base + i * (size_t)page_size()) = gen * 100 + i + 1;
}

static void *remapper(void *arg) {
    (void)arg;
    uint64_t gen = 1;
    while (!atomic_load(&stop)) {
        atomic_fetch_add(&seq, 1); /* odd */
        void *q = base;
        if (control_fd >= 0) {
            CHECK(fallocate(control_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, (off_t)len) == 0, "punch");
        } else if (gen % 2) {
            CHECK(munmap(base, len) == 0, "munmap");
            q = mmap(base, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        } else {
            q = mmap(base, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        }
        CHECK(q == base, "re-map at the same address");
        fill(++gen);
        atomic_fetch_add(&seq, 1); /* even */
        atomic_fetch_add(&remaps, 1);
        if (rand() % 2) {
            /* Let the getter finish a couple of gets on this mapping (whatever its speed, e.g.
             * under a sanitizer), so that judged windows exist; the other half races freely. */
            long g0 = atomic_load(&a_gets);
            double until = now_s() + 0.05;
            while (atomic_load(&a_gets) < g0 + 2 && now_s() < until) usleep(20);
        } else {
            usleep((useconds_t)(rand() % 400));
        }
    }
    return NULL;
}

struct outcome {
    long stale, judged;
    mmn_rcache_stats_t st;
};

static struct outcome run(double seconds) {
    uint64_t a = (uint64_t)(uintptr_t)base;
    atomic_store(&stop, 0);
    atomic_store(&remaps, 0);
    pthread_t b;
    pthread_create(&b, NULL, remapper, NULL);
    long gets = 0, failed = 0, judged = 0, raced = 0, stale = 0, hits_judged = 0;
    long last_reg = -1;
    /* At least `seconds`, and until 50 judged gets and 100 changes (a loaded machine may starve
     * one thread), at most 10 s. */
    double start = now_s();
    for (;;) {
        double t = now_s() - start;
        if (t >= 10 || (t >= seconds && judged >= 50 && atomic_load(&remaps) >= 100)) break;
        unsigned long s0 = atomic_load(&seq);
        mmn_region_t r;
        mmn_region_info_t info;
        int rc = mmn_rcache_get(cache, a, len, MMN_ACCESS_READ, &r, &info);
        if (rc != 0) {
            /* The memory was unmapped when the cache looked, or reg found it gone. */
            CHECK(rc == MMN_ENOMEM || rc == MMN_ECALLBACK || rc == MMN_EAGAIN, "get: %d %s", rc, mmn_last_error());
            failed++;
            continue;
        }
        gets++;
        const char *why = "";
        int current = record_is_current(&reg, info.reg_handle, &why);
        unsigned long s1 = atomic_load(&seq);
        if (s0 == s1 && s0 % 2 == 0) {
            judged++;
            if ((long)info.reg_handle == last_reg) hits_judged++;
            if (!current) {
                stale++;
                if (control_fd < 0)
                    fprintf(stderr, "STALE hit: record %lu: %s\n", (unsigned long)info.reg_handle, why);
            }
        } else {
            raced++;
        }
        last_reg = (long)info.reg_handle;
        OK(mmn_rcache_put(r));
        atomic_fetch_add(&a_gets, 1);
    }
    atomic_store(&stop, 1);
    pthread_join(b, NULL);
    struct outcome o = {stale, judged, {0}};
    OK(mmn_rcache_stats(cache, &o.st));
    printf("%s: %ld %s; %ld gets (%ld judged, %ld of them repeat registrations, %ld overlapped a change), "
           "%ld failed on unmapped memory, %ld STALE\n",
           control_fd >= 0 ? "control" : "race", atomic_load(&remaps), control_fd >= 0 ? "hole punches" : "remaps", gets, judged,
           hits_judged, raced, failed, stale);
    printf("  cache: hits %lu misses %lu invalidations %lu collisions %lu registrations %lu deregistrations %lu\n",
           (unsigned long)o.st.hits, (unsigned long)o.st.misses, (unsigned long)o.st.invalidations,
           (unsigned long)o.st.collisions, (unsigned long)o.st.registrations, (unsigned long)o.st.deregistrations);
    return o;
}

int main(void) {
    len = PAGES * (size_t)page_size();
    OK(mmn_init(MMN_ABI_VERSION, NULL));
    registrar_init(&reg);
    reg.writer_seq = &seq;
    printf("judging by %s\n", reg.pfns_visible ? "page frames and contents" : "contents only (frame numbers hidden)");

    /* The race. */
    cache = make_cache(&reg, 0);
    base = mmap(quiet_addr(), len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    CHECK(base != MAP_FAILED, "mmap");
    fill(1);
    struct outcome o = run(1.5);
    CHECK(o.stale == 0, "%ld stale hits", o.stale);
    CHECK(atomic_load(&remaps) >= 20 && o.judged >= 50 && o.st.hits >= 50 && o.st.invalidations + o.st.collisions >= 10,
          "the test must have raced: remaps %ld judged %ld hits %lu invalidations+collisions %lu",
          atomic_load(&remaps), o.judged,
          (unsigned long)o.st.hits, (unsigned long)(o.st.invalidations + o.st.collisions));
    OK(mmn_rcache_destroy(cache));
    munmap(base, len);

    /* Control: the same judge on a cache told to trust memory it cannot see (MMN_BLIND_TRUST),
     * while the other thread punches holes in the shared file behind it (no event): it must
     * find stale hits, or it could not find them above either. */
    cache = make_cache_policy(&reg, 0, MMN_BLIND_TRUST);
    control_fd = memfd_create("mmn-race-control", 0);
    CHECK(ftruncate(control_fd, (off_t)len) == 0, "ftruncate");
    base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, control_fd, 0);
    CHECK(base != MAP_FAILED, "mmap memfd");
    fill(1);
    struct outcome c = run(0.5);
    CHECK(c.stale > 0, "the control found no stale hit: the judge cannot fail");
    OK(mmn_rcache_destroy(cache));
    munmap(base, len);
    close(control_fd);

    CHECK(atomic_load(&reg.regs) == atomic_load(&reg.deregs) && atomic_load(&reg.double_deregs) == 0,
          "every registration deregistered exactly once: %ld regs, %ld deregs, %ld double",
          atomic_load(&reg.regs), atomic_load(&reg.deregs), atomic_load(&reg.double_deregs));
    OK(mmn_fini());
    registrar_free(&reg);
    return finish("rcache_race");
}
