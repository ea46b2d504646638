/* fastlaion extract: the WAT hot path in C, built on first use and loaded with ctypes by
 * extract_native.py. Python's path in extract.py stays the reference, and the fallback.
 *
 * wat_scan walks a buffer of gzip members, one WARC record each, as Common Crawl writes them,
 * and does for each member what extract.py's fast paths do, only where their outcome is
 * certain:
 *   - inflate it with libdeflate (function pointers taken from the `deflate` package), taken
 *     only when the member inflates whole at its first possible end (the trailer's CRC-32 and
 *     length checked by libdeflate, all of its input consumed): exactly then _whole_members
 *     takes the same member the same way;
 *   - check it is one whole sound record (_Splitter._whole_record) and read its type,
 *     Content-Length and target URI where the header has the usual layout;
 *   - classify it: other_type, no_img_links (no '"IMG@/src"' in its block), or a WAT page,
 *     whose JSON is validated and walked here: page URL, <base href>, language (_wat_lang),
 *     the parts of the page URL (_base_parts), and each IMG@/src link's url and alt, JSON
 *     escapes decoded.
 * Anything unusual (a header of another layout, a response record, invalid or odd JSON, a lone
 * surrogate escape, a number with an exponent, a field of an unexpected type, a repeated key
 * that matters, a string holding U+0000, ...) marks the record K_DEFER: Python feeds the
 * member's bytes to the reference path, which decides. A member that does not inflate whole
 * at its first end stops the scan, and Python's own member loop takes that one.
 *
 * wat_rules then applies LAION's link rules to the links of a range of pages, settling the
 * same links extract_vec.py settles and marking the others hard, for extract._check_link.
 * wat_uids computes extract.uid_of for many pairs.
 *
 * Only the C library; no Python, zlib or OpenSSL headers: it builds with any C compiler.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__) && defined(__GNUC__)
#include <emmintrin.h>
#endif

typedef int (*gunzip_fn)(void *d, const void *in, size_t in_n, void *out, size_t out_avail,
                         size_t *actual_in, size_t *actual_out);

enum { K_EMPTY = 0, K_DEFER = 1, K_OTHER = 2, K_NOIMG = 3, K_PAGE = 4 };
enum { S_STOP = 0, S_FULL = 1 };

#define MEM_FIELDS 4   /* kind, arena offset, length, page index */
/* per page: its strings' start in pblob, <base href> offset and length in strs (-1: none or
 * blank), first link, links, flags (F_LANG: it has a language, F_PARTS: scheme, origin and
 * directory of its base URL are set: the page URL's, or with F_BASED its <base href>'s) */
#define PAGE_FIELDS 6
#define F_LANG 1
#define F_PARTS 2
#define F_BASED 4  /* the parts are those of the page's <base href>, taken as it is (based_here) */
#define DECOMPRESS_CAP (8 << 20)
#define MAX_HEADER 65536
#define MAX_DEPTH 200

typedef struct {
    uint8_t *arena; int64_t arena_cap; int64_t arena_used;     /* inflated members */
    int64_t *mem; int64_t mem_cap; int64_t n_mem;
    int64_t *pages; int64_t pages_cap; int64_t n_pages;
    uint8_t *strs; int64_t strs_cap; int64_t strs_used;        /* <base href> values */
    uint8_t *pblob; int64_t pblob_cap; int64_t pblob_used;     /* per page: url, lang, scheme, origin, dir; each then a NUL */
    uint8_t *src; int64_t src_cap; int64_t src_used;           /* each url then a NUL */
    uint8_t *alt; int64_t alt_cap; int64_t alt_used;           /* each alt then a NUL */
    uint8_t *src_valid; uint8_t *alt_valid; int32_t *link_page;
    int64_t links_cap; int64_t n_links;
    int64_t max_record_bytes;
    void *decompressor; gunzip_fn gunzip;
    int64_t *src_start; int64_t *alt_start;                     /* each link's string offsets */
    int64_t n_defer, n_other, n_noimg, n_bytes;                 /* members of each kind; output bytes */
    int64_t opt_out_mask;  /* bits of OPT_OUT_TAGS that opt a page out (extract.py decides; here: defer) */
} ctx_t;

/* extract.config.PAGE_OPT_OUT_TAGS, in its order: bit i of opt_out_mask is tag i */
static const char *const OPT_OUT_TAGS[] = {"noai", "noimageai", "noindex", "noimageindex"};
#define N_OPT_OUT_TAGS 4

/* ---------------------------------------------------------------------------------------- */
/* bytes helpers */

static int64_t find(const uint8_t *s, int64_t n, int64_t from, const char *needle, int64_t m) {
    if (from < 0) from = 0;
    if (m == 0) return from <= n ? from : -1;
    while (from + m <= n) {
        const uint8_t *p = memchr(s + from, (uint8_t)needle[0], (size_t)(n - m + 1 - from));
        if (!p) return -1;
        if (memcmp(p, needle, (size_t)m) == 0) return p - s;
        from = (p - s) + 1;
    }
    return -1;
}

static inline uint8_t lower(uint8_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

/* needle is lower case; s is compared as bytes.lower() would make it */
static int match_ci(const uint8_t *s, const char *needle, int64_t m) {
    for (int64_t k = 0; k < m; k++)
        if (lower(s[k]) != (uint8_t)needle[k]) return 0;
    return 1;
}

static int64_t find_ci(const uint8_t *s, int64_t n, const char *needle, int64_t m) {
    if (!(needle[0] >= 'a' && needle[0] <= 'z')) {  /* "\r\n...": memchr for the CR */
        const uint8_t *p = s, *e = s + n - m + 1;
        while (p < e && (p = memchr(p, needle[0], (size_t)(e - p))) != NULL) {
            if (match_ci(p + 1, needle + 1, m - 1)) return p - s;
            p++;
        }
        return -1;
    }
    for (int64_t i = 0; i + m <= n; i++)
        if (lower(s[i]) == (uint8_t)needle[0] && match_ci(s + i, needle, m)) return i;
    return -1;
}

/* Whether a string's bytes could hold one of the enabled opt-out tags: each, case-insensitively,
 * anywhere (extract.py splits the directives and decides; this only finds the pages to ask it) */
static int may_opt_out(const uint8_t *v, int64_t n, int64_t mask) {
    for (int i = 0; i < N_OPT_OUT_TAGS; i++) {
        int64_t m = (int64_t)strlen(OPT_OUT_TAGS[i]);
        if ((mask >> i & 1) && n >= m && find_ci(v, n, OPT_OUT_TAGS[i], m) >= 0) return 1;
    }
    return 0;
}

/* header.lower().count(name) for "content-length", "warc-type" and "warc-target-uri", in one
 * pass (none of them can overlap itself): each 'c' or 'w', in either case, is checked */
static inline void count_name_at(const uint8_t *h, int64_t n, int64_t i, int64_t counts[3]) {
    if ((h[i] | 0x20) == 'c') {
        if (n - i >= 14 && match_ci(h + i, "content-length", 14)) counts[0]++;
    } else if (n - i >= 9 && match_ci(h + i, "warc-t", 6)) {
        if (match_ci(h + i + 6, "ype", 3)) counts[1]++;
        else if (n - i >= 15 && match_ci(h + i + 6, "arget-uri", 9)) counts[2]++;
    }
}

static void count_names(const uint8_t *h, int64_t n, int64_t counts[3]) {
    counts[0] = counts[1] = counts[2] = 0;
    int64_t i = 0;
#if defined(__SSE2__) && defined(__GNUC__)
    const __m128i lower_bit = _mm_set1_epi8(0x20), c = _mm_set1_epi8('c'), w = _mm_set1_epi8('w');
    for (; i + 16 <= n; i += 16) {
        __m128i v = _mm_or_si128(_mm_loadu_si128((const __m128i *)(h + i)), lower_bit);
        unsigned mask = (unsigned)_mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(v, c), _mm_cmpeq_epi8(v, w)));
        while (mask) {
            count_name_at(h, n, i + __builtin_ctz(mask), counts);
            mask &= mask - 1;
        }
    }
#endif
    for (; i < n; i++)  /* | 0x20 makes 'c' or 'w' of both cases of them, and of no other byte */
        if ((h[i] | 0x20) == 'c' || (h[i] | 0x20) == 'w') count_name_at(h, n, i, counts);
}

static inline int is_bytes_space(uint8_t c) {  /* bytes.strip() */
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == 0x0b || c == 0x0c;
}

static inline int is_str_space_ascii(uint8_t c) {  /* str.strip() / str.isspace() on ASCII */
    return c == ' ' || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f);
}

/* strict UTF-8, as Python's decoder: no overlong forms, no surrogates, at most U+10FFFF */
static int utf8_ok(const uint8_t *s, int64_t n) {
    int64_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) { i++; continue; }
        if (c >= 0xc2 && c <= 0xdf) {
            if (i + 1 >= n || (s[i + 1] & 0xc0) != 0x80) return 0;
            i += 2;
        } else if (c >= 0xe0 && c <= 0xef) {
            if (i + 2 >= n) return 0;
            uint8_t c1 = s[i + 1];
            if ((c1 & 0xc0) != 0x80 || (s[i + 2] & 0xc0) != 0x80) return 0;
            if (c == 0xe0 && c1 < 0xa0) return 0;
            if (c == 0xed && c1 >= 0xa0) return 0;
            i += 3;
        } else if (c >= 0xf0 && c <= 0xf4) {
            if (i + 3 >= n) return 0;
            uint8_t c1 = s[i + 1];
            if ((c1 & 0xc0) != 0x80 || (s[i + 2] & 0xc0) != 0x80 || (s[i + 3] & 0xc0) != 0x80) return 0;
            if (c == 0xf0 && c1 < 0x90) return 0;
            if (c == 0xf4 && c1 >= 0x90) return 0;
            i += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

/* ---------------------------------------------------------------------------------------- */
/* JSON: a strict validator that walks to the fields extract.py reads */

typedef struct {
    const uint8_t *p, *e;
    int defer;  /* set on anything this parser does not decide: the record goes to Python */
    ctx_t *c;
    /* what the walk found */
    int has_links;               /* Links was an array */
    int head_seen;
    const uint8_t *base_s; int64_t base_n; int base_esc; int base_set;
    const uint8_t *lang_meta_s; int64_t lang_meta_n;   /* first matching meta's content */
    const uint8_t *lang_hdr_s; int64_t lang_hdr_n; int hdr_matches;
} J;

typedef struct { const uint8_t *s; int64_t n; int esc; int ascii; } jstr;

/* The first byte at or after p that ends a run of plain string bytes: '"', '\\', a control
 * character or a non-ASCII byte (e if none). */
#if defined(__SSE2__) && defined(__GNUC__)
static inline const uint8_t *plain_run(const uint8_t *p, const uint8_t *e) {
    const __m128i quote = _mm_set1_epi8('"'), bslash = _mm_set1_epi8('\\'), space = _mm_set1_epi8(0x20);
    while (e - p >= 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)p);
        /* signed compare: below 0x20, and 0x80-0xff (negative) */
        __m128i m = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, bslash)),
                                 _mm_cmplt_epi8(v, space));
        int mask = _mm_movemask_epi8(m);
        if (mask) return p + __builtin_ctz((unsigned)mask);
        p += 16;
    }
    while (p < e && *p >= 0x20 && *p < 0x80 && *p != '"' && *p != '\\') p++;
    return p;
}
#else
static inline const uint8_t *plain_run(const uint8_t *p, const uint8_t *e) {
    while (p < e && *p >= 0x20 && *p < 0x80 && *p != '"' && *p != '\\') p++;
    return p;
}
#endif

