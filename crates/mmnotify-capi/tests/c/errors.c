/* Every error code of mmnotify.h, provoked at least once, each with a non-empty last-error
 * message and an mmn_strerror text; and a misbehaving callback reported in the statistics. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include "check.h"

static const struct { int code; const char *name; } codes[] = {
    {MMN_EPERM, "MMN_EPERM"},         {MMN_EBADF, "MMN_EBADF"},         {MMN_ECHILD, "MMN_ECHILD"},
    {MMN_EAGAIN, "MMN_EAGAIN"},       {MMN_ENOMEM, "MMN_ENOMEM"},       {MMN_EFAULT, "MMN_EFAULT"},
    {MMN_EBUSY, "MMN_EBUSY"},         {MMN_EEXIST, "MMN_EEXIST"},       {MMN_EINVAL, "MMN_EINVAL"},
    {MMN_ENOSPC, "MMN_ENOSPC"},       {MMN_EDEADLK, "MMN_EDEADLK"},     {MMN_ENOSYS, "MMN_ENOSYS"},
    {MMN_ENOTSUP, "MMN_ENOTSUP"},     {MMN_ESHUTDOWN, "MMN_ESHUTDOWN"}, {MMN_ETIMEDOUT, "MMN_ETIMEDOUT"},
    {MMN_EIO, "MMN_EIO"},             {MMN_ECALLBACK, "MMN_ECALLBACK"}, {MMN_EPANIC, "MMN_EPANIC"},
};
#define NCODES (sizeof codes / sizeof codes[0])
static int seen[NCODES];

static void saw(int code, const char *what, const char *message) {
    for (size_t i = 0; i < NCODES; i++)
        if (codes[i].code == code) {
            if (!seen[i]) printf("%-14s %-44s %s\n", codes[i].name, what, message);
            seen[i] = 1;
            return;
        }
    CHECK(0, "%s returned %d, which is not an MMN_E* code", what, code);
}

/* A call in this process that must fail with `code`. */
#define EXPECT(call, code)                                                                  \
    do {                                                                                    \
        int rc_ = (call);                                                                   \
        CHECK(rc_ == (code), "%s returned %d (%s), want %s", #call, rc_, mmn_strerror(rc_), #code); \
        CHECK(mmn_last_error_code() == rc_, "last error code %d", mmn_last_error_code());  \
        CHECK(strlen(mmn_last_error()) > 0, "empty last-error message");                    \
        saw(rc_, #call, mmn_last_error());                                                  \
    } while (0)

/* ---- creation errors, in children whose userfaultfd is refused by a seccomp filter ---- */
static int init_with_userfaultfd_failing(int errno_value) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        struct sock_filter f[] = {
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_userfaultfd, 0, 1),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (unsigned)errno_value),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        };
        struct sock_fprog prog = {sizeof f / sizeof f[0], f};
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0)
            _exit(200);
        int rc = mmn_init(MMN_ABI_VERSION, NULL);
        printf("  (child with userfaultfd -> errno %d: mmn_init %d: %s)\n", errno_value, rc, mmn_last_error());
        fflush(stdout);
        _exit(rc < 0 ? -rc : 0);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? -WEXITSTATUS(st) : -999;
}

/* ---- callbacks ---- */
struct selfish {
    mmn_interval_t self;
    int unsubscribe_rc, read_begin_rc, calls;
};
static int selfish_cb(void *ctx, const mmn_invalidation_t *inv) {
    struct selfish *s = ctx;
    mmn_seq_t seq;
    s->unsubscribe_rc = mmn_unsubscribe(inv->interval);
    s->read_begin_rc = mmn_read_begin(inv->interval, &seq);
    s->calls++;
    return 0;
}

struct slow {
    atomic_int entered, armed;
};
static int slow_cb(void *ctx, const mmn_invalidation_t *inv) {
    (void)inv;
    struct slow *s = ctx;
    if (atomic_load(&s->armed)) {
        atomic_store(&s->entered, 1);
        usleep(300 * 1000);
    }
    return 0;
}
static void *munmap_thread(void *p) {
    munmap(p, (size_t)page_size());
    return NULL;
}

static int misbehaving_cb(void *ctx, const mmn_invalidation_t *inv) {
    (void)ctx;
    (void)inv;
    return 42;
}
static int noop_cb(void *ctx, const mmn_invalidation_t *inv) {
    (void)ctx;
    (void)inv;
    return 0;
}

