/* fastlaion extract: a small Parquet writer for the candidate pairs, so the compiled WAT path
 * can write its rows without Polars. Built into one library with extract_native.c and driven
 * by parquet_native.py.
 *
 * It writes one fixed schema, the columns of extract._schema_of(), all OPTIONAL:
 *   url, caption, page_url, uid: BYTE_ARRAY, logical type STRING (converted type UTF8)
 *   width, height: INT32
 *   page_lang: BYTE_ARRAY, STRING
 * The file layout:
 *   "PAR1"
 *   per row group, per column one data page (v1):
 *     PageHeader (Thrift compact protocol)
 *     the page body, zstd-compressed as a whole:
 *       definition levels: 4-byte LE length, then the RLE/bit-packed hybrid (bit width 1)
 *       the values of the non-null rows, PLAIN: BYTE_ARRAY = 4-byte LE length + bytes,
 *       INT32 = 4 bytes LE
 *   FileMetaData (Thrift compact protocol), its 4-byte LE length, "PAR1"
 * No dictionary, no page index; statistics only null_count (and min/max of the INT32
 * columns). The footer carries the Arrow schema Polars stores, so pyarrow reads the strings
 * as large_string from these files as from Polars' own.
 *
 * zstd comes in as three function pointers (ZSTD_compress, ZSTD_compressBound,
 * ZSTD_isError) taken from libzstd by the caller: no zstd header is needed.
 *
 * pq_append can merge two sets of rows by a sort key and drop rows whose url or uid was seen
 * before (exactly: the keys are kept and compared byte for byte).
 */
#define _POSIX_C_SOURCE 200809L /* O_CLOEXEC, ssize_t */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef size_t (*zstd_compress_fn)(void *dst, size_t dst_cap, const void *src, size_t src_n, int level);
typedef size_t (*zstd_bound_fn)(size_t src_n);
typedef unsigned (*zstd_iserror_fn)(size_t code);

typedef struct {
    int64_t n;
    const int64_t *seq;
    const uint8_t *strs[5];
    const uint8_t *valid[5];
    const int32_t *ints[2];
    const uint8_t *ivalid[2];
    /* Per string column: NULL, its n strings are NUL-terminated; else their n byte lengths, the
     * strings back to back (they may then hold NUL bytes). */
    const int64_t *lens[5];
} pq_rows;

#define NCOL 7
#define NSTR 5
/* A row group ends before any column's page body would pass this (pages are i32-sized). */
#define PAGE_LIMIT ((size_t)256 << 20)
/* One cell larger than this cannot be written (its page must stay i32-sized). */
#define MAX_CELL ((size_t)1 << 30)

/* Parquet enums (parquet.thrift) */
enum { T_INT32 = 1, T_BYTE_ARRAY = 6 };                 /* Type */
enum { REP_OPTIONAL = 1 };                              /* FieldRepetitionType */
enum { CONV_UTF8 = 0 };                                 /* ConvertedType */
enum { ENC_PLAIN = 0, ENC_RLE = 3 };                    /* Encoding */
enum { CODEC_ZSTD = 6 };                                /* CompressionCodec */
enum { PAGE_DATA = 0 };                                 /* PageType */

/* The columns in file order: name, Parquet type, and where the values come from (strs[src]
 * or ints[src]). */
static const struct { const char *name; int type; int src; } COLS[NCOL] = {
    {"url", T_BYTE_ARRAY, 0}, {"caption", T_BYTE_ARRAY, 1}, {"page_url", T_BYTE_ARRAY, 2},
    {"uid", T_BYTE_ARRAY, 3}, {"width", T_INT32, 0}, {"height", T_INT32, 1},
    {"page_lang", T_BYTE_ARRAY, 4},
};

/* The Arrow IPC schema message (base64) Polars stores under "ARROW:schema" for these
 * columns: the four strings large_utf8, width and height int32, page_lang large_utf8. */
