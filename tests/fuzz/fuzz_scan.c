/* libFuzzer harness for extract_native.c's gzip member walk (wat_scan) and the rules after it, with
 * the libdeflate of the `deflate` package (its path in $FUZZ_LIBDEFLATE,
 * and $FUZZ_LIBPYTHON the libpython it needs loaded), as extract_native.Scanner
 * uses it. Not built by the test suite: bench/fuzz_native.py builds and runs it.
 *
 * Input: a flags byte, then records separated by "\x1e\x1e". Each record is gzip-compressed alone
 * (level from the flags; so the CRCs hold and the walk reaches the records), the members joined;
 * then, as the flags say, the stream is damaged at a place the input picks (a byte, a cut, a member's
 * ISIZE made huge or small, junk between members). Flag 0x40: the rest of the input is the gzip
 * stream itself, as is. The scan runs as Python drives it: wat_scan, the rules over the batch's
 * pages, again from where it stopped (after S_FULL), and past a member it left to Python (S_STOP) to
 * the next gzip magic. */
#include "../../fastlaion/extract_native.c"

#include <dlfcn.h>
#include <stdio.h>

typedef void *(*alloc_c_fn)(int);
typedef size_t (*gz_compress_fn)(void *, const void *, size_t, void *, size_t);
typedef size_t (*gz_bound_fn)(void *, size_t);

static ctx_t *ctx;
static void *compressors[13];
static gz_compress_fn gz_compress;
static gz_bound_fn gz_bound;

static void init(void) {
    const char *path = getenv("FUZZ_LIBDEFLATE"), *python = getenv("FUZZ_LIBPYTHON");
    if (python && !dlopen(python, RTLD_NOW | RTLD_GLOBAL)) {  /* the module's Py* data symbols */
        fprintf(stderr, "FUZZ_LIBPYTHON: %s\n", dlerror());
        abort();
    }
    void *so = path ? dlopen(path, RTLD_LAZY) : NULL;  /* lazy: a Python extension module, whose Py* symbols go unused */
    if (!so) { fprintf(stderr, "FUZZ_LIBDEFLATE (the deflate package's _deflate*.so): %s\n", dlerror()); abort(); }
    void *(*alloc_d)(void) = (void *(*)(void))dlsym(so, "libdeflate_alloc_decompressor");
    alloc_c_fn alloc_c = (alloc_c_fn)dlsym(so, "libdeflate_alloc_compressor");
    gz_compress = (gz_compress_fn)dlsym(so, "libdeflate_gzip_compress");
    gz_bound = (gz_bound_fn)dlsym(so, "libdeflate_gzip_compress_bound");
    for (int l = 0; l <= 12; l++) compressors[l] = alloc_c(l);
    ctx = wat_open(1 << 22, alloc_d(), dlsym(so, "libdeflate_gzip_decompress_ex"));
    if (!ctx) abort();
}

static void scan_all(const uint8_t *buf, int64_t len, int64_t opt_mask) {
    static const rules_cfg cfg = {5, 1, 1, 253, 4096, NULL, NULL, NULL, NULL, NULL, 0};
    rules_out *out = wat_rules_out();
    int64_t start = 0;
    wat_set_opt_out(ctx, opt_mask);
    for (int rounds = 0; start < len && rounds < 10000; rounds++) {
        int32_t status;
        wat_reset(ctx);
        int64_t at = wat_scan(ctx, buf, len, start, &status);
        if (at < start || at > len) abort();
        if (ctx->n_pages && wat_rules(ctx, &cfg, out, 0, ctx->n_pages) != 0) abort();
        if (status == S_FULL && at > start) { start = at; continue; }
        /* Python's member loop takes buf[at:]: here, on to the next magic after it */
        int64_t next = find(buf, len, at + 1, "\x1f\x8b\x08", 3);
        if (next < 0) break;
        start = next;
    }
    wat_rules_free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!ctx) init();
    if (size < 1 || size > (1 << 20)) return 0;
    uint8_t flags = data[0];
    const uint8_t *p = data + 1;
    size_t n = size - 1;
    if (flags & 0x40) {
        uint8_t *copy = malloc(n ? n : 1);
        memcpy(copy, p, n);
        scan_all(copy, (int64_t)n, flags & 1 ? 15 : 0);
        free(copy);
        return 0;
    }
    void *comp = compressors[(flags >> 1) % 13];
    size_t cap = gz_bound(comp, n) + 64 * (n / 2 + 1) + 64, used = 0;
    uint8_t *gz = malloc(cap);
    size_t a = 0;
    while (a <= n) {
        size_t b = a;
        while (b + 1 < n && !(p[b] == 0x1e && p[b + 1] == 0x1e)) b++;
        if (b + 1 >= n) b = n;
        size_t got = gz_compress(comp, p + a, b - a, gz + used, cap - used);
        if (!got) break;
        used += got;
        a = b + 2;
    }
    /* damage, at a place the last bytes of the input choose */
    uint32_t where = size >= 5 ? (uint32_t)data[size - 1] | (uint32_t)data[size - 2] << 8 : 0;
    if (used) {
        size_t at = where % used;
        switch ((flags >> 5) & 3) {
            case 1: gz[at] ^= (uint8_t)(1u << (where >> 16 & 7)) | 1; break;  /* a byte */
            case 2: used = at; break;                                            /* a cut */
            case 3: if (used >= 4) { gz[used - 1] = (uint8_t)where; gz[used - 2] = 0xff; } break;  /* ISIZE */
            default: break;
        }
    }
    uint8_t *exact = malloc(used ? used : 1);  /* exactly its size: ASan sees a read past it */
    memcpy(exact, gz, used);
    free(gz);
    scan_all(exact, (int64_t)used, flags & 1 ? 15 : 0);
    free(exact);
    return 0;
}