static inline void ws(J *j) {
    while (j->p < j->e && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')) j->p++;
}

static inline int hexv(uint8_t c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int hex4(const uint8_t *p, const uint8_t *e, unsigned *v) {
    if (e - p < 4) return 0;
    unsigned x = 0;
    for (int k = 0; k < 4; k++) {
        int h = hexv(p[k]);
        if (h < 0) return 0;
        x = (x << 4) | (unsigned)h;
    }
    *v = x;
    return 1;
}

/* A string at j->p (the opening quote). Validates escapes (a lone surrogate defers), control
 * characters and UTF-8. */
static int parse_string(J *j, jstr *out) {
    const uint8_t *p = j->p + 1, *e = j->e;
    const uint8_t *start = p;
    int esc = 0, ascii = 1;
    for (;;) {
        p = plain_run(p, e);
        if (p >= e) { j->defer = 1; return 0; }
        uint8_t c = *p;
        if (c == '"') break;
        if (c < 0x20) { j->defer = 1; return 0; }
        if (c == '\\') {
            esc = 1;
            if (p + 1 >= e) { j->defer = 1; return 0; }
            uint8_t x = p[1];
            if (x == 'u') {
                unsigned v;
                if (!hex4(p + 2, e, &v)) { j->defer = 1; return 0; }
                p += 6;
                if (v >= 0xd800 && v <= 0xdbff) {
                    unsigned w;
                    if (e - p < 6 || p[0] != '\\' || p[1] != 'u' || !hex4(p + 2, e, &w) || w < 0xdc00 || w > 0xdfff) {
                        j->defer = 1; return 0;
                    }
                    p += 6;
                } else if (v >= 0xdc00 && v <= 0xdfff) {
                    j->defer = 1; return 0;
                }
                continue;
            }
            if (x == '"' || x == '\\' || x == '/' || x == 'b' || x == 'f' || x == 'n' || x == 'r' || x == 't') {
                p += 2;
                continue;
            }
            j->defer = 1;
            return 0;
        }
        /* non-ASCII: one UTF-8 sequence */
        ascii = 0;
        const uint8_t *q = p + 1;
        while (q < e && (*q & 0xc0) == 0x80 && q - p < 4) q++;
        if (!utf8_ok(p, q - p)) { j->defer = 1; return 0; }
        p = q;
    }
    out->s = start;
    out->n = p - start;
    out->esc = esc;
    out->ascii = ascii;
    j->p = p + 1;
    return 1;
}

/* Decode a validated string into dst (room for s.n bytes); returns the length, or -1 when it
 * holds U+0000 and nul_ok is 0. */
static int64_t unescape(jstr s, uint8_t *dst, int nul_ok) {
    if (!s.esc) {
        memcpy(dst, s.s, (size_t)s.n);
        return s.n;
    }
    const uint8_t *p = s.s, *e = s.s + s.n;
    uint8_t *o = dst;
    while (p < e) {
        if (*p != '\\') { *o++ = *p++; continue; }
        uint8_t x = p[1];
        if (x != 'u') {
            switch (x) {
                case 'b': *o++ = '\b'; break;
                case 'f': *o++ = '\f'; break;
                case 'n': *o++ = '\n'; break;
                case 'r': *o++ = '\r'; break;
                case 't': *o++ = '\t'; break;
                default: *o++ = x; break;
            }
            p += 2;
            continue;
        }
        unsigned v;
        hex4(p + 2, e, &v);
        p += 6;
        if (v >= 0xd800 && v <= 0xdbff) {
            unsigned w;
            hex4(p + 2, e, &w);
            p += 6;
            v = 0x10000 + ((v - 0xd800) << 10) + (w - 0xdc00);
        }
        if (v == 0 && !nul_ok) return -1;
        if (v < 0x80) *o++ = (uint8_t)v;
        else if (v < 0x800) { *o++ = (uint8_t)(0xc0 | (v >> 6)); *o++ = (uint8_t)(0x80 | (v & 0x3f)); }
        else if (v < 0x10000) {
            *o++ = (uint8_t)(0xe0 | (v >> 12)); *o++ = (uint8_t)(0x80 | ((v >> 6) & 0x3f));
            *o++ = (uint8_t)(0x80 | (v & 0x3f));
        } else {
            *o++ = (uint8_t)(0xf0 | (v >> 18)); *o++ = (uint8_t)(0x80 | ((v >> 12) & 0x3f));
            *o++ = (uint8_t)(0x80 | ((v >> 6) & 0x3f)); *o++ = (uint8_t)(0x80 | (v & 0x3f));
        }
    }
    return o - dst;
}

static int skip_value(J *j, int depth);

/* A number, strict JSON grammar; an exponent or more than 18 digits defers (the decoders
 * differ on numbers beyond a double's range). */
static int skip_number(J *j) {
    const uint8_t *p = j->p, *e = j->e;
    int digits = 0;
    if (p < e && *p == '-') p++;
    if (p >= e) { j->defer = 1; return 0; }
    if (*p == '0') { p++; digits++; }
    else if (*p >= '1' && *p <= '9') { while (p < e && *p >= '0' && *p <= '9') { p++; digits++; } }
    else { j->defer = 1; return 0; }
    if (p < e && *p == '.') {
        p++;
        int f = 0;
        while (p < e && *p >= '0' && *p <= '9') { p++; f++; }
        if (!f) { j->defer = 1; return 0; }
        digits += f;
    }
    if (p < e && (*p == 'e' || *p == 'E')) { j->defer = 1; return 0; }
    if (digits > 18) { j->defer = 1; return 0; }
    j->p = p;
    return 1;
}

static int literal(J *j, const char *word, int n) {
    if (j->e - j->p < n || memcmp(j->p, word, (size_t)n) != 0) { j->defer = 1; return 0; }
    j->p += n;
    return 1;
}

/* Object iteration: on '{', calls back per key with j->p at the value. */
#define OBJ_BEGIN(j) \
    if ((j)->p >= (j)->e || *(j)->p != '{') { (j)->defer = 1; return 0; } \
    (j)->p++; ws(j); \
    if ((j)->p < (j)->e && *(j)->p == '}') { (j)->p++; return 1; }

static int next_key(J *j, jstr *key) {
    ws(j);
    if (j->p >= j->e || *j->p != '"') { j->defer = 1; return 0; }
    if (!parse_string(j, key)) return 0;
    ws(j);
    if (j->p >= j->e || *j->p != ':') { j->defer = 1; return 0; }
    j->p++;
    ws(j);
    return 1;
}

/* after a member value: 1 more, 0 end of object, -1 error */
static int obj_more(J *j) {
    ws(j);
    if (j->p >= j->e) { j->defer = 1; return -1; }
    if (*j->p == ',') { j->p++; return 1; }
    if (*j->p == '}') { j->p++; return 0; }
    j->defer = 1;
    return -1;
}

static int arr_more(J *j) {
    ws(j);
    if (j->p >= j->e) { j->defer = 1; return -1; }
    if (*j->p == ',') { j->p++; ws(j); return 1; }
    if (*j->p == ']') { j->p++; return 0; }
    j->defer = 1;
    return -1;
}

static inline int key_is(jstr k, const char *name) {
    size_t n = strlen(name);
    return (size_t)k.n == n && memcmp(k.s, name, n) == 0;
}

static int skip_value(J *j, int depth) {
    if (depth > MAX_DEPTH) { j->defer = 1; return 0; }
    ws(j);
    if (j->p >= j->e) { j->defer = 1; return 0; }
    uint8_t c = *j->p;
    if (c == '"') { jstr s; return parse_string(j, &s); }
    if (c == '{') {
        j->p++;
        ws(j);
        if (j->p < j->e && *j->p == '}') { j->p++; return 1; }
        for (;;) {
            jstr k;
            if (!next_key(j, &k) || !skip_value(j, depth + 1)) return 0;
            int m = obj_more(j);
            if (m < 0) return 0;
            if (m == 0) return 1;
        }
    }
    if (c == '[') {
        j->p++;
        ws(j);
        if (j->p < j->e && *j->p == ']') { j->p++; return 1; }
        for (;;) {
            if (!skip_value(j, depth + 1)) return 0;
            int m = arr_more(j);
            if (m < 0) return 0;
            if (m == 0) return 1;
        }
    }
    if (c == 't') return literal(j, "true", 4);
    if (c == 'f') return literal(j, "false", 5);
    if (c == 'n') return literal(j, "null", 4);
    return skip_number(j);
}

static inline int at_null(J *j) { return j->p < j->e && *j->p == 'n'; }

/* ASCII case-insensitive equality with a lower-case name */
static int eq_ci(jstr s, const char *name) {
    size_t n = strlen(name);
    return (size_t)s.n == n && match_ci(s.s, name, (int64_t)n);
}

static int all_str_space(jstr s) {
    for (int64_t i = 0; i < s.n; i++)
        if (!is_str_space_ascii(s.s[i])) return 0;
    return 1;
}

/* The JSON objects on the way to the links: each known field goes to its walker (at one level
 * deeper), any other is skipped; null counts as an empty object. A field seen twice, or a key
 * with escapes, leaves the record to the Python path (defer), which decides as msgspec does. */
typedef int (*walk_fn)(J *j, int depth);
typedef struct { const char *key; walk_fn walk; } field_t;

static int walk_fields(J *j, int depth, const field_t *fields, int n_fields) {
    if (at_null(j)) return literal(j, "null", 4);
    OBJ_BEGIN(j)
    int seen = 0;
    for (;;) {
        jstr k;
        if (!next_key(j, &k)) return 0;
        if (k.esc) { j->defer = 1; return 0; }
        int i = 0;
        while (i < n_fields && !key_is(k, fields[i].key)) i++;
        if (i < n_fields) {
            if (seen & (1 << i)) { j->defer = 1; return 0; }
            seen |= 1 << i;
            if (!fields[i].walk(j, depth + 1)) return 0;
        } else if (!skip_value(j, depth + 1)) {
            return 0;
        }
        int m = obj_more(j);
        if (m < 0) return 0;
        if (m == 0) return 1;
    }
}

/* Head.Metas: the first meta http-equiv=content-language with a non-blank content */
static int walk_metas(J *j, int depth) {
    if (j->p >= j->e || *j->p != '[') return skip_value(j, depth);
    j->p++;
    ws(j);
    if (j->p < j->e && *j->p == ']') { j->p++; return 1; }
    for (;;) {
        ws(j);
        if (j->p < j->e && *j->p == '{') {
            /* one meta: the last http-equiv and content values count, as in a dict */
            int equiv_state = 0;  /* 0 absent or other, 1 matches, 2 undecided here */
            int equiv_robots = 0; /* http-equiv is (or may be) X-Robots-Tag */
            int content_state = 0; /* 0 none or not a string, 1 a string */
            int robots = 0;        /* name is (or may be) robots, fastlaion or img2dataset */
            jstr content = {0};
            j->p++;
            ws(j);
            if (j->p < j->e && *j->p == '}') j->p++;
            else for (;;) {
                jstr k;
                if (!next_key(j, &k)) return 0;
                if (k.esc) { j->defer = 1; return 0; }
                int is_equiv = key_is(k, "http-equiv"), is_content = key_is(k, "content");
                int is_name = key_is(k, "name");
                if ((is_equiv || is_content || is_name) && j->p < j->e && *j->p == '"') {
                    jstr v;
                    if (!parse_string(j, &v)) return 0;
                    /* str.lower() of a non-ASCII value is never "content-language" */
                    if (is_equiv) {
                        equiv_state = v.esc ? 2 : (v.ascii && eq_ci(v, "content-language")) ? 1 : 0;
                        equiv_robots = v.esc || !v.ascii || eq_ci(v, "x-robots-tag");
                    }
                    else if (is_name) robots = v.esc || !v.ascii || find_ci(v.s, v.n, "robots", 6) >= 0
                                               || find_ci(v.s, v.n, "fastlaion", 9) >= 0
                                               || find_ci(v.s, v.n, "img2dataset", 11) >= 0;
                    else { content_state = 1; content = v; }
                } else {
                    if (!skip_value(j, depth + 2)) return 0;
                    if (is_equiv) equiv_state = equiv_robots = 0;  /* str() of a non-string never matches */
                    else if (is_content) content_state = 0;
                    else if (is_name) robots = 0;
                }
                int m = obj_more(j);
                if (m < 0) return 0;
                if (m == 0) break;
            }
            if ((robots || equiv_robots) && content_state == 1 && j->c->opt_out_mask
                && (content.esc || may_opt_out(content.s, content.n, j->c->opt_out_mask))) {
                j->defer = 1;  /* a robots meta that may opt the page out: extract.py decides */
                return 0;
            }
            if (equiv_state == 2 && !j->lang_meta_s) { j->defer = 1; return 0; }
            if (equiv_state == 1 && content_state == 1 && !j->lang_meta_s) {
                if (content.esc || !content.ascii) { j->defer = 1; return 0; }
                if (!all_str_space(content)) {
                    j->lang_meta_s = content.s;
                    j->lang_meta_n = content.n;
                }
            }
        } else if (!skip_value(j, depth + 1)) {
            return 0;
        }
        int m = arr_more(j);
        if (m < 0) return 0;
        if (m == 0) return 1;
    }
}

/* HTTP-Response-Metadata.Headers: a Content-Language header (any case); X-Robots-Tag values that may opt out */
static int walk_headers(J *j, int depth) {
    if (j->p >= j->e || *j->p != '{') return skip_value(j, depth);
    j->p++;
    ws(j);
    if (j->p < j->e && *j->p == '}') { j->p++; return 1; }
    for (;;) {
        jstr k;
        if (!next_key(j, &k)) return 0;
        if (k.esc) { j->defer = 1; return 0; }
        /* a header sent several times is a list of its values (CC-MAIN-2024-51 on): extract.py reads those */
        int is_list = j->p < j->e && *j->p == '[';
        if (j->c->opt_out_mask && eq_ci(k, "x-robots-tag") && j->p < j->e && (*j->p == '"' || is_list)) {
            if (is_list) { j->defer = 1; return 0; }
            jstr v;
            if (!parse_string(j, &v)) return 0;
            if (v.esc || may_opt_out(v.s, v.n, j->c->opt_out_mask)) { j->defer = 1; return 0; }
        } else if (eq_ci(k, "content-language")) {
            if (++j->hdr_matches > 1 || is_list) { j->defer = 1; return 0; }
            if (j->p < j->e && *j->p == '"') {
                jstr v;
                if (!parse_string(j, &v)) return 0;
                if (v.esc || !v.ascii) { j->defer = 1; return 0; }
                if (!all_str_space(v)) { j->lang_hdr_s = v.s; j->lang_hdr_n = v.n; }
            } else if (!skip_value(j, depth + 1)) {
                return 0;
            }
        } else if (!skip_value(j, depth + 1)) {
            return 0;
        }
        int m = obj_more(j);
        if (m < 0) return 0;
        if (m == 0) return 1;
    }
}

/* Head.Base: the <base href> when it is a string (anything else is skipped) */
static int walk_base(J *j, int depth) {
    if (j->p < j->e && *j->p == '"') {
        jstr v;
        if (!parse_string(j, &v)) return 0;
        j->base_s = v.s; j->base_n = v.n; j->base_esc = v.esc; j->base_set = 1;
        return 1;
    }
    return skip_value(j, depth);
}

static const field_t HEAD_FIELDS[] = {{"Base", walk_base}, {"Metas", walk_metas}};

static int walk_head(J *j, int depth) { return walk_fields(j, depth, HEAD_FIELDS, 2); }

/* one url or alt value of a link: string -> arena, null -> invalid; other types defer */
typedef struct { jstr s; int state; } lval;  /* state: 0 absent/null, 1 string */

static int link_value(J *j, lval *v) {
    if (j->p < j->e && *j->p == '"') {
        if (!parse_string(j, &v->s)) return 0;
        v->state = 1;
        return 1;
    }
    if (at_null(j)) { v->state = 0; return literal(j, "null", 4); }
    j->defer = 1;  /* a number, object, ...: the reference decides */
    return 0;
}

static int put_str(uint8_t *dst, int64_t *used, lval v) {
    if (!v.state) { dst[(*used)++] = 0; return 1; }
    int64_t n = unescape(v.s, dst + *used, 0);  /* -1 for a \u0000; a raw NUL never passed parse_string */
    if (n < 0) return 0;
    *used += n;
    dst[(*used)++] = 0;
    return 1;
}

static int walk_links(J *j, int depth) {
    if (at_null(j)) return literal(j, "null", 4);
    if (j->p >= j->e || *j->p != '[') { j->defer = 1; return 0; }
    j->has_links = 1;
    ctx_t *c = j->c;
    j->p++;
    ws(j);
    if (j->p < j->e && *j->p == ']') { j->p++; return 1; }
    for (;;) {
        ws(j);
        if (j->p >= j->e || *j->p != '{') { j->defer = 1; return 0; }
        j->p++;
        ws(j);
        int seen = 0, is_img = 0;
        lval url = {{0}, 0}, alt = {{0}, 0};
        if (j->p < j->e && *j->p == '}') j->p++;
        else for (;;) {
            jstr k;
            if (!next_key(j, &k)) return 0;
            if (k.esc) { j->defer = 1; return 0; }
            if (key_is(k, "path")) {
                if (seen & 1) { j->defer = 1; return 0; }
                seen |= 1;
                if (j->p < j->e && *j->p == '"') {
                    jstr v;
                    if (!parse_string(j, &v)) return 0;
                    if (v.esc) { j->defer = 1; return 0; }
                    is_img = v.n == 8 && memcmp(v.s, "IMG@/src", 8) == 0;
                } else if (!skip_value(j, depth + 2)) {
                    return 0;
                }
            } else if (key_is(k, "url")) {
                if (seen & 2) { j->defer = 1; return 0; }
                seen |= 2;
                if (!link_value(j, &url)) return 0;
            } else if (key_is(k, "alt")) {
                if (seen & 4) { j->defer = 1; return 0; }
                seen |= 4;
                if (!link_value(j, &alt)) return 0;
            } else if (!skip_value(j, depth + 2)) {
                return 0;
            }
            int m = obj_more(j);
            if (m < 0) return 0;
            if (m == 0) break;
        }
        if (is_img) {
            if (c->n_links >= c->links_cap) { j->defer = 1; return 0; }  /* cannot happen: room checked */
            int64_t i = c->n_links;
            c->src_valid[i] = (uint8_t)url.state;
            c->alt_valid[i] = (uint8_t)alt.state;
            c->link_page[i] = (int32_t)c->n_pages;
            c->src_start[i] = c->src_used;
            c->alt_start[i] = c->alt_used;
            if (!put_str(c->src, &c->src_used, url) || !put_str(c->alt, &c->alt_used, alt)) {
                j->defer = 1;
                return 0;
            }
            c->n_links++;
        }
        int m = arr_more(j);
        if (m < 0) return 0;
        if (m == 0) return 1;
    }
}

static const field_t HTML_FIELDS[] = {{"Links", walk_links}, {"Head", walk_head}};

static int walk_html(J *j, int depth) { return walk_fields(j, depth, HTML_FIELDS, 2); }

static const field_t RESPONSE_FIELDS[] = {{"HTML-Metadata", walk_html}, {"Headers", walk_headers}};

static int walk_response(J *j, int depth) { return walk_fields(j, depth, RESPONSE_FIELDS, 2); }

static const field_t PAYLOAD_FIELDS[] = {{"HTTP-Response-Metadata", walk_response}};

static int walk_payload(J *j, int depth) { return walk_fields(j, depth, PAYLOAD_FIELDS, 1); }

/* Envelope.WARC-Header-Metadata: read only when the WARC header has no target URI (then Python
 * decides); its type must still be one the typed decoder accepts */
static int walk_warc_header(J *j, int depth) {
    if (!(at_null(j) || (j->p < j->e && *j->p == '{'))) { j->defer = 1; return 0; }
    return skip_value(j, depth);
}

static const field_t ENVELOPE_FIELDS[] = {{"Payload-Metadata", walk_payload},
                                          {"WARC-Header-Metadata", walk_warc_header}};

static int walk_envelope(J *j, int depth) { return walk_fields(j, depth, ENVELOPE_FIELDS, 2); }

static const field_t DOC_FIELDS[] = {{"Envelope", walk_envelope}};

static int walk_doc(J *j) {
    ws(j);
    if (at_null(j)) { j->defer = 1; return 0; }  /* the document itself must be an object */
    return walk_fields(j, 0, DOC_FIELDS, 1);
}

/* ---------------------------------------------------------------------------------------- */
/* records */

static void put_pstr(ctx_t *c, const uint8_t *s, int64_t n) {
    memcpy(c->pblob + c->pblob_used, s, (size_t)n);
    c->pblob_used += n;
    c->pblob[c->pblob_used++] = 0;
}

/* The plain shape extract._base_parts splits: a printable-ASCII http(s) URL without spaces or
 * brackets in its host. Sets the scheme's length, the host's end and the path's last '/' (-1:
 * none); 0 for any other URL. */
static int plain_split(const uint8_t *u, int64_t n, int64_t *scheme_n, int64_t *host_end, int64_t *last_slash) {
    for (int64_t i = 0; i < n; i++)
        if (u[i] < 0x21 || u[i] > 0x7e) return 0;
    if (n < 7 || !match_ci(u, "http", 4)) return 0;
    int64_t k = 4;
    if (lower(u[k]) == 's') k++;
    if (n - k < 3 || memcmp(u + k, "://", 3) != 0) return 0;
    int64_t h0 = k + 3, h1 = h0;
    while (h1 < n && u[h1] != '/' && u[h1] != '?' && u[h1] != '#') h1++;
    if (h1 == h0) return 0;
    for (int64_t i = h0; i < h1; i++)
        if (u[i] == '[' || u[i] == ']') return 0;
    int64_t p1 = h1, last = -1;
    while (p1 < n && u[p1] != '?' && u[p1] != '#') p1++;
    for (int64_t i = h1; i < p1; i++)
        if (u[i] == '/') last = i;
    *scheme_n = k;
    *host_end = h1;
    *last_slash = last;
    return 1;
}

/* extract._base_parts(url): (scheme, origin, directory) for the plain shape (plain_split), put
 * in pblob; 0 for any other URL */
static int put_base_parts(ctx_t *c, const uint8_t *u, int64_t n) {
    int64_t scheme_n, h1, last;
    if (!plain_split(u, n, &scheme_n, &h1, &last)) return 0;
    uint8_t scheme[5];
    for (int64_t i = 0; i < scheme_n; i++) scheme[i] = lower(u[i]);
    put_pstr(c, scheme, scheme_n);
    /* origin: scheme "://" host */
    uint8_t *o = c->pblob + c->pblob_used;
    memcpy(o, scheme, (size_t)scheme_n);
    memcpy(o + scheme_n, u + scheme_n, (size_t)(h1 - scheme_n));
    c->pblob_used += h1;
    c->pblob[c->pblob_used++] = 0;
    /* directory: origin, then the path up to its last '/' ("/" when the path is empty) */
    o = c->pblob + c->pblob_used;
    memcpy(o, scheme, (size_t)scheme_n);
    memcpy(o + scheme_n, u + scheme_n, (size_t)(h1 - scheme_n));
    int64_t dn = h1;
    if (last < 0) o[dn++] = '/';
    else { memcpy(o + dn, u + h1, (size_t)(last + 1 - h1)); dn += last + 1 - h1; }
    c->pblob_used += dn;
    c->pblob[c->pblob_used++] = 0;
    return 1;
}

/* The <base href> strs[pg[1]:pg[1] + pg[2]] joined to the page URL uri, where that needs no
 * more than urljoin does to plain shapes: after str.strip(), printable ASCII without '?', '#',
 * ';' (urlunparse would drop an empty query, fragment or params), '&' (entities are decoded by
 * Python first), brackets or a backslash, and
 *   - "http://" or "https://" in lower case and a host: the href itself;
 *   - "//" and a host: the page URL's scheme, ':', the href;
 *   - one '/', no ':' and no "/.": the page URL's origin, then the href (urljoin keeps the
 *     segments of an absolute path as they are when none is '.' or '..').
 * The joined base replaces the href in strs (pg[1], pg[2]: extract_native.Batch.based) and its
 * parts are put as the page's. 0 for any other href (Python joins it: extract._page_base), or a
 * page URL of another shape. */
static int based_here(ctx_t *c, int64_t *pg, const uint8_t *uri, int64_t uri_n) {
    int64_t off = pg[1], n = pg[2];
    const uint8_t *h = c->strs + off;
    while (n && is_str_space_ascii(h[0])) { h++; n--; }
    while (n && is_str_space_ascii(h[n - 1])) n--;
    if (n == 0) return 0;
    for (int64_t i = 0; i < n; i++)
        if (h[i] < 0x21 || h[i] > 0x7e || h[i] == '?' || h[i] == '#' || h[i] == ';' || h[i] == '&' || h[i] == '['
            || h[i] == ']' || h[i] == '\\') return 0;
    int64_t k = n >= 8 && memcmp(h, "https://", 8) == 0 ? 8 : n >= 7 && memcmp(h, "http://", 7) == 0 ? 7 : 0;
    if (k) {
        if (k == n || h[k] == '/') return 0;
        memmove(c->strs + off, h, (size_t)n);
    } else {
        int64_t scheme_n, h1, last;
        if (h[0] != '/' || n < 2 || !plain_split(uri, uri_n, &scheme_n, &h1, &last)) return 0;
        /* the joined base goes after the href in strs: room for it is there (wat_scan's check) */
        uint8_t *o = c->strs + c->strs_used;
        int64_t m = 0;
        for (int64_t i = 0; i < scheme_n; i++) o[m++] = lower(uri[i]);
        if (h[1] == '/') {  /* //host/path */
            if (n == 2 || h[2] == '/') return 0;
            o[m++] = ':';
        } else {  /* /path */
            if (memchr(h, ':', (size_t)n) || find(h, n, 0, "/.", 2) >= 0) return 0;
            memcpy(o + m, uri + scheme_n, (size_t)(h1 - scheme_n));
            m += h1 - scheme_n;
        }
        memcpy(o + m, h, (size_t)n);
        m += n;
        pg[1] = c->strs_used;
        c->strs_used += m;
        n = m;
    }
    pg[2] = n;
    return put_base_parts(c, c->strs + pg[1], n);
}

static int wat_page(ctx_t *c, const uint8_t *uri, int64_t uri_n, const uint8_t *body, int64_t body_n) {
    int64_t save_links = c->n_links, save_src = c->src_used, save_alt = c->alt_used;
    J j;
    memset(&j, 0, sizeof j);
    j.p = body;
    j.e = body + body_n;
    j.c = c;
    int ok = walk_doc(&j);
    if (ok) {
        ws(&j);
        if (j.p != j.e) ok = 0;
    }
    if (!ok || j.defer) {
        c->n_links = save_links;
        c->src_used = save_src;
        c->alt_used = save_alt;
        return K_DEFER;
    }
    if (!j.has_links) return K_NOIMG;  /* no links were added */
    int64_t *pg = c->pages + c->n_pages * PAGE_FIELDS;
    pg[0] = c->pblob_used;
    pg[1] = -1; pg[2] = -1;
    pg[3] = save_links;
    pg[4] = c->n_links - save_links;
    pg[5] = 0;
    put_pstr(c, uri, uri_n);
    /* language: str.strip()[:64] of an ASCII value */
    const uint8_t *ls = j.lang_meta_s ? j.lang_meta_s : j.lang_hdr_s;
    int64_t ln = j.lang_meta_s ? j.lang_meta_n : j.lang_hdr_n;
    if (ls) {
        while (ln && is_str_space_ascii(ls[0])) { ls++; ln--; }
        while (ln && is_str_space_ascii(ls[ln - 1])) ln--;
        if (ln > 64) ln = 64;
        put_pstr(c, ls, ln);
        pg[5] |= F_LANG;
    } else {
        put_pstr(c, uri, 0);
    }
    /* <base href>: a non-blank one is the base, joined to the page URL here when that leaves it as
     * it is, else by Python; without one the page URL is the base */
    int blank = 1;
    if (j.base_set) {
        jstr b = {j.base_s, j.base_n, j.base_esc, 0};
        int64_t off = c->strs_used;
        int64_t n = unescape(b, c->strs + off, 1);
        for (int64_t i = 0; i < n && blank; i++)
            if (!is_str_space_ascii(c->strs[off + i])) blank = 0;
        if (!blank) {
            c->strs_used += n;
            pg[1] = off;
            pg[2] = n;
        }
    }
    if (blank ? put_base_parts(c, uri, uri_n) : based_here(c, pg, uri, uri_n)) pg[5] |= blank ? F_PARTS : F_PARTS | F_BASED;
    else { put_pstr(c, uri, 0); put_pstr(c, uri, 0); put_pstr(c, uri, 0); }
    c->n_pages++;
    return K_PAGE;
}

/* bytes.strip() bounds of s[a:b] */
static void strip_bytes(const uint8_t *s, int64_t *a, int64_t *b) {
    while (*a < *b && is_bytes_space(s[*a])) (*a)++;
    while (*b > *a && is_bytes_space(s[*b - 1])) (*b)--;
}

/* whether '"IMG@/src"' occurs in s: a search for its '@', rare in the records without links */
static int has_img_path(const uint8_t *s, int64_t n) {
    const uint8_t *p = s + 4, *e = s + n - 5;
    while (p < e) {
        p = memchr(p, '@', (size_t)(e - p));
        if (!p) return 0;
        if (memcmp(p - 4, "\"IMG", 4) == 0 && memcmp(p + 1, "/src\"", 5) == 0) return 1;
        p++;
    }
    return 0;
}

static int classify(ctx_t *c, const uint8_t *d, int64_t n) {
    if (n < 5 || memcmp(d, "WARC/", 5) != 0) return K_DEFER;
    int64_t h_end = find(d, n < MAX_HEADER ? n : MAX_HEADER, 0, "\r\n\r\n", 4);
    if (h_end < 0) return K_DEFER;
    const uint8_t *h = d;
    int64_t counts[3];  /* each name must occur once in the header, as a field or not */
    count_names(h, h_end, counts);
    /* Content-Length */
    int64_t i = find_ci(h, h_end, "\r\ncontent-length:", 17);
    if (i < 0 || counts[0] != 1) return K_DEFER;
    int64_t e = find(h, h_end, i + 17, "\r\n", 2);
    if (e < 0) e = h_end;
    int64_t a = i + 17, b = e;
    while (a < b && (h[a] == ' ' || h[a] == '\t')) a++;
    while (b > a && (h[b - 1] == ' ' || h[b - 1] == '\t')) b--;
    if (b == a || b - a > 15) return K_DEFER;
    int64_t length = 0;
    for (int64_t k = a; k < b; k++) {
        if (h[k] < '0' || h[k] > '9') return K_DEFER;
        length = length * 10 + (h[k] - '0');
    }
    int64_t body = h_end + 4, end = body + length;
    if (length > c->max_record_bytes || end + 4 != n || memcmp(d + n - 4, "\r\n\r\n", 4) != 0) return K_DEFER;
    /* WARC-Type */
    i = find_ci(h, h_end, "\r\nwarc-type:", 12);
    if (i < 0 || counts[1] != 1) return K_DEFER;
    e = find(h, h_end, i + 12, "\r\n", 2);
    if (e < 0) e = h_end;
    a = i + 12; b = e;
    strip_bytes(h, &a, &b);
    int metadata = b - a == 8 && match_ci(h + a, "metadata", 8);
    int response = b - a == 8 && match_ci(h + a, "response", 8);
    if (response) return K_DEFER;
    if (!metadata) return K_OTHER;
    if (length == 0 || d[body] != '{') return K_DEFER;
    if (!has_img_path(d + body, length)) return K_NOIMG;
    /* WARC-Target-URI */
    if (counts[2] != 1) return K_DEFER;
    i = find_ci(h, h_end, "\r\nwarc-target-uri:", 18);
    if (i < 0) return K_DEFER;
    e = find(h, h_end, i + 18, "\r\n", 2);
    if (e < 0) e = h_end;
    a = i + 18; b = e;
    strip_bytes(h, &a, &b);
    if (b > a && h[a] == '<' && h[b - 1] == '>') { a++; b--; }
    if (b <= a || !utf8_ok(h + a, b - a) || memchr(h + a, 0, (size_t)(b - a))) return K_DEFER;
    return wat_page(c, h + a, b - a, d + body, length);
}

/* ---------------------------------------------------------------------------------------- */
/* gzip members */

/* Walk gzip members from buf[start]; returns where it stopped. *status: S_FULL when an output
 * is full (call again after taking the results), S_STOP when Python's member loop must look at
 * buf[start:] (no member header there, no next header buffered yet, or a member that does not
 * inflate whole at its first end). */
int64_t wat_scan(ctx_t *c, const uint8_t *buf, int64_t len, int64_t start, int32_t *status) {
    static const char magic[3] = {0x1f, (char)0x8b, 0x08};
    *status = S_STOP;
    while (len - start >= 3 && memcmp(buf + start, magic, 3) == 0) {
        int64_t end = find(buf, len, start + 20, magic, 3);
        if (end < 0) break;
        int64_t n = end - start;
        uint32_t size = (uint32_t)buf[end - 4] | ((uint32_t)buf[end - 3] << 8) | ((uint32_t)buf[end - 2] << 16)
                        | ((uint32_t)buf[end - 1] << 24);
        if (size > DECOMPRESS_CAP || (int64_t)size > 1032 * n) break;
        if (c->n_mem >= c->mem_cap || c->n_pages >= c->pages_cap || c->arena_used + size > c->arena_cap
            || c->strs_used + 2 * size > c->strs_cap || c->pblob_used + 4 * size + 80 > c->pblob_cap
            || c->src_used + size > c->src_cap
            || c->alt_used + size > c->alt_cap || c->n_links + size / 8 + 1 > c->links_cap) {
            *status = c->n_mem ? S_FULL : S_STOP;  /* a member too big for empty buffers: Python's */
            break;
        }
        size_t ain = 0, aout = 0;
        uint8_t *out = c->arena + c->arena_used;
        int r = c->gunzip(c->decompressor, buf + start, (size_t)n, out, size, &ain, &aout);
        if (r != 0 || (int64_t)ain != n || aout != size) break;
        int64_t *m = c->mem + c->n_mem * MEM_FIELDS;
        m[1] = c->arena_used;
        m[2] = size;
        m[3] = -1;
        if (size == 0) {
            m[0] = K_EMPTY;
        } else {
            int64_t page = c->n_pages;
            m[0] = classify(c, out, size);
            if (m[0] == K_PAGE) m[3] = page;
            else if (m[0] == K_DEFER) c->n_defer++;
            else if (m[0] == K_OTHER) c->n_other++;
            else if (m[0] == K_NOIMG) c->n_noimg++;
            c->n_bytes += size;
        }
        c->arena_used += size;
        c->n_mem++;
        start = end;
    }
    return start;
}

/* ---------------------------------------------------------------------------------------- */
/* LAION's link rules (extract._check_link, as extract_vec.link_outcomes applies them): the
 * same cases the vectorised rules settle are settled here, and every other link is marked hard
 * for Python's reference, exactly as extract_vec marks them. */

void wat_uids(const uint8_t *urls, const int64_t *url_off, const uint8_t *caps, const int64_t *cap_off, int64_t n,
              uint8_t *out, void *init, void *update, void *final);

enum { R_KEPT = -1, R_HARD = -2 };
enum { R_NO_ALT = 0, R_SHORT_ALT, R_DATA_URI, R_JAVASCRIPT, R_SVG, R_GIF, R_INVALID_URL, R_LONG_HOST, N_REASONS };

typedef struct { uint8_t *p; int64_t n, cap; } gbuf;

static int gbuf_room(gbuf *b, int64_t more) {
    if (b->n + more <= b->cap) return 1;
    int64_t cap = b->cap ? b->cap : 1 << 16;
    while (cap < b->n + more) cap *= 2;
    uint8_t *p = realloc(b->p, (size_t)cap);
    if (!p) return 0;
    b->p = p;
    b->cap = cap;
    return 1;
}

typedef struct {
    int64_t min_alt, reject_svg, reject_gif, max_host, max_text;
    void *sha_init, *sha_update, *sha_final;  /* OpenSSL's, or NULL (see wat_uids) */
    /* parts of the pages whose <base href> Python joined: sorted page indices, and per page
     * scheme, origin, directory in blob, each then a NUL (an empty scheme: no parts) */
    const int64_t *ovr_page; const uint8_t *ovr_blob; int64_t n_ovr;
} rules_cfg;

typedef struct {
    gbuf url, cap, purl, lang;  /* kept links: url, caption, page URL, language; each then a NUL */
    gbuf uid;                   /* kept links: extract.uid_of(url, caption), 32 hex digits then a NUL */
    gbuf lang_valid;            /* a byte per kept link: 0 when its page has no language */
    gbuf row_link;              /* int64 per kept link: its link index in the batch */
    gbuf hard;                  /* int64 per hard link: its link index */
    gbuf hsrc, halt;            /* per hard link: url and alt as found, each then a NUL */
    gbuf hvalid;                /* 2 bytes per hard link: url, alt not null */
    int64_t reasons[N_REASONS], url_cut, cap_cut;
} rules_out;

/* str.isspace() */
static int is_py_space(uint32_t c) {
    if (c < 0x80) return is_str_space_ascii((uint8_t)c);
    return c == 0x85 || c == 0xa0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029
           || c == 0x202f || c == 0x205f || c == 0x3000;
}

static uint32_t next_cp(const uint8_t *s, int64_t *i) {  /* valid UTF-8 */
    uint8_t c = s[*i];
    if (c < 0x80) { (*i)++; return c; }
    if (c < 0xe0) { uint32_t v = ((uint32_t)(c & 0x1f) << 6) | (s[*i + 1] & 0x3f); *i += 2; return v; }
    if (c < 0xf0) {
        uint32_t v = ((uint32_t)(c & 0x0f) << 12) | ((uint32_t)(s[*i + 1] & 0x3f) << 6) | (s[*i + 2] & 0x3f);
        *i += 3;
        return v;
    }
    uint32_t v = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[*i + 1] & 0x3f) << 12) | ((uint32_t)(s[*i + 2] & 0x3f) << 6)
                 | (s[*i + 3] & 0x3f);
    *i += 4;
    return v;
}

