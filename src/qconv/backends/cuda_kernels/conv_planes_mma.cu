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
// Block: 8 warps as WM x WN as in conv_s8_mma.cu; per pipeline stage P A tiles and P B tiles of
// BM/BN x 32 words; one accumulator set per shift class (3 for INT16, 4 for INT32).
#include "qconv_common.cuh"

template <int P, int BM, int BN, int WM, int WN, int STAGES>
QD void conv_planes(const ConvParams& p) {
  constexpr int BKW = 32, NT = 256;
  constexpr int WTM = BM / WM, WTN = BN / WN, MT = WTM / 16, NTL = WTN / 8;
  constexpr int NS = P == 2 ? 3 : 4;  // shift classes s = i + j kept (s <= 3 for INT32: mod 2^32)
  static_assert(WM * WN == 8, "8 warps");
  static_assert(P == 2 || P == 4, "2 or 4 byte planes");
  typedef TileLoader<BM, BN, BKW, NT> L;
  constexpr int SW = L::SW;
  constexpr int ASZ = BM * SW, BSZ = BN * SW;  // one plane's tile, words
  extern __shared__ __align__(16) unsigned smem[];
  unsigned* As = smem;                          // [STAGES][P][BM][SW]
  unsigned* Bs = smem + STAGES * P * ASZ;       // [STAGES][P][BN][SW]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp / WN, wn = warp % WN;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  scan_finite(p.scan_x, p.scan_n, p.scan_vec, p.stats);
  const BlockWork bw = block_work(p);
  const int nk = bw.nk;
  const int xplane = p.XPW / P;                               // words of one plane of a pixel
  const int wplane = weight_plane_words(p);

  L loader(p, m0, tid);
  int acc[NS][MT][NTL][4];
#pragma unroll
  for (int s = 0; s < NS; ++s)
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NTL; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[s][i][j][r] = 0;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) loader.template stage<STAGES, P, P>(p, bw, As, Bs, s, n0, tid, wplane, xplane);
  for (int it = 0; it < nk; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    loader.template stage<STAGES, P, P>(p, bw, As, Bs, it + STAGES - 1, n0, tid, wplane, xplane);
    const int st = it % STAGES;
    const int aoff = (wm * WTM + (lane & 15)) * SW + (lane >> 4) * 4;
    const int boff = (wn * WTN + (lane & 7) + ((lane >> 4) << 3)) * SW + ((lane >> 3) & 1) * 4;
#pragma unroll
    for (int ks = 0; ks < BKW; ks += 8) {
      unsigned a[P][MT][4], b[P][NTL][2];
#pragma unroll
      for (int pl = 0; pl < P; ++pl) {
        const unsigned* as = As + (st * P + pl) * ASZ + aoff;
        const unsigned* bs = Bs + (st * P + pl) * BSZ + boff;
#pragma unroll
        for (int i = 0; i < MT; ++i) ldsm_x4(a[pl][i], as + i * 16 * SW + ks);
#pragma unroll
        for (int j = 0; j + 1 < NTL; j += 2) {
          unsigned r[4];
          ldsm_x4(r, bs + j * 8 * SW + ks);
          b[pl][j][0] = r[0]; b[pl][j][1] = r[1]; b[pl][j + 1][0] = r[2]; b[pl][j + 1][1] = r[3];
        }
        if (NTL % 2) ldsm_x2(b[pl][NTL - 1], bs + (NTL - 1) * 8 * SW + ks);
      }
      // every byte pair (xi, wj) with i + j < NS, into the accumulator of its shift class; the
      // top plane (P-1) is signed, the others unsigned
#pragma unroll
      for (int xi = 0; xi < P; ++xi)
#pragma unroll
        for (int wj = 0; wj < P; ++wj) {
          if (xi + wj >= NS) continue;
#pragma unroll
          for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NTL; ++j) {
              if (xi == P - 1 && wj == P - 1) mma_x8_16832<true, true>(acc[xi + wj][i][j], a[xi][i], b[wj][j]);
              else if (xi == P - 1) mma_x8_16832<true, false>(acc[xi + wj][i][j], a[xi][i], b[wj][j]);
              else if (wj == P - 1) mma_x8_16832<false, true>(acc[xi + wj][i][j], a[xi][i], b[wj][j]);
              else mma_x8_16832<false, false>(acc[xi + wj][i][j], a[xi][i], b[wj][j]);
            }
        }
    }
  }
  cp_async_wait<0>();
  const float inv0 = epilogue_inv(p);
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NTL; ++j) {
      unsigned v[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {  // sum_s acc_s * 2^(8s) modulo 2^32 (unsigned shifts and adds wrap)
        unsigned u = 0;
#pragma unroll
        for (int s = 0; s < NS; ++s) u += (unsigned)acc[s][i][j][r] << (8 * s);
        v[r] = u;
      }
      int m = m0 + wm * WTM + i * 16 + g, o = n0 + wn * WTN + j * 8 + 2 * t;
      store_out(p, bw.ocol, m, o, v[0], inv0);
      store_out(p, bw.ocol, m, o + 1, v[1], inv0);
      store_out(p, bw.ocol, m + 8, o, v[2], inv0);
      store_out(p, bw.ocol, m + 8, o + 1, v[3], inv0);
    }
  publish_stats(p.stats, p.slot);
}

// Stages per precision (shared memory: STAGES * P * (BM + BN) * 144 bytes; INT32's four planes
// take two stages so that 64x64 fits in 144 KB).
#define QCONV_PLANES(NAME, P, BM, BN, WM, WN, STAGES)                           \
  extern "C" __global__ void __launch_bounds__(256, 1) NAME(const ConvParams p) { \
    conv_planes<P, BM, BN, WM, WN, STAGES>(p);                                   \
  }
QCONV_PLANES(qconv_s16_conv_mma_128x64, 2, 128, 64, 4, 2, 3)
QCONV_PLANES(qconv_s16_conv_mma_64x64, 2, 64, 64, 2, 4, 3)
QCONV_PLANES(qconv_s16_conv_mma_64x32, 2, 64, 32, 4, 2, 3)
QCONV_PLANES(qconv_s16_conv_mma_32x32, 2, 32, 32, 2, 4, 3)
QCONV_PLANES(qconv_s32_conv_mma_64x64, 4, 64, 64, 2, 4, 2)
QCONV_PLANES(qconv_s32_conv_mma_64x32, 4, 64, 32, 4, 2, 2)
QCONV_PLANES(qconv_s32_conv_mma_32x32, 4, 32, 32, 2, 4, 2)
