/* conv_vnni_emu.c - the VNNI kernels (conv_vnni.inc) with vpdpbusd and vpdpwssd emulated exactly
 * by AVX2 sequences, for tests only: on a CPU without VNNI it runs the VNNI families' own code
 * (the q + 128 operand, the compensation, quad-channel packing, 8 x 16 tiles) so the
 * differential suite checks it everywhere. QCONV_ISA_VNNI_EMULATED; `auto` never picks it. */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma")
#include <immintrin.h>

/* acc + sum of four u8 x s8 products per int32 lane, wrapping: even and odd bytes widened to
 * int16 (u8 zero-extended, s8 sign-extended), vpmaddwd, two adds. Each product <= 255 * 128. */
static inline __attribute__((always_inline)) __m256i dpbusd_emu(__m256i acc, __m256i a, __m256i b)
{
    const __m256i lo8 = _mm256_set1_epi16(0x00FF);
    __m256i ae = _mm256_and_si256(a, lo8), ao = _mm256_srli_epi16(a, 8);
    __m256i be = _mm256_srai_epi16(_mm256_slli_epi16(b, 8), 8), bo = _mm256_srai_epi16(b, 8);
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(ae, be), _mm256_madd_epi16(ao, bo)));
}

/* acc + (a0*b0 + a1*b1) per int32 lane, wrapping: vpmaddwd equals vpdpwssd's sum except for
 * a0 = a1 = b0 = b1 = -32768, which quantization never produces. */
static inline __attribute__((always_inline)) __m256i dpwssd_emu(__m256i acc, __m256i a, __m256i b)
{
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
}

#define VNNI_SFX vnni_emulated
#define VNNI_NAME "vnni-emulated"
#define VNNI_MR 8   /* the AVX512-VNNI family's tiles */
#define VNNI_MRH 16
#define VNNI_TILE _8x16
#define DPBUSD(acc, a, b) dpbusd_emu((acc), (a), (b))
#define DPWSSD(acc, a, b) dpwssd_emu((acc), (a), (b))
#include "conv_vnni.inc"
#endif /* x86 */