/* extract_vec._ODD_ALT: an alt html.unescape may change, or with U+001C-U+001F */
static int odd_alt(const uint8_t *a, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint8_t c = a[i];
        if (c >= 0x1c && c <= 0x1f) return 1;
        if (c == '&' && i + 1 < n) {
            uint8_t d = a[i + 1];
            if (d == '#') {
                if (i + 2 < n && ((a[i + 2] >= '0' && a[i + 2] <= '9') || a[i + 2] == 'x' || a[i + 2] == 'X')) return 1;
            } else if (!(d == '\t' || d == '\n' || d == 0x0c || d == ' ' || d == '<' || d == '&' || d == ';')) {
                return 1;
            }
        }
    }
    return 0;
}

/* Whether an alt is already what " ".join(alt.split()) makes of it, and odd_alt passes it:
 * printable ASCII without '&', no space at either end, no two spaces in a row (most alts) */
static int plain_alt(const uint8_t *a, int64_t n) {
    if (n == 0 || a[0] == ' ' || a[n - 1] == ' ') return 0;
    int64_t i = 0;
    unsigned prev = 0;  /* whether the byte before a[i] is a space */
#if defined(__SSE2__) && defined(__GNUC__)
    const __m128i space = _mm_set1_epi8(' '), del = _mm_set1_epi8(0x7f), amp = _mm_set1_epi8('&');
    for (; i + 16 <= n; i += 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(a + i));
        /* signed compare: below 0x20, and 0x80-0xff (negative) */
        __m128i bad = _mm_or_si128(_mm_cmplt_epi8(v, space), _mm_or_si128(_mm_cmpeq_epi8(v, del), _mm_cmpeq_epi8(v, amp)));
        if (_mm_movemask_epi8(bad)) return 0;
        unsigned sp = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v, space));
        if (sp & ((sp << 1) | prev)) return 0;  /* a space right after a space */
        prev = sp >> 15;
    }