static const char ARROW_SCHEMA[] =
    "/////5ABAAAEAAAA8v///xQAAAAEAAEAAAAKAAsACAAKAAQA+P///wwAAAAIAAgAAAAEAAcAAAAoAQAA/AAAAMwAAACkAAAA"
    "aAAAADQAAAAEAAAA4P7//xgAAAAQAAAACAAAAAEUAAAAAAAA4P7//wkAAABwYWdlX2xhbmcAAAAM////IAAAABAAAAAIAAAA"
    "AQIAAAAAAADE////IAAAAAEAAAAGAAAAaGVpZ2h0AAA8////KAAAABAAAAAIAAAAAQIAAAAAAAD0////IAAAAAEAAAAIAAkA"
    "BAAIAAUAAAB3aWR0aAAAAHT///8YAAAAEAAAAAgAAAABFAAAAAAAAHT///8DAAAAdWlkAJj///8YAAAAEAAAAAgAAAABFAAA"
    "AAAAAJj///8IAAAAcGFnZV91cmwAAAAAxP///xgAAAAQAAAACAAAAAEUAAAAAAAAxP///wcAAABjYXB0aW9uAOz///8sAAAA"
    "IAAAABgAAAABFAAAEAASAAQAEAARAAgAAAAMAAAAAAD8////BAAEAAMAAAB1cmwA";

/* ---------------------------------------------------------------------------------------
 * Growable byte buffers */

typedef struct { uint8_t *p; size_t n, cap; } buf;

