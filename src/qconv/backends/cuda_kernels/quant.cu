// Elementwise passes around the convolution (bit-exact to qconv.contract): the input scan
// (finiteness, max|x| and the per-call maxabs scale), quantize/pad of the activations into the
// implicit GEMM's layout, and the dequantize (+ bias) epilogue when it is not fused.
#include "qconv_common.cuh"

struct PassParams {
  const float* x;        // input, n floats (NHWC)
  void* out;             // quantize/pad: [pixels][G][icgp]; epilogue: [M][OC] in place
  QStats* stats;         // device statistics of the call
  QSlot* slot;           // epilogue: the call's host-mapped record, published by this last pass
  const float* s_w;      // [OC] kernel scales (scan's finalize: inv[o])
  float* inv;            // [OC] dequantize factors (written by the finalize, read by the epilogue)
  const float* bias;     // [OC] or null
  long long n;           // elements of x (scan, quantize, pad) or of the output (epilogue)
  int C, G, icg, icgp;   // channel layout: a pixel is G groups of icg channels, padded to icgp
  int OC;                // output channels (inv, bias)
  int q;                 // scan: maxabs target Q (the largest quantized |x|)
  int qmax, trunc;       // quantize
  float s;               // fixed input scale (dev_scale == 0)
  int dev_scale;         // 1: the input scale is stats->s_x (maxabs, computed by the scan)
  int vec;               // 16-byte vectors allowed (x aligned, n % 4 == 0)
  int do_max;            // scan: reduce max|x| and finalize s_x and inv
  int mode;              // epilogue: 0 FP32 after split-K (+ bias[o], non-finite outputs counted);
                         // 1 float32(int32) * inv[o] (+ bias[o])
  int N, H, W, Hp, Wp, pt, pl;  // quantize/pad into the grid [N][Hp][Wp][G][icgp] (Hp > 0; walk_padded):
                                // pixel (h, w) at (h + pt, w + pl), every other pixel 0
};

#define QGRID_STRIDE(i, n)                                                                   \
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n);             \
       i += (long long)gridDim.x * blockDim.x)

QD unsigned abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// contract.maxabs_scale: s = float32(q / m) in double, stepped down while float32(m * s) > q;
// m == 0 gives 1. Returns 0 (and flags bit 3) when s is not finite (denormal m).
QD float maxabs_scale_dev(float m, int q, int* flag) {
  if (m == 0.0f) return 1.0f;
  float s = __double2float_rn((double)q / (double)m);
  if (!isfinite(s)) { *flag |= 8; return 0.0f; }
  while (s > 0.0f && (double)__fmul_rn(m, s) > (double)q) s = __uint_as_float(__float_as_uint(s) - 1u);
  return s;
}

QD void scan4(const float4 t, int& bad, unsigned& mx) {
  bad |= nonfinite4(t);
  mx = max(max(mx, abs_bits(t.x)), max(abs_bits(t.y), max(abs_bits(t.z), abs_bits(t.w))));
}

// The grid barrier's orderings at GPU scope, without a full fence (__threadfence) on either side.
QD unsigned atom_add_acq_rel(unsigned* a, unsigned v) {
  unsigned old;
  asm volatile("atom.acq_rel.gpu.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(a), "r"(v) : "memory");
  return old;
}
QD void red_add_release(unsigned* a, unsigned v) { asm volatile("red.release.gpu.add.u32 [%0], %1;" ::"l"(a), "r"(v) : "memory"); }
QD unsigned ld_acquire(const unsigned* a) {
  unsigned v;
  asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(v) : "l"(a) : "memory");
  return v;
}

