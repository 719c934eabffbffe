/* conv_amx_emu.c - the AMX kernels (conv_amx.inc) with every tile instruction emulated in C
 * (amx_emu.h), for tests only: on a CPU without AMX it runs the AMX level's own code (its
 * packing, byte planes, tile shapes, slack reads and tdpb**d sign combinations) so the tests
 * check it everywhere. QCONV_ISA_AMX_EMULATED; `auto` never picks it. FP32 and depthwise are
 * the AVX2 kernels (the amx level's FP32 is AVX-512, which this CPU may lack). */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma")

#include "amx_emu.h"

#define AMX_SFX amx_emulated
#define AMX_TABLE qconv_amx_emulated_table
#define AMX_NAME "amx-emulated"
#define AMX_F32_CONV qconv_f32_conv__avx2   /* the ymm FP32 kernel and its 6x16 tile */
#define AMX_F32_NR QCONV_NR
#define AMX_F32_MR 6
#define AMX_F32_MRH 0
#include "conv_amx.inc"

#endif /* x86 */
