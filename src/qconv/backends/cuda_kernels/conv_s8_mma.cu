// INT8 convolution on the tensor cores: mma.sync.m16n8k32 s8 x s8 -> s32 (qconv_mma.cuh).
#include "qconv_mma.cuh"

QCONV_MMA(qconv_s8_conv_mma_128x128, MmaS8, 128, 128, 2, 4, 2, 3)
QCONV_MMA(qconv_s8_conv_mma_96x128, MmaS8, 96, 128, 2, 4, 2, 3)
QCONV_MMA(qconv_s8_conv_mma_128x64, MmaS8, 128, 64, 4, 2, 1, 3)
QCONV_MMA(qconv_s8_conv_mma_64x64, MmaS8, 64, 64, 2, 4, 1, 3)
QCONV_MMA(qconv_s8_conv_mma_64x32, MmaS8, 64, 32, 4, 2, 1, 3)
QCONV_MMA(qconv_s8_conv_mma_32x32, MmaS8, 32, 32, 2, 4, 1, 3)
// 4 warps of 64x32 (128x64) or 32x32 (64x64), unpadded swizzled rows: 72 KB a 128x64 block, three an SM
QCONV_MMA_W4(qconv_s8_conv_mma_128x64, MmaS8, 128, 64, 2, 2, 3, 3)
QCONV_MMA_W4(qconv_s8_conv_mma_64x64, MmaS8, 64, 64, 2, 2, 4, 3)
