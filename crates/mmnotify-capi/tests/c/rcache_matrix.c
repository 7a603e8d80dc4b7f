/* The registration cache's stale-address matrix through the C API: the same paths as
 * `mmnotify rcache-check` (munmap whole/partial, raw syscall, other thread, DONTNEED, FREE,
 * REMOVE, mremap move, MAP_FIXED over, brk shrink, shmdt, punch hole, ftruncate), each with the
 * plain call and with the cooperative wrapper where there is one:
 *   map, fill with A, get -> put, the operation, new memory at the same address filled with B,
 *   get again: it must miss, and the new registration must record B (and, where frame
 *   numbers are visible, the frames mapped now). Zero stale hits. */
#define _GNU_SOURCE
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/syscall.h>

#include "registrar.h"

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

#define PAGES 4

enum kind { ANON, MEMFD, SYSV, BRK };
enum path {
    MUNMAP_WHOLE, MUNMAP_PARTIAL, RAW_SYSCALL, OTHER_THREAD, DONTNEED, FREE, REMOVE,
    MREMAP_MOVE, MAP_FIXED_OVER, BRK_SHRINK, SHMDT, PUNCH_HOLE, FTRUNCATE, NPATHS
};
static const char *names[NPATHS] = {
    "munmap whole", "munmap partial", "syscall(SYS_munmap)", "munmap, other thread",
    "MADV_DONTNEED", "MADV_FREE", "MADV_REMOVE (memfd)", "mremap move", "MAP_FIXED over",
    "brk shrink", "shmdt", "punch hole", "ftruncate"};

static enum kind kind_of(enum path p) {
    switch (p) {
    case REMOVE: case PUNCH_HOLE: case FTRUNCATE: return MEMFD;
    case SHMDT: return SYSV;
    case BRK_SHRINK: return BRK;
    default: return ANON;
    }
}
static int has_wrapper(enum path p) { return p != MAP_FIXED_OVER && p != BRK_SHRINK; }

static struct registrar reg;
static mmn_rcache_t cache;
static size_t len;
static long stale_total, cells, skipped;

struct mem {
    enum kind kind;
    char *p;
    int fd, shmid;
};

static void fill(char *p, size_t n, uint64_t tag) {
    for (size_t i = 0; i < n / (size_t)page_size(); i++)
        *(volatile uint64_t *)(p + i * (size_t)page_size()) = tag * 100 + i;
}

static int map_at(struct mem *m, void *hint, int fixed) {
    if (!hint && m->kind != BRK) {
        hint = quiet_addr(); /* nobody else maps there: the address stays free for the re-map */
        fixed = fixed || m->kind != SYSV;
    }
    int fl = fixed ? MAP_FIXED_NOREPLACE : 0;
    switch (m->kind) {
    case ANON:
        m->p = mmap(hint, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | fl, -1, 0);
        break;
    case MEMFD:
        if (m->fd < 0) {
            m->fd = memfd_create("mmn-matrix", 0);
            CHECK(ftruncate(m->fd, (off_t)len) == 0, "ftruncate");
        }
        m->p = mmap(hint, len, PROT_READ | PROT_WRITE, MAP_SHARED | fl, m->fd, 0);
        break;
    case SYSV:
        m->shmid = shmget(IPC_PRIVATE, len, IPC_CREAT | 0600);
        m->p = shmat(m->shmid, hint, 0);
        shmctl(m->shmid, IPC_RMID, NULL);
        if (m->p == (void *)-1) m->p = MAP_FAILED;
        break;
    case BRK: {
        char *cur = sbrk(0);
        size_t pad = (size_t)((page_size() - (uintptr_t)cur % (uintptr_t)page_size()) % (uintptr_t)page_size());
        if (fixed) pad = 0;
        char *q = sbrk((intptr_t)(pad + len));
        m->p = q == (void *)-1 ? MAP_FAILED : q + pad;
        break;
    }
    }
    return m->p == MAP_FAILED ? -1 : 0;
}


