/* The common case of CachedClipTokenizer (fastlaion/score.py), in C: open_clip's SimpleTokenizer
 * ids for captions of printable ASCII without '&', from a table of words whose ids Python has
 * already computed. Loaded with ctypes (fastlaion/tokenize_native.py), which releases the GIL
 * for each call, so a batch is tokenized while other Python threads run.
 *
 * Why those captions: SimpleTokenizer cleans a caption with ftfy, HTML unescaping, whitespace
 * folding and lower case; on printable ASCII without '&' only the last two change anything
 * (score.py says why). Lower case is done here; the folding changes no token, as no token holds a
 * space. The words are then split as SimpleTokenizer's pattern does, which on lower-case printable
 * ASCII reads: at each position, skipping spaces, the first of
 *     <start_of_text> | <end_of_text> | 's | 't | 're | 've | 'm | 'll | 'd
 *     | [a-z]+ | [0-9] | [^ a-z0-9]+
 * (the pattern's \p{L}, \p{N} and \s, restricted to that alphabet).
 * Each word's ids (its byte-level BPE) come from the table: Python computes a word it has not seen
 * with SimpleTokenizer's own BPE and adds it (tok_add). A caption outside that alphabet, or with a
 * word not in the table, is left to Python, marked in `status`; Python's path is the reference
 * (tests/test_tokenize.py compares both with open_clip's tokenizer).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    uint64_t hash;
    int64_t key;   /* offset of the word's bytes in keys; -1: an empty slot */
    int64_t ids;   /* offset of its ids in ids */
    int32_t klen, nids;
} slot_t;

typedef struct {
    slot_t *slots;
    int64_t cap, n;
    char *keys;
    int64_t keys_cap, keys_used;
    int64_t *ids;
    int64_t ids_cap, ids_used;
    int64_t sot, eot;
} tok_t;

enum { ST_DONE = 0, ST_NOT_ASCII = 1, ST_NEW_WORD = 2 };

static uint64_t hash_bytes(const char *s, int64_t n) {
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (int64_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ULL;
    }
    return h ^ (h >> 29);
}

static slot_t *find(const tok_t *t, const char *w, int64_t n, uint64_t h) {
    uint64_t mask = (uint64_t)t->cap - 1;
    for (uint64_t i = h & mask;; i = (i + 1) & mask) {
        slot_t *s = &t->slots[i];
        if (s->key < 0) return s;
        if (s->hash == h && s->klen == n && memcmp(t->keys + s->key, w, (size_t)n) == 0) return s;
    }
}

static int grow_slots(tok_t *t, int64_t cap) {
    slot_t *slots = malloc(sizeof(slot_t) * (size_t)cap);
    if (!slots) return -1;
    for (int64_t i = 0; i < cap; i++) slots[i].key = -1;
    slot_t *old = t->slots;
    int64_t old_cap = t->cap;
    t->slots = slots;
    t->cap = cap;
    for (int64_t i = 0; i < old_cap; i++)
        if (old[i].key >= 0) *find(t, t->keys + old[i].key, old[i].klen, old[i].hash) = old[i];
    free(old);
    return 0;
}

static int reserve(void **buf, int64_t *cap, int64_t need, size_t item) {
    if (need <= *cap) return 0;
    int64_t c = *cap ? *cap : 4096;
    while (c < need) c *= 2;
    void *p = realloc(*buf, (size_t)c * item);
    if (!p) return -1;
    *buf = p;
    *cap = c;
    return 0;
}

void tok_free(tok_t *t) {
    if (!t) return;
    free(t->slots);
    free(t->keys);
    free(t->ids);
    free(t);
}

tok_t *tok_new(int64_t sot, int64_t eot) {
    tok_t *t = calloc(1, sizeof(tok_t));
    if (!t) return NULL;
    t->sot = sot;
    t->eot = eot;
    if (grow_slots(t, 1024) != 0) {
        tok_free(t);
        return NULL;
    }
    return t;
}

/* Forget every word (the table starts over, as Python's cache does at its bound). */
void tok_clear(tok_t *t) {
    for (int64_t i = 0; i < t->cap; i++) t->slots[i].key = -1;
    t->n = t->keys_used = t->ids_used = 0;
}

int64_t tok_words(const tok_t *t) { return t->n; }

/* Add a word (lower-case bytes) and its ids; a word already there is left as it is.
 * 0, or -1 when memory ran out (the table is unchanged then). */
