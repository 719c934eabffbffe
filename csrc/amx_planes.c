/* amx_planes.c - the byte-plane stores of the AMX INT16/INT32 kernels (conv_amx.inc):
 * QCONV_STORE_I16PL / I32PL hold E-byte integers (E = 2, 4) in blocks of 64 elements, each block
 * as E planes of 64 bytes, plane i holding byte i (little-endian) of every element. Blocks start
 * at multiples of 64 elements from the start of the array handed over, which the AMX level
 * guarantees by padding every group's channels to 64 (cpad). No SIMD here: plain C, any CPU
 * (qconv.c splits the packed kernel through these on every platform; quantize is x86 only). */
#include <string.h>

#include "qconv_impl.h"

int qconv_plain_store(int store)
{
    return store == QCONV_STORE_I16PL ? QCONV_STORE_I16 : store == QCONV_STORE_I32PL ? QCONV_STORE_I32 : store;
}

/* [64][E] -> [E][64] for each block of p's `count` E-byte elements. A last block of r < 64
 * elements gets zeros past r in every plane: its 64 - r elements are padding the caller owns. */
static inline __attribute__((always_inline)) void to_planes(uint8_t *p, int64_t count, const int E)
{
    uint8_t tmp[4 * 64];
    for (int64_t e = 0; e < count; e += 64, p += E * 64) {
        const int64_t r = count - e < 64 ? count - e : 64;
        memcpy(tmp, p, (size_t)(r * E));
        if (r < 64)
            memset(p, 0, (size_t)(E * 64));
        for (int64_t i = 0; i < r; i++)
            for (int k = 0; k < E; k++)
                p[k * 64 + i] = tmp[i * E + k];
    }
}

void qconv_split_planes(void *p, int64_t count, int store)
{
    if (store == QCONV_STORE_I16PL)
        to_planes(p, count, 2);
    else if (store == QCONV_STORE_I32PL)
        to_planes(p, count, 4);
}

#if defined(__x86_64__) || defined(__i386__)
int qconv_quantize__amx(const float *src, int64_t count, float s, int32_t qmax, int truncate, int store, void *dst)
{
    const int bad = qconv_quantize__avx2(src, count, s, qmax, truncate, qconv_plain_store(store), dst);
    qconv_split_planes(dst, count, store);
    return bad;
}
#endif /* x86 */
