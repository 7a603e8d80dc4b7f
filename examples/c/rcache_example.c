/* A registration cache as a C library would use one, on ordinary malloc'd buffers.
 *
 * Build against an installed libmmnotify (header + pkg-config file):
 *   cc -o rcache_example rcache_example.c $(pkg-config --cflags --libs mmnotify)
 * Run with the library directory on the loader's path if it is not a system one:
 *   LD_LIBRARY_PATH=$(pkg-config --variable=libdir mmnotify) ./rcache_example
 *
 * What it shows: a second get of the same buffer is a hit (no new registration); after the
 * buffer is freed (glibc unmaps a large allocation) and a new one is allocated, even at the
 * same address, the cache registers again instead of handing out the stale registration. */
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mmnotify.h>

struct device {
    unsigned long next_key, registered, deregistered, invalidated;
};

/* "Register" memory with a device: here, hand out a key. A real one pins the pages. */
static int dev_reg(void *ctx, uint64_t start, uint64_t len, uint32_t access, uint64_t *key) {
    struct device *d = ctx;
    *key = ++d->next_key;
    d->registered++;
    printf("  reg   [%#lx, +%lu) %s -> key %lu\n", (unsigned long)start, (unsigned long)len,
           access & MMN_ACCESS_WRITE ? "rw" : "r-", (unsigned long)*key);
    return 0;
}

static int dev_dereg(void *ctx, uint64_t start, uint64_t len, uint64_t key) {
    struct device *d = ctx;
    d->deregistered++;
    printf("  dereg [%#lx, +%lu) key %lu\n", (unsigned long)start, (unsigned long)len, (unsigned long)key);
    return 0;
}

static void dev_invalidated(void *ctx, const mmn_region_info_t *r) {
    struct device *d = ctx;
    d->invalidated++; /* runs in the invalidation's context: no I/O, no cache calls */
    (void)r;
}

static int die(const char *what, int rc) {
    fprintf(stderr, "%s: %s (%s)\n", what, mmn_strerror(rc), mmn_last_error());
    return 1;
}

/* One "send": get a registration for the buffer, use its key, put it back. */
static int send_buffer(mmn_rcache_t cache, void *buf, size_t len, uint64_t *key) {
    mmn_region_t region;
    mmn_region_info_t info;
    int rc = mmn_rcache_get(cache, (uint64_t)(uintptr_t)buf, len, MMN_ACCESS_READ, &region, &info);
    if (rc != 0) return rc;
    *key = info.reg_handle; /* ... post the I/O with this key, wait for it ... */
    return mmn_rcache_put(region);
}

int main(void) {
    int rc = mmn_init(MMN_ABI_VERSION, NULL);
    if (rc < 0) return die("mmn_init", rc);

    struct device dev = {0};
    mmn_rcache_params_t params;
    memset(&params, 0, sizeof params);
    params.reg = dev_reg;
    params.dereg = dev_dereg;
    params.invalidated = dev_invalidated;
    params.ctx = &dev;
    mmn_rcache_t cache;
    if ((rc = mmn_rcache_create(&params, &cache)) != 0) return die("mmn_rcache_create", rc);

    /* A fixed mmap threshold (glibc raises it after the first free otherwise): large buffers
     * are served with mmap and freed with munmap, so the next one often reuses the address. */
    mallopt(M_MMAP_THRESHOLD, 128 * 1024);
    const size_t len = 1 << 20;
    char *buf = malloc(len);
    memset(buf, 'a', len);
    uint64_t k1, k2, k3;
    printf("send #1 (miss):\n");
    if ((rc = send_buffer(cache, buf, len, &k1)) != 0) return die("send #1", rc);
    printf("send #2 (hit):\n");
    if ((rc = send_buffer(cache, buf, len, &k2)) != 0) return die("send #2", rc);

    void *old = buf;
    free(buf);
    buf = malloc(len);
    memset(buf, 'b', len);
    printf("send #3 after free + malloc (%s address):\n", (void *)buf == old ? "same" : "another");
    if ((rc = send_buffer(cache, buf, len, &k3)) != 0) return die("send #3", rc);

    mmn_rcache_stats_t st;
    mmn_rcache_stats(cache, &st);
    printf("hits %lu misses %lu invalidations %lu; device: %lu registered, %lu deregistered, %lu told invalidated\n",
           (unsigned long)st.hits, (unsigned long)st.misses, (unsigned long)st.invalidations, dev.registered,
           dev.deregistered, dev.invalidated);
    int ok = k1 == k2 && k3 != k1 && st.hits == 1 && st.misses == 2;
    free(buf);
    if ((rc = mmn_rcache_destroy(cache)) != 0) return die("mmn_rcache_destroy", rc);
    if ((rc = mmn_fini()) < 0) return die("mmn_fini", rc);
    printf("%s: %lu registered, %lu deregistered\n", ok ? "ok" : "UNEXPECTED", dev.registered, dev.deregistered);
    return ok && dev.registered == dev.deregistered ? 0 : 1;
}