int tok_add(tok_t *t, const char *w, int64_t n, const int64_t *ids, int64_t nids) {
    if (n <= 0 || n > INT32_MAX || nids <= 0 || nids > INT32_MAX) return -1;
    uint64_t h = hash_bytes(w, n);
    slot_t *s = find(t, w, n, h);
    if (s->key >= 0) return 0;
    if ((t->n + 1) * 2 > t->cap) {
        if (grow_slots(t, t->cap * 2) != 0) return -1;
        s = find(t, w, n, h);
    }
    if (reserve((void **)&t->keys, &t->keys_cap, t->keys_used + n, 1) != 0) return -1;
    if (reserve((void **)&t->ids, &t->ids_cap, t->ids_used + nids, sizeof(int64_t)) != 0) return -1;
    memcpy(t->keys + t->keys_used, w, (size_t)n);
    memcpy(t->ids + t->ids_used, ids, sizeof(int64_t) * (size_t)nids);
    s->hash = h;
    s->key = t->keys_used;
    s->klen = (int32_t)n;
    s->ids = t->ids_used;
    s->nids = (int32_t)nids;
    t->keys_used += n;
    t->ids_used += nids;
    t->n++;
    return 0;
}

static inline int is_lower(unsigned char c) { return c >= 'a' && c <= 'z'; }
static inline int is_alpha(unsigned char c) { return is_lower(c | 0x20); }
static inline int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

/* Does s[i..] (lower-cased) start with the lower-case literal lit? */
static int starts(const unsigned char *s, int64_t i, int64_t n, const char *lit) {
    int64_t k = 0;
    for (; lit[k]; k++) {
        if (i + k >= n) return 0;
        unsigned char c = s[i + k];
        if (is_alpha(c)) c |= 0x20;
        if (c != (unsigned char)lit[k]) return 0;
    }
    return 1;
}

/* The end of the word that starts at s[i] (not a space), as the pattern splits. */
static int64_t word_end(const unsigned char *s, int64_t i, int64_t n) {
    static const char *const specials[] = {"<start_of_text>", "<end_of_text>"};
    static const char *const contractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
    unsigned char c = s[i];
    if (c == '<')
        for (int k = 0; k < 2; k++)
            if (starts(s, i, n, specials[k])) return i + (int64_t)strlen(specials[k]);
    if (c == '\'')
        for (int k = 0; k < 7; k++)
            if (starts(s, i, n, contractions[k])) return i + (int64_t)strlen(contractions[k]);
    int64_t j = i + 1;
    if (is_alpha(c)) {
        while (j < n && is_alpha(s[j])) j++;
    } else if (!is_digit(c)) {
        while (j < n && s[j] != ' ' && !is_alpha(s[j]) && !is_digit(s[j])) j++;
    }
    return j;
}

/* n captions, caption i the bytes blob[off[i]:off[i+1]] -> rows of `context` ids in out (n x
 * context, written whole for the captions done here) and status[i]: ST_DONE, ST_NOT_ASCII (a byte
 * outside printable ASCII, or '&': Python cleans and tokenizes it) or ST_NEW_WORD (a word that is
 * not in the table yet: Python tokenizes it and adds its words). A row is [sot, ids..., eot] padded
 * with zeros, cut to `context` with eot last, as SimpleTokenizer does. `scratch` holds the longest
 * caption's bytes. Returns how many captions were done here (-1: context < 1, nothing written). */
int64_t tok_encode(const tok_t *t, const unsigned char *blob, const int64_t *off, int64_t n, int64_t context,
                   int64_t *out, uint8_t *status, char *scratch) {
    int64_t done = 0;
    if (context < 1) return -1;
    for (int64_t r = 0; r < n; r++) {
        const unsigned char *s = blob + off[r];
        int64_t len = off[r + 1] - off[r], i;
        int64_t *row = out + r * context;
        for (i = 0; i < len; i++)
            if (s[i] < 0x20 || s[i] > 0x7e || s[i] == '&') break;
        if (i < len) {
            status[r] = ST_NOT_ASCII;
            continue;
        }
        for (i = 0; i < len; i++) scratch[i] = (char)(is_alpha(s[i]) ? (s[i] | 0x20) : s[i]);
        int64_t pos = 0;
        row[pos++] = t->sot;
        int missing = 0;
        for (i = 0; i < len && pos < context;) {
            if (s[i] == ' ') {
                i++;
                continue;
            }
            int64_t j = word_end(s, i, len);
            const slot_t *w = find(t, scratch + i, j - i, hash_bytes(scratch + i, j - i));
            if (w->key < 0) {
                missing = 1;
                break;
            }
            const int64_t *ids = t->ids + w->ids;
            for (int32_t k = 0; k < w->nids && pos < context; k++) row[pos++] = ids[k];
            i = j;
        }
        if (missing) {
            memset(row, 0, sizeof(int64_t) * (size_t)context);
            status[r] = ST_NEW_WORD;
            continue;
        }
        /* a full context (or more) means the caption was cut: eot takes the last place */
        row[pos < context ? pos : context - 1] = t->eot;
        for (int64_t k = pos + 1; k < context; k++) row[k] = 0;
        status[r] = ST_DONE;
        done++;
    }
    return done;
}
