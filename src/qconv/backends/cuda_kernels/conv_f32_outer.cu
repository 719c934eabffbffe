// FP32 convolution on the CUDA cores, outer-product form (the CUTLASS-SIMT shared-memory layout).
//
// Same implicit GEMM as qconv_simt.cuh (C[m][o] = sum_k X[m][k] W[o][k], both operands k-contiguous
// in global memory), but shared memory holds the A tile m-contiguous (As[k][m]) and the B tile
// o-contiguous (Bs[k][o]): each K step a thread reads TM/4 + TN/4 float4 and does TM*TN FFMA.
// The transpose happens on the way in, through registers: each thread loads R = 1, 2 or 4
// consecutive rows of one 16-byte K chunk of each operand (R LDG.128) and stores them as 4 R-word
// rows; the 32/R lanes of a store phase take the same chunk and consecutive row groups, so they write
// consecutive words (no bank conflicts, no padding). Every thread loads both operands (no branches).
// Warp: 4 (m) x 8 (n) lanes, lane bit 0 -> n and bit 1 -> m, so lanes T and T^1 read the same A
// address and T and T^2 the same B address (pairs whose shared-memory returns can be packed).
// Thread (TM, TN in {4, 8}): rows wm*4TM + 16g + 4ml + (0..3), columns wn*8TN + 32g + 4nl + (0..3).
// Pipeline: two shared stages; the global loads of tile t+1 are issued before tile t's math and
// stored before its last K step, then one barrier per tile; fragments are double-buffered in
// registers, so the next tile's first shared loads overlap the last step's math.
// grid.z = groups x K slices as in qconv_simt.cuh (mode 2: float atomics); stride, padding and
// groups in the A loader's index math.
#include "qconv_common.cuh"

QD unsigned comp(const uint4& v, int c) { return c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w; }
// Stores the R x 4 block v (row r = v[r]) transposed: shared row kk (stride rs) gets the R words v[.][kk].
template <int R>
QD void store_rows(float* dst, int rs, const uint4* v) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    if constexpr (R == 4) *(uint4*)(dst + kk * rs) = make_uint4(comp(v[0], kk), comp(v[1], kk), comp(v[2], kk), comp(v[3], kk));
    else if constexpr (R == 2) *(uint2*)(dst + kk * rs) = make_uint2(comp(v[0], kk), comp(v[1], kk));
    else *(unsigned*)(dst + kk * rs) = comp(v[0], kk);
  }
}