struct regctx {
    int fail, madvise_inside, get_inside;
    mmn_rcache_t self;
    int inner_get_rc;
    int deregs;
};
static int reg_cb(void *ctx, uint64_t start, uint64_t len, uint32_t access, uint64_t *h) {
    (void)access;
    struct regctx *r = ctx;
    if (r->fail) return -7;
    if (r->madvise_inside) OK(mmn_madvise((void *)(uintptr_t)start, len, MADV_DONTNEED));
    if (r->get_inside) {
        mmn_region_t inner;
        r->inner_get_rc = mmn_rcache_get(r->self, start, len, MMN_ACCESS_READ, &inner, NULL);
    }
    *h = start;
    return 0;
}
static int dereg_cb(void *ctx, uint64_t start, uint64_t len, uint64_t h) {
    (void)start;
    (void)len;
    (void)h;
    ((struct regctx *)ctx)->deregs++;
    return 0;
}
static mmn_rcache_t cache_with(struct regctx *r, uint64_t max_regions, uint32_t max_attempts) {
    mmn_rcache_params_t p;
    memset(&p, 0, sizeof p);
    p.reg = reg_cb;
    p.dereg = dereg_cb;
    p.ctx = r;
    p.max_regions = max_regions;
    p.max_attempts = max_attempts;
    mmn_rcache_t c;
    OK(mmn_rcache_create(&p, &c));
    return c;
}

