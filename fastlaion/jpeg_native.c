/* The GPU decoders' per-image JPEG check, compiled: gpu_decode.jpeg_has_eoi_after_scan is the
 * reference (and runs where this library cannot be built), and tests/test_gpu_decode.py checks
 * that both answer alike on real, cut and randomly mutated JPEGs.
 *
 * 1 when the body (after its SOI) walks, segment by segment as libjpeg reads them, to a scan that
 * follows a frame header, with an EOI marker starting after the scan's marker; 0 otherwise (a
 * byte where a marker should be, an EOI or SOI before the scan, a scan before any frame header,
 * a segment running past the end, no EOI after the scan, more than a MiB of header before the
 * scan: both this walk and libjpeg's header read run holding the GIL, so their time is bounded).
 */
#include <stddef.h>

#define MAX_HEADER_BYTES ((size_t)1 << 20)  /* gpu_decode._MAX_HEADER_BYTES */

int jpeg_eoi_after_scan(const unsigned char *body, size_t end) {
    size_t pos = 2;
    int frame = 0;
    while (pos + 4 <= end) {
        if (pos > MAX_HEADER_BYTES)                             /* no scan in the first MiB: the CPU decides */
            return 0;
        if (body[pos] != 0xFF)
            return 0;
        unsigned marker = body[pos + 1];
        if (marker == 0xFF) {                                   /* a fill byte before a marker */
            pos += 1;
        } else if (marker == 0x01 || (marker >= 0xD0 && marker <= 0xD7)) {  /* TEM, RST0-7: no length */
            pos += 2;
        } else if (marker == 0xD9 || marker == 0xD8) {          /* EOI or SOI before any scan */
            return 0;
        } else if (marker == 0xDA) {                            /* SOS: an EOI must start after it */
            if (!frame)
                return 0;
            for (size_t k = end - 2; k > pos; k--)              /* end >= pos + 4, so k >= pos + 2 */
                if (body[k] == 0xFF && body[k + 1] == 0xD9)
                    return 1;
            return 0;
        } else {
            if (marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC)
                frame = 1;                                      /* SOF0-15, less DHT, JPG and DAC */
            pos += 2 + (((size_t)body[pos + 2] << 8) | body[pos + 3]);
        }
    }
    return 0;
}
