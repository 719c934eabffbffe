// Implicit-GEMM convolution on the tensor cores through mma.sync, one template for INT8
// (m16n8k32 s8 x s8 -> s32), FP32 by three TF32 products (m16n8k8 tf32 x tf32 -> f32) and INT16 /
// INT32 by byte planes (conv_planes_mma.cu).
// Block: 8 (or 4) warps as WM x WN, each warp owning a (BM/WM) x (BN/WN) tile of m16n8 fragments.
// K in steps of 32 words (128 int8 or 32 float), 3-stage cp.async pipeline, fragments through
// ldmatrix: with 32-bit words an 8x8 b16 matrix is 8 rows x 4 words, so the same row addresses give
// both m16n8k32's int8 fragments and m16n8k8's tf32 fragments. Rows padded to 36 words so each
// 8-row ldmatrix phase hits 32 distinct banks; or (SWZ) rows of 32 words with 16-byte chunk c of
// row r at chunk c ^ (r & 7), the same banks spread without the padding (12% less shared memory:
// three 4-warp 128x64 INT8 blocks fit an SM, as in cuBLASLt's kernel). grid.z = groups x K slices (split-K); stride,
// padding and groups live in the loader (qconv_common.cuh).
#pragma once
#include "qconv_common.cuh"

// An operation: Acc, the accumulator type, NACC accumulator sets per fragment; AP planes of
// activations and BP of packed weights; PARTS mma per fragment pair and k-step, issued part-major
// so that consecutive mma do not wait on each other; A, the A fragment made from ldmatrix's
// registers of the AP planes; mma(q, ...), part q; out(d, r), element r's bits from its sets.

// INT8: the s32 accumulation of mma without .satfinite wraps modulo 2^32, as the contract asks.
struct MmaS8 {
  typedef int Acc;
  static constexpr int NACC = 1, AP = 1, BP = 1, PARTS = 1;
  struct A { unsigned r[4]; };
  QD static A a_frag(const unsigned (&r)[AP][4]) { return {{r[0][0], r[0][1], r[0][2], r[0][3]}}; }
  QD static void mma(int, int (&d)[NACC][4], const A& a, const unsigned (&b)[BP][2]) { mma_s8_16832(d[0], a.r, b[0]); }
  QD static unsigned out(const int (&d)[NACC][4], int r) { return (unsigned)d[0][r]; }
};

// FP32 as three TF32 products (CUTLASS's "3xTF32"): each operand t = big + small in TF32, and
// x*w ~ xs*wb + xb*ws + xb*wb (the small products first, so they are not lost below the big one's
// rounding). The weights come split on the host (_tiling.tf32_split: big = tf32(w) rounded to
// nearest, small = tf32(w - big)). The activations are split here in three integer-unit steps
// (cvt.rna.satfinite for both parts took compare-and-select sequences in SASS): big = x truncated
// to TF32's 19 bits (no overflow near FLT_MAX), x - big is exact, small = that rounded to nearest
// (add half an ulp, mask). What is dropped per term, xs*ws and the parts' roundings, is at most
// 10 eps32 |x*w| (+ 2^-32 |x*w|): TF32X3_BOUND in cuda/_tiling.py.
QD void mma_tf32_1688(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
struct MmaTF32x3 {
  typedef float Acc;
  static constexpr int NACC = 1, AP = 1, BP = 2, PARTS = 3;
  struct A { unsigned big[4], small[4]; };
  QD static A a_frag(const unsigned (&r)[AP][4]) {
    A a;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      a.big[i] = r[0][i] & 0xFFFFE000u;
      a.small[i] = (__float_as_uint(__fsub_rn(__uint_as_float(r[0][i]), __uint_as_float(a.big[i]))) + 0x1000u) & 0xFFFFE000u;
    }
    return a;
  }
  QD static void mma(int q, float (&d)[NACC][4], const A& a, const unsigned (&b)[BP][2]) {
    if (q == 0) mma_tf32_1688(d[0], a.small, b[0]);
    else if (q == 1) mma_tf32_1688(d[0], a.big, b[1]);
    else mma_tf32_1688(d[0], a.big, b[0]);
  }
  QD static float out(const float (&d)[NACC][4], int r) { return d[0][r]; }
};

