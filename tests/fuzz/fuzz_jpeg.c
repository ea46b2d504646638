/* libFuzzer harness for jpeg_native.c's jpeg_eoi_after_scan on a buffer of exactly the input's size
 * (bench/fuzz_native.py diff jpeg compares its answers with gpu_decode.jpeg_has_eoi_after_scan). */
#include "../../fastlaion/jpeg_native.c"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    unsigned char *body = malloc(size ? size : 1);
    memcpy(body, data, size);
    int r = jpeg_eoi_after_scan(body, size);
    if (r != 0 && r != 1) abort();
    free(body);
    return 0;
}
