// qconv CUDA kernels: shared definitions (included by every module file; compiled by NVRTC).
//
// Every kernel takes one parameter struct by value. The structs below are mirrored field for
// field by ctypes.Structure classes in qconv/backends/cuda/_launch.py (a test parses this file
// and compares the two), so a launch signature is declared once.
//
// Layouts (see cuda/_tiling.py):
//   activations: NHWC; for the implicit GEMM each pixel is XPW 32-bit words, G groups of Cw words
//                (the group's icg channels padded to icgp so that Cw is a multiple of 4: every
//                16-byte chunk lies inside one pixel and one group);
//   weights:     packed [G][OCgp][Kpw] words, k = (kh*KW + kw)*icgp + c, zero-padded in OC and K;
//   output:      [M][OC] = NHWC, M = N*Ho*Wo, int32 accumulators or float32.
#pragma once

typedef signed char qs8;
typedef short qs16;
#define QD __device__ __forceinline__

// Programmatic dependent launch (sm_90 on): the host launches a convolution that follows its
// input pass with the programmatic-serialization attribute (cuda/_driver.py, Launch's after_pass),
// so the convolution's blocks are launched and placed while the pass still runs. Every convolution
// waits for the grid before it to complete (its writes visible) before it touches global memory;
// the passes let it launch as soon as all their blocks run. Both are no-ops on plain launches and
// compile to nothing before sm_90.
QD void wait_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
QD void launch_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Per-call statistics on the device, one per prepared convolution and stream. The passes before
// the convolution fill them (flag bits, the maxabs input scale), the kernels that write FP32
// outputs count the non-finite ones; the last kernel of the call copies them to the call's host
// record (publish_stats) and clears them for the next call.
struct QStats {
  unsigned maxbits;   // max |x| as float bits (non-negative floats order like their bits)
  int flag;           // bit 0: non-finite input; bit 2: inv out of float32; bit 3: s_x not finite;
                      // bit 4: non-finite FP32 output (float32 overflow)
  unsigned counter;   // blocks of the scan arrived (the last one finalizes)
  float s_x;          // this call's input scale (maxabs)
  float m;            // this call's max |x|
  unsigned gen;       // barrier generation of the fused scan+quantize (bumped once per call)
  unsigned done;      // blocks of the publishing kernel finished (the last one publishes)
  unsigned nonfinite; // FP32 outputs written non-finite (modulo 2^32; the flag's bit 4 says whether any)
};

// The call's record in mapped host memory (what the host reads once the call is done).
struct QSlot {
  int flag;
  float s_x;
  float m;
  unsigned nonfinite;
};

// Implicit-GEMM convolution, any stride, explicit padding and groups.
struct ConvParams {
  const unsigned* x;      // activations, XPW words per pixel, group g at word g*Cw
  const unsigned* w;      // packed weights [G][OCgp][Kpw]
  void* out;              // [M][OC]
  const float* inv;       // [OC] dequantize factors (integer paths)
  const float* bias;      // [OC] or null
  QStats* stats;          // device statistics of this call (or null)
  QSlot* slot;            // host-mapped record of this call (null: a later pass publishes it)
  const float* scan_x;    // FP32 read in place: the input, scanned for NaN/inf in the prologue (or null)
  long long scan_n;       // its elements
  long long wgs;          // words per group of packed weights (OCgp * Kpw)
  int N, H, W, Cw, XPW;   // input: Cw words per pixel per group, XPW words per pixel
  int KH, KW, pt, pl, sh, sw;
  int Ho, Wo, OC, OCg;    // output; OCg output channels per group
  int Kpw, M, T;          // packed K in words, N*Ho*Wo, KH*KW
  int ktiles, ktiles_per_split, splits;  // grid.z = groups * splits
  int mode;               // 0: store raw (+bias for float), 1: float(acc)*inv[o] (+bias), 2: atomic add raw
  int vec_out;            // out is 16-byte aligned: float4 stores allowed
  int scan_vec;           // scan_x is 16-byte aligned and scan_n % 4 == 0
  int inv_uniform;        // one kernel scale: every inv[o] is inv[0] (loaded once per thread)
};