// The scan's end, once per block: the non-finite flag, and with do_max the block's max|x| into the
// grid's; returns true in the block that arrived last (it computed s_x and inv[o]).
QD bool scan_reduce(const PassParams& p, unsigned mx, int bad) {
  QStats* st = p.stats;
  if (bad) atomicOr(&st->flag, 1);
  if (!p.do_max) return false;
  __shared__ unsigned red[8];
  __shared__ bool last;
  __shared__ float s_sh;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = mx;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned b = 0;
    for (int w = 0; w < (int)(blockDim.x + 31) / 32; ++w) b = max(b, red[w]);
    atomicMax(&st->maxbits, b);
    last = atom_add_acq_rel(&st->counter, 1u) == gridDim.x - 1;  // release: the max above; acquire: all of them
  }
  __syncthreads();
  if (!last) return false;
  if (threadIdx.x == 0) {
    unsigned bits = atomicOr(&st->maxbits, 0u);
    // NaN bits order above inf: the flag already says why; keep the arithmetic finite-safe
    float m = bits >= 0x7f800000u ? __uint_as_float(0x7f7fffffu) : __uint_as_float(bits);
    int f = 0;
    float s = maxabs_scale_dev(m, p.q, &f);
    if (f) atomicOr(&st->flag, f);
    st->s_x = s;
    st->m = m;
    st->maxbits = 0;
    st->counter = 0;
    red_add_release(&st->gen, 1u);  // s_x is out: a cooperative pass's blocks quantize (wait_for_scale)
    s_sh = s;
  }
  __syncthreads();
  const float s = s_sh;
  int f = 0;
  for (int o = threadIdx.x; o < p.OC; o += blockDim.x) {
    float v = __double2float_rn(1.0 / ((double)s * (double)p.s_w[o]));
    if (!(isfinite(v) && v > 0.0f)) f = 4;
    p.inv[o] = v;
  }
  if (f && s > 0.0f) atomicOr(&st->flag, f);
  return true;
}
// Scan: the non-finite flag over every element, and with do_max the maxabs input scale: max|x|
// reduced with atomicMax on float bits; the last block to arrive computes s_x and every channel's
// inv[o] = float32(1 / (double(s_x) * double(s_w[o]))) (contract.dequant_factor, on the device),
// then clears the reduction for the next call. Returns true in the block that finalized.
QD bool scan_x_body(const PassParams& p) {
  unsigned mx = 0;
  int bad = 0;
  if (p.vec) {  // four float4 loads in flight per thread, then the rest one by one
    const float4* x4 = (const float4*)p.x;
    const long long n4 = p.n / 4, step = (long long)gridDim.x * blockDim.x;
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    for (; i + 3 * step < n4; i += 4 * step) {
      float4 t[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) t[k] = __ldg(x4 + i + k * step);
#pragma unroll
      for (int k = 0; k < 4; ++k) scan4(t[k], bad, mx);
    }
    for (; i < n4; i += step) scan4(__ldg(x4 + i), bad, mx);
  } else {
    QGRID_STRIDE(i, p.n) {
      float t = __ldg(p.x + i);
      bad |= !isfinite(t);
      mx = max(mx, abs_bits(t));
    }
  }
  return scan_reduce(p, mx, bad);
}

extern "C" __global__ void __launch_bounds__(256) qconv_scan_x(const PassParams p) { scan_x_body(p); }

// Fast path of quantize (no channel padding, aligned, n % 4 == 0): float4 in, 4 values out.
template <typename T> struct Vec4;
template <> struct Vec4<qs8> { typedef char4 type; };
template <> struct Vec4<qs16> { typedef short4 type; };
template <> struct Vec4<int> { typedef int4 type; };

// Four values quantized into T, non-finite ones or-ed into bad.
template <typename T>
QD typename Vec4<T>::type quantize4(const float4 t, const PassParams& p, const float s, int& bad) {
  bad |= nonfinite4(t);
  typename Vec4<T>::type q;
  q.x = (T)quantize1(t.x, s, p.qmax, p.trunc); q.y = (T)quantize1(t.y, s, p.qmax, p.trunc);
  q.z = (T)quantize1(t.z, s, p.qmax, p.trunc); q.w = (T)quantize1(t.w, s, p.qmax, p.trunc);
  return q;
}