#endif
    for (; i < n; i++) {
        uint8_t c = a[i];
        if (c < 0x20 || c >= 0x7f || c == '&') return 0;
        unsigned sp = c == ' ';
        if (sp && prev) return 0;
        prev = sp;
    }
    return 1;
}

/* extract._ENTITY: &#123; &#x1F; &name; */
static int has_entity(const uint8_t *s, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        if (s[i] != '&') continue;
        int64_t j = i + 1;
        if (j < n && s[j] == '#') {
            j++;
            int64_t k = j;
            if (j < n && (s[j] == 'x' || s[j] == 'X')) {
                k = ++j;
                while (j < n && hexv(s[j]) >= 0) j++;
            } else {
                while (j < n && s[j] >= '0' && s[j] <= '9') j++;
            }
            if (j > k && j < n && s[j] == ';') return 1;
        } else if (j < n && ((s[j] | 0x20) >= 'a' && (s[j] | 0x20) <= 'z')) {
            j++;
            while (j < n && (((s[j] | 0x20) >= 'a' && (s[j] | 0x20) <= 'z') || (s[j] >= '0' && s[j] <= '9'))) j++;
            if (j < n && s[j] == ';') return 1;
        }
    }
    return 0;
}

/* the characters a host name cannot hold (extract_vec._url_pattern) */
static const uint8_t not_host[256] = {
    [' '] = 1, ['/'] = 1, ['?'] = 1, ['#'] = 1, ['@'] = 1, [':'] = 1, ['['] = 1, [']'] = 1, ['<'] = 1, ['>'] = 1,
    ['"'] = 1, ['\''] = 1, ['{'] = 1, ['}'] = 1, ['|'] = 1, ['\\'] = 1, ['^'] = 1, ['`'] = 1};