// Shared-memory address of a generic pointer, for cp.async.
QD unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// 16-byte global->shared copy; when !valid the 16 bytes are zero-filled (src-size 0 reads nothing).
QD void cp_async16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(smem_u32(smem)), "l"(gmem), "r"(valid ? 16 : 0));
}
QD void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> QD void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

// Tensor-core helpers (sm_80+; emitted only where a kernel uses them).
// D = A(16x32 s8, row) * B(32x8 s8, col) + C, s32. No .satfinite: the s32 accumulation wraps
// modulo 2^32 (two's complement), which is the contract's int32 accumulation.
QD void mma_s8_16832(int (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Four (x4) or two (x2) 8x8 b16 matrices from shared memory: with int8 data each is 8 rows x 16 bytes,
// exactly the m16n8k32 A / B fragment layout (thread l gets row l/4, bytes 4(l%4)..4(l%4)+3).
QD void ldsm_x4(unsigned (&r)[4], const unsigned* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}
QD void ldsm_x2(unsigned (&r)[2], const unsigned* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(p)));
}

// The same with each operand's type chosen: AS / BS true = .s8 (signed byte), false = .u8
// (unsigned byte, 0..255). Every combination is a PTX mma.sync m16n8k32 type (sm_80+).
template <bool AS, bool BS>
QD void mma_x8_16832(int (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#define QCONV_MMA_X8(TA, TB)                                                                              \
  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32." TA "." TB ".s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, " \
               "{%0,%1,%2,%3};\n"                                                                        \
               : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])                                          \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
  if constexpr (AS && BS) QCONV_MMA_X8("s8", "s8");
  else if constexpr (AS) QCONV_MMA_X8("s8", "u8");
  else if constexpr (BS) QCONV_MMA_X8("u8", "s8");
  else QCONV_MMA_X8("u8", "u8");
#undef QCONV_MMA_X8
}

// The contract's quantize: clamp(R(float32(t) * float32(s)), -qmax, qmax); one float32 multiply
// without FMA contraction; R = rint (half to even) or trunc; saturation past int32.
QD int quantize1(float t, float s, int qmax, int trunc) {
  float v = __fmul_rn(t, s);
  float r = trunc ? truncf(v) : rintf(v);
  if (r >= 2147483648.0f) return qmax;
  if (r <= -2147483648.0f) return -qmax;
  int i = (int)r;  // exact: r is an integer inside int32 (NaN -> 0, reported through the flag)
  return i > qmax ? qmax : (i < -qmax ? -qmax : i);
}

// The contract's dequantize (+ bias): float32(acc) * inv, then + b where the layer has a bias, two
// roundings, no FMA. dequant1 loads the bias itself; an epilogue that holds it passes it in.
QD float dequant(unsigned acc, float inv, bool has_bias, float b) {
  float y = __fmul_rn(__int2float_rn((int)acc), inv);
  return has_bias ? __fadd_rn(y, b) : y;
}
QD float dequant1(unsigned acc, float inv, const float* bias, int o) {
  return dequant(acc, inv, bias != nullptr, bias ? bias[o] : 0.0f);
}

QD int nonfinite4(const float4 t) { return !isfinite(t.x) | !isfinite(t.y) | !isfinite(t.z) | !isfinite(t.w); }

// Sets the flag's bit 0 if any of x's n elements is not finite: a grid-stride prologue of the main
// kernel (every thread of the grid takes its share), so no separate pass is launched.
QD void scan_finite(const float* x, long long n, int vec, QStats* st) {
  if (x == nullptr) return;
  const long long nthreads = (long long)gridDim.x * gridDim.y * gridDim.z * blockDim.x;
  const long long tid = (((long long)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
  int bad = 0;
  if (vec) {
    for (long long i = tid; i < n / 4; i += nthreads) {
      bad |= nonfinite4(__ldg((const float4*)x + i));
    }
  } else {
    for (long long i = tid; i < n; i += nthreads) bad |= !isfinite(__ldg(x + i));
  }
  if (bad) atomicOr(&st->flag, 1);
}

// Called by every thread (whole warps) of a kernel that writes FP32 outputs, once, with the number
// of non-finite outputs it wrote: one vote per warp, one atomic per warp that has any.
QD void count_nonfinite(QStats* st, unsigned n) {
  const unsigned total = __reduce_add_sync(0xffffffffu, n);
  if (total && (threadIdx.x & 31) == 0) {
    atomicAdd(&st->nonfinite, total);
    atomicOr(&st->flag, 16);
  }
}

// Called by every thread at the end of the call's last kernel: the last block to finish copies the
// call's statistics (set by the passes before this kernel and by this kernel) to the call's host
// record, then clears them and the block count for the next call.
QD void publish_stats(QStats* st, QSlot* slot) {
  if (slot == nullptr) return;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned nblocks = gridDim.x * gridDim.y * gridDim.z;
    if (atomicAdd(&st->done, 1u) == nblocks - 1) {
      __threadfence();
      volatile QStats* v = st;
      volatile QSlot* s = slot;
      s->flag = v->flag;
      s->s_x = v->s_x;
      s->m = v->m;
      s->nonfinite = v->nonfinite;
      v->flag = 0;
      v->nonfinite = 0;
      v->done = 0;
      __threadfence_system();
    }
  }
}

// Which group and K slice a block computes (grid.z = groups * splits), and where they start.
struct BlockWork {
  int xoff;             // word offset of the group's channels in a pixel (grp * Cw)
  int woff;             // word offset of the group's packed weights (grp * wgs)
  int ocol;             // first output channel of the group
  int kt0, nk;          // first K tile and K tiles of the slice
};
QD BlockWork block_work(const ConvParams& p) {
  BlockWork b;
  const int grp = blockIdx.z / p.splits, slice = blockIdx.z - grp * p.splits;
  b.xoff = grp * p.Cw;
  b.woff = (int)(grp * p.wgs);  // < 2^31: the packed weights are checked on the host
  b.ocol = grp * p.OCg;
  b.kt0 = slice * p.ktiles_per_split;
  b.nk = min(p.ktiles, b.kt0 + p.ktiles_per_split) - b.kt0;
  return b;
}

// Words of one plane of the packed weights (every group's): the planes kernels' plane stride.
QD int weight_plane_words(const ConvParams& p) { return (int)((gridDim.z / p.splits) * p.wgs); }

// Loads one BM x BKW-word A tile (implicit im2col of the activations, stride and padding in the
// index math) and one BN x BKW B tile (packed weights of the block's group) into shared memory
// with 16-byte cp.async; rows padded to SW words, or (SWZ) rows of 128 bytes with wgmma's
// 128-byte swizzle (qconv_wgmma.cuh).
template <int BM, int BN, int BKW, int NT, bool SWZ = false>
struct TileLoader {
  static constexpr int SW = SWZ ? BKW : BKW + 4;
  static_assert(!SWZ || BKW == 32, "the 128-byte swizzle needs rows of 32 words");
  // Word offset of 16-byte chunk jc of a row.
  static QD int at(int row, int jc) { return row * SW + (SWZ ? (jc ^ (row & 7)) : jc) * 4; }
  static constexpr int CPR = BKW / 4;                  // 16-byte chunks per row
  static constexpr int CA = (BM * CPR + NT - 1) / NT;  // A chunks per thread
  static constexpr int CB = (BN * CPR + NT - 1) / NT;
  static constexpr int RPP = NT / CPR;                 // rows a pass of the block's threads covers
  // chunk c of a thread sits RPP rows below chunk c - 1, at the same column (and swizzle):
  // its shared offset is a constant past the first's
  static_assert(NT % CPR == 0 && (!SWZ || RPP % 8 == 0), "rows a pass covers keep the swizzle");
  // Per A chunk, kept for the whole K loop: where its output pixel's tap (0, 0) lies in x (at the
  // thread's chunk column; outside x where that tap falls in the padding), and which taps fall
  // inside the input: bit kh (kh < 15) when row i*sh - pt + kh is inside, bit 16 + kw (kw < 16)
  // when column j*sw - pl + kw is; 0 past M. A K tile then costs each chunk one AND, one compare
  // and a 64-bit add (the bounds and pixel arithmetic per chunk were most of the loads' instructions).
  // KH <= 15 and KW <= 16: _tiling.MAX_KERNEL, checked on the host.
  const unsigned* a_src[CA];
  unsigned a_in[CA];
  int j;                                               // this thread's chunk column

  // Bits k of [0, K) with 0 <= o + k < L.
  static QD unsigned inside(int o, int K, int L) {
    const int lo = max(0, -o), hi = min(K, L - o);
    return hi > lo ? (1u << hi) - (1u << lo) : 0u;
  }

  // One division for the thread's first chunk; each later chunk sits RPP output pixels on, so its
  // (n, i, jw) is a carry walk (one step while Wo >= RPP), not two more divisions.
  QD TileLoader(const ConvParams& p, int m0, int tid) {
    j = tid % CPR;
    const int hw = p.Ho * p.Wo, row0 = tid / CPR, m = m0 + row0;
    int n = m / hw, i = (m - n * hw) / p.Wo, jw = m - n * hw - i * p.Wo;
#pragma unroll
    for (int c = 0; c < CA; ++c) {
      const int row = row0 + c * RPP;
      a_src[c] = p.x;
      a_in[c] = 0;
      if (m0 + row < p.M && row < BM) {
        const int h0 = i * p.sh - p.pt, w0 = jw * p.sw - p.pl;
        a_src[c] = p.x + (long long)((n * p.H + h0) * p.W + w0) * p.XPW;
        a_in[c] = inside(h0, p.KH, p.H) | inside(w0, p.KW, p.W) << 16;
      }
      jw += RPP;
      while (jw >= p.Wo) {
        jw -= p.Wo;
        if (++i == p.Ho) { i = 0; ++n; }
      }
    }
  }

  // Where this thread's chunk of K tile kt starts: tap (kh, kw), word cw inside the pixel's group,
  // and the tap's bits (a_in's; bit 15, never set there, past the last tap).
  struct KPos { int tap, cw, kh, kw; unsigned bits; };
  KPos next;                                           // stage(): the next K tile's position
  static QD void set_bits(const ConvParams& p, KPos& k) {
    k.bits = k.tap < p.T ? (1u << k.kh) | (1u << (16 + k.kw)) : 1u << 15;
  }
  QD KPos kpos(const ConvParams& p, int kt) const {
    KPos k;
    const int kword = kt * BKW + j * 4;
    k.tap = kword / p.Cw;
    k.cw = kword - k.tap * p.Cw;
    k.kh = k.tap / p.KW;
    k.kw = k.tap - k.kh * p.KW;
    set_bits(p, k);
    return k;
  }
  // The same one K tile later, without dividing (stage() walks the tiles in order).
  static QD void advance(const ConvParams& p, KPos& k) {
    k.cw += BKW;
    while (k.cw >= p.Cw) {
      k.cw -= p.Cw;
      ++k.tap;
      if (++k.kw == p.KW) { k.kw = 0; ++k.kh; }
    }
    set_bits(p, k);
  }

  // A chunk outside the input is zero-filled by cp.async reading 0 bytes of its (unused) address.
  QD void load_a(const ConvParams& p, int xoff, unsigned* As, const KPos& k, int tid) const {
    const long long off = (long long)(k.kh * p.W + k.kw) * p.XPW + xoff + k.cw;
    unsigned* dst = As + at(tid / CPR, j);
#pragma unroll
    for (int c = 0; c < CA; ++c) {
      if (CA * NT == BM * CPR || tid + c * NT < BM * CPR) {
        const bool ok = (a_in[c] & k.bits) == k.bits;
        cp_async16(dst + c * RPP * SW, a_src[c] + off, ok);
      }
    }
  }

  QD void load_b(const ConvParams& p, int woff, unsigned* Bs, int kt, int n0, int tid) const {
    const unsigned* src = p.w + ((size_t)(n0 + tid / CPR) * p.Kpw + woff + kt * BKW + j * 4);
    const size_t step = (size_t)RPP * p.Kpw;
    unsigned* dst = Bs + at(tid / CPR, j);
#pragma unroll
    for (int c = 0; c < CB; ++c)
      if (CB * NT == BN * CPR || tid + c * NT < BN * CPR) cp_async16(dst + c * RPP * SW, src + c * step, true);
  }

  // K tile k of the block's slice into slot k % STAGES of the As / Bs ring (nothing past the
  // slice's last tile), then one cp.async group either way, so that wait_group counts stay in step.
  // AP planes of activations, xplane words apart in a pixel, and BP planes of weights, wplane words
  // apart, each slot holding them as [AP][BM][SW] and [BP][BN][SW]. bw.xoff and bw.woff (the
  // block's group) are ints, so the pointers stay in the constant bank rather than in registers.
  // Called with k = 0, 1, 2, ... in order: the A tile's position in K is carried from one call to
  // the next.
  template <int STAGES, int BP = 1, int AP = 1>
  QD void stage(const ConvParams& p, const BlockWork& bw, unsigned* As, unsigned* Bs, int k, int n0, int tid,
                int wplane = 0, int xplane = 0) {
    if (k == 0) next = kpos(p, bw.kt0);
    if (k < bw.nk) {
#pragma unroll
      for (int a = 0; a < AP; ++a)
        load_a(p, bw.xoff + a * xplane, As + ((k % STAGES) * AP + a) * BM * SW, next, tid);
      advance(p, next);
#pragma unroll
      for (int b = 0; b < BP; ++b)
        load_b(p, bw.woff + b * wplane, Bs + ((k % STAGES) * BP + b) * BN * SW, bw.kt0 + k, n0, tid);
    }
    cp_async_commit();
  }
};

// Epilogue store of one accumulator (float or 32-bit integer bits) according to p.mode;
// o is the channel inside the group (< OCg), ocol the group's first output channel. Returns 1 when
// it stored a non-finite FP32 output (a split-K partial sum is counted by the pass after: 0).
QD unsigned store_out(const ConvParams& p, int ocol, int m, int o, float v, float = 0.0f) {
  if (m < p.M && o < p.OCg) {
    const int oc = ocol + o;
    float* out = (float*)p.out + (size_t)m * p.OC + oc;
    if (p.mode == 2) {
      atomicAdd(out, v);
    } else {
      const float y = p.bias ? __fadd_rn(v, p.bias[oc]) : v;
      *out = y;
      return !isfinite(y);
    }
  }
  return 0;
}
// inv0: epilogue_inv(p), the factor of every channel when p.inv_uniform.
QD float epilogue_inv(const ConvParams& p) { return p.mode == 1 && p.inv_uniform ? __ldg(p.inv) : 0.0f; }
// Integer outputs are not counted (the FP32 overflow check is FP32's): returns 0.
QD unsigned store_out(const ConvParams& p, int ocol, int m, int o, unsigned v, float inv0) {
  if (m < p.M && o < p.OCg) {
    const int oc = ocol + o;
    size_t i = (size_t)m * p.OC + oc;
    if (p.mode == 1) ((float*)p.out)[i] = dequant1(v, p.inv_uniform ? inv0 : p.inv[oc], p.bias, oc);
    else if (p.mode == 2) atomicAdd((unsigned*)p.out + i, v);  // modulo 2^32, order-free
    else ((unsigned*)p.out)[i] = v;
  }
  return 0;
}

// Two adjacent channels o, o + 1 of output m (o even): one 8-byte store when the row allows it
// (out 16-byte aligned, OC and OCg even, not split-K's atomics), else two store_out.
QD void store_pair(const ConvParams& p, int ocol, int m, int o, unsigned v0, unsigned v1, float inv0) {
  if (m >= p.M) return;
  if (p.mode != 2 && p.vec_out && ((p.OC | p.OCg | ocol) & 1) == 0 && o + 1 < p.OCg) {
    const int oc = ocol + o;
    const size_t i = (size_t)m * p.OC + oc;
    if (p.mode == 1) {
      const float i0 = p.inv_uniform ? inv0 : p.inv[oc], i1 = p.inv_uniform ? inv0 : p.inv[oc + 1];
      *(float2*)((float*)p.out + i) = make_float2(dequant1(v0, i0, p.bias, oc), dequant1(v1, i1, p.bias, oc + 1));
    } else {
      *(uint2*)((unsigned*)p.out + i) = make_uint2(v0, v1);
    }
    return;
  }
  store_out(p, ocol, m, o, v0, inv0);
  store_out(p, ocol, m, o + 1, v1, inv0);
}
