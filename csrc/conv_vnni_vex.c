/* conv_vnni_vex.c - VNNI kernels with VEX encodings (AVX-VNNI: Alder Lake, Sapphire Rapids and
 * later). Only this file is built with AVX-VNNI enabled (pragma below). */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,avxvnni")
#define VNNI_SFX avxvnni
#define VNNI_NAME "avxvnni"
#define VNNI_MR 6   /* 16 ymm registers: 6 x 16 tile = 12 accumulators */
#define VNNI_MRH 12 /* half-width tiles: 12 x 8 = 12 accumulators */
#define VNNI_TILE _6x16
#define DPBUSD(acc, a, b) _mm256_dpbusd_avx_epi32((acc), (a), (b))
#define DPWSSD(acc, a, b) _mm256_dpwssd_avx_epi32((acc), (a), (b))
/* The peak loops' inline asm (conv_vnni.inc): AVX-VNNI is VEX only, and gas encodes vpdpbusd as
 * EVEX unless told {vex} (braces escaped: bare ones are asm dialect alternatives); "x" keeps
 * the operands in ymm0-15, which is all VEX can name. */
#define VNNI_ASM_PREFIX "%{vex%} "
#define VNNI_ASM_REG "x"
#include "conv_vnni.inc"
#endif /* x86 */