/* extract_vec._url_pattern(max_host) (max_host < 0: None) on a printable-ASCII URL; where it
 * matches and `host_at` is not NULL, the host's bounds (brackets included) go to host_at[0], host_at[1] */
static int url_ok(const uint8_t *u, int64_t n, int64_t max_host, int64_t *host_at) {
    if (n < 7 || !match_ci(u, "http", 4)) return 0;
    int64_t p = 4;
    if (lower(u[p]) == 's') p++;
    if (n - p < 3 || memcmp(u + p, "://", 3) != 0) return 0;
    p += 3;
    int64_t q = p;
    while (q < n && u[q] != '/' && u[q] != '?' && u[q] != '#' && u[q] != '@') q++;
    if (q < n && u[q] == '@') p = q + 1;  /* userinfo */
    int64_t host;
    if (p < n && u[p] == '[') {
        q = p + 1;
        while (q < n && (hexv(u[q]) >= 0 || u[q] == ':' || u[q] == '.')) q++;
        if (q == p + 1 || q >= n || u[q] != ']') return 0;
        host = q + 1 - p;
        if (max_host >= 0 && (max_host < 3 || host > max_host)) return 0;
        q++;
    } else {
        q = p;
        while (q < n && !not_host[u[q]]) q++;
        host = q - p;
        if (host < 1 || (max_host >= 0 && host > max_host)) return 0;
    }
    if (host_at) { host_at[0] = p; host_at[1] = q; }
    p = q;
    if (p < n && u[p] == ':') {
        p++;
        q = p;
        while (q < n && u[q] >= '0' && u[q] <= '9') q++;
        int64_t z = p;
        while (z < q && u[z] == '0') z++;
        if (q - z > 5) return 0;
        int64_t v = 0;
        for (int64_t k = z; k < q; k++) v = v * 10 + (u[k] - '0');
        if (v > 65535) return 0;
        p = q;
    }
    return p == n || u[p] == '/' || u[p] == '?' || u[p] == '#';
}

