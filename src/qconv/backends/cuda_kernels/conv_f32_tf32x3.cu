// FP32 convolution on the tensor cores: each product as three TF32 mma.sync.m16n8k8 products with
// float32 accumulation (qconv_mma.cuh), within _tiling.TF32X3_BOUND (cuda/_tiling.py).
#include "qconv_mma.cuh"

QCONV_MMA(qconv_f32_conv_tf32x3_128x64, MmaTF32x3, 128, 64, 4, 2, 2, 3)
QCONV_MMA(qconv_f32_conv_tf32x3_64x64, MmaTF32x3, 64, 64, 2, 4, 1, 3)
QCONV_MMA(qconv_f32_conv_tf32x3_64x32, MmaTF32x3, 64, 32, 4, 2, 1, 3)
QCONV_MMA(qconv_f32_conv_tf32x3_32x32, MmaTF32x3, 32, 32, 2, 4, 1, 3)
