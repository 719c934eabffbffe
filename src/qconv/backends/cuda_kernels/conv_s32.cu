// INT32 convolution on the CUDA cores, products and sums modulo 2^32.
#include "qconv_simt.cuh"
QCONV_SIMT_ALL(qconv_s32_conv_simt, OpS32)
