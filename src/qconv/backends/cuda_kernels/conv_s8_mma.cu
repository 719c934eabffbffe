// INT8 convolution on the tensor cores: mma.sync.m16n8k32 s8 x s8 -> s32 through inline PTX.
// Block: 8 warps as WM x WN, each warp owning a (BM/WM) x (BN/WN) tile of m16n8 fragments.
// K in steps of 32 words (128 int8), 3-stage cp.async pipeline, fragments through ldmatrix; rows
// padded to 36 words so each 8-row ldmatrix phase hits 32 distinct banks. grid.z = groups x K
// slices (split-K); stride, padding and groups live in the loader (qconv_common.cuh).
// The s32 accumulation of mma without .satfinite wraps modulo 2^32, as the contract asks.
#include "qconv_common.cuh"

// mma_s8_16832, ldsm_x4 and ldsm_x2 are in qconv_common.cuh (shared with conv_planes_mma.cu).

template <int BM, int BN, int WM, int WN, int STAGES>
QD void conv_mma(const ConvParams& p) {
  constexpr int BKW = 32, NT = 256;
  constexpr int WTM = BM / WM, WTN = BN / WN, MT = WTM / 16, NTL = WTN / 8;
  static_assert(WM * WN == 8, "8 warps");
  typedef TileLoader<BM, BN, BKW, NT> L;
  constexpr int SW = L::SW;
  extern __shared__ __align__(16) unsigned smem[];
  unsigned* As = smem;
  unsigned* Bs = smem + STAGES * BM * SW;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp / WN, wn = warp % WN;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  scan_finite(p.scan_x, p.scan_n, p.scan_vec, p.stats);
  const BlockWork bw = block_work(p);
  const int nk = bw.nk;

  L loader(p, m0, tid);
  int acc[MT][NTL][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NTL; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) loader.template stage<STAGES>(p, bw, As, Bs, s, n0, tid);
  for (int it = 0; it < nk; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    loader.template stage<STAGES>(p, bw, As, Bs, it + STAGES - 1, n0, tid);
    // ldmatrix row addresses: A lanes 0-15 rows 0-15 at k 0-15, lanes 16-31 the same rows at k 16-31;
    // B lanes 0-7 / 8-15 rows of n-tile j at k 0-15 / 16-31, lanes 16-31 the same for n-tile j+1.
    const unsigned* as = As + (it % STAGES) * BM * SW + (wm * WTM + (lane & 15)) * SW + (lane >> 4) * 4;
    const unsigned* bs = Bs + (it % STAGES) * BN * SW + (wn * WTN + (lane & 7) + ((lane >> 4) << 3)) * SW +
                         ((lane >> 3) & 1) * 4;
#pragma unroll
    for (int ks = 0; ks < BKW; ks += 8) {
      unsigned a[MT][4], b[NTL][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) ldsm_x4(a[i], as + i * 16 * SW + ks);
#pragma unroll
      for (int j = 0; j + 1 < NTL; j += 2) {
        unsigned r[4];
        ldsm_x4(r, bs + j * 8 * SW + ks);
        b[j][0] = r[0]; b[j][1] = r[1]; b[j + 1][0] = r[2]; b[j + 1][1] = r[3];
      }
      if (NTL % 2) ldsm_x2(b[NTL - 1], bs + (NTL - 1) * 8 * SW + ks);
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NTL; ++j) mma_s8_16832(acc[i][j], a[i], b[j]);
    }
  }
  cp_async_wait<0>();
  const float inv0 = epilogue_inv(p);
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NTL; ++j) {
      int m = m0 + wm * WTM + i * 16 + g, o = n0 + wn * WTN + j * 8 + 2 * t;
      store_out(p, bw.ocol, m, o, (unsigned)acc[i][j][0], inv0);
      store_out(p, bw.ocol, m, o + 1, (unsigned)acc[i][j][1], inv0);
      store_out(p, bw.ocol, m + 8, o, (unsigned)acc[i][j][2], inv0);
      store_out(p, bw.ocol, m + 8, o + 1, (unsigned)acc[i][j][3], inv0);
    }
  publish_stats(p.stats, p.slot);
}

// MINB: blocks per SM to fit (128x128 is capped at 128 registers so two blocks share an SM).
#define QCONV_MMA(NAME, BM, BN, WM, WN, MINB)                                        \
  extern "C" __global__ void __launch_bounds__(256, MINB) NAME(const ConvParams p) { \
    conv_mma<BM, BN, WM, WN, 3>(p);                                                  \
  }
QCONV_MMA(qconv_s8_conv_mma_128x128, 128, 128, 2, 4, 2)
QCONV_MMA(qconv_s8_conv_mma_96x128, 96, 128, 2, 4, 2)
QCONV_MMA(qconv_s8_conv_mma_128x64, 128, 64, 4, 2, 1)
QCONV_MMA(qconv_s8_conv_mma_64x64, 64, 64, 2, 4, 1)
QCONV_MMA(qconv_s8_conv_mma_64x32, 64, 32, 4, 2, 1)
QCONV_MMA(qconv_s8_conv_mma_32x32, 32, 32, 2, 4, 1)