// The walk of every layout but the dense one: the grid [N][Hp][Wp][G][icgp] (Hp = H, Wp = W and
// pt = pl = 0 where there is no border), pixel (h, w) of x at (h + pt, w + pl), in items of V slots
// of one group (V divides icgp). item(pix, c, src, n): grid pixel pix, its slot c, the item's first
// float of x and how many of its V slots hold channels of x (0 for the border and the padding). The
// grid's pixels count below 2^31 (checked on the host), so the item index is divided once per
// thread: each step of the grid-stride loop advances (pixel, slot) by the stride's quotient and
// remainder.
template <int V, class Item>
QD void walk_padded(const PassParams& p, Item&& item) {
  const int HWp = p.Hp * p.Wp, gp = p.G * p.icgp, pixels = p.N * HWp;
  // 32-bit setup (a launch has fewer than 2^31 threads): a 64-bit division is a software routine
  // of 100+ instructions, and a thread here walks only a few items
  const unsigned first = blockIdx.x * blockDim.x + threadIdx.x, step = gridDim.x * blockDim.x, per = gp / V;
  const int dpix = (int)(step / per), dc = (int)(step % per) * V;
  long long pix = first / per;  // 64-bit: pix + dpix may pass 2^31 on the last step
  int c = (int)(first % per) * V;
  for (; pix < pixels; pix += dpix, c += dc) {
    const int img = (int)pix / HWp, r = (int)pix - img * HWp, i = r / p.Wp, h = i - p.pt, w = r - i * p.Wp - p.pl;
    const int g = p.G == 1 ? 0 : c / p.icgp, ch = c - g * p.icgp;
    const bool inside = (unsigned)h < (unsigned)p.H && (unsigned)w < (unsigned)p.W;
    const int n = inside ? max(0, min(V, p.icg - ch)) : 0;
    item(pix, c, p.x + (((long long)img * p.H + h) * p.W + w) * p.C + g * p.icg + ch, n);
    if (c + dc >= gp) { c -= gp; ++pix; }  // dc < gp: at most one carry
  }
}

// V values of an item into q (0 past its n channels, which are not quantized: a C = 3 stem's item
// has 13 padding slots and the conversions are the pass's costliest instructions), float4 loads
// (F4: x 16-byte aligned, icg % 4 == 0, so n is 0 or V) or one float at a time; non-finite ones
// or-ed into bad.
template <int V, bool F4, typename Q>
QD void quantize_item(const PassParams& p, const float s, const float* src, int n, Q (&q)[V], int& bad) {
#pragma unroll
  for (int k = 0; k < V; ++k) q[k] = 0;
  if constexpr (F4) {
    if (n) {
#pragma unroll
      for (int k = 0; k < V / 4; ++k) {
        const float4 t = __ldg((const float4*)src + k);
        bad |= nonfinite4(t);
        q[4 * k] = (Q)quantize1(t.x, s, p.qmax, p.trunc); q[4 * k + 1] = (Q)quantize1(t.y, s, p.qmax, p.trunc);
        q[4 * k + 2] = (Q)quantize1(t.z, s, p.qmax, p.trunc); q[4 * k + 3] = (Q)quantize1(t.w, s, p.qmax, p.trunc);
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k < n) {
        const float t = __ldg(src + k);
        bad |= !isfinite(t);
        q[k] = (Q)quantize1(t, s, p.qmax, p.trunc);
      }
    }
  }
}

