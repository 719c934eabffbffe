// INT16 convolution on the CUDA cores (two int16 per word), int32 wrap-around accumulation.
#include "qconv_simt.cuh"
QCONV_SIMT_ALL(qconv_s16_conv_simt, OpS16)
