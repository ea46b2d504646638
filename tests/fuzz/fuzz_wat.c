/* libFuzzer harness for extract_native.c's record walk and link rules (not built by the test
 * suite; bench/fuzz_native.py builds and runs it, see bench/README.md).
 *
 * The input is one inflated WARC record (what a gzip member holds). It is copied into a buffer of
 * exactly its size, and the scan's output buffers are allocated at exactly the room wat_scan
 * checks for one member of that size (strs 2n, pblob 4n + 80, src and alt n, n / 8 + 1 links, one
 * page), so AddressSanitizer sees a read past the record or a write past that room, which inside
 * the real 24 MiB arenas would go unseen. A page found is then put through wat_rules under three
 * settings (LAION's, keep-all, tiny limits), with the C SHA-256 (no OpenSSL pointers). */
#include "../../fastlaion/extract_native.c"

#include <stdio.h>

static ctx_t *tight_ctx(int64_t n) {
    ctx_t *c = calloc(1, sizeof *c);
    c->strs_cap = 2 * n; c->strs = malloc((size_t)c->strs_cap + 1);
    c->pblob_cap = 4 * n + 80; c->pblob = malloc((size_t)c->pblob_cap);
    c->src_cap = n; c->src = malloc((size_t)n + 1);
    c->alt_cap = n; c->alt = malloc((size_t)n + 1);
    c->links_cap = n / 8 + 1;
    c->src_valid = malloc((size_t)c->links_cap); c->alt_valid = malloc((size_t)c->links_cap);
    c->link_page = malloc(sizeof(int32_t) * (size_t)c->links_cap);
    c->src_start = malloc(sizeof(int64_t) * (size_t)c->links_cap);
    c->alt_start = malloc(sizeof(int64_t) * (size_t)c->links_cap);
    c->pages_cap = 1; c->pages = malloc(sizeof(int64_t) * PAGE_FIELDS);
    c->max_record_bytes = 1 << 30;
    return c;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0 || size > (1 << 20)) return 0;
    int64_t n = (int64_t)size;
    uint8_t *d = malloc(size);
    memcpy(d, data, size);
    ctx_t *c = tight_ctx(n);
    /* the opt-out walk too, on every other input */
    c->opt_out_mask = (data[size - 1] & 1) ? 15 : 0;
    int kind = classify(c, d, n);
    if (kind == K_PAGE) {
        if (c->n_pages != 1 || c->strs_used > c->strs_cap || c->pblob_used > c->pblob_cap || c->src_used > c->src_cap
            || c->alt_used > c->alt_cap || c->n_links > c->links_cap) {
            fprintf(stderr, "room exceeded: strs %ld/%ld pblob %ld/%ld src %ld/%ld alt %ld/%ld links %ld/%ld\n",
                    (long)c->strs_used, (long)c->strs_cap, (long)c->pblob_used, (long)c->pblob_cap,
                    (long)c->src_used, (long)c->src_cap, (long)c->alt_used, (long)c->alt_cap,
                    (long)c->n_links, (long)c->links_cap);
            abort();
        }
        static const rules_cfg cfgs[3] = {
            {5, 1, 1, 253, 4096, NULL, NULL, NULL, NULL, NULL, 0},
            {0, 0, 0, -1, 1 << 20, NULL, NULL, NULL, NULL, NULL, 0},
            {1, 1, 0, 3, 7, NULL, NULL, NULL, NULL, NULL, 0},
        };
        for (int k = 0; k < 3; k++) {
            rules_out *out = wat_rules_out();
            if (wat_rules(c, &cfgs[k], out, 0, 1) != 0) abort();
            /* what the Python side reads: NUL-separated strings, one per kept or hard link */
            int64_t kept = out->row_link.n / 8, hard = out->hard.n / 8;
            if (out->uid.n != 33 * kept || out->lang_valid.n != kept || out->hvalid.n != 2 * hard) abort();
            wat_rules_free(out);
        }
    }
    wat_close(c);
    free(d);
    return 0;
}