// x -> the grid of T (walk_padded): items of 16 or 4 channels read as float4 where x is aligned
// and icg % V == 0, else 16 bytes of T read one float at a time (a C = 3 stem: one item a pixel);
// each item one or more 16-byte stores. Returns the non-finite flag.
template <typename T, int V, bool F4>
QD int quantize_grid(const PassParams& p, const float s) {
  static_assert(V * sizeof(T) % 16 == 0 || V == 4, "whole 16-byte stores, or one Vec4");
  int bad = 0;
  walk_padded<V>(p, [&](long long pix, int c, const float* src, int n) {
    __align__(16) T q[V];
    quantize_item<V, F4>(p, s, src, n, q, bad);
    T* dst = (T*)p.out + pix * p.G * p.icgp + c;
    if constexpr (V * sizeof(T) % 16 == 0) {
#pragma unroll
      for (int k = 0; k < V * (int)sizeof(T) / 16; ++k) ((uint4*)dst)[k] = ((const uint4*)q)[k];
    } else {
      *(typename Vec4<T>::type*)dst = *(const typename Vec4<T>::type*)q;
    }
  });
  return bad;
}

// x (pixels x C floats) -> the dense layout (Hp == 0: float4 in, 4 values out) or the grid of T,
// quantized with the fixed or the per-call scale; the flag's bit 0 when an input is not finite.
template <typename T>
QD void quantize_x_body(const PassParams& p, const float s) {
  int bad = 0;
  if (p.Hp) {  // an item of V channels must lie in one group's icgp slots: V divides both
    bad = p.vec && (p.icg | p.icgp) % 16 == 0 ? quantize_grid<T, 16, true>(p, s)
        : p.vec && (p.icg | p.icgp) % 4 == 0  ? quantize_grid<T, 4, true>(p, s)
                                              : quantize_grid<T, 16 / sizeof(T), false>(p, s);
  } else {
    const float4* x4 = (const float4*)p.x;
    typename Vec4<T>::type* o4 = (typename Vec4<T>::type*)p.out;
    QGRID_STRIDE(i, p.n / 4) o4[i] = quantize4<T>(__ldg(x4 + i), p, s, bad);
  }
  if (bad) atomicOr(&p.stats->flag, 1);
}

// The maxabs path in one launch: scan (flag, max|x|), a grid-wide barrier, quantize with the new
// scale. The last block to arrive computes s_x and inv[o] (scan_reduce) and bumps the barrier's
// generation; the others spin on it. Launched with cuLaunchCooperativeKernel and at most as many
// blocks as fit on the GPU at once, so every block is resident and the barrier cannot deadlock.
// scan_then_wait reads x twice (the second read mostly hits L2); scan_quantize_held, once.

// The grid barrier's generation, read by every block before it arrives.
QD unsigned barrier_gen(const QStats* st) {
  __shared__ unsigned gen0;
  if (threadIdx.x == 0) gen0 = *(volatile const unsigned*)&st->gen;
  __syncthreads();
  return gen0;
}

// The barrier after scan_reduce: the last block released it when it wrote s_x (its inv[o], read
// only by later kernels, come after); the others wait for the generation to move, then read s_x.
QD float wait_for_scale(const PassParams& p, bool last, unsigned gen0) {
  QStats* st = p.stats;
  __shared__ float s;
  if (threadIdx.x == 0) {
    if (!last)
      while (ld_acquire(&st->gen) == gen0) __nanosleep(64);
    s = __ldcg(&st->s_x);
  }
  __syncthreads();
  return s;
}
QD float scan_then_wait(const PassParams& p) {
  const unsigned gen0 = barrier_gen(p.stats);
  return wait_for_scale(p, scan_x_body(p), gen0);
}

// The dense layout's maxabs pass when x fits the resident grid (n / 4 <= blocks x 256 x (XREGS +
// S), checked on the host): a thread loads its float4 of x once, XREGS into registers and S into
// the dynamic shared memory (S from its size: 0 where registers suffice), scans them, waits at the
// barrier and quantizes what it holds, so x is read from memory once, not twice. Item k of a
// thread is float4 i0 + k * step, as in a grid-stride loop.
constexpr int XREGS = 16;
template <typename T>
QD void scan_quantize_held(const PassParams& p) {
  extern __shared__ float4 held[];  // [S][blockDim.x]
  unsigned smem;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(smem));
  const unsigned gen0 = barrier_gen(p.stats);
  // 32-bit: x fits the resident grid. kn: this thread's items (XREGS + S at most), so that a small
  // x does not run every slot's code predicated off
  const float4* x4 = (const float4*)p.x;
  const unsigned n4 = (unsigned)(p.n / 4), step = gridDim.x * blockDim.x, i0 = blockIdx.x * blockDim.x + threadIdx.x;
  const int kn = i0 < n4 ? (int)min((n4 - i0 - 1) / step + 1, XREGS + smem / (blockDim.x * 16)) : 0;
  float4 t[XREGS];
  unsigned mx = 0;
  int bad = 0;
