// CUDA-core implicit-GEMM convolution, one template for FP32, INT32, INT16 and INT8 (dp4a).
// Block: 256 threads as 16 x 16, each computing TM x TN outputs (rows ty + 16 i, columns tx + 16 j);
// BM = 16 TM, BN = 16 TN; K in steps of 16 words, 3-stage cp.async pipeline; grid.z = groups x
// K slices (split-K); stride, padding and groups live in the loader's index math (qconv_common.cuh).
// A warp covers 4 consecutive rows x 8 consecutive columns, so with rows padded to 20 words its
// 16-byte shared loads hit distinct banks (4 rows -> banks 0,20,8,28; 8 columns -> all 32).
#include "qconv_common.cuh"

// Multiply-accumulate four 32-bit words of K: one float, one int32, two int16 or four int8 each.
struct OpF32 {
  typedef float Acc;
  QD static void mac(float& acc, unsigned a, unsigned b) { acc = fmaf(__uint_as_float(a), __uint_as_float(b), acc); }
};
struct OpS32 {  // products and sums modulo 2^32 (unsigned arithmetic = two's-complement wrap)
  typedef unsigned Acc;
  QD static void mac(unsigned& acc, unsigned a, unsigned b) { acc += a * b; }
};
struct OpS16 {  // two int16 per word; each product fits int32, the sum wraps
  typedef unsigned Acc;
  QD static void mac(unsigned& acc, unsigned a, unsigned b) {
    int alo = (int)(short)(a & 0xffffu), ahi = (int)a >> 16;
    int blo = (int)(short)(b & 0xffffu), bhi = (int)b >> 16;
    acc += (unsigned)(alo * blo) + (unsigned)(ahi * bhi);
  }
};
struct OpDP4A {  // four int8 per word through __dp4a (int32 accumulate, wraps)
  typedef unsigned Acc;
  QD static void mac(unsigned& acc, unsigned a, unsigned b) { acc = (unsigned)__dp4a((int)a, (int)b, (int)acc); }
};

template <class Op, int TM, int TN, int STAGES>
QD void conv_simt(const ConvParams& p) {
  constexpr int BM = 16 * TM, BN = 16 * TN, BKW = 16, NT = 256;
  typedef TileLoader<BM, BN, BKW, NT> L;
  constexpr int SW = L::SW;
  extern __shared__ __align__(16) unsigned smem[];
  unsigned* As = smem;
  unsigned* Bs = smem + STAGES * BM * SW;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tx = (warp & 1) * 8 + (lane & 7);
  const int ty = (warp >> 1) * 4 + (lane >> 3);
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  scan_finite(p.scan_x, p.scan_n, p.scan_vec, p.stats);
  const BlockWork bw = block_work(p);
  const int nk = bw.nk;

  L loader(p, m0, tid);
  typename Op::Acc acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) loader.template stage<STAGES>(p, bw, As, Bs, s, n0, tid);
  for (int it = 0; it < nk; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    loader.template stage<STAGES>(p, bw, As, Bs, it + STAGES - 1, n0, tid);
    const unsigned* as = As + (it % STAGES) * BM * SW;
    const unsigned* bs = Bs + (it % STAGES) * BN * SW;
#pragma unroll
    for (int kk = 0; kk < BKW; kk += 4) {
      uint4 a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = *(const uint4*)(as + (ty + 16 * i) * SW + kk);
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = *(const uint4*)(bs + (tx + 16 * j) * SW + kk);
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          Op::mac(acc[i][j], a[i].x, b[j].x);
          Op::mac(acc[i][j], a[i].y, b[j].y);
          Op::mac(acc[i][j], a[i].z, b[j].z);
          Op::mac(acc[i][j], a[i].w, b[j].w);
        }
    }
  }
  cp_async_wait<0>();
  const float inv0 = epilogue_inv(p);
  unsigned nonfinite = 0;
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) nonfinite += store_out(p, bw.ocol, m0 + ty + 16 * i, n0 + tx + 16 * j, acc[i][j], inv0);
  count_nonfinite(p.stats, nonfinite);  // integer stores return 0
  publish_stats(p.stats, p.slot);
}

#define QCONV_SIMT(NAME, OP, TM, TN)                                              \
  extern "C" __global__ void __launch_bounds__(256) NAME(const ConvParams p) {    \
    wait_prior_grid(); conv_simt<OP, TM, TN, 3>(p);                               \
  }
#define QCONV_SIMT_ALL(PFX, OP)                  \
  QCONV_SIMT(PFX##_128x128, OP, 8, 8)            \
  QCONV_SIMT(PFX##_128x64, OP, 8, 4)             \
  QCONV_SIMT(PFX##_64x64, OP, 4, 4)              \
  QCONV_SIMT(PFX##_64x32, OP, 4, 2)              \
  QCONV_SIMT(PFX##_32x32, OP, 2, 2)