/* Whether a (printable ASCII) host is dotted decimal: four labels of 0-255 in decimal, without
 * leading zeros, and no trailing dot (what WHATWG's parser writes an IPv4 address as). */
static int dotted_decimal(const uint8_t *h, int64_t n) {
    int labels = 0;
    for (int64_t i = 0; i <= n; labels++) {
        int64_t j = i;
        int value = 0;
        while (j < n && h[j] >= '0' && h[j] <= '9' && j - i < 3) value = value * 10 + (h[j++] - '0');
        if (j == i || (j < n && h[j] != '.') || value > 255 || (h[i] == '0' && j - i > 1)) return 0;
        i = j + 1;  /* past the dot; past the end after the last label */
    }
    return labels == 4 && h[n - 1] != '.';
}

/* WHATWG's "ends in a number" (ipv4.ends_in_number): the last label, one trailing dot aside,
 * decimal digits, or "0x" and hex digits. */
static int ends_in_number(const uint8_t *h, int64_t n) {
    if (n > 1 && h[n - 1] == '.') n--;
    int64_t s = n;
    while (s > 0 && h[s - 1] != '.') s--;
    if (s == n) return 0;
    int64_t i = s;
    if (n - s >= 2 && h[s] == '0' && (h[s + 1] | 0x20) == 'x') {
        for (i = s + 2; i < n && ((h[i] >= '0' && h[i] <= '9') || ((h[i] | 0x20) >= 'a' && (h[i] | 0x20) <= 'f')); i++) {}
    } else {
        while (i < n && h[i] >= '0' && h[i] <= '9') i++;
    }
    return i == n;
}

/* Whether WHATWG's host parser does more to a (printable ASCII) host than lower-case it
 * (extract._ODD_HOST, extract._numeric_end): a '%' to decode, an IPv4 address in another
 * spelling than dotted decimal (`0x7f.1`, `01.2.3.4`, `127.1`; or no address: `1.2.3.4.5`).
 * The reference decides those (extract._parse_host: it may refuse the host, invalid_url). An
 * ASCII host's "xn--" labels are not checked (extract._parse_host, whatwg/url#914). */
static int odd_host(const uint8_t *h, int64_t n) {
    if (memchr(h, '%', (size_t)n)) return 1;
    return ends_in_number(h, n) && !dotted_decimal(h, n);
}

static int starts(const uint8_t *s, int64_t n, const char *pre) {
    int64_t m = (int64_t)strlen(pre);
    return n >= m && memcmp(s, pre, (size_t)m) == 0;
}

/* cut a UTF-8 string to at most `cap` code points; returns its byte length, *cut when cut */
static int64_t cut_chars(const uint8_t *s, int64_t n, int64_t cap, int *cut) {
    if (n <= cap) { *cut = 0; return n; }  /* no more characters than bytes */
    int64_t i = 0, chars = 0;
    while (i < n && chars < cap) { next_cp(s, &i); chars++; }
    *cut = i < n;
    return i;
}

/* The length of the leading run of s that is printable ASCII without '&' (16 bytes at a time
 * where SSE2 is there). */
static int64_t plain_src_run(const uint8_t *s, int64_t n) {
    int64_t i = 0;
#if defined(__SSE2__) && defined(__GNUC__)
    const __m128i lo = _mm_set1_epi8(0x1f), hi = _mm_set1_epi8(0x7f), amp = _mm_set1_epi8('&');
    while (n - i >= 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(s + i));
        /* signed: bytes 0x80-0xff are negative, so below 0x20 too */
        __m128i ok = _mm_and_si128(_mm_cmpgt_epi8(v, lo), _mm_cmplt_epi8(v, hi));
        int bad = ~_mm_movemask_epi8(ok) & 0xffff;
        bad |= _mm_movemask_epi8(_mm_cmpeq_epi8(v, amp));
        if (bad) return i + __builtin_ctz((unsigned)bad);
        i += 16;
    }
#endif
    while (i < n && s[i] >= 0x20 && s[i] <= 0x7e && s[i] != '&') i++;
    return i;
}

/* Whether lower(s) holds `word` (lower case) starting `at` bytes from a `mark` character: word
 * then mark (at = -len(word), "javascript" before ':'), mark then word (at = 1, "svg" after '.'),
 * or a word holding the mark ("data:image" at = -4, its ':'), as `"data:image" in low`. */
static int contains_ci(const uint8_t *s, int64_t n, uint8_t mark, const char *word, int64_t wn, int64_t at) {
    const uint8_t *p = s, *e = s + n;
    while (p < e && (p = memchr(p, mark, (size_t)(e - p))) != NULL) {
        const uint8_t *w = p + at;
        if (w >= s && w + wn <= e && match_ci(w, word, wn)) return 1;
        p++;
    }
    return 0;
}

typedef struct { const uint8_t *p; int64_t n; } seg_t;

/* urljoin(base, src) for a src that is a path with dot segments, as extract._Base._join_dots
 * does it (urllib.parse's steps): the segments are src's when it starts with '/', else the
 * base directory's then src's with the empty ones between the first and the last dropped;
 * '..' pops the last kept one (the leading empty one too), '.' goes; a last '.' or '..' leaves
 * a trailing slash. Writes origin + path to out and returns its length. `segs` holds room for
 * 2 * (slashes in dir and src + 2) segments. */
static int64_t join_dots(const uint8_t *origin, int64_t on, const uint8_t *dir, int64_t dn,
                         const uint8_t *src, int64_t sn, uint8_t *out, seg_t *segs) {
    int64_t n = 0;
    for (int part = src[0] == '/' ? 1 : 0; part < 2; part++) {  /* split on '/' */
        const uint8_t *s = part ? src : dir;
        int64_t len = part ? sn : dn, at = 0;
        for (int64_t i = 0; i <= len; i++) {
            if (i == len || s[i] == '/') { segs[n].p = s + at; segs[n].n = i - at; n++; at = i + 1; }
        }
    }
    int joined = src[0] != '/';
    seg_t *kept = segs + n;
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        seg_t g = segs[i];
        if (joined && g.n == 0 && i > 0 && i < n - 1) continue;  /* empty ones in between */
        if (g.n == 2 && g.p[0] == '.' && g.p[1] == '.') { if (k) k--; }
        else if (!(g.n == 1 && g.p[0] == '.')) kept[k++] = g;
    }
    seg_t last = segs[n - 1];
    if ((last.n == 1 && last.p[0] == '.') || (last.n == 2 && last.p[0] == '.' && last.p[1] == '.')) {
        kept[k].p = src; kept[k].n = 0; k++;
    }
    memcpy(out, origin, (size_t)on);
    int64_t m = on;
    if (k == 0 || kept[0].n > 0) out[m++] = '/';  /* "/".join(kept) or "/", made absolute */
    for (int64_t i = 0; i < k; i++) {
        if (i) out[m++] = '/';
        memcpy(out + m, kept[i].p, (size_t)kept[i].n);
        m += kept[i].n;
    }
    if (k == 1 && kept[0].n == 0) out[m++] = '/';  /* [""] joins to "", which is "/" */
    return m;
}

/* Whether s holds a character urlparse reads as more than a path (extract._NOT_A_PLAIN_PATH;
 * s is printable ASCII here). */
static int not_plain_path(const uint8_t *s, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (s[i] == ':' || s[i] == '?' || s[i] == '#' || s[i] == ';' || s[i] == ' ') return 1;
    return 0;
}

/* one link: its reason (R_KEPT, R_HARD, or a reason index); a kept link's url and caption are
 * appended to out */
/* Whether urlsplit reads a scheme other than http(s) in s: a letter, then letters, digits, '+',
 * '-' or '.' up to the first ':'. urljoin returns such a src as it is, on an http(s) base. */
static int other_scheme(const uint8_t *s, int64_t n) {
    const uint8_t *colon = memchr(s, ':', (size_t)n);
    if (!colon || colon == s || !((s[0] | 0x20) >= 'a' && (s[0] | 0x20) <= 'z')) return 0;
    int64_t k = colon - s;
    for (int64_t i = 0; i < k; i++) {
        uint8_t ch = s[i];
        if (!((ch | 0x20) >= 'a' && (ch | 0x20) <= 'z') && !(ch >= '0' && ch <= '9') && ch != '+' && ch != '-' && ch != '.')
            return 0;
    }
    return !((k == 4 && match_ci(s, "http", 4)) || (k == 5 && match_ci(s, "https", 5)));
}

