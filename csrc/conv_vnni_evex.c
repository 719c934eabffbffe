/* conv_vnni_evex.c - VNNI kernels with 256-bit EVEX encodings (AVX512-VNNI + AVX512VL: Zen 4,
 * Ice Lake and later servers). Only this file is built with these extensions (pragma below). */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,avx512f,avx512vl,avx512vnni")
#define VNNI_SFX avx512vnni
#define VNNI_NAME "avx512vnni"
#define VNNI_MR 8   /* 32 ymm registers: 8 x 16 tile = 16 accumulators */
#define VNNI_MRH 16 /* half-width tiles: 16 x 8 = 16 accumulators */
#define VNNI_TILE _8x16
#define DPBUSD(acc, a, b) _mm256_dpbusd_epi32((acc), (a), (b))
#define DPWSSD(acc, a, b) _mm256_dpwssd_epi32((acc), (a), (b))
#define VNNI_ASM_PREFIX "" /* the peak loops' inline asm (conv_vnni.inc): EVEX, gas's default */
#define VNNI_ASM_REG "v"   /* ymm0-31 */
#include "conv_vnni.inc"
#endif /* x86 */