#pragma unroll
  for (int k = 0; k < XREGS && k < kn; ++k) t[k] = __ldg(x4 + i0 + k * step);
#pragma unroll 4
  for (int k = XREGS; k < kn; ++k) {
    const float4 v = __ldg(x4 + i0 + k * step);
    scan4(v, bad, mx);
    held[(k - XREGS) * blockDim.x + threadIdx.x] = v;
  }
#pragma unroll
  for (int k = 0; k < XREGS && k < kn; ++k) scan4(t[k], bad, mx);
  const float s = wait_for_scale(p, scan_reduce(p, mx, bad), gen0);
  typename Vec4<T>::type* o4 = (typename Vec4<T>::type*)p.out;
  int unused = 0;  // (the scan flagged them)
#pragma unroll
  for (int k = 0; k < XREGS && k < kn; ++k) o4[i0 + k * step] = quantize4<T>(t[k], p, s, unused);
  for (int k = XREGS; k < kn; ++k) o4[i0 + k * step] = quantize4<T>(held[(k - XREGS) * blockDim.x + threadIdx.x], p, s, unused);
}

#define QCONV_QUANT(SUF, T)                                                                               \
  extern "C" __global__ void __launch_bounds__(256) qconv_quantize_x_##SUF(const PassParams p) {          \
    quantize_x_body<T>(p, p.dev_scale ? __ldcg(&p.stats->s_x) : p.s);                                     \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(256) qconv_scan_quantize_x_##SUF(const PassParams p) {     \
    quantize_x_body<T>(p, scan_then_wait(p));                                                             \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(256, 2) qconv_scan_quantize_held_##SUF(const PassParams p) { \
    scan_quantize_held<T>(p);                                                                             \
  }
QCONV_QUANT(s8, qs8)
QCONV_QUANT(s16, qs16)
QCONV_QUANT(s32, int)

// Byte planes for the tensor-core INT16 / INT32 kernels (conv_planes_mma.cu): x -> the grid
// (walk_padded) of [P][G][icgp] bytes a pixel, plane b holding byte b of each quantized value
// ((q >> 8b) & 0xFF; the top plane is the signed top byte q >> 8(P-1) as bits), icgp a multiple
// of 16 so that every plane is the INT8 kernel's layout. An item is 16 channels of one group: P
// 16-byte stores. Quantized with the fixed or the per-call scale; the flag's bit 0 when an input is
// not finite.
template <int P, bool F4>
QD int planes_grid(const PassParams& p, const float s) {
  int bad = 0;
  walk_padded<16>(p, [&](long long pix, int c, const float* src, int n) {
    int q[16];
    quantize_item<16, F4>(p, s, src, n, q, bad);
    const long long gp = (long long)p.G * p.icgp;
    uint4* o = (uint4*)((unsigned char*)p.out + pix * P * gp + c);
#pragma unroll
    for (int b = 0; b < P; ++b) {  // 16 bytes of plane b, little-endian
      unsigned w[4];
#pragma unroll
      for (int k = 0; k < 4; ++k)
        w[k] = (((unsigned)q[4 * k] >> (8 * b)) & 0xFFu) | ((((unsigned)q[4 * k + 1] >> (8 * b)) & 0xFFu) << 8) |
               ((((unsigned)q[4 * k + 2] >> (8 * b)) & 0xFFu) << 16) | (((unsigned)q[4 * k + 3] >> (8 * b)) << 24);
      o[b * gp / 16] = make_uint4(w[0], w[1], w[2], w[3]);
    }
  });
  return bad;
}
template <int P>
QD void quantize_planes_body(const PassParams& p, const float s) {
  const int bad = p.vec && p.icg % 16 == 0 ? planes_grid<P, true>(p, s) : planes_grid<P, false>(p, s);
  if (bad) atomicOr(&p.stats->flag, 1);
}