/* urljoin(base, src) for a src that starts with '?' or '#', on a base of the plain shape
 * without '?', '#' or ';' (so urlunparse gives it back as it is): the base, then src's query
 * and fragment, each only when not empty. Returns the length written to out. */
static int64_t join_query(const uint8_t *base, int64_t bn, const uint8_t *src, int64_t sn, uint8_t *out) {
    const uint8_t *hash = memchr(src, '#', (size_t)sn);
    int64_t i = hash ? hash - src : sn, m = bn;
    memcpy(out, base, (size_t)bn);
    if (src[0] == '?' && i > 1) { memcpy(out + m, src, (size_t)i); m += i; }
    if (i + 1 < sn) { memcpy(out + m, src + i, (size_t)(sn - i)); m += sn - i; }
    return m;
}

static int link_rule(const rules_cfg *cfg, rules_out *out, const uint8_t *src, int64_t sn, int src_valid,
                     const uint8_t *alt, int64_t an, int alt_valid, const uint8_t *const parts[3],
                     const int64_t parts_n[3], const uint8_t *base, int64_t base_n, uint8_t *scratch, seg_t *segs) {
    /* alt */
    int64_t fold_n = 0, chars = 0;
    if (!alt_valid) {
        if (cfg->min_alt > 0) return R_NO_ALT;
    } else if (plain_alt(alt, an)) {  /* folds to itself */
        memcpy(scratch, alt, (size_t)an);
        fold_n = chars = an;
    } else {
        if (odd_alt(alt, an)) return R_HARD;
        /* " ".join(alt.split()) */
        int64_t i = 0;
        int in_word = 0;
        while (i < an) {
            uint8_t c = alt[i];
            if (c < 0x80) {
                if (is_str_space_ascii(c)) { in_word = 0; i++; continue; }
                if (!in_word && fold_n) { scratch[fold_n++] = ' '; chars++; }
                in_word = 1;
                scratch[fold_n++] = c;
                chars++;
                i++;
                continue;
            }
            int64_t at = i;
            uint32_t cp = next_cp(alt, &i);
            if (is_py_space(cp)) { in_word = 0; continue; }
            if (!in_word && fold_n) { scratch[fold_n++] = ' '; chars++; }
            in_word = 1;
            memcpy(scratch + fold_n, alt + at, (size_t)(i - at));
            fold_n += i - at;
            chars++;
        }
    }
    if (chars < cfg->min_alt) return R_SHORT_ALT;
    /* src: printable ASCII, tab, CR, LF, and no entity; else the reference decides */
    if (!src_valid) sn = 0;
    int64_t amp = plain_src_run(src, sn);
    for (int64_t i = amp; i < sn; i++) {
        uint8_t c = src[i];
        if (!((c >= 0x20 && c <= 0x7e) || c == '\t' || c == '\n' || c == '\r')) return R_HARD;
    }
    if (amp < sn && has_entity(src + amp, sn - amp)) return R_HARD;
    int64_t a = 0, b = sn;
    while (a < b && (src[a] == ' ' || src[a] == '\t' || src[a] == '\n' || src[a] == '\r')) a++;
    while (b > a && (src[b - 1] == ' ' || src[b - 1] == '\t' || src[b - 1] == '\n' || src[b - 1] == '\r')) b--;
    /* the substring rules, on lower(s) where s is the stripped src */
    const uint8_t *s = src + a;
    int64_t bn = b - a;
    if (contains_ci(s, bn, ':', "data:image", 10, -4)) return R_DATA_URI;
    if (contains_ci(s, bn, ':', "javascript", 10, -10)) return R_JAVASCRIPT;
    if (cfg->reject_svg && contains_ci(s, bn, '.', "svg", 3, 1)) return R_SVG;
    if (cfg->reject_gif && contains_ci(s, bn, '.', "gif", 3, 1)) return R_GIF;
    /* clean: s without tab, CR, LF */
    uint8_t *clean = scratch + fold_n;
    int64_t cn = 0;
    for (int64_t i = a; i < b; i++)
        if (src[i] != '\t' && src[i] != '\n' && src[i] != '\r') clean[cn++] = src[i];
    /* join to the base */
    const uint8_t *pre = NULL;
    int64_t pre_n = 0, extra = 0;  /* extra: the ':' after a scheme */
    uint8_t *url = clean + cn;
    int64_t un = -1;
    if ((cn >= 7 && match_ci(clean, "http://", 7)) || (cn >= 8 && match_ci(clean, "https://", 8))) {
    } else if (cn == 0) {
    } else if (clean[0] == '.' || find(clean, cn, 0, "/.", 2) >= 0) {
        if (!parts[0] || starts(clean, cn, "//") || not_plain_path(clean, cn)) return R_HARD;
        un = join_dots(parts[1], parts_n[1], parts[2] + parts_n[1], parts_n[2] - parts_n[1], clean, cn, url, segs);
    } else if (!parts[0]) {
        return R_HARD;
    } else if (starts(clean, cn, "//")) {
        pre = parts[0]; pre_n = parts_n[0]; extra = 1;
    } else if (clean[0] == '/') {
        pre = parts[1]; pre_n = parts_n[1];
    } else if (clean[0] != '?' && clean[0] != '#' && !memchr(clean, ':', (size_t)cn)) {
        pre = parts[2]; pre_n = parts_n[2];
    } else if ((clean[0] == '?' || clean[0] == '#') && base) {
        un = join_query(base, base_n, clean, cn, url);
    } else if (!other_scheme(clean, cn)) {
        return R_HARD;
    }  /* else the src as it is (about:blank, mailto:...): url_ok below rejects it */
    if (un < 0) {
        un = 0;
        if (pre) { memcpy(url, pre, (size_t)pre_n); un = pre_n; if (extra) url[un++] = ':'; }
        memcpy(url + un, clean, (size_t)cn);
        un += cn;
    }
    int64_t host_at[2];
    if (!url_ok(url, un, -1, host_at)) return R_INVALID_URL;
    if (odd_host(url + host_at[0], host_at[1] - host_at[0])) return R_HARD;
    if (!url_ok(url, un, cfg->max_host, NULL)) return R_LONG_HOST;
    /* extract.fold_case: scheme and host in lower case (the URL is printable ASCII here, so the
     * host needs no punycode), and the port as a number, none where it is empty or the scheme's
     * default (url_ok has checked it: digits, at most 65535) */
    for (int64_t i = 0; url[i] != ':'; i++) url[i] = lower(url[i]);
    for (int64_t i = host_at[0]; i < host_at[1]; i++) url[i] = lower(url[i]);
    if (host_at[1] < un && url[host_at[1]] == ':') {
        int64_t p = host_at[1] + 1, q = p, z = p, port = 0;
        while (q < un && url[q] >= '0' && url[q] <= '9') q++;
        while (z < q - 1 && url[z] == '0') z++;  /* leading zeros; "0" itself stays */
        for (int64_t k = z; k < q; k++) port = port * 10 + (url[k] - '0');
        int64_t from = p, to = z;  /* the bytes that go */
        if (q == p || port == (url[4] == 's' ? 443 : 80)) { from = host_at[1]; to = q; }
        if (to > from) {
            memmove(url + from, url + to, (size_t)(un - to));
            un -= to - from;
        }
    }
    /* kept: cut to max_text_chars (the URL is ASCII) */
    int cut;
    int64_t keep = un > cfg->max_text ? cfg->max_text : un;
    out->url_cut += un > cfg->max_text;
    if (!gbuf_room(&out->url, keep + 1)) return -100;
    memcpy(out->url.p + out->url.n, url, (size_t)keep);
    out->url.n += keep;
    out->url.p[out->url.n++] = 0;
    int64_t url_n = un > cfg->max_text ? cfg->max_text : un;
    keep = cut_chars(scratch, fold_n, cfg->max_text, &cut);
    out->cap_cut += cut;
    if (!gbuf_room(&out->cap, keep + 1) || !gbuf_room(&out->uid, 33)) return -100;
    memcpy(out->cap.p + out->cap.n, scratch, (size_t)keep);
    out->cap.n += keep;
    out->cap.p[out->cap.n++] = 0;
    int64_t url_off = out->url.n - url_n - 1, cap_off = out->cap.n - keep - 1;
    int64_t uo[2] = {0, url_n}, co[2] = {0, keep};
    wat_uids(out->url.p + url_off, uo, out->cap.p + cap_off, co, 1, out->uid.p + out->uid.n, cfg->sha_init,
             cfg->sha_update, cfg->sha_final);
    out->uid.n += 33;
    return R_KEPT;
}

static int push_i64(gbuf *b, int64_t v) {
    if (!gbuf_room(b, 8)) return 0;
    memcpy(b->p + b->n, &v, 8);
    b->n += 8;
    return 1;
}

static int push_str(gbuf *b, const uint8_t *s, int64_t n) {
    if (!gbuf_room(b, n + 1)) return 0;
    memcpy(b->p + b->n, s, (size_t)n);
    b->n += n;
    b->p[b->n++] = 0;
    return 1;
}

/* The rules over the links of pages pa..pb of the last scan. Returns 0, or -1 when out of
 * memory. */