static int buf_reserve(buf *b, size_t more)
{
    if (more <= b->cap - b->n)
        return 0;
    if (more > SIZE_MAX / 2 - b->n) {
        errno = ENOMEM;
        return -1;
    }
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + more)
        cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p) {
        errno = ENOMEM;
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

/* The next three assume the room was reserved. */
static void put_bytes(buf *b, const void *src, size_t n)
{
    if (n)
        memcpy(b->p + b->n, src, n);
    b->n += n;
}

static void le32(uint8_t out[4], uint32_t v)
{
    for (int k = 0; k < 4; k++)
        out[k] = (uint8_t)(v >> (8 * k));
}

static void put_u32(buf *b, uint32_t v)
{
    uint8_t le[4];
    le32(le, v);
    put_bytes(b, le, 4);
}

static void put_varint(buf *b, uint64_t v)
{
    while (v >= 0x80) {
        b->p[b->n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    b->p[b->n++] = (uint8_t)v;
}

/* ---------------------------------------------------------------------------------------
 * Thrift compact protocol, writing only. A field header is (id delta << 4 | type) when the
 * id grows by 1..15 over the previous field of the same struct, else the type byte and the id
 * as a zigzag varint. A nested struct starts counting ids from 0 again; a struct ends with a
 * STOP byte (0). A list header is (size << 4 | element type), or 0xF0 | type and a varint
 * size from 15 elements on. Integers are zigzag varints, binary is a varint length + bytes.
 * Errors (memory) stick in `err` and are checked once at the end. */

enum { CT_I16 = 4, CT_I32 = 5, CT_I64 = 6, CT_BINARY = 8, CT_LIST = 9, CT_STRUCT = 12 };
#define TW_DEPTH 16

typedef struct {
    buf *b;
    int16_t last[TW_DEPTH];
    int depth;
    int err;
} tw;

static void tw_raw(tw *t, const void *p, size_t n)
{
    if (t->err || buf_reserve(t->b, n)) {
        t->err = 1;
        return;
    }
    put_bytes(t->b, p, n);
}

static void tw_varint(tw *t, uint64_t v)
{
    if (t->err || buf_reserve(t->b, 10)) {
        t->err = 1;
        return;
    }
    put_varint(t->b, v);
}

static uint64_t zigzag(int64_t v)
{
    return ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
}

static void tw_field(tw *t, int type, int id)
{
    int delta = id - t->last[t->depth];
    if (delta > 0 && delta <= 15) {
        uint8_t h = (uint8_t)(delta << 4 | type);
        tw_raw(t, &h, 1);
    } else {
        uint8_t h = (uint8_t)type;
        tw_raw(t, &h, 1);
        tw_varint(t, zigzag(id));
    }
    t->last[t->depth] = (int16_t)id;
}

static void tw_i64(tw *t, int id, int64_t v)
{
    tw_field(t, CT_I64, id);
    tw_varint(t, zigzag(v));
}

static void tw_i32(tw *t, int id, int32_t v)
{
    tw_field(t, CT_I32, id);
    tw_varint(t, zigzag(v));
}

static void tw_i16(tw *t, int id, int16_t v)
{
    tw_field(t, CT_I16, id);
    tw_varint(t, zigzag(v));
}

static void tw_binary(tw *t, int id, const void *p, size_t n)
{
    tw_field(t, CT_BINARY, id);
    tw_varint(t, n);
    tw_raw(t, p, n);
}

static void tw_list(tw *t, int id, int elem_type, size_t size)
{
    tw_field(t, CT_LIST, id);
    if (size < 15) {
        uint8_t h = (uint8_t)(size << 4 | (size_t)elem_type);
        tw_raw(t, &h, 1);
    } else {
        uint8_t h = (uint8_t)(0xF0 | elem_type);
        tw_raw(t, &h, 1);
        tw_varint(t, size);
    }
}

/* A struct: as a field (id > 0) or as a list element (id 0: no field header). */
static void tw_begin(tw *t, int id)
{
    if (id)
        tw_field(t, CT_STRUCT, id);
    if (t->depth + 1 >= TW_DEPTH) {
        t->err = 1;
        return;
    }
    t->last[++t->depth] = 0;
}

static void tw_end(tw *t)
{
    uint8_t stop = 0;
    tw_raw(t, &stop, 1);
    if (t->depth > 0)
        t->depth--;
}

/* ---------------------------------------------------------------------------------------
 * Definition levels: the RLE/bit-packed hybrid at bit width 1 (1 = the row has a value).
 * A run of 8 or more equal levels (or the last run) is an RLE run: varint(count << 1), then
 * the level in one byte. Other levels go into bit-packed runs of whole groups of 8:
 * varint(groups << 1 | 1), then one byte per group, first level in the lowest bit; a group
 * past the last row is padded with zeros (readers stop at the page's num_values). */

static int64_t run_length(const uint8_t *lv, int64_t i, int64_t n, int64_t cap)
{
    int64_t j = i + 1;
    while (j < n && j - i < cap && lv[j] == lv[i])
        j++;
    return j - i;
}

/* At most n / 4 + 32 bytes (2 bytes per RLE run of >= 8 levels, 1 byte per group of 8 plus
 * a header for each bit-packed run, which is followed by an RLE run of >= 16). */
static size_t levels_bound(int64_t n)
{
    return (size_t)n / 4 + 32;
}

static void put_levels(buf *out, const uint8_t *lv, int64_t n)
{
    int64_t i = 0;
    while (i < n) {
        int64_t r = run_length(lv, i, n, INT64_MAX);
        if (r >= 8 || i + r == n) {
            put_varint(out, (uint64_t)r << 1);
            out->p[out->n++] = lv[i];
            i += r;
            continue;
        }
        int64_t start = i, groups = 0;
        do {
            groups++;
            i += 8;
        } while (i < n && run_length(lv, i, n, 16) < 16);
        put_varint(out, (uint64_t)groups << 1 | 1);
        for (int64_t g = 0; g < groups; g++) {
            uint8_t bits = 0;
            for (int k = 0; k < 8; k++) {
                int64_t at = start + 8 * g + k;
                if (at < n && lv[at])
                    bits |= (uint8_t)(1u << k);
            }
            out->p[out->n++] = bits;
        }
        if (i > n)
            i = n;
    }
}

/* ---------------------------------------------------------------------------------------
 * Dedup: the keys seen, in an arena, with an open-addressing hash table (linear probing) of
 * (low 32 bits of the hash, length, offset in the arena). Keys are compared byte for byte on
 * a hash match, so a collision never drops a row. */

typedef struct { uint32_t h; uint32_t len; uint64_t off; } slot;
#define SLOT_EMPTY UINT32_MAX /* in len */

static uint64_t rotl64(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

static uint64_t mix64(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

/* MurmurHash3-style: 8 bytes a round, the tail in a last word, then a final mix. */
static uint64_t hash_bytes(const uint8_t *p, size_t n)
{
    const uint64_t c1 = 0x87c37b91114253d5ULL, c2 = 0x4cf5ad432745937fULL;
    uint64_t h = 0x9e3779b97f4a7c15ULL ^ (n * c2);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t k;
        memcpy(&k, p + i, 8);
        k *= c1;
        k = rotl64(k, 31);
        k *= c2;
        h ^= k;
        h = rotl64(h, 27) * 5 + 0x52dce729;
    }
    if (i < n) {
        uint64_t k = 0;
        memcpy(&k, p + i, n - i);
        k *= c1;
        k = rotl64(k, 31);
        k *= c2;
        h ^= k;
    }
    return mix64(h);
}

/* ---------------------------------------------------------------------------------------
 * The writer */

typedef struct {
    int64_t page_offset, usize, csize, nulls;  /* sizes include the page header */
    int32_t min, max;
    int has_minmax;
} chunk_meta;

typedef struct {
    int64_t rows, offset, usize, csize;
    chunk_meta col[NCOL];
} group_meta;

typedef struct {
    buf values;          /* PLAIN values of the non-null rows */
    buf levels;          /* one byte a row: 1 value, 0 null */
    int64_t nulls;
    int32_t min, max;
    int has_minmax;
} column;

typedef struct pq_writer {
    int fd;
    int failed;          /* errno of an earlier failure: the file is unusable */
    int64_t pos;         /* bytes written */
    int level, dedup_col;
    int64_t rowgroup_rows;
    zstd_compress_fn zcompress;
    zstd_bound_fn zbound;
    zstd_iserror_fn ziserror;
    column col[NCOL];
    int64_t group_rows;
    group_meta *groups;
    size_t n_groups, groups_cap;
    int64_t written, dropped;
    buf body, comp, head; /* scratch: page body, compressed body, page header / footer */
    buf keys;             /* dedup arena */
    slot *table;
    size_t table_cap, table_n;
    int seen_null_key;
} pq_writer;

static int write_all(pq_writer *w, const void *p, size_t n)
{
    const uint8_t *c = p;
    while (n) {
        ssize_t k = write(w->fd, c, n);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (k == 0) {
            errno = EIO;
            return -1;
        }
        c += k;
        n -= (size_t)k;
        w->pos += k;
    }
    return 0;
}

static void free_writer(pq_writer *w)
{
    for (int c = 0; c < NCOL; c++) {
        free(w->col[c].values.p);
        free(w->col[c].levels.p);
    }
    free(w->groups);
    free(w->body.p);
    free(w->comp.p);
    free(w->head.p);
    free(w->keys.p);
    free(w->table);
    free(w);
}

pq_writer *pq_open(const char *path, void *zstd_compress, void *zstd_bound, void *zstd_iserror, int level,
                   int dedup_col, int64_t rowgroup_rows)
{
    if (!path || !zstd_compress || !zstd_bound || !zstd_iserror || rowgroup_rows < 1 ||
        (dedup_col != -1 && dedup_col != 0 && dedup_col != 3)) {
        errno = EINVAL;
        return NULL;
    }
    pq_writer *w = calloc(1, sizeof *w);
    if (!w) {
        errno = ENOMEM;
        return NULL;
    }
    w->zcompress = (zstd_compress_fn)zstd_compress;
    w->zbound = (zstd_bound_fn)zstd_bound;
    w->ziserror = (zstd_iserror_fn)zstd_iserror;
    w->level = level;
    w->dedup_col = dedup_col;
    w->rowgroup_rows = rowgroup_rows;
    w->fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (w->fd < 0) {
        int e = errno;
        free_writer(w);
        errno = e;
        return NULL;
    }
    if (write_all(w, "PAR1", 4)) {
        int e = errno;
        close(w->fd);
        unlink(path);
        free_writer(w);
        errno = e;
        return NULL;
    }
    return w;
}

/* Compress and write column c of the current row group as one data page. */
static int write_page(pq_writer *w, int c, chunk_meta *m)
{
    column *col = &w->col[c];
    int64_t n = w->group_rows;
    buf *body = &w->body;
    body->n = 0;
    if (buf_reserve(body, 4 + levels_bound(n) + col->values.n))
        return -1;
    put_u32(body, 0); /* the levels' length, set below */
    put_levels(body, col->levels.p, n);
    le32(body->p, (uint32_t)(body->n - 4));
    put_bytes(body, col->values.p, col->values.n);

    size_t bound = w->zbound(body->n);
    if (w->ziserror(bound) || bound > INT32_MAX || body->n > INT32_MAX) {
        errno = EOVERFLOW;
        return -1;
    }
    w->comp.n = 0;
    if (buf_reserve(&w->comp, bound))
        return -1;
    size_t csize = w->zcompress(w->comp.p, bound, body->p, body->n, w->level);
    if (w->ziserror(csize)) {
        errno = ENOMEM; /* zstd fails only for memory, the bound being enough */
        return -1;
    }

    /* PageHeader: type, uncompressed_page_size, compressed_page_size, data_page_header
     * (num_values, encoding PLAIN, definition_level_encoding RLE, repetition_level_encoding
     * RLE) */
    w->head.n = 0;
    tw t = {.b = &w->head};
    tw_i32(&t, 1, PAGE_DATA);
    tw_i32(&t, 2, (int32_t)body->n);
    tw_i32(&t, 3, (int32_t)csize);
    tw_begin(&t, 5);
    tw_i32(&t, 1, (int32_t)n);
    tw_i32(&t, 2, ENC_PLAIN);
    tw_i32(&t, 3, ENC_RLE);
    tw_i32(&t, 4, ENC_RLE);
    tw_end(&t);
    tw_end(&t);
    if (t.err) {
        errno = ENOMEM;
        return -1;
    }

    m->page_offset = w->pos;
    m->usize = (int64_t)(w->head.n + body->n);
    m->csize = (int64_t)(w->head.n + csize);
    m->nulls = col->nulls;
    m->min = col->min;
    m->max = col->max;
    m->has_minmax = col->has_minmax;
    if (write_all(w, w->head.p, w->head.n) || write_all(w, w->comp.p, csize))
        return -1;
    return 0;
}

static int flush_group(pq_writer *w)
{
    if (!w->group_rows)
        return 0;
    if (w->n_groups == w->groups_cap) {
        size_t cap = w->groups_cap ? w->groups_cap * 2 : 16;
        if (cap > SIZE_MAX / sizeof(group_meta)) {
            errno = ENOMEM;
            return -1;
        }
        group_meta *g = realloc(w->groups, cap * sizeof(group_meta));
        if (!g) {
            errno = ENOMEM;
            return -1;
        }
        w->groups = g;
        w->groups_cap = cap;
    }
    group_meta *g = &w->groups[w->n_groups];
    memset(g, 0, sizeof *g);
    g->rows = w->group_rows;
    g->offset = w->pos;
    for (int c = 0; c < NCOL; c++) {
        if (write_page(w, c, &g->col[c]))
            return -1;
        g->usize += g->col[c].usize;
        g->csize += g->col[c].csize;
    }
    w->n_groups++;
    for (int c = 0; c < NCOL; c++) {
        column *col = &w->col[c];
        col->values.n = col->levels.n = 0;
        col->nulls = 0;
        col->has_minmax = 0;
    }
    w->group_rows = 0;
    return 0;
}

/* Whether the key was seen before; if not, it is remembered. -1 on error. */
static int seen_key(pq_writer *w, const uint8_t *key, size_t len)
{
    if (len >= SLOT_EMPTY) {
        errno = EOVERFLOW;
        return -1;
    }
    if (w->table_n + 1 > w->table_cap / 2) { /* grow at half full */
        size_t cap = w->table_cap ? w->table_cap * 2 : 1024;
        if (cap > ((size_t)1 << 32) || cap > SIZE_MAX / sizeof(slot)) {
            errno = ENOMEM;
            return -1;
        }
        slot *t = malloc(cap * sizeof(slot));
        if (!t) {
            errno = ENOMEM;
            return -1;
        }
        for (size_t i = 0; i < cap; i++)
            t[i].len = SLOT_EMPTY;
        for (size_t i = 0; i < w->table_cap; i++) {
            if (w->table[i].len == SLOT_EMPTY)
                continue;
            size_t j = w->table[i].h & (cap - 1);
            while (t[j].len != SLOT_EMPTY)
                j = (j + 1) & (cap - 1);
            t[j] = w->table[i];
        }
        free(w->table);
        w->table = t;
        w->table_cap = cap;
    }
    uint32_t h = (uint32_t)hash_bytes(key, len);
    size_t mask = w->table_cap - 1, j = h & mask;
    for (; w->table[j].len != SLOT_EMPTY; j = (j + 1) & mask) {
        const slot *s = &w->table[j];
        if (s->h == h && s->len == len && (len == 0 || memcmp(w->keys.p + s->off, key, len) == 0))
            return 1;
    }
    if (buf_reserve(&w->keys, len))
        return -1;
    w->table[j] = (slot){.h = h, .len = (uint32_t)len, .off = w->keys.n};
    put_bytes(&w->keys, key, len);
    w->table_n++;
    return 0;
}

/* One set's position: its next row and where that row's strings start. */
typedef struct {
    const pq_rows *r;
    int64_t i;
    const uint8_t *s[NSTR];
} cursor;

static int valid_at(const uint8_t *v, int64_t i)
{
    return !v || v[i];
}

/* Write (or drop, as a duplicate) the cursor's next row and move past it. */
static int take_row(pq_writer *w, cursor *cur)
{
    const pq_rows *r = cur->r;
    int64_t i = cur->i;
    size_t len[NSTR];
    for (int k = 0; k < NSTR; k++)
        len[k] = r->lens[k] ? (size_t)r->lens[k][i] : strlen((const char *)cur->s[k]);
    const uint8_t *s[NSTR];
    memcpy(s, cur->s, sizeof s);
    for (int k = 0; k < NSTR; k++)
        cur->s[k] += len[k] + !r->lens[k]; /* past the terminator, where there is one */
    cur->i++;

    if (w->dedup_col >= 0) {
        int d = w->dedup_col, seen;
        if (!valid_at(r->valid[d], i)) { /* nulls are one key, as in Polars' unique */
            seen = w->seen_null_key;
            w->seen_null_key = 1;
        } else {
            seen = seen_key(w, s[d], len[d]);
        }
        if (seen < 0)
            return -1;
        if (seen) {
            w->dropped++;
            return 0;
        }
    }

    /* what the row adds to each column's values */
    size_t add[NCOL];
    int has[NCOL];
    int32_t iv[NCOL] = {0};
    for (int c = 0; c < NCOL; c++) {
        int src = COLS[c].src;
        if (COLS[c].type == T_BYTE_ARRAY) {
            has[c] = valid_at(r->valid[src], i);
            add[c] = has[c] ? 4 + len[src] : 0;
            if (len[src] > MAX_CELL) {
                errno = EOVERFLOW;
                return -1;
            }
        } else {
            has[c] = r->ints[src] && valid_at(r->ivalid[src], i);
            add[c] = has[c] ? 4 : 0;
            if (has[c])
                iv[c] = r->ints[src][i];
        }
    }
    if (w->group_rows) {
        size_t lv = levels_bound(w->group_rows + 1) + 4;
        for (int c = 0; c < NCOL; c++) {
            if (w->col[c].values.n + add[c] + lv > PAGE_LIMIT) {
                if (flush_group(w))
                    return -1;
                break;
            }
        }
    }
    for (int c = 0; c < NCOL; c++) {
        column *col = &w->col[c];
        if (buf_reserve(&col->levels, 1) || buf_reserve(&col->values, add[c]))
            return -1;
    }
    for (int c = 0; c < NCOL; c++) {
        column *col = &w->col[c];
        col->levels.p[col->levels.n++] = (uint8_t)has[c];
        if (!has[c]) {
            col->nulls++;
        } else if (COLS[c].type == T_BYTE_ARRAY) {
            int src = COLS[c].src;
            put_u32(&col->values, (uint32_t)len[src]);
            put_bytes(&col->values, s[src], len[src]);
        } else {
            put_u32(&col->values, (uint32_t)iv[c]);
            if (!col->has_minmax || iv[c] < col->min)
                col->min = iv[c];
            if (!col->has_minmax || iv[c] > col->max)
                col->max = iv[c];
            col->has_minmax = 1;
        }
    }
    w->group_rows++;
    w->written++;
    if (w->group_rows >= w->rowgroup_rows)
        return flush_group(w);
    return 0;
}

static void cursor_init(cursor *cur, const pq_rows *r)
{
    cur->r = r;
    cur->i = 0;
    for (int k = 0; k < NSTR; k++)
        cur->s[k] = r->strs[k];
}

static int rows_ok(const pq_rows *r)
{
    if (r->n < 0)
        return 0;
    if (!r->n)
        return 1;
    for (int k = 0; k < NSTR; k++)
        if (!r->strs[k])
            return 0;
    return 1;
}

int pq_append(pq_writer *w, const pq_rows *a, const pq_rows *b)
{
    if (!w || !a) {
        errno = EINVAL;
        return -1;
    }
    if (w->failed) {
        errno = w->failed;
        return -1;
    }
    if (!rows_ok(a) || (b && !rows_ok(b)) || (b && a->n && b->n && (!a->seq || !b->seq))) {
        errno = EINVAL;
        return -1;
    }
    cursor ca, cb;
    cursor_init(&ca, a);
    if (b)
        cursor_init(&cb, b);
    for (;;) {
        cursor *next;
        int a_left = ca.i < a->n, b_left = b && cb.i < b->n;
        if (a_left && b_left)
            next = b->seq[cb.i] < a->seq[ca.i] ? &cb : &ca; /* a first on equal keys */
        else if (a_left)
            next = &ca;
        else if (b_left)
            next = &cb;
        else
            break;
        if (take_row(w, next)) {
            w->failed = errno ? errno : EIO;
            return -1;
        }
    }
    return 0;
}

int64_t pq_rows_written(const pq_writer *w)
{
    return w ? w->written : 0;
}

int64_t pq_rows_dropped(const pq_writer *w)
{
    return w ? w->dropped : 0;
}

/* FileMetaData: version, schema, num_rows, row_groups, key_value_metadata, created_by,
 * column_orders. */
static int write_footer(pq_writer *w)
{
    static const char created_by[] = "fastlaion";
    w->head.n = 0;
    tw t = {.b = &w->head};
    tw_i32(&t, 1, 1);

    /* schema: the root group, then the columns */
    tw_list(&t, 2, CT_STRUCT, 1 + NCOL);
    tw_begin(&t, 0);
    tw_binary(&t, 4, "schema", 6);
    tw_i32(&t, 5, NCOL);
    tw_end(&t);
    for (int c = 0; c < NCOL; c++) {
        tw_begin(&t, 0);
        tw_i32(&t, 1, COLS[c].type);
        tw_i32(&t, 3, REP_OPTIONAL);
        tw_binary(&t, 4, COLS[c].name, strlen(COLS[c].name));
        if (COLS[c].type == T_BYTE_ARRAY) {
            tw_i32(&t, 6, CONV_UTF8);
            tw_begin(&t, 10); /* logicalType: STRING (StringType, an empty struct) */
            tw_begin(&t, 1);
            tw_end(&t);
            tw_end(&t);
        }
        tw_end(&t);
    }

    tw_i64(&t, 3, w->written);

    /* row_groups: columns, total_byte_size, num_rows, file_offset, total_compressed_size,
     * ordinal */
    tw_list(&t, 4, CT_STRUCT, w->n_groups);
    for (size_t g = 0; g < w->n_groups; g++) {
        const group_meta *gm = &w->groups[g];
        tw_begin(&t, 0);
        tw_list(&t, 1, CT_STRUCT, NCOL);
        for (int c = 0; c < NCOL; c++) {
            const chunk_meta *m = &gm->col[c];
            /* ColumnChunk: file_offset (deprecated: 0), meta_data */
            tw_begin(&t, 0);
            tw_i64(&t, 2, 0);
            /* ColumnMetaData: type, encodings, path_in_schema, codec, num_values,
             * total_uncompressed_size, total_compressed_size, data_page_offset, statistics */
            tw_begin(&t, 3);
            tw_i32(&t, 1, COLS[c].type);
            tw_list(&t, 2, CT_I32, 2);
            tw_varint(&t, zigzag(ENC_PLAIN));
            tw_varint(&t, zigzag(ENC_RLE));
            tw_list(&t, 3, CT_BINARY, 1);
            tw_varint(&t, strlen(COLS[c].name));
            tw_raw(&t, COLS[c].name, strlen(COLS[c].name));
            tw_i32(&t, 4, CODEC_ZSTD);
            tw_i64(&t, 5, gm->rows);
            tw_i64(&t, 6, m->usize);
            tw_i64(&t, 7, m->csize);
            tw_i64(&t, 9, m->page_offset);
            /* Statistics: null_count, max_value, min_value (INT32: 4 bytes LE) */
            tw_begin(&t, 12);
            tw_i64(&t, 3, m->nulls);
            if (m->has_minmax) {
                uint8_t mx[4], mn[4];
                le32(mx, (uint32_t)m->max);
                le32(mn, (uint32_t)m->min);
                tw_binary(&t, 5, mx, 4);
                tw_binary(&t, 6, mn, 4);
            }
            tw_end(&t);
            tw_end(&t);
            tw_end(&t);
        }
        tw_i64(&t, 2, gm->usize);
        tw_i64(&t, 3, gm->rows);
        tw_i64(&t, 5, gm->offset);
        tw_i64(&t, 6, gm->csize);
        if (g <= INT16_MAX)
            tw_i16(&t, 7, (int16_t)g);
        tw_end(&t);
    }

    /* key_value_metadata: the Arrow schema */
    tw_list(&t, 5, CT_STRUCT, 1);
    tw_begin(&t, 0);
    tw_binary(&t, 1, "ARROW:schema", 12);
    tw_binary(&t, 2, ARROW_SCHEMA, sizeof ARROW_SCHEMA - 1);
    tw_end(&t);

    tw_binary(&t, 6, created_by, sizeof created_by - 1);

    /* column_orders: TYPE_ORDER (TypeDefinedOrder, an empty struct) for each column */
    tw_list(&t, 7, CT_STRUCT, NCOL);
    for (int c = 0; c < NCOL; c++) {
        tw_begin(&t, 0);
        tw_begin(&t, 1);
        tw_end(&t);
        tw_end(&t);
    }
    tw_end(&t);
    if (t.err || w->head.n > UINT32_MAX) {
        errno = ENOMEM;
        return -1;
    }
    uint8_t tail[8];
    le32(tail, (uint32_t)w->head.n);
    memcpy(tail + 4, "PAR1", 4);
    if (write_all(w, w->head.p, w->head.n) || write_all(w, tail, 8))
        return -1;
    return 0;
}

int pq_close(pq_writer *w)
{
    if (!w) {
        errno = EINVAL;
        return -1;
    }
    int err = w->failed;
    if (!err && (flush_group(w) || write_footer(w)))
        err = errno ? errno : EIO;
    if (close(w->fd) && !err)
        err = errno;
    free_writer(w);
    if (err) {
        errno = err;
        return -1;
    }
    return 0;
}

void pq_abort(pq_writer *w)
{
    if (!w)
        return;
    int e = errno;
    close(w->fd);
    free_writer(w);
    errno = e;
}