#define QCONV_QUANT_PLANES(SUF, P)                                                                        \
  extern "C" __global__ void __launch_bounds__(256) qconv_quantize_x_##SUF(const PassParams p) {          \
    quantize_planes_body<P>(p, p.dev_scale ? __ldcg(&p.stats->s_x) : p.s);                                \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__(256) qconv_scan_quantize_x_##SUF(const PassParams p) {     \
    quantize_planes_body<P>(p, scan_then_wait(p));                                                        \
  }
QCONV_QUANT_PLANES(p16, 2)
QCONV_QUANT_PLANES(p32, 4)

// FP32: x -> the grid (walk_padded) of floats, its channels padded for the 16-byte loader (icg %
// 4 != 0: read one float at a time), with the flag.
extern "C" __global__ void __launch_bounds__(256) qconv_pad_x_f32(const PassParams p) {
  int bad = 0;
  walk_padded<4>(p, [&](long long pix, int c, const float* src, int n) {
    float v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[k] = k < n ? __ldg(src + k) : 0.0f;
      bad |= !isfinite(v[k]);
    }
    *(float4*)((float*)p.out + pix * p.G * p.icgp + c) = make_float4(v[0], v[1], v[2], v[3]);
  });
  if (bad) atomicOr(&p.stats->flag, 1);
}

// Epilogue in place over [M][OC], the call's last kernel: mode 1 turns int32 accumulators into
// float32(acc) * inv[o] (+ bias[o]); mode 0 finishes FP32 after split-K: + bias[o] (when there is
// one) and the count of non-finite outputs. Two roundings, no FMA.
QD float epi1(const PassParams& p, float v, int o, unsigned& nonfinite) {
  if (p.mode == 1) return dequant1(__float_as_uint(v), p.inv[o], p.bias, o);
  const float y = p.bias ? __fadd_rn(v, p.bias[o]) : v;
  nonfinite += !isfinite(y);
  return y;
}
extern "C" __global__ void __launch_bounds__(256) qconv_epilogue(const PassParams p) {
  unsigned nf = 0;
  const bool store = p.mode == 1 || p.bias;  // FP32 without a bias: only counted
  if (p.vec) {  // OC % 4 == 0: four consecutive elements share a row
    float4* b4 = (float4*)p.out;
    QGRID_STRIDE(i, p.n / 4) {
      float4 v = b4[i];
      int o = (int)((i * 4) % p.OC);
      v.x = epi1(p, v.x, o, nf); v.y = epi1(p, v.y, o + 1, nf); v.z = epi1(p, v.z, o + 2, nf); v.w = epi1(p, v.w, o + 3, nf);
      if (store) b4[i] = v;
    }
  } else {
    float* b = (float*)p.out;
    QGRID_STRIDE(i, p.n) {
      const float v = epi1(p, b[i], (int)(i % p.OC), nf);
      if (store) b[i] = v;
    }
  }
  count_nonfinite(p.stats, nf);
  publish_stats(p.stats, p.slot);
}

// Stream gate (benchmarks): holds the stream until the host writes 1 to a mapped host word (or 5 s
// pass), so that everything enqueued behind it runs back to back and CUDA events time the GPU
// work alone, not the host's launch latency.
extern "C" __global__ void qconv_gate_wait(const volatile int* flag) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  while (*flag == 0) {
    __nanosleep(2000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    if (t - t0 > 5000000000ull) break;
  }
}
