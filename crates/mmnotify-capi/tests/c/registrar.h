/* A pinning registrar for the cache tests. `reg` faults the range in for writing and pins its
 * pages the way a device registration does: it vmsplice()s them into a pipe, which holds a
 * reference to each page until `dereg` closes the pipe (so a frame cannot be freed and reused
 * while registered). It also records each page's first word and frame number.
 *
 * The judge, `record_is_current`, reads what the *pinned pages* hold now (tee() the pipe into
 * a scratch pipe and read that: this is what a device using the registration would read) and
 * compares it with what the process maps at the address now. A registration whose pages are
 * no longer the mapped ones reads the old contents: a stale registration. */
#ifndef MMN_TEST_REGISTRAR_H
#define MMN_TEST_REGISTRAR_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
static mmn_rcache_t make_cache(struct registrar *r, uint64_t max_regions) {
    return make_cache_policy(r, max_regions, MMN_BLIND_UNCACHED);
}

#endif
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/uio.h>

#include "check.h"

#define MAX_RECORDS 65536
#define MAX_PAGES 8

struct record {
    uint64_t start, len;
    uint64_t words[MAX_PAGES];
    uint64_t pfns[MAX_PAGES];
    int contents_reliable; /* the contents did not change while they were recorded */
    int pipe_r, pipe_w;    /* the pin: the pages, spliced into this pipe */
    int released;
};

struct registrar {
    pthread_mutex_t lock;
    struct record *records;
    atomic_long attempts, regs, deregs, double_deregs, invalidated;
    /* If set: a counter that is odd while another thread changes the memory (rcache_race). */
    atomic_ulong *writer_seq;
    int mem_fd, pagemap_fd;
    int pfns_visible;
};

static int read_word(struct registrar *r, uint64_t addr, uint64_t *out) {
    return pread(r->mem_fd, out, sizeof *out, (off_t)addr) == (ssize_t)sizeof *out ? 0 : -1;
}

/* The frame number mapped at addr, 0 if not present or hidden. */
static uint64_t read_pfn(struct registrar *r, uint64_t addr) {
    uint64_t e = 0;
    if (pread(r->pagemap_fd, &e, sizeof e, (off_t)(addr / (uint64_t)page_size() * 8)) != (ssize_t)sizeof e)
        return 0;
    if (!(e >> 63)) return 0;
    return e & ((1ULL << 55) - 1);
}

static int rec_reg(void *ctx, uint64_t start, uint64_t len, uint32_t access, uint64_t *handle) {
    (void)access;
    struct registrar *r = ctx;
    uint64_t pages = len / (uint64_t)page_size();
    if (pages > MAX_PAGES) pages = MAX_PAGES;
    long id = atomic_fetch_add(&r->attempts, 1);
    if (id >= MAX_RECORDS) return -2;
    struct record *rec = &r->records[id];
    rec->start = start;
    rec->len = len;
    /* Fault the pages in for writing, as a long-term pin for a device does (a read fault
     * would map the shared zero page, which the next write replaces). */
    if (madvise((void *)(uintptr_t)start, len, 23 /* MADV_POPULATE_WRITE */) != 0) return -1;
    unsigned long before = r->writer_seq ? atomic_load(r->writer_seq) : 0;
    for (uint64_t i = 0; i < pages; i++) {
        uint64_t a = start + i * (uint64_t)page_size();
        if (read_word(r, a, &rec->words[i]) != 0) return -1; /* not mapped: cannot pin */
        rec->pfns[i] = read_pfn(r, a);
    }
    unsigned long after = r->writer_seq ? atomic_load(r->writer_seq) : 0;
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return -3;
    struct iovec iov = {(void *)(uintptr_t)start, len};
    while (iov.iov_len > 0) {
        ssize_t n = vmsplice(fds[1], &iov, 1, 0);
        if (n <= 0) {
            close(fds[0]);
            close(fds[1]);
            return -1; /* unmapped meanwhile: cannot pin */
        }
        iov.iov_base = (char *)iov.iov_base + n;
        iov.iov_len -= (size_t)n;
    }
    rec->pipe_r = fds[0];
    rec->pipe_w = fds[1];
    rec->contents_reliable = before == after && before % 2 == 0;
    atomic_fetch_add(&r->regs, 1);
    *handle = (uint64_t)id;
    return 0;
}

