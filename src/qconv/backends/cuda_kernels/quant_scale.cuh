// The quantize passes' parameters and their per-call scale (bit-exact to qconv.contract): the
// input scan (finiteness, max|x|), the maxabs scale and inv[o] computed by the last block to
// arrive, and the grid-wide barrier that lets a cooperative pass quantize with that scale in the
// same launch. Included by quant.cu.
#pragma once
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

// The maxabs path in one launch: scan (flag, max|x|), a grid-wide barrier, quantize with the new
// scale. The last block to arrive computes s_x and inv[o] (scan_reduce) and bumps the barrier's
// generation; the others spin on it. Launched with cuLaunchCooperativeKernel and at most as many
// blocks as fit on the GPU at once, so every block is resident and the barrier cannot deadlock.
// scan_then_wait reads x twice (the second read mostly hits L2); quant.cu's scan_quantize_held,
// once.

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