// An m16n8 accumulator fragment's four elements: (m, o), (m, o + 1), (m + 8, o), (m + 8, o + 1).
// Integers in two 8-byte pairs where the row allows (store_pair); FP32 one by one, counting the
// non-finite ones.
QD unsigned store_frag(const ConvParams& p, int ocol, int m, int o, const unsigned (&v)[4], float inv0) {
  store_pair(p, ocol, m, o, v[0], v[1], inv0);
  store_pair(p, ocol, m + 8, o, v[2], v[3], inv0);
  return 0;
}
QD unsigned store_frag(const ConvParams& p, int ocol, int m, int o, const float (&v)[4], float inv0) {
  return store_out(p, ocol, m, o, v[0], inv0) + store_out(p, ocol, m, o + 1, v[1], inv0) +
         store_out(p, ocol, m + 8, o, v[2], inv0) + store_out(p, ocol, m + 8, o + 1, v[3], inv0);
}

template <class T> struct is_integer { static const bool value = false; };
template <> struct is_integer<unsigned> { static const bool value = true; };

// The dequantizing epilogue (p.mode 1) of integer accumulators: a lane's outputs lie in NTL
// channel pairs (o, o + 1) and 2 * MT rows, so each pair's factors and bias are loaded once, not
// once per row as store_pair does, and the store's conditions are decided once.
template <int MT, int NTL, class V>
QD void store_dequantized(const ConvParams& p, int ocol, int mrow, int ocol0, const V& v, float inv0) {
  const bool pairs = p.vec_out && ((p.OC | p.OCg | ocol) & 1) == 0;
  float f[NTL][2], b[NTL][2];
#pragma unroll
  for (int j = 0; j < NTL; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int o = ocol0 + j * 8 + e, ok = o < p.OCg;
      f[j][e] = p.inv_uniform ? inv0 : ok ? __ldg(p.inv + ocol + o) : 0.0f;
      b[j][e] = p.bias && ok ? __ldg(p.bias + ocol + o) : 0.0f;
    }
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = mrow + i * 16 + h * 8;
      if (m >= p.M) continue;
      float* row = (float*)p.out + (size_t)m * p.OC + ocol;
#pragma unroll
      for (int j = 0; j < NTL; ++j) {
        const int o = ocol0 + j * 8;
        float y[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) y[e] = dequant(v[i][j][2 * h + e], f[j][e], p.bias != nullptr, b[j][e]);
        if (pairs && o + 1 < p.OCg) {
          *(float2*)(row + o) = make_float2(y[0], y[1]);
        } else {
          if (o < p.OCg) row[o] = y[0];
          if (o + 1 < p.OCg) row[o + 1] = y[1];
        }
      }
    }
}