static int rec_dereg(void *ctx, uint64_t start, uint64_t len, uint64_t handle) {
    struct registrar *r = ctx;
    struct record *rec = &r->records[handle];
    CHECK(rec->start == start && rec->len == len, "dereg of record %lu with another range", (unsigned long)handle);
    pthread_mutex_lock(&r->lock);
    if (rec->released) atomic_fetch_add(&r->double_deregs, 1);
    rec->released = 1;
    close(rec->pipe_r);
    close(rec->pipe_w);
    pthread_mutex_unlock(&r->lock);
    atomic_fetch_add(&r->deregs, 1);
    return 0;
}

static void rec_invalidated(void *ctx, const mmn_region_info_t *region) {
    (void)region;
    struct registrar *r = ctx;
    atomic_fetch_add(&r->invalidated, 1);
}

static void registrar_init(struct registrar *r) {
    memset(r, 0, sizeof *r);
    pthread_mutex_init(&r->lock, NULL);
    r->records = calloc(MAX_RECORDS, sizeof *r->records);
    r->mem_fd = open("/proc/self/mem", O_RDONLY);
    r->pagemap_fd = open("/proc/self/pagemap", O_RDONLY);
    if (!r->records || r->mem_fd < 0 || r->pagemap_fd < 0) {
        perror("registrar_init");
        exit(1);
    }
    /* Frame numbers are visible with CAP_SYS_ADMIN only; probe a present page. */
    static volatile uint64_t probe = 1;
    r->pfns_visible = read_pfn(r, (uint64_t)(uintptr_t)&probe) != 0;
}

static void registrar_free(struct registrar *r) {
    close(r->mem_fd);
    close(r->pagemap_fd);
    free(r->records);
    pthread_mutex_destroy(&r->lock);
}

/* Reads what the pinned pages of record `rec` hold now into buf (rec->len bytes). */
static int read_pinned(struct record *rec, char *buf) {
    int s[2];
    if (pipe2(s, O_CLOEXEC) != 0) return -1;
    size_t got = 0;
    int ok = 1;
    while (got < rec->len) {
        ssize_t t = tee(rec->pipe_r, s[1], rec->len - got, 0);
        if (t <= 0) { ok = 0; break; }
        ssize_t n = read(s[0], buf + got, (size_t)t);
        if (n != t) { ok = 0; break; }
        got += (size_t)n;
        if (got < rec->len) { ok = 0; break; } /* tee copies the whole pipe at once here */
    }
    close(s[0]);
    close(s[1]);
    return ok ? 0 : -1;
}

/* Whether record `id` describes what is mapped now: its pinned pages hold what the address
 * holds now (and, where recorded reliably, the same first words; where visible, the same
 * frames). */
static int record_is_current(struct registrar *r, uint64_t id, const char **why) {
    struct record *rec = &r->records[id];
    uint64_t pages = rec->len / (uint64_t)page_size();
    if (pages > MAX_PAGES) pages = MAX_PAGES;
    static char pinned[MAX_PAGES * 65536];
    if (rec->len > sizeof pinned || read_pinned(rec, pinned) != 0) {
        *why = "could not read the pinned pages";
        return 0;
    }
    for (uint64_t i = 0; i < pages; i++) {
        uint64_t a = rec->start + i * (uint64_t)page_size(), w, pw;
        if (read_word(r, a, &w) != 0) {
            *why = "the page is no longer mapped";
            return 0;
        }
        memcpy(&pw, pinned + i * (uint64_t)page_size(), sizeof pw);
        if (pw != w) {
            *why = "the registration's pinned page holds other contents than the page mapped now";
            return 0;
        }
        if (rec->contents_reliable && w != rec->words[i]) {
            *why = "the registration recorded other contents";
            return 0;
        }
        if (r->pfns_visible && read_pfn(r, a) != rec->pfns[i]) {
            *why = "the registration recorded another page frame";
            return 0;
        }
    }
    return 1;
}

static mmn_rcache_t make_cache_policy(struct registrar *r, uint64_t max_regions, uint32_t blind_policy) {
    mmn_rcache_params_t p;
    memset(&p, 0, sizeof p);
    p.reg = rec_reg;
    p.dereg = rec_dereg;
    p.invalidated = rec_invalidated;
    p.ctx = r;
    p.max_regions = max_regions;
    p.blind_policy = blind_policy;
    mmn_rcache_t c;
    OK(mmn_rcache_create(&p, &c));
    return c;
}

static mmn_rcache_t make_cache(struct registrar *r, uint64_t max_regions) {
    return make_cache_policy(r, max_regions, MMN_BLIND_UNCACHED);
}

#endif
