// INT8 convolution on the tensor cores: mma.sync.m16n8k32 s8 x s8 -> s32 (qconv_mma.cuh).
#include "qconv_mma.cuh"

QCONV_MMA(qconv_s8_conv_mma_128x128, MmaS8, 128, 128, 2, 4, 2, 3)
QCONV_MMA(qconv_s8_conv_mma_96x128, MmaS8, 96, 128, 2, 4, 2, 3)
QCONV_MMA(qconv_s8_conv_mma_128x64, MmaS8, 128, 64, 4, 2, 1, 3)
QCONV_MMA(qconv_s8_conv_mma_64x64, MmaS8, 64, 64, 2, 4, 1, 3)
QCONV_MMA(qconv_s8_conv_mma_64x32, MmaS8, 64, 32, 4, 2, 1, 3)
QCONV_MMA(qconv_s8_conv_mma_32x32, MmaS8, 32, 32, 2, 4, 1, 3)