template <class Op, int BM, int BN, int WM, int WN, int STAGES, bool SWZ = false>
QD void conv_mma(const ConvParams& p) {
  constexpr int BKW = 32, NT = 32 * WM * WN;
  constexpr int WTM = BM / WM, WTN = BN / WN, MT = WTM / 16, NTL = WTN / 8;
  static_assert(WM * WN == 8 || WM * WN == 4, "8 or 4 warps");
  typedef TileLoader<BM, BN, BKW, NT, SWZ> L;
  constexpr int SW = L::SW, AP = Op::AP, BP = Op::BP, NACC = Op::NACC;
  extern __shared__ __align__(16) unsigned smem[];
  unsigned* As = smem;                            // [STAGES][AP][BM][SW]
  unsigned* Bs = smem + STAGES * AP * BM * SW;    // [STAGES][BP][BN][SW]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp / WN, wn = warp % WN;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  scan_finite(p.scan_x, p.scan_n, p.scan_vec, p.stats);
  const BlockWork bw = block_work(p);
  const int nk = bw.nk;
  const int wplane = weight_plane_words(p), xplane = p.XPW / AP;  // words between planes

  L loader(p, m0, tid);
  typename Op::Acc acc[MT][NTL][NACC][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NTL; ++j)
#pragma unroll
      for (int s = 0; s < NACC; ++s)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[i][j][s][r] = 0;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) loader.template stage<STAGES, BP, AP>(p, bw, As, Bs, s, n0, tid, wplane, xplane);
  for (int it = 0; it < nk; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    loader.template stage<STAGES, BP, AP>(p, bw, As, Bs, it + STAGES - 1, n0, tid, wplane, xplane);
    // ldmatrix row addresses: A lanes 0-15 rows 0-15 at words 0-3, lanes 16-31 the same rows at
    // words 4-7; B lanes 0-7 / 8-15 rows of n-tile j at words 0-3 / 4-7, lanes 16-31 the same for
    // n-tile j+1. Every row a lane addresses is lane & 7 modulo 8, so with SWZ its chunk
    // (ca or cb, + ks / 4 with no carry) lands at that XOR lane & 7.
    const unsigned* as = As + (it % STAGES) * AP * BM * SW + (wm * WTM + (lane & 15)) * SW;
    const unsigned* bs = Bs + (it % STAGES) * BP * BN * SW + (wn * WTN + (lane & 7) + ((lane >> 4) << 3)) * SW;
    const int ca = (lane >> 4) ^ (SWZ ? lane & 7 : 0), cb = ((lane >> 3) & 1) ^ (SWZ ? lane & 7 : 0);
#pragma unroll
    for (int ks = 0; ks < BKW; ks += 8) {
      const int ao = SWZ ? (ca ^ (ks >> 2)) * 4 : ca * 4 + ks, bo = SWZ ? (cb ^ (ks >> 2)) * 4 : cb * 4 + ks;
      unsigned b[NTL][BP][2];
#pragma unroll
      for (int pl = 0; pl < BP; ++pl) {
#pragma unroll
        for (int j = 0; j + 1 < NTL; j += 2) {
          unsigned r[4];
          ldsm_x4(r, bs + pl * BN * SW + j * 8 * SW + bo);
          b[j][pl][0] = r[0]; b[j][pl][1] = r[1]; b[j + 1][pl][0] = r[2]; b[j + 1][pl][1] = r[3];
        }
        if (NTL % 2) ldsm_x2(b[NTL - 1][pl], bs + pl * BN * SW + (NTL - 1) * 8 * SW + bo);
      }
      typename Op::A a[MT];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        unsigned r[AP][4];
#pragma unroll
        for (int pl = 0; pl < AP; ++pl) ldsm_x4(r[pl], as + pl * BM * SW + i * 16 * SW + ao);
        a[i] = Op::a_frag(r);
      }
#pragma unroll
      for (int q = 0; q < Op::PARTS; ++q)
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int j = 0; j < NTL; ++j) Op::mma(q, acc[i][j], a[i], b[j]);
    }
  }
  cp_async_wait<0>();
  const float inv0 = epilogue_inv(p);
  typedef decltype(Op::out(acc[0][0], 0)) Out;
  if (is_integer<Out>::value && p.mode == 1) {
    Out v[MT][NTL][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NTL; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) v[i][j][r] = Op::out(acc[i][j], r);
    store_dequantized<MT, NTL>(p, bw.ocol, m0 + wm * WTM + g, n0 + wn * WTN + 2 * t, v, inv0);
    publish_stats(p.stats, p.slot);
    return;
  }
  unsigned nonfinite = 0;
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NTL; ++j) {
      // every element's bits before the stores (the planes' combining, interleaved with the
      // stores, took 8 more registers at 32x32)
      decltype(Op::out(acc[i][j], 0)) v[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) v[r] = Op::out(acc[i][j], r);
      nonfinite += store_frag(p, bw.ocol, m0 + wm * WTM + i * 16 + g, n0 + wn * WTN + j * 8 + 2 * t, v, inv0);
    }
  count_nonfinite(p.stats, nonfinite);  // integer stores return 0
  publish_stats(p.stats, p.slot);
}

// MINB: blocks per SM to fit (128x128 is capped at 128 registers so two blocks share an SM).
#define QCONV_MMA(NAME, OP, BM, BN, WM, WN, MINB, STAGES)                            \
  extern "C" __global__ void __launch_bounds__(256, MINB) NAME(const ConvParams p) { \
    wait_prior_grid(); conv_mma<OP, BM, BN, WM, WN, STAGES>(p);                      \
  }
// 4 warps and swizzled rows (_tiling.SLIM_TILES, "BMxBN/w4"): entry point NAME_w4.
#define QCONV_MMA_W4(NAME, OP, BM, BN, WM, WN, MINB, STAGES)                           \
  extern "C" __global__ void __launch_bounds__(128, MINB) NAME##_w4(const ConvParams p) { \
    wait_prior_grid(); conv_mma<OP, BM, BN, WM, WN, STAGES, true>(p);                     \
  }
