/* libFuzzer harness for tokenize_native.c: the input's first line gives words (space-separated),
 * each added with ids of its length; the other lines are the captions, tokenized at a context the
 * first byte picks. Buffers of exactly the input's size (ASan sees a read past a caption). */
#include "../../fastlaion/tokenize_native.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int64_t context = 1 + data[0] % 80;
    const unsigned char *p = data + 1;
    int64_t n = (int64_t)size - 1;
    tok_t *t = tok_new(49406, 49407);
    int64_t i = 0;
    while (i < n && p[i] != '\n') {
        int64_t j = i;
        while (j < n && p[j] != ' ' && p[j] != '\n') j++;
        if (j > i) {
            int64_t ids[8];
            int64_t k = (j - i) % 8 + 1;
            for (int64_t q = 0; q < k; q++) ids[q] = q + j;
            char *w = malloc((size_t)(j - i));
            for (int64_t q = i; q < j; q++) w[q - i] = (char)(p[q] >= 'A' && p[q] <= 'Z' ? p[q] | 0x20 : p[q]);
            if (tok_add(t, w, j - i, ids, k) != 0) abort();
            free(w);
        }
        i = j < n && p[j] == ' ' ? j + 1 : j;
    }
    /* captions: the remaining lines */
    int64_t rows = 0, off[257];
    off[0] = i < n ? i + 1 : n;
    for (int64_t q = off[0]; q <= n && rows < 256; q++)
        if (q == n || p[q] == '\n') off[++rows] = q;
    /* a blob of the captions back to back (no newlines), exactly sized */
    int64_t total = 0, longest = 0;
    for (int64_t r = 0; r < rows; r++) {
        int64_t a = r ? off[r] + 1 : off[0], len = off[r + 1] - a;
        if (len < 0) len = 0;
        total += len;
        if (len > longest) longest = len;
    }
    unsigned char *blob = malloc((size_t)total + 1);
    int64_t *o = malloc(sizeof(int64_t) * (size_t)(rows + 1));
    o[0] = 0;
    for (int64_t r = 0; r < rows; r++) {
        int64_t a = r ? off[r] + 1 : off[0], len = off[r + 1] - a;
        if (len < 0) len = 0;
        memcpy(blob + o[r], p + a, (size_t)len);
        o[r + 1] = o[r] + len;
    }
    int64_t *out = malloc(sizeof(int64_t) * (size_t)(rows * context + 1));
    uint8_t *status = malloc((size_t)rows + 1);
    char *scratch = malloc((size_t)longest + 1);
    int64_t done = tok_encode(t, blob, o, rows, context, out, status, scratch);
    if (done < 0 || done > rows) abort();
    for (int64_t r = 0; r < rows; r++) {
        if (status[r] > 2) abort();
        if (status[r] == 0 && out[r * context] != 49406 && context > 1) abort();
    }
    free(blob); free(o); free(out); free(status); free(scratch);
    tok_free(t);
    return 0;
}
