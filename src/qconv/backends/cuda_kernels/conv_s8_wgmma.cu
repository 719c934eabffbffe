// INT8 convolution on Hopper's warpgroup tensor cores: wgmma.mma_async m64nBNk32 s8 x s8 -> s32
// (sm_90a only; the mma.sync kernel serves the other architectures).
// Block: BM/64 warpgroups, each owning 64 output pixels x BN channels. Every thread loads with
// cp.async (TileLoader: implicit im2col, stride, padding and groups in the index math) into a
// STAGES-deep ring of 128-byte-swizzled tiles, D = STAGES - 2 tiles ahead, so the wgmma group of
// one K tile is still running while the block passes the next tile's barrier. grid.z = groups x
// K slices (split-K), as the mma.sync kernel. No .satfinite: the s32 sums wrap modulo 2^32.
#include "qconv_common.cuh"
#include "qconv_wgmma.cuh"

// The thread's warpgroup, read through a shuffle so that the compiler knows it is warp-uniform:
// the wgmma descriptors built from it then stay in uniform registers (no R2UR per wgmma).
QD int warpgroup_index() { return __shfl_sync(0xffffffffu, threadIdx.x >> 7, 0); }

// Keeps the compiler from moving accesses of the accumulators across wgmma issue / wait.
template <int R> QD void fence_operands(int (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

template <int BM, int BN, int STAGES>
QD void conv_wgmma(const ConvParams& p) {
  constexpr int BKW = 32, NT = 2 * BM, D = STAGES - 2;  // BM / 64 warpgroups of 128 threads
  static_assert(BM % 64 == 0 && D >= 1, "whole warpgroups, one tile in flight");
  typedef TileLoader<BM, BN, BKW, NT, true> L;
  constexpr int ASZ = BM * BKW, BSZ = BN * BKW;  // words per stage
  extern __shared__ unsigned smem_raw[];
  const unsigned raw = smem_u32(smem_raw);
  unsigned* As = smem_raw + (((raw + 1023u) & ~1023u) - raw) / 4;  // swizzle atoms: 1 KiB aligned
  unsigned* Bs = As + STAGES * ASZ;

  const int tid = threadIdx.x, wg = warpgroup_index(), warp = (tid >> 5) & 3, lane = tid & 31;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const BlockWork bw = block_work(p);
  const int nk = bw.nk;

  L loader(p, m0, tid);
  int acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0;

#pragma unroll
  for (int s = 0; s < D; ++s) loader.template stage<STAGES>(p, bw, As, Bs, s, n0, tid);
  const unsigned a_base = smem_u32(As) + wg * 64 * 128, b_base = smem_u32(Bs);
  for (int it = 0; it < nk; ++it) {
    cp_async_wait<D - 1>();  // this thread's chunks of tile it have landed
    fence_proxy_async();
    __syncthreads();         // everyone's have; and every warpgroup's wgmma of tile it - 2 is done
    const int s = it % STAGES;
    fence_operands(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)  // 4 k-steps of 32 bytes in the 128-byte row
      wgmma_s8<BN>(acc, wgmma_desc(a_base + s * ASZ * 4 + kk * 32), wgmma_desc(b_base + s * BSZ * 4 + kk * 32));
    wgmma_commit();
    wgmma_wait<1>();         // tile it - 1's group is done: at most one in flight
    fence_operands(acc);
    loader.template stage<STAGES>(p, bw, As, Bs, it + D, n0, tid);  // into the slot of tile it - 2
  }
  wgmma_wait<0>();
  fence_operands(acc);
  cp_async_wait<0>();

  // Accumulator layout of m64nN: warp w of the warpgroup holds rows 16w + lane/4 (+8); n8 block i
  // holds columns 8i + 2(lane%4) (+1), as acc[4i + {0: (r, c), 1: (r, c+1), 2: (r+8, c), 3: (r+8, c+1)}].
  const float inv0 = epilogue_inv(p);
  const int m = m0 + wg * 64 + warp * 16 + (lane >> 2);
#pragma unroll
  for (int i = 0; i < BN / 8; ++i) {
    const int o = n0 + i * 8 + 2 * (lane & 3);
    store_pair(p, bw.ocol, m, o, (unsigned)acc[4 * i], (unsigned)acc[4 * i + 1], inv0);
    store_pair(p, bw.ocol, m + 8, o, (unsigned)acc[4 * i + 2], (unsigned)acc[4 * i + 3], inv0);
  }
  publish_stats(p.stats, p.slot);
}

#define QCONV_WGMMA(NAME, BM, BN)                                                          \
  extern "C" __global__ void __launch_bounds__(2 * BM, 1) NAME(const ConvParams p) {       \
    wait_prior_grid(); conv_wgmma<BM, BN, 4>(p);                                           \
  }
QCONV_WGMMA(qconv_s8_conv_wgmma_128x128, 128, 128)
QCONV_WGMMA(qconv_s8_conv_wgmma_128x64, 128, 64)
QCONV_WGMMA(qconv_s8_conv_wgmma_64x128, 64, 128)
QCONV_WGMMA(qconv_s8_conv_wgmma_64x64, 64, 64)

// ---- stride-1 layers with resident weights: the "window" kernel ---------------------------------
// The input is quantized into a zero-padded grid [N][Hp][Wp][Cp] (Hp = Ho + KH - 1, Wp = Wo + KW - 1,
// Cp = Cw * 4 bytes, a multiple of 32). Over that grid's rows q = (n*Hp + i)*Wp + j, the output at
// q reads input row q + u*Wp + v for tap (u, v): every tap's A operand is the same window of rows,
// shifted. So a block loads its BM output rows' window ONCE (BM + (KH-1)*Wp + KW-1 rows, not KH*KW
// times BM as the im2col loader does) and points each tap's wgmma descriptor into it; rows with
// i >= Ho or j >= Wo are computed and dropped. The weights of the block's BN channels stay in
// shared memory for the whole (persistent) block, which walks M tiles blockIdx.x, + gridDim.x, ...
// Operands are K-major without swizzle (wgmma_desc_plain): a shift by one row is 16 bytes of
// descriptor start.

// A window kernel's geometry for tiles of BM grid rows, and its dynamic shared memory: the block's
// weights Bs [KC][BN][16 B], then the windows Aw, abuf bytes each [CH][rows][16 B] (window_smem in
// cuda/_tiling.py).
struct Window {
  int Wp, CH, Mp, rows, KC, abuf;  // grid row width; 16-byte chunks per pixel; grid rows; window rows
  unsigned char *Bs, *Aw;
  QD Window(const ConvParams& p, int BM, int BN, unsigned* smem) {
    Wp = p.Wo + p.KW - 1;
    CH = p.Cw / 4;
    Mp = p.N * (p.Ho + p.KH - 1) * Wp;                   // < 2^31: checked on the host
    rows = (BM + (p.KH - 1) * Wp + p.KW - 1 + 7) & ~7;   // whole core matrices
    KC = p.T * CH;
    abuf = CH * rows * 16;
    Bs = (unsigned char*)smem;
    Aw = Bs + KC * BN * 16;
  }
};

// The window of w.rows grid rows from q0 into dst, by threads 0..nthreads-1 walking row-major,
// nthreads / CH rows per pass (no division per chunk; CH <= nthreads, checked on the host by
// window_fits and window_ws_config). Rows past the grid are zero-filled.
QD void load_window(const ConvParams& p, const Window& w, int q0, unsigned char* dst, int tid, int nthreads) {
  const int CH = w.CH, per = nthreads / CH;
  if (tid >= per * CH) return;
  const unsigned char* xb = (const unsigned char*)p.x;
  for (int r = tid / CH, c = tid % CH; r < w.rows; r += per) {
    const int q = q0 + r;
    const bool ok = q < w.Mp;
    cp_async16(dst + (c * w.rows + r) * 16, ok ? xb + ((size_t)q * CH * 16 + c * 16) : xb, ok);
  }
}

// One warpgroup's 64 rows x BN channels from its window (at shared address a) and the block's
// weights (at b): every tap's wgmmas, issued and committed, not waited for. Descriptor starts count
// 16-byte units: tap (u, v) shifts A by u*Wp + v rows, a k-step of 32 bytes moves A by 2 * rows and
// B by 2 * BN (the smem addresses stay below 2^18: no carry).
template <int BN>
QD void window_mma(const ConvParams& p, const Window& w, int (&acc)[BN / 2], unsigned a, unsigned b) {
  const int rows = w.rows, CH = w.CH, Wp = w.Wp;
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0;
  fence_operands(acc);
  wgmma_fence();
  const unsigned long long da0 = wgmma_desc_plain(a, rows * 16), db0 = wgmma_desc_plain(b, BN * 16);
  int shift = 0, v = 0;
#pragma unroll 1
  for (int t = 0; t < p.T; ++t) {
    unsigned long long da = da0 + shift, db = db0 + (unsigned)(t * CH * BN);
#pragma unroll 1
    for (int c = 0; c < CH; c += 2, da += 2 * rows, db += 2 * BN) wgmma_s8<BN>(acc, da, db);
    if (++v == p.KW) { v = 0; shift += Wp - p.KW + 1; } else { ++shift; }
  }
  wgmma_commit();
}

// The epilogue of one warp's 16 rows from grid row qw (fused dequantize). Grid rows with i >= Ho or
// j >= Wo, or past the grid, are dropped. The common case (dequantized, 16-byte aligned rows, OC a
// multiple of 4) stores 16 bytes a lane: lanes t and t ^ 1 swap a pair of values, so that for n8
// blocks b and b + 1 the even lane holds columns 8b + 2t .. + 3 and the odd one 8b + 8 + 2(t - 1)
// .. + 3, and a warp's store covers 64 contiguous bytes of each of its 8 rows (half the store
// instructions, twice the bytes per line, of one 8-byte pair a lane). Anything else: store_pair.
template <int BN>
QD void window_store(const ConvParams& p, const Window& w, const int (&acc)[BN / 2], int qw, int n0, float inv0) {
  const int lane = threadIdx.x & 31, t = lane & 3, Wp = w.Wp, Mp = w.Mp, HWp = (p.Ho + p.KH - 1) * Wp;
  const bool quad = p.mode == 1 && p.vec_out && ((p.OC | p.OCg) & 3) == 0;  // uniform: every lane shuffles
#pragma unroll
  for (int h = 0; h < 2; ++h) {  // rows qw + lane/4 and 8 below -> output pixel m, or M (dropped)
    const int q = qw + (lane >> 2) + 8 * h;
    const int n = q / HWp, rem = q - n * HWp, i = rem / Wp, j = rem - i * Wp;
    const int m = (q < Mp && i < p.Ho && j < p.Wo) ? (n * p.Ho + i) * p.Wo + j : p.M;
    float* row = (float*)p.out + (size_t)min(m, p.M - 1) * p.OC;
#pragma unroll
    for (int b = 0; b < BN / 8; b += 2) {
      const unsigned p0 = (unsigned)acc[4 * b + 2 * h], p1 = (unsigned)acc[4 * b + 2 * h + 1];
      const unsigned q0 = (unsigned)acc[4 * b + 4 + 2 * h], q1 = (unsigned)acc[4 * b + 4 + 2 * h + 1];
      if (!quad) {
        const int o = n0 + b * 8 + 2 * t;
        store_pair(p, 0, m, o, p0, p1, inv0);
        store_pair(p, 0, m, o + 8, q0, q1, inv0);
        continue;
      }
      const bool odd = t & 1;
      const unsigned r0 = __shfl_xor_sync(0xffffffffu, odd ? p0 : q0, 1);
      const unsigned r1 = __shfl_xor_sync(0xffffffffu, odd ? p1 : q1, 1);
      const int o = n0 + b * 8 + (odd ? 8 + 2 * (t - 1) : 2 * t);
      if (m >= p.M || o >= p.OCg) continue;  // OCg % 4 == 0: o + 3 < OCg too
      const unsigned v[4] = {odd ? r0 : p0, odd ? r1 : p1, odd ? q0 : r0, odd ? q1 : r1};
      float y[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) y[e] = dequant1(v[e], p.inv_uniform ? inv0 : __ldg(p.inv + o + e), p.bias, o + e);
      *(float4*)(row + o) = make_float4(y[0], y[1], y[2], y[3]);
    }
  }
}

// The block's BN channels of weights into w.Bs (KC = T * CH 16-byte K chunks), by all NT threads.
QD void load_window_weights(const ConvParams& p, const Window& w, int BN, int n0, int NT) {
  for (int i = threadIdx.x; i < w.KC * BN; i += NT) {
    const int kc = i / BN, o = i - kc * BN;
    cp_async16(w.Bs + i * 16, (const unsigned char*)p.w + ((size_t)(n0 + o) * p.Kpw * 4 + kc * 16), true);
  }
}

template <int BN, int NBUF>
QD void conv_wgmma_window(const ConvParams& p) {
  constexpr int BM = 128, NT = 256;  // two warpgroups of 64 rows
  extern __shared__ __align__(16) unsigned smem_w[];
  const Window w(p, BM, BN, smem_w);  // NBUF windows
  const int tid = threadIdx.x, wg = warpgroup_index(), warp = (tid >> 5) & 3;
  const int n0 = blockIdx.y * BN;

  load_window_weights(p, w, BN, n0, NT);
  const int tiles = (w.Mp + BM - 1) / BM;
  int tile = blockIdx.x;
  if (tile < tiles) load_window(p, w, tile * BM, w.Aw, tid, NT);
  cp_async_commit();

  const float inv0 = epilogue_inv(p);
  const unsigned bs = smem_u32(w.Bs), aw = smem_u32(w.Aw);
  for (int it = 0; tile < tiles; ++it, tile += gridDim.x) {
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();  // window `it` (and the weights) landed; every warpgroup is done with window it-1
    if (NBUF == 2) {  // the next window loads during this one's MMA
      if (tile + gridDim.x < tiles) load_window(p, w, (tile + gridDim.x) * BM, w.Aw + ((it + 1) & 1) * w.abuf, tid, NT);
      cp_async_commit();
    }
    int acc[BN / 2];
    window_mma<BN>(p, w, acc, aw + (it % NBUF) * w.abuf + wg * 64 * 16, bs);
    wgmma_wait<0>();
    fence_operands(acc);
    if (NBUF == 1) {  // one window: the next one loads during this epilogue (and another block's MMA)
      __syncthreads();
      if (tile + gridDim.x < tiles) load_window(p, w, (tile + gridDim.x) * BM, w.Aw, tid, NT);
      cp_async_commit();
    }
    window_store<BN>(p, w, acc, tile * BM + wg * 64 + warp * 16, n0, inv0);
  }
  cp_async_wait<0>();
  publish_stats(p.stats, p.slot);
}

// The same computation, warp-specialized: warpgroup 0 loads windows of 64 rows into a ring of
// nbuf buffers (as many as the dynamic shared memory holds, 2 to 4), and warpgroups 1 and 2 take
// the block's M tiles in turn ("ping-pong"): a consumer issues its tile's wgmmas only once the
// other has issued the tile before (named barriers 1 and 2), so their MMAs queue one behind the
// other and each one's epilogue runs while the other's MMA keeps the tensor cores busy. (Left free,
// the two fall into step and their epilogues coincide: measured 126.7 us against 64.2 without
// the epilogue, exam 2 at N=256.) The ring is two mbarriers per buffer: "full" (the producer's 128
// threads arrive as their cp.async land) and "empty" (one arrival per consumer warp once its wgmmas
// have read the buffer).
template <int BN>
QD void conv_wgmma_ws(const ConvParams& p) {
  constexpr int BM = 64, NT = 384, NBUF_MAX = 4;
  extern __shared__ __align__(16) unsigned smem_w[];
  __shared__ unsigned long long full[NBUF_MAX], empty[NBUF_MAX];
  const Window w(p, BM, BN, smem_w);
  unsigned dyn;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
  const int nbuf = min(NBUF_MAX, (int)(dyn - w.KC * BN * 16) / w.abuf);  // >= 2: the host sizes it
  const int tid = threadIdx.x, wg = warpgroup_index(), warp = (tid >> 5) & 3;
  const int n0 = blockIdx.y * BN, tiles = (w.Mp + BM - 1) / BM;

  if (tid == 0) {
    for (int b = 0; b < nbuf; ++b) { mbar_init(&full[b], 128); mbar_init(&empty[b], 4); }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  load_window_weights(p, w, BN, n0, NT);
  cp_async_commit();  // wait_group waits for committed groups only
  cp_async_wait<0>();
  fence_proxy_async();
  __syncthreads();

  if (wg == 0) {  // producer: local tile i in buffer i % nbuf once its consumer released it
    for (int i = 0, tile = blockIdx.x; tile < tiles; ++i, tile += gridDim.x) {
      const int b = i % nbuf;
      mbar_wait(&empty[b], ((i / nbuf) & 1) ^ 1);
      load_window(p, w, tile * BM, w.Aw + b * w.abuf, tid, 128);
      mbar_arrive_cp_async(&full[b]);
    }
    cp_async_wait<0>();
  } else {        // consumer wg - 1: local tiles wg - 1, wg + 1, ...
    const float inv0 = epilogue_inv(p);
    const unsigned bs = smem_u32(w.Bs), aw = smem_u32(w.Aw);
    for (int i = wg - 1, tile = blockIdx.x + i * gridDim.x; tile < tiles; i += 2, tile += 2 * gridDim.x) {
      const int b = i % nbuf;
      mbar_wait(&full[b], (i / nbuf) & 1);
      fence_proxy_async();  // the window's generic-proxy writes, before wgmma reads them
      if (i > 0) named_bar_sync(wg, 256);  // the other consumer has issued tile i - 1
      int acc[BN / 2];
      window_mma<BN>(p, w, acc, aw + b * w.abuf, bs);
      if (tile + gridDim.x < tiles) named_bar_arrive(3 - wg, 256);  // tile i + 1's turn
      wgmma_wait<0>();
      fence_operands(acc);
      if ((tid & 31) == 0) mbar_arrive(&empty[b]);
      window_store<BN>(p, w, acc, tile * BM + warp * 16, n0, inv0);
    }
  }
  publish_stats(p.stats, p.slot);
}

// _nNN_bB: BN = NN channels, B windows (2: the next loads during this MMA; 1: a smaller block, so
// that two fit an SM and one's epilogue overlaps the other's MMA).
#define QCONV_WGMMA_WINDOW(BN, NBUF)                                                                         \
  extern "C" __global__ void __launch_bounds__(256, 1) qconv_s8_conv_wgmma_window_n##BN##_b##NBUF(const ConvParams p) { \
    wait_prior_grid(); conv_wgmma_window<BN, NBUF>(p);                                                        \
  }
QCONV_WGMMA_WINDOW(128, 2)
QCONV_WGMMA_WINDOW(128, 1)
QCONV_WGMMA_WINDOW(64, 2)
QCONV_WGMMA_WINDOW(64, 1)

#define QCONV_WGMMA_WS(BN)                                                                                   \
  extern "C" __global__ void __launch_bounds__(384, 1) qconv_s8_conv_wgmma_ws_n##BN(const ConvParams p) {    \
    wait_prior_grid(); conv_wgmma_ws<BN>(p);                                                                 \
  }
QCONV_WGMMA_WS(128)
QCONV_WGMMA_WS(64)