static void *map_page(void) {
    void *p = mmap(NULL, (size_t)page_size(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) exit(1);
    memset(p, 1, (size_t)page_size());
    return p;
}
#define A(p) ((uint64_t)(uintptr_t)(p))

static int find_uffd(void) {
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int found = -1;
    char path[300], target[128];
    while (d && (e = readdir(d))) {
        snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
        ssize_t n = readlink(path, target, sizeof target - 1);
        if (n > 0) {
            target[n] = 0;
            if (strstr(target, "userfaultfd")) found = atoi(e->d_name);
        }
    }
    if (d) closedir(d);
    return found;
}

int main(void) {
    long ps = page_size();
    mmn_features_t f;
    /* Not initialised. */
    EXPECT(mmn_features(&f), MMN_ESHUTDOWN);
    EXPECT(mmn_fini(), MMN_ESHUTDOWN);

    /* Creation errors, each in a child whose userfaultfd(2) fails with one errno. */
    int rc = init_with_userfaultfd_failing(ENOSYS);
    CHECK(rc == MMN_ENOSYS, "userfaultfd ENOSYS -> %d", rc);
    saw(rc, "mmn_init (userfaultfd: ENOSYS)", "(in a child, see above)");
    rc = init_with_userfaultfd_failing(EPERM);
    CHECK(rc == MMN_EPERM, "userfaultfd EPERM -> %d", rc);
    saw(rc, "mmn_init (userfaultfd: EPERM)", "(in a child, see above)");
    rc = init_with_userfaultfd_failing(EINVAL);
    CHECK(rc == MMN_ENOTSUP, "userfaultfd EINVAL (no USER_MODE_ONLY) -> %d", rc);
    saw(rc, "mmn_init (userfaultfd: EINVAL)", "(in a child, see above)");

    EXPECT(mmn_init(MMN_ABI_VERSION + 1, NULL), MMN_EINVAL);
    OK(mmn_init(MMN_ABI_VERSION, NULL));
    mmn_init_options_t o;
    memset(&o, 0, sizeof o);
    o.fork_events = MMN_FORK_EVENTS_REQUIRED;
    EXPECT(mmn_init(MMN_ABI_VERSION, &o), MMN_EEXIST);
    o.fork_events = 7;
    EXPECT(mmn_init(MMN_ABI_VERSION, &o), MMN_EINVAL);
    CHECK(mmn_init(MMN_ABI_VERSION, NULL) == 2, "a second init counts a reference");
    CHECK(mmn_fini() == 1, "one reference left");

    /* Pointers, ranges, handles. */
    mmn_interval_t iv;
    EXPECT(mmn_features(NULL), MMN_EFAULT);
    EXPECT(mmn_subscribe(4096, 4096, NULL, NULL, 0, &iv), MMN_EFAULT);
    EXPECT(mmn_subscribe(4096, 0, noop_cb, NULL, 0, &iv), MMN_EINVAL);
    EXPECT(mmn_subscribe(UINT64_MAX - 10, 100, noop_cb, NULL, 0, &iv), MMN_EINVAL);
    EXPECT(mmn_subscribe(4096, 4096, noop_cb, NULL, 0x80, &iv), MMN_EINVAL);
    void *hole = quiet_addr(); /* nothing is mapped there, and nobody maps there */
    EXPECT(mmn_subscribe(A(hole), (uint64_t)ps, noop_cb, NULL, 0, &iv), MMN_ENOMEM);
    EXPECT(mmn_watch(A(hole) + 1, (uint64_t)ps), MMN_EINVAL);
    mmn_interval_t zero = {0};
    EXPECT(mmn_unsubscribe(zero), MMN_EBADF);
    void *p = map_page();
    OK(mmn_subscribe(A(p), (uint64_t)ps, noop_cb, NULL, 0, &iv));
    mmn_interval_t stale = iv;
    OK(mmn_unsubscribe(iv));
    EXPECT(mmn_unsubscribe(stale), MMN_EBADF);
    mmn_seq_t seq;
    EXPECT(mmn_read_begin(stale, &seq), MMN_EBADF);
    EXPECT(mmn_read_retry(stale, NULL), MMN_EFAULT);
    OK(mmn_subscribe(A(p), (uint64_t)ps, noop_cb, NULL, 0, &iv));
    mmn_interval_t other;
    OK(mmn_subscribe(A(p), (uint64_t)ps, noop_cb, NULL, 0, &other));
    OK(mmn_read_begin(iv, &seq));
    EXPECT(mmn_read_retry(other, &seq), MMN_EINVAL);
    OK(mmn_unsubscribe(other));

    /* A handle of another kind. */
    struct regctx rc0 = {0};
    mmn_rcache_t c = cache_with(&rc0, 0, 0);
    mmn_interval_t foreign = {c.bits};
    EXPECT(mmn_unsubscribe(foreign), MMN_EBADF);

    /* Deadlocks refused from inside the subscription's own callback (cooperative call: the
     * callback runs on this thread). */
    void *q = map_page();
    struct selfish s = {0};
    OK(mmn_subscribe(A(q), (uint64_t)ps, selfish_cb, &s, 0, &s.self));
    OK(mmn_munmap(q, (size_t)ps));
    CHECK(s.calls >= 1, "the selfish callback ran");
    CHECK(s.unsubscribe_rc == MMN_EDEADLK, "unsubscribe from its own callback: %d", s.unsubscribe_rc);
    CHECK(s.read_begin_rc == MMN_EDEADLK, "read_begin from a callback: %d", s.read_begin_rc);
    saw(s.unsubscribe_rc, "mmn_unsubscribe (from its own callback)", "(recorded in the callback)");
    OK(mmn_unsubscribe(s.self)); /* after the callback: fine */

    /* A misbehaving callback is reported, not ignored. */
    void *m = map_page();
    mmn_interval_t bad;
    OK(mmn_subscribe(A(m), (uint64_t)ps, misbehaving_cb, NULL, 0, &bad));
    OK(mmn_munmap(m, (size_t)ps));
    mmn_interval_stats_t st;
    OK(mmn_interval_stats(bad, &st));
    CHECK(st.callback_errors >= 1 && st.last_callback_error == 42, "misbehaviour counted: %lu, last %d",
          (unsigned long)st.callback_errors, st.last_callback_error);
    printf("%-14s %-44s callback_errors %lu, last %d\n", "(reported)", "a callback returning 42",
           (unsigned long)st.callback_errors, st.last_callback_error);
    OK(mmn_unsubscribe(bad));

    /* Timeout: an invalidation held open by a slow callback on the dispatcher. */
    void *t = map_page();
    struct slow sl = {0};
    mmn_interval_t slow_iv;
    OK(mmn_subscribe(A(t), (uint64_t)ps, slow_cb, &sl, 0, &slow_iv));
    atomic_store(&sl.armed, 1);
    pthread_t th;
    pthread_create(&th, NULL, munmap_thread, t);
    double until = now_s() + 5;
    while (!atomic_load(&sl.entered) && now_s() < until) usleep(1000);
    CHECK(atomic_load(&sl.entered), "the slow callback never ran");
    EXPECT(mmn_read_begin_timeout(slow_iv, 20000, &seq), MMN_ETIMEDOUT);
    pthread_join(th, NULL);
    OK(mmn_read_begin(slow_iv, &seq));
    OK(mmn_unsubscribe(slow_iv));

    /* The registration cache. */
    mmn_rcache_params_t bad_params;
    memset(&bad_params, 0, sizeof bad_params);
    mmn_rcache_t bc;
    EXPECT(mmn_rcache_create(&bad_params, &bc), MMN_EFAULT);
    mmn_region_t r1, r2;
    void *b1 = map_page(), *b2 = map_page();
    EXPECT(mmn_rcache_get(c, A(b1), (uint64_t)ps, 0, &r1, NULL), MMN_EINVAL);
    rc0.fail = 1;
    EXPECT(mmn_rcache_get(c, A(b1), (uint64_t)ps, MMN_ACCESS_READ, &r1, NULL), MMN_ECALLBACK);
    rc0.fail = 0;
    OK(mmn_rcache_get(c, A(b1), (uint64_t)ps, MMN_ACCESS_READ, &r1, NULL));
    EXPECT(mmn_rcache_destroy(c), MMN_EBUSY);
    OK(mmn_rcache_put(r1));
    EXPECT(mmn_rcache_put(r1), MMN_EBADF);
    rc0.get_inside = 1;
    rc0.self = c;
    OK(mmn_rcache_get(c, A(b2), (uint64_t)ps, MMN_ACCESS_READ, &r2, NULL));
    CHECK(rc0.inner_get_rc == MMN_EDEADLK, "get from the cache's own reg callback: %d", rc0.inner_get_rc);
    OK(mmn_rcache_put(r2));
    rc0.get_inside = 0;
    OK(mmn_rcache_destroy(c));
    EXPECT(mmn_rcache_flush(c), MMN_EBADF);

    struct regctx rc1 = {0};
    mmn_rcache_t small = cache_with(&rc1, 1, 0);
    OK(mmn_rcache_get(small, A(b1), (uint64_t)ps, MMN_ACCESS_READ, &r1, NULL));
    EXPECT(mmn_rcache_get(small, A(b2), (uint64_t)ps, MMN_ACCESS_READ, &r2, NULL), MMN_ENOSPC);
    OK(mmn_rcache_put(r1));
    OK(mmn_rcache_destroy(small));

    struct regctx rc2 = {.madvise_inside = 1};
    mmn_rcache_t unstable = cache_with(&rc2, 0, 1);
    EXPECT(mmn_rcache_get(unstable, A(b1), (uint64_t)ps, MMN_ACCESS_READ, &r1, NULL), MMN_EAGAIN);
    OK(mmn_rcache_destroy(unstable));
    CHECK(rc1.deregs >= 1 && rc2.deregs >= 1, "registrations were deregistered");

    /* The last fini with a subscription alive. */
    EXPECT(mmn_fini(), MMN_EBUSY);

    /* A panic inside the library becomes an error code. */
    EXPECT(mmn_selftest_panic(), MMN_EPANIC);
    OK(mmn_features(&f)); /* and the library goes on */

    /* A forked child fails closed. */
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        int crc = mmn_read_begin(iv, &seq);
        _exit(crc < 0 ? -crc : 0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    rc = WIFEXITED(status) ? -WEXITSTATUS(status) : -999;
    CHECK(rc == MMN_ECHILD, "read_begin in a forked child: %d", rc);
    saw(rc, "mmn_read_begin (in a forked child)", "(in the child)");

    /* The watcher fails: its userfaultfd replaced behind its back. Last, it cannot recover. */
    int ufd = find_uffd();
    CHECK(ufd >= 0, "found the watcher's userfaultfd in /proc/self/fd");
    if (ufd >= 0) {
        int null = open("/dev/null", O_RDONLY);
        dup2(null, ufd);
        close(null);
        until = now_s() + 5;
        do {
            rc = mmn_read_begin(iv, &seq);
            if (rc == MMN_EIO) break;
            usleep(1000);
        } while (now_s() < until);
        EXPECT(rc, MMN_EIO);
        CHECK(mmn_read_retry(iv, &seq) != 0, "a failed watcher fails closed: read_retry says retry");
    }
    OK(mmn_unsubscribe(iv));
    munmap(p, (size_t)ps);
    munmap(b1, (size_t)ps);
    munmap(b2, (size_t)ps);

    /* mmn_strerror knows every code and negated errnos. */
    for (size_t i = 0; i < NCODES; i++) {
        const char *text = mmn_strerror(codes[i].code);
        CHECK(text && strlen(text) > 0 && strcmp(text, "not an error code") != 0, "strerror(%s)", codes[i].name);
        CHECK(seen[i], "%s was never provoked", codes[i].name);
    }
    CHECK(strstr(mmn_strerror(-EPIPE), "system call failed") != NULL, "strerror of a negated errno");
    CHECK(mmn_fini() == 0, "fini after everything was released");
    return finish("errors");
}