template <int BM, int BN, int TM, int TN, int BK>
QD void conv_outer(const ConvParams& p) {
  // BK: K words per shared tile, 16 (cuda.py SIMT_BKW, the unit of p.ktiles) or 8 (fewer staging
  // registers for the global->shared copy, two barriers per 16 words)
  constexpr int SUB = 16 / BK, CPR = BK / 4;   // tiles per 16 words, 16-byte chunks per tile row
  constexpr int WM = 4 * TM, WN = 8 * TN;      // warp tile
  constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN;
  constexpr int NT = 32 * WARPS_M * WARPS_N;
  constexpr int RA = BM * CPR / NT, RB = BN * CPR / NT;  // rows per thread (one K chunk)
  static_assert(BM % WM == 0 && BN % WN == 0 && (BK == 16 || BK == 8), "tile shape");
  static_assert((RA == 1 || RA == 2 || RA == 4) && (RB == 1 || RB == 2 || RB == 4), "loader shape");
  __shared__ __align__(16) float As[2][BK][BM];
  __shared__ __align__(16) float Bs[2][BK][BN];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  scan_finite(p.scan_x, p.scan_n, p.scan_vec, p.stats);
  const BlockWork bw = block_work(p);
  const int kt0 = bw.kt0 * SUB;  // in BK-word tiles
  const int nk = bw.nk * SUB;

  // ---- loader: every thread loads R consecutive rows of one 16-byte K chunk of each operand (an
  // R x 4 block, R LDG.128) and stores it transposed as 4 R-word rows of the m- (o-) contiguous
  // tile. The 32/R lanes of one shared-store phase take the same chunk and consecutive row groups.
  constexpr int LA = 32 / RA, LB = 32 / RB;
  const int ja = (tid / LA) % CPR, ga = (tid % LA) + LA * (tid / (CPR * LA));
  const int jb = (tid / LB) % CPR, gb = (tid % LB) + LB * (tid / (CPR * LB));
  // This thread's A rows: top-left input pixel (i*sh - pt, j*sw - pl) of the receptive field, as
  // (h, w) for the bounds test and as a pixel index; h huge when the row is past M.
  int ah[RA], aw[RA], apix[RA];
#pragma unroll
  for (int r = 0; r < RA; ++r) {
    int m = m0 + RA * ga + r;
    if (m < p.M) {
      int hw = p.Ho * p.Wo;
      int n = m / hw, rem = m - n * hw;
      int i = rem / p.Wo;
      ah[r] = i * p.sh - p.pt; aw[r] = (rem - i * p.Wo) * p.sw - p.pl;
      apix[r] = (n * p.H + ah[r]) * p.W + aw[r];
    } else {
      ah[r] = -(1 << 28); aw[r] = 0; apix[r] = 0;
    }
  }
  uint4 sa[RA], sb[RB];
  // K position of this thread's A chunk (cw within the pixel, kernel tap kh, kw), advanced by BK
  // words per tile so that the loop needs no division.
  int ld_cw, ld_kh, ld_kw;
  {
    int kword = kt0 * BK + 4 * ja;
    int tap = kword / p.Cw;
    ld_cw = kword - tap * p.Cw;
    ld_kh = tap / p.KW;
    ld_kw = tap - ld_kh * p.KW;
  }

  auto load_global = [&](int kt) {
    const bool tap_ok = ld_kh < p.KH;
    const int dpix = ld_kh * p.W + ld_kw;
#pragma unroll
    for (int r = 0; r < RA; ++r) {
      int hi = ah[r] + ld_kh, wi = aw[r] + ld_kw;
      bool ok = tap_ok && (unsigned)hi < (unsigned)p.H && (unsigned)wi < (unsigned)p.W;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (ok) v = __ldg((const uint4*)(p.x + ((long long)(apix[r] + dpix) * p.XPW + bw.xoff + ld_cw)));
      sa[r] = v;
    }
    const unsigned* src = p.w + ((size_t)(n0 + RB * gb) * p.Kpw + bw.woff + kt * BK + 4 * jb);
#pragma unroll
    for (int r = 0; r < RB; ++r) sb[r] = __ldg((const uint4*)(src + (size_t)r * p.Kpw));
    ld_cw += BK;  // next tile
    while (ld_cw >= p.Cw) {
      ld_cw -= p.Cw;
      if (++ld_kw == p.KW) { ld_kw = 0; ++ld_kh; }
    }
  };
  auto store_smem = [&](int buf) {
    store_rows<RA>(&As[buf][4 * ja][RA * ga], BM, sa);
    store_rows<RB>(&Bs[buf][4 * jb][RB * gb], BN, sb);
  };

  // ---- math
  const int ml = ((lane >> 1) & 1) | ((lane >> 3) & 2);   // lane bits 1, 4
  const int nl = (lane & 1) | ((lane >> 1) & 6);          // lane bits 0, 2, 3
  const int wm = warp % WARPS_M, wn = warp / WARPS_M;
  const int arow = wm * WM + 4 * ml, bcol = wn * WN + 4 * nl;
  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

  // Fragments: two register sets; step k's math runs while step k+1's shared loads are in flight.
  // The next tile is stored and the barrier taken before the last step's math, so that the next
  // tile's first loads overlap it (one barrier per tile; see the loop for why that suffices).
  float4 fa[2][TM / 4], fb[2][TN / 4];
  auto load_frag = [&](int s, int buf, int k) {
#pragma unroll
    for (int g = 0; g < TM / 4; ++g) fa[s][g] = *(const float4*)(&As[buf][k][arow + 16 * g]);
#pragma unroll
    for (int g = 0; g < TN / 4; ++g) fb[s][g] = *(const float4*)(&Bs[buf][k][bcol + 32 * g]);
  };
  auto math = [&](int s) {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const float4 av = fa[s][i / 4];
      const float a = (i & 3) == 0 ? av.x : (i & 3) == 1 ? av.y : (i & 3) == 2 ? av.z : av.w;
#pragma unroll
      for (int g = 0; g < TN / 4; ++g) {
        acc[i][4 * g] = fmaf(a, fb[s][g].x, acc[i][4 * g]);
        acc[i][4 * g + 1] = fmaf(a, fb[s][g].y, acc[i][4 * g + 1]);
        acc[i][4 * g + 2] = fmaf(a, fb[s][g].z, acc[i][4 * g + 2]);
        acc[i][4 * g + 3] = fmaf(a, fb[s][g].w, acc[i][4 * g + 3]);
      }
    }
  };

  if (nk > 0) {
    load_global(kt0);
    store_smem(0);
    __syncthreads();
    load_frag(0, 0, 0);
    for (int it = 0; it < nk; ++it) {
      const int buf = it & 1;
      const bool more = it + 1 < nk;
      if (more) load_global(kt0 + it + 1);
#pragma unroll
      for (int k = 0; k < BK - 1; ++k) {
        load_frag((k + 1) & 1, buf, k + 1);
        math(k & 1);
      }
      // Tile it+1 goes to the other buffer, whose last reads (tile it-1, steps 1..15) every thread
      // issued before the previous iteration's barrier. After this barrier tile it+1's first
      // fragments load while the last step of tile it computes from registers.
      if (more) {
        store_smem(buf ^ 1);
        __syncthreads();
        load_frag(0, buf ^ 1, 0);
      }
      math((BK - 1) & 1);
    }
  }

  // ---- epilogue: float4 rows (+ bias) when the output allows it, else one element at a time
  const bool vec = p.mode == 0 && p.vec_out && (p.OC & 3) == 0 && (p.OCg & 3) == 0;
  unsigned nonfinite = 0;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    int m = m0 + arow + 16 * (i / 4) + (i & 3);
