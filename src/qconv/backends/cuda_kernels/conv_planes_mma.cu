// INT16 and INT32 convolution on the tensor cores, bit-exact, by exact 8-bit decomposition
// (mma.sync m16n8k32 with the .s8/.u8 operand types, sm_80+).
//
// Operands. Each quantized value q (int16 or int32) is split into P bytes (P = 2 or 4):
//   q = sum_{b < P-1} u_b * 2^(8b) + s_{P-1} * 2^(8(P-1)),
// u_b = (q >> 8b) & 0xFF unsigned (0..255) and the top byte s_{P-1} = q >> 8(P-1) signed
// (-128..127). This is an identity over the integers (two's complement: the top byte carries the
// sign), so for INT16 q = hi*256 + lo and for INT32 q = s3*2^24 + u2*2^16 + u1*2^8 + u0.
// quant.cu (qconv_quantize_x_p16/p32) writes the activations as P byte planes per pixel, each
// plane in the INT8 kernel's layout (G groups of Cw words), plane b at word b*XPW/P of the pixel;
// the packed weights are P such [G][OCgp][Kpw] planes, plane b at word b*G*wgs (cuda/_tiling.py).
// The loader reads every plane's tile exactly as the INT8 kernel reads its one.
//
// Products. x*w = sum_{i,j} x_i * w_j * 2^(8(i+j)). Modulo 2^32 every term with i + j >= 4 is
// 0 (2^32 divides 2^(8(i+j))), so
//   INT16 (P = 2): x*w = hi*hi*2^16 + (hi_x*lo_w + lo_x*hi_w)*2^8 + lo*lo        (4 products, exact)
//   INT32 (P = 4): x*w = sum_{s=0..3} 2^(8s) * sum_{i+j=s} x_i*w_j  (mod 2^32)  (10 of the 16 products)
// Each byte product is one mma with the operand types of its bytes (.s8 for the top byte, .u8 for
// the others): s8.s8, s8.u8, u8.s8, u8.u8.
//
// Proof that the result equals the contract's int32 wrap-around accumulation, bit for bit:
//  1. A tensor-core mma computes each byte product exactly (|product| <= 255*255 < 2^16) and
//     adds them into its s32 accumulator; without .satfinite (never used here) the s32
//     accumulation wraps, i.e. it is exact modulo 2^32 (PTX ISA, mma integer types: only
//     .satfinite clamps). So acc_s = sum over K and over pairs (i+j = s) of x_i*w_j  (mod 2^32).
//  2. Reduction mod 2^32 is a ring homomorphism Z -> Z/2^32: sums and products may be reduced in
//     any order, and multiplying by 2^(8s) is a left shift by 8s in 32-bit unsigned arithmetic
//     (bits shifted out are multiples of 2^32). Hence
//       acc0 + (acc1 << 8) + (acc2 << 16) [+ (acc3 << 24)]  (unsigned, wrapping)
//     = sum_K sum_{i,j} x_i*w_j*2^(8(i+j)) = sum_K x*w  (mod 2^32),
//     which is exactly the contract's acc (products and sums modulo 2^32), whatever the values
//     and however often any partial sum overflows.
//
// The kernel is qconv_mma.cuh's conv_mma with the operation below: P A planes and P B planes per
// pipeline stage, and one accumulator set per shift class (3 for INT16, 4 for INT32).
#include "qconv_mma.cuh"

template <int P>
struct MmaPlanes {
  static_assert(P == 2 || P == 4, "2 or 4 byte planes");
  typedef int Acc;
  // shift classes s = i + j kept (s <= 3 for INT32: mod 2^32); parts: the byte pairs (xi, wj)
  // with xi + wj < NACC, in row-major order
  static constexpr int NACC = P == 2 ? 3 : 4, AP = P, BP = P, PARTS = P == 2 ? 4 : 10;
  struct A { unsigned r[P][4]; };
  QD static A a_frag(const unsigned (&r)[AP][4]) {
    A a;
#pragma unroll
    for (int pl = 0; pl < P; ++pl)
#pragma unroll
      for (int k = 0; k < 4; ++k) a.r[pl][k] = r[pl][k];
    return a;
  }
  // part q's pair; q is a constant once the caller's loop is unrolled, so this folds away
  QD static constexpr int pair(int q) {
    for (int xi = 0; xi < P; ++xi)
      for (int wj = 0; wj < P; ++wj)
        if (xi + wj < NACC && q-- == 0) return xi * P + wj;
    return -1;
  }
  // the top plane (P-1) is signed, the others unsigned
  QD static void mma(int q, int (&d)[NACC][4], const A& a, const unsigned (&b)[BP][2]) {
    const int xi = pair(q) / P, wj = pair(q) % P;
    if (xi == P - 1 && wj == P - 1) mma_x8_16832<true, true>(d[xi + wj], a.r[xi], b[wj]);
    else if (xi == P - 1) mma_x8_16832<true, false>(d[xi + wj], a.r[xi], b[wj]);
    else if (wj == P - 1) mma_x8_16832<false, true>(d[xi + wj], a.r[xi], b[wj]);
    else mma_x8_16832<false, false>(d[xi + wj], a.r[xi], b[wj]);
  }
  // sum_s acc_s * 2^(8s) modulo 2^32 (unsigned shifts and adds wrap)
  QD static unsigned out(const int (&d)[NACC][4], int r) {
    unsigned u = 0;
#pragma unroll
    for (int s = 0; s < NACC; ++s) u += (unsigned)d[s][r] << (8 * s);
    return u;
  }
};

// Stages per precision (shared memory: STAGES * P * (BM + BN) * 144 bytes; INT32's four planes
// take two stages so that 64x64 fits in 144 KB).
QCONV_MMA(qconv_s16_conv_mma_128x64, MmaPlanes<2>, 128, 64, 4, 2, 1, 3)
QCONV_MMA(qconv_s16_conv_mma_64x64, MmaPlanes<2>, 64, 64, 2, 4, 1, 3)
QCONV_MMA(qconv_s16_conv_mma_64x32, MmaPlanes<2>, 64, 32, 4, 2, 1, 3)
QCONV_MMA(qconv_s16_conv_mma_32x32, MmaPlanes<2>, 32, 32, 2, 4, 1, 3)
QCONV_MMA(qconv_s32_conv_mma_64x64, MmaPlanes<4>, 64, 64, 2, 4, 1, 2)
QCONV_MMA(qconv_s32_conv_mma_64x32, MmaPlanes<4>, 64, 32, 4, 2, 1, 2)
QCONV_MMA(qconv_s32_conv_mma_32x32, MmaPlanes<4>, 32, 32, 2, 4, 1, 2)
