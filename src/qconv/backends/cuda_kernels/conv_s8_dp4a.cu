// INT8 convolution on the CUDA cores through __dp4a (four int8 products per instruction).
#include "qconv_simt.cuh"
QCONV_SIMT_ALL(qconv_s8_conv_dp4a, OpDP4A)
