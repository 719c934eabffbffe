// FP32 convolution on the CUDA cores (tiled implicit GEMM, float32 accumulation).
#include "qconv_simt.cuh"
QCONV_SIMT_ALL(qconv_f32_conv_simt, OpF32)
