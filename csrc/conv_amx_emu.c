/* conv_amx_emu.c - the AMX kernels (conv_amx.inc) with every tile instruction emulated in C
 * (amx_emu.h), for tests only: on a CPU without AMX it runs the AMX level's own code (its
 * packing, byte planes, tile shapes, slack reads and tdpb**d sign combinations) so the tests
 * check it everywhere. QCONV_ISA_AMX_EMULATED; `auto` never picks it. FP32 and depthwise are
 * the AVX2 kernels (the amx level's FP32 is AVX-512, which this CPU may lack). */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma")

#include "amx_emu.h"

#define AMX_SFX amx_emulated
#include "conv_amx.inc"

const qconv_isa_table qconv_amx_emulated_table = {
    .name = "amx-emulated",
    .quantize = qconv_quantize__amx,
    .absmax = qconv_absmax__avx2,
    .dequantize = qconv_dequantize__avx2,
    .conv = {qconv_f32_conv__avx2, qconv_s32_conv__amx_emulated, qconv_s16_conv__amx_emulated,
             qconv_s8_conv__amx_emulated},
    .nr = {QCONV_NR, 16, 16, 16},
    .grp = {1, 4, 4, 4},
    .cpad = {0, 64, 64, 64},
    .xslack = {0, 16, 16, 16},
    .xstore = {QCONV_STORE_F32, QCONV_STORE_I32PL, QCONV_STORE_I16PL, QCONV_STORE_I8},
    .wstore = {QCONV_STORE_F32, QCONV_STORE_I32PL, QCONV_STORE_I16PL, QCONV_STORE_I8},
    .mr = {6, 16, 16, 16},
    .mrh = {0, 0, 0, 0},
    .dw = {qconv_f32_dwconv__avx2, qconv_s32_dwconv__avx2, qconv_s16_dwconv__avx2, qconv_s16_dwconv__avx2},
    .dw_store = {QCONV_STORE_F32, QCONV_STORE_I32, QCONV_STORE_I16, QCONV_STORE_I16},
    .dw_block = QCONV_DW_BLOCK_AVX2,
    .dw_pack = qconv_dw_pack__avx2,
};
#endif /* x86 */