int wat_rules(ctx_t *c, const rules_cfg *cfg, rules_out *out, int64_t pa, int64_t pb) {
    out->url.n = out->cap.n = out->purl.n = out->lang.n = out->lang_valid.n = out->row_link.n = out->hard.n = 0;
    out->hsrc.n = out->halt.n = out->hvalid.n = out->uid.n = 0;
    memset(out->reasons, 0, sizeof out->reasons);
    out->url_cut = out->cap_cut = 0;
    gbuf scratch = {0}, segs = {0};
    int64_t ovr = 0;
    const uint8_t *ovr_p = cfg->ovr_blob;
    for (int64_t pg = pa; pg < pb; pg++) {
        const int64_t *row = c->pages + pg * PAGE_FIELDS;
        const uint8_t *parts[3] = {NULL, NULL, NULL};
        int64_t parts_n[3] = {0, 0, 0};
        const uint8_t *p = NULL;
        const uint8_t *purl = c->pblob + row[0];
        int64_t purl_n = (int64_t)strlen((const char *)purl);
        const uint8_t *lang = purl + purl_n + 1;
        int64_t lang_n = (int64_t)strlen((const char *)lang);
        uint8_t has_lang = (row[5] & F_LANG) != 0;
        int ovr_taken = ovr < cfg->n_ovr && cfg->ovr_page[ovr] == pg;
        if (ovr_taken) {
            p = ovr_p;
            for (int k = 0; k < 3; k++) ovr_p += strlen((const char *)ovr_p) + 1;
            ovr++;
        } else if (row[5] & F_PARTS) {
            p = c->pblob + row[0];
            p += strlen((const char *)p) + 1;  /* url */
            p += strlen((const char *)p) + 1;  /* lang */
        }
        if (p && *p) {
            for (int k = 0; k < 3; k++) {
                parts[k] = p;
                parts_n[k] = (int64_t)strlen((const char *)p);
                p += parts_n[k] + 1;
            }
        }
        /* the base URL itself, for srcs of only a query or fragment: the page URL or the
         * <base href> joined in C, where urlunparse gives it back as it is */
        const uint8_t *base = NULL;
        int64_t base_n = 0;
        if (ovr_taken) {
        } else if (row[5] & F_BASED) {
            base = c->strs + row[1];
            base_n = row[2];
        } else if ((row[5] & F_PARTS) && (memcmp(purl, "http://", 7) == 0 || memcmp(purl, "https://", 8) == 0)
                   && !memchr(purl, '?', (size_t)purl_n) && !memchr(purl, '#', (size_t)purl_n)
                   && !memchr(purl, ';', (size_t)purl_n)) {
            base = purl;
            base_n = purl_n;
        }
        int64_t longest = parts_n[2] > parts_n[1] ? parts_n[2] : parts_n[1];
        if (base_n + 2 > longest) longest = base_n + 2;
        for (int64_t l = row[3]; l < row[3] + row[4]; l++) {
            const uint8_t *src = c->src + c->src_start[l], *alt = c->alt + c->alt_start[l];
            /* each link put its src and its alt, each then a NUL (walk_links): a length is the
             * distance to the next one's start */
            int64_t last = l + 1 == c->n_links;
            int64_t sn = (last ? c->src_used : c->src_start[l + 1]) - c->src_start[l] - 1;
            int64_t an = (last ? c->alt_used : c->alt_start[l + 1]) - c->alt_start[l] - 1;
            if (!gbuf_room(&scratch, an + 3 * sn + longest + 8)
                || !gbuf_room(&segs, 2 * (int64_t)sizeof(seg_t) * (sn + longest + 4))) {
                free(scratch.p); free(segs.p); return -1;
            }
            int r = link_rule(cfg, out, src, sn, c->src_valid[l], alt, an, c->alt_valid[l], parts, parts_n, base, base_n,
                              scratch.p, (seg_t *)segs.p);
            if (r == -100) { free(scratch.p); free(segs.p); return -1; }
            if (r == R_KEPT) {
                if (!push_i64(&out->row_link, l) || !push_str(&out->purl, purl, purl_n)
                    || !push_str(&out->lang, lang, lang_n) || !gbuf_room(&out->lang_valid, 1)) {
                    free(scratch.p);
                    free(segs.p);
                    return -1;
                }
                out->lang_valid.p[out->lang_valid.n++] = has_lang;
            } else if (r == R_HARD) {
                if (!push_i64(&out->hard, l) || !push_str(&out->hsrc, src, sn) || !push_str(&out->halt, alt, an)
                    || !gbuf_room(&out->hvalid, 2)) {
                    free(scratch.p);
                    free(segs.p);
                    return -1;
                }
                out->hvalid.p[out->hvalid.n++] = c->src_valid[l];
                out->hvalid.p[out->hvalid.n++] = c->alt_valid[l];
            } else {
                out->reasons[r]++;
            }
        }
    }
    free(scratch.p);
    free(segs.p);
    return 0;
}

rules_out *wat_rules_out(void) { return calloc(1, sizeof(rules_out)); }

void wat_rules_free(rules_out *o) {
    if (!o) return;
    free(o->url.p); free(o->cap.p); free(o->purl.p); free(o->lang.p); free(o->lang_valid.p); free(o->row_link.p);
    free(o->hard.p); free(o->hsrc.p); free(o->halt.p); free(o->hvalid.p); free(o->uid.p);
    free(o);
}

int wat_is_py_space(uint32_t c) { return is_py_space(c); }

#define ARENA_BYTES (24 << 20)  /* inflated members per batch; a member is at most 8 MiB */
#define MAX_MEMBERS 4096
#define MAX_LINKS (1 << 20)

void wat_reset(ctx_t *c) {
    c->arena_used = c->n_mem = c->n_pages = c->strs_used = c->pblob_used = c->src_used = c->alt_used = c->n_links = 0;
    c->n_defer = c->n_other = c->n_noimg = c->n_bytes = 0;
}

void wat_close(ctx_t *c) {
    if (!c) return;
    free(c->arena); free(c->mem); free(c->pages); free(c->strs); free(c->pblob); free(c->src); free(c->alt);
    free(c->src_valid); free(c->alt_valid); free(c->link_page); free(c->src_start); free(c->alt_start);
    free(c);
}

/* the opt-out tags (bits of OPT_OUT_TAGS) whose pages the scan leaves to extract.py */
void wat_set_opt_out(ctx_t *c, int64_t mask) { c->opt_out_mask = mask; }

ctx_t *wat_open(int64_t max_record_bytes, void *decompressor, void *gunzip) {
    ctx_t *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->arena = malloc(ARENA_BYTES); c->arena_cap = ARENA_BYTES;
    c->mem = malloc(sizeof(int64_t) * MEM_FIELDS * MAX_MEMBERS); c->mem_cap = MAX_MEMBERS;
    c->pages = malloc(sizeof(int64_t) * PAGE_FIELDS * MAX_MEMBERS); c->pages_cap = MAX_MEMBERS;
    c->strs = malloc(ARENA_BYTES); c->strs_cap = ARENA_BYTES;
    c->pblob = malloc(4 * ARENA_BYTES); c->pblob_cap = 4 * ARENA_BYTES;
    c->src = malloc(ARENA_BYTES); c->src_cap = ARENA_BYTES;
    c->alt = malloc(ARENA_BYTES); c->alt_cap = ARENA_BYTES;
    c->src_valid = malloc(MAX_LINKS); c->alt_valid = malloc(MAX_LINKS);
    c->link_page = malloc(sizeof(int32_t) * MAX_LINKS);
    c->src_start = malloc(sizeof(int64_t) * MAX_LINKS); c->alt_start = malloc(sizeof(int64_t) * MAX_LINKS);
    c->links_cap = MAX_LINKS;
    c->max_record_bytes = max_record_bytes;
    c->decompressor = decompressor;
    c->gunzip = (gunzip_fn)gunzip;
    if (!c->arena || !c->mem || !c->pages || !c->strs || !c->pblob || !c->src || !c->alt || !c->src_valid || !c->alt_valid
        || !c->link_page || !c->src_start || !c->alt_start) {
        wat_close(c);
        return NULL;
    }
    return c;
}

/* ---------------------------------------------------------------------------------------- */
/* uid: the first 16 bytes of sha256(url + "\0" + caption) as 32 hex characters (extract.uid_of) */

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(uint32_t h[8], const uint8_t *b) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = ((uint32_t)b[4 * i] << 24) | ((uint32_t)b[4 * i + 1] << 16) | ((uint32_t)b[4 * i + 2] << 8) | b[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], bb = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = hh + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & bb) ^ (a & c) ^ (bb & c));
        hh = g; g = f; f = e; e = d + t1; d = c; c = bb; bb = a; a = t1 + t2;
    }
    h[0] += a; h[1] += bb; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
}

/* sha256 of the concatenation of up to three pieces */
static void sha256_3(const uint8_t *p1, size_t n1, const uint8_t *p2, size_t n2, const uint8_t *p3, size_t n3,
                     uint8_t out[32]) {
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    uint8_t blk[64];
    size_t fill = 0;
    const uint8_t *ps[3] = {p1, p2, p3};
    size_t ns[3] = {n1, n2, n3};
    for (int k = 0; k < 3; k++) {
        const uint8_t *p = ps[k];
        size_t n = ns[k];
        while (n) {
            if (fill == 0 && n >= 64) { sha256_block(h, p); p += 64; n -= 64; continue; }
            size_t take = 64 - fill < n ? 64 - fill : n;
            memcpy(blk + fill, p, take);
            fill += take; p += take; n -= take;
            if (fill == 64) { sha256_block(h, blk); fill = 0; }
        }
    }
    uint64_t bits = (uint64_t)(n1 + n2 + n3) * 8;
    blk[fill++] = 0x80;
    if (fill > 56) { memset(blk + fill, 0, 64 - fill); sha256_block(h, blk); fill = 0; }
    memset(blk + fill, 0, 56 - fill);
    for (int i = 0; i < 8; i++) blk[56 + i] = (uint8_t)(bits >> (56 - 8 * i));
    sha256_block(h, blk);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(h[i] >> 24); out[4 * i + 1] = (uint8_t)(h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(h[i] >> 8); out[4 * i + 3] = (uint8_t)h[i];
    }
}

/* n uids; url i is urls[url_off[i]:url_off[i+1]], caption likewise; out gets 33 bytes each
 * (32 hex digits and a NUL) */
typedef int (*sha_init_fn)(void *ctx);
typedef int (*sha_update_fn)(void *ctx, const void *d, size_t n);
typedef int (*sha_final_fn)(unsigned char *md, void *ctx);

/* init, update, final: OpenSSL's SHA256_Init/_Update/_Final when given (several times faster:
 * it uses the CPU's SHA instructions where there are some), else the code above */
void wat_uids(const uint8_t *urls, const int64_t *url_off, const uint8_t *caps, const int64_t *cap_off, int64_t n,
              uint8_t *out, void *init, void *update, void *final) {
    static const char hex[] = "0123456789abcdef";
    static const uint8_t zero = 0;
    uint8_t d[32];
    uint64_t ctx[64];  /* room for a SHA256_CTX (112 bytes) */
    for (int64_t i = 0; i < n; i++) {
        size_t un = (size_t)(url_off[i + 1] - url_off[i]), cn = (size_t)(cap_off[i + 1] - cap_off[i]);
        if (init && update && final) {
            ((sha_init_fn)init)(ctx);
            ((sha_update_fn)update)(ctx, urls + url_off[i], un);
            ((sha_update_fn)update)(ctx, &zero, 1);
            ((sha_update_fn)update)(ctx, caps + cap_off[i], cn);
            ((sha_final_fn)final)(d, ctx);
        } else {
            sha256_3(urls + url_off[i], un, &zero, 1, caps + cap_off[i], cn, d);
        }
        uint8_t *o = out + 33 * i;
        for (int k = 0; k < 16; k++) { o[2 * k] = (uint8_t)hex[d[k] >> 4]; o[2 * k + 1] = (uint8_t)hex[d[k] & 15]; }
        o[32] = 0;
    }
}