struct thread_arg { char *p; int wrapper; int rc; };
static void *munmap_in_thread(void *arg) {
    struct thread_arg *t = arg;
    t->rc = t->wrapper ? mmn_munmap(t->p, len) : munmap(t->p, len);
    return NULL;
}

/* One cell: returns 1 if stale. */
static int cell(enum path path, int wrapper) {
    struct mem m = {.kind = kind_of(path), .fd = -1, .shmid = -1};
    size_t ps = (size_t)page_size();
    if (map_at(&m, NULL, 0) != 0) {
        printf("  %-22s %-8s could not map memory\n", names[path], wrapper ? "wrapper" : "plain");
        check_failures++;
        return 0;
    }
    char *p = m.p;
    uint64_t a = (uint64_t)(uintptr_t)p;
    fill(p, len, 1);

    mmn_region_t r;
    mmn_region_info_t info;
    OK(mmn_rcache_get(cache, a, len, MMN_ACCESS_READ | MMN_ACCESS_WRITE, &r, &info));
    int cached = info.cached;
    uint64_t first = info.reg_handle;
    OK(mmn_rcache_put(r));
    long inval_before = atomic_load(&reg.invalidated);

    int rc = 0;
    void *tmp;
    switch (path) {
    case MUNMAP_WHOLE:
        rc = wrapper ? mmn_munmap(p, len) : munmap(p, len);
        break;
    case MUNMAP_PARTIAL:
        rc = wrapper ? mmn_munmap(p + ps, ps) : munmap(p + ps, ps);
        break;
    case RAW_SYSCALL:
        rc = wrapper ? mmn_munmap(p, len) : (int)syscall(SYS_munmap, p, len);
        break;
    case OTHER_THREAD: {
        struct thread_arg t = {p, wrapper, 0};
        pthread_t th;
        pthread_create(&th, NULL, munmap_in_thread, &t);
        pthread_join(th, NULL);
        rc = t.rc;
        break;
    }
    case DONTNEED:
        rc = wrapper ? mmn_madvise(p, len, MADV_DONTNEED) : madvise(p, len, MADV_DONTNEED);
        break;
    case FREE:
        rc = wrapper ? mmn_madvise(p, len, MADV_FREE) : madvise(p, len, MADV_FREE);
        break;
    case REMOVE:
        rc = wrapper ? mmn_madvise(p, len, MADV_REMOVE) : madvise(p, len, MADV_REMOVE);
        break;
    case MREMAP_MOVE: {
        void *spot = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (wrapper) {
            rc = mmn_mremap(p, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, spot, &tmp);
        } else {
            tmp = mremap(p, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, spot);
            rc = tmp == MAP_FAILED ? -1 : 0;
        }
        munmap(spot, len); /* the moved memory, now at spot */
        break;
    }
    case MAP_FIXED_OVER:
        tmp = mmap(p, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        rc = tmp == p ? 0 : -1;
        break;
    case BRK_SHRINK:
        if (sbrk(0) != p + len) {
            /* malloc moved the heap's end past our pages: shrinking would cut its memory. */
            printf("  %-22s %-8s skipped: the heap grew past the test's pages\n", names[path], "plain");
            skipped++;
            return 0;
        }
        rc = sbrk(-(intptr_t)len) == (void *)-1 ? -1 : 0;
        break;
    case SHMDT:
        rc = wrapper ? mmn_shmdt(p) : shmdt(p);
        break;
    case PUNCH_HOLE:
        rc = wrapper ? mmn_punch_hole(m.fd, 0, len)
                     : fallocate(m.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, (off_t)len);
        break;
    case FTRUNCATE:
        rc = wrapper ? mmn_ftruncate(m.fd, 0) : ftruncate(m.fd, 0);
        if (rc == 0) rc = ftruncate(m.fd, (off_t)len);
        break;
    default:
        break;
    }
    CHECK(rc == 0, "%s (%s): the operation failed: %d", names[path], wrapper ? "wrapper" : "plain", rc);

    /* New memory at the same address, contents B. */
    switch (path) {
    case MUNMAP_WHOLE: case RAW_SYSCALL: case OTHER_THREAD: case MREMAP_MOVE:
        CHECK(map_at(&m, p, 1) == 0 && m.p == p, "%s: re-map at the same address", names[path]);
        break;
    case MUNMAP_PARTIAL:
        tmp = mmap(p + ps, ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        CHECK(tmp == p + ps, "re-map one page");
        break;
    case BRK_SHRINK:
        CHECK(map_at(&m, p, 1) == 0 && m.p == p, "brk grows back at the same address");
        break;
    case SHMDT:
        CHECK(map_at(&m, p, 1) == 0 && m.p == p, "shmat at the same address");
        break;
    default:
        break; /* same mapping, new pages on the next write */
    }
    fill(p, len, 2);

    OK(mmn_rcache_get(cache, a, len, MMN_ACCESS_READ | MMN_ACCESS_WRITE, &r, &info));
    const char *why = "";
    int hit = info.reg_handle == first;
    int current = record_is_current(&reg, info.reg_handle, &why);
    int stale = hit || !current;
    if (hit) why = "the second get hit the old registration";
    OK(mmn_rcache_put(r));
    long inval = atomic_load(&reg.invalidated) - inval_before;
    if (cached && !stale)
        CHECK(inval >= 1, "%s (%s): the invalidated-region callback was not called", names[path],
              wrapper ? "wrapper" : "plain");
    printf("  %-22s %-8s %-8s %s%s\n", names[path], wrapper ? "wrapper" : "plain",
           cached ? "cached" : "uncached", stale ? "STALE: " : "pass (miss, new contents)", stale ? why : "");

    /* Clean up. */
    switch (m.kind) {
    case ANON: munmap(p, len); break;
    case MEMFD: munmap(p, len); close(m.fd); break;
    case SYSV: shmdt(p); break;
    case BRK: if (sbrk(0) == p + len) { if (sbrk(-(intptr_t)len)) {} } break;
    }
    cells++;
    return stale;
}

int main(void) {
    len = PAGES * (size_t)page_size();
    OK(mmn_init(MMN_ABI_VERSION, NULL));
    registrar_init(&reg);
    cache = make_cache(&reg, 0);
    printf("stale-address matrix (frame numbers %s)\n", reg.pfns_visible ? "compared" : "hidden: contents compared");
    for (int p = 0; p < NPATHS; p++) {
        stale_total += cell((enum path)p, 0);
        if (has_wrapper((enum path)p)) stale_total += cell((enum path)p, 1);
    }
    /* Control: the judge must be able to fail. A cache told to trust blind memory
     * (MMN_BLIND_TRUST) cannot see a plain hole punch, so that cell must come out stale. */
    mmn_rcache_t careful = cache;
    cache = make_cache_policy(&reg, 0, MMN_BLIND_TRUST);
    printf("control (MMN_BLIND_TRUST, a documented blind spot; must be judged stale):\n");
    int control = cell(PUNCH_HOLE, 0);
    cells--;
    CHECK(control == 1, "the control cell was not judged stale: the judge cannot fail");
    OK(mmn_rcache_destroy(cache));
    cache = careful;
    mmn_rcache_stats_t st;
    OK(mmn_rcache_stats(cache, &st));
    printf("cells %ld, skipped %ld, stale %ld; cache: hits %lu misses %lu invalidations %lu registrations %lu\n",
           cells, skipped, stale_total, (unsigned long)st.hits, (unsigned long)st.misses,
           (unsigned long)st.invalidations, (unsigned long)st.registrations);
    CHECK(stale_total == 0, "%ld stale hit(s)", stale_total);
    CHECK(cells >= 20, "only %ld cells ran", cells);
    OK(mmn_rcache_destroy(cache));
    CHECK(atomic_load(&reg.regs) == atomic_load(&reg.deregs) && atomic_load(&reg.double_deregs) == 0,
          "every registration deregistered exactly once: %ld regs, %ld deregs, %ld double",
          atomic_load(&reg.regs), atomic_load(&reg.deregs), atomic_load(&reg.double_deregs));
    OK(mmn_fini());
    registrar_free(&reg);
    return finish("rcache_matrix");
}