#pragma unroll
    for (int g = 0; g < TN / 4; ++g) {
      int o = n0 + bcol + 32 * g;
      if (vec) {
        if (m < p.M && o < p.OCg) {
          const int oc = bw.ocol + o;
          float4 y = make_float4(acc[i][4 * g], acc[i][4 * g + 1], acc[i][4 * g + 2], acc[i][4 * g + 3]);
          if (p.bias) {
            const float4 b = *(const float4*)(p.bias + oc);
            y.x = __fadd_rn(y.x, b.x); y.y = __fadd_rn(y.y, b.y);
            y.z = __fadd_rn(y.z, b.z); y.w = __fadd_rn(y.w, b.w);
          }
          *(float4*)((float*)p.out + (size_t)m * p.OC + oc) = y;
          nonfinite += !isfinite(y.x) + !isfinite(y.y) + !isfinite(y.z) + !isfinite(y.w);
        }
      } else {
#pragma unroll
        for (int c = 0; c < 4; ++c) nonfinite += store_out(p, bw.ocol, m, o + c, acc[i][4 * g + c]);
      }
    }
  }
  count_nonfinite(p.stats, nonfinite);
  publish_stats(p.stats, p.slot);
}

#define QCONV_OUTER(NAME, BM, BN, TM, TN, BK, MINB)                                                    \
  extern "C" __global__ void __launch_bounds__((BM) * (BN) / ((TM) * (TN)), MINB)                     \
      qconv_f32_conv_outer_##NAME(const ConvParams p) {                                                \
    wait_prior_grid(); conv_outer<BM, BN, TM, TN, BK>(p);                                              \
  }
// name: block tile BMxBN, thread tile TMxTN (_k8: 8-word K tiles); threads = BM*BN/(TM*TN)
// (cuda.py OUTER_TILES)
QCONV_OUTER(128x128_8x8, 128, 128, 8, 8, 16, 1)
QCONV_OUTER(128x64_8x4, 128, 64, 8, 4, 16, 2)
QCONV_OUTER(128x64_8x8, 128, 64, 8, 8, 16, 3)
QCONV_OUTER(128x64_8x8_k8, 128, 64, 8, 8, 8, 3)
QCONV_OUTER(64x64_4x4, 64, 64, 4, 4, 16, 2)
QCONV_OUTER(64x64_8x4, 64, 64, 8, 4, 16, 3)
QCONV_OUTER(64x32_4x4, 64, 32, 4, 4, 16, 4)
