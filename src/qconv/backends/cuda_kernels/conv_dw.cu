// Depthwise convolution (groups == C, one input channel per group, OC = C * mult), every precision:
// a memory-bound operation, so one pass over the float32 input with the quantization fused into the
// loads (integers), no im2col and no packing. Each thread computes V consecutive output channels
// (V = 4: float4 loads and stores; V = 1: the scalar twin, any C and channel multiplier) of TW
// consecutive output columns of one output row; along a kernel row it loads each of the
// (TW - 1) * sw + KW input columns once and feeds every output column that reads it.
// Specializations with the kernel size and column stride fixed at compile time (3x3, 5x5; stride
// 1, 2) unroll every loop and keep the channel vector's weights in registers; the generic kernels
// take any size. Integer products and sums are taken modulo 2^32 (unsigned arithmetic), as the
// contract says; FP32 accumulates in float32 and adds the bias after. Neighbouring threads take
// neighbouring channel vectors of the same pixels, so loads and stores are coalesced along C.
// A grid-stride prologue scans the whole input for NaN/inf (unless a scan pass ran before: maxabs),
// FP32 counts its non-finite outputs, and the last block to finish publishes the call's record
// (qconv_common.cuh).
#include "qconv_common.cuh"

struct DwParams {
  const float* x;     // input (N, H, W, C) float32
  const void* w;      // weights [KH*KW][OC]: int32 quantized (integer paths) or float32
  float* out;         // output (N, Ho, Wo, OC)
  const float* inv;   // [OC] dequantize factors (integer paths)
  const float* bias;  // [OC] or null
  QStats* stats;      // device statistics of this call (s_x when dev_scale; flag)
  QSlot* slot;        // host-mapped record of this call (or null)
  const float* scan_x;  // the input again when this kernel scans it for NaN/inf (or null)
  long long scan_n;   // its elements
  int N, H, W, C, KH, KW, pt, pl, sh, sw, Ho, Wo, OC, mult;
  int tiles_w;        // ceil(Wo / TW)
  float s;            // fixed input scale (dev_scale == 0)
  int dev_scale;      // 1: the input scale is stats->s_x (maxabs)
  int qmax, trunc;
  int scan_vec;       // scan_x is 16-byte aligned and scan_n % 4 == 0
};

template <int V> struct FV;
template <> struct FV<4> {
  static QD void load(float (&v)[4], const float* p) { float4 t = __ldg((const float4*)p); v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w; }
  static QD void store(float* p, const float (&v)[4]) { *(float4*)p = make_float4(v[0], v[1], v[2], v[3]); }
  static QD void loadw(float (&v)[4], const void* p) { load(v, (const float*)p); }
  static QD void loadw(int (&v)[4], const void* p) { int4 t = __ldg((const int4*)p); v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w; }
};
template <> struct FV<1> {
  static QD void load(float (&v)[1], const float* p) { v[0] = __ldg(p); }
  static QD void store(float* p, const float (&v)[1]) { *p = v[0]; }
  static QD void loadw(float (&v)[1], const void* p) { v[0] = __ldg((const float*)p); }
  static QD void loadw(int (&v)[1], const void* p) { v[0] = __ldg((const int*)p); }
};
template <bool Q> struct WType { typedef float T; };
template <> struct WType<true> { typedef int T; };

// Q: quantize on load (integer precisions) or plain FP32. KH_, KW_, SW_: kernel size and column
// stride fixed at compile time, or 0 (read from p).
template <bool Q, int V, int TW, int KH_, int KW_, int SW_>
QD void dwconv(const DwParams& p) {
  scan_finite(p.scan_x, p.scan_n, p.scan_vec, p.stats);
  constexpr bool FIXED = KH_ > 0;
  typedef typename WType<Q>::T WT;
  const int KH = FIXED ? KH_ : p.KH, KW = FIXED ? KW_ : p.KW, SW = FIXED ? SW_ : p.sw;
  const float s = Q ? (p.dev_scale ? __ldcg(&p.stats->s_x) : p.s) : 0.0f;
  const int CV = p.OC / V;                        // channel vectors per output pixel
  const int total = p.N * p.Ho * p.tiles_w * CV;  // < 2^31 (checked on the host)
  const int span = (TW - 1) * SW + KW;            // input columns one kernel row of a strip reads
  unsigned nonfinite = 0;
  for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += gridDim.x * blockDim.x) {
    const int cv = idx % CV;
    int r = idx / CV;
    const int jt = r % p.tiles_w;
    r /= p.tiles_w;
    const int i = r % p.Ho, n = r / p.Ho;
    const int o = cv * V;
    const int c = V == 1 ? o / p.mult : o;        // V == 4 only when mult == 1
    const int j0 = jt * TW;
    const int w0 = j0 * SW - p.pl;
    WT wreg[FIXED ? KH_ * KW_ : 1][V];
    if constexpr (FIXED) {
#pragma unroll
      for (int k = 0; k < KH_ * KW_; ++k) FV<V>::loadw(wreg[k], (const WT*)p.w + (size_t)k * p.OC + o);
    }
    float facc[TW][V];
    unsigned iacc[TW][V];
#pragma unroll
    for (int u = 0; u < TW; ++u)
#pragma unroll
      for (int v = 0; v < V; ++v) { facc[u][v] = 0.0f; iacc[u][v] = 0u; }
#pragma unroll
    for (int kh = 0; kh < KH; ++kh) {
      const int hi = i * p.sh - p.pt + kh;
      if ((unsigned)hi >= (unsigned)p.H) continue;
      const float* xrow = p.x + (size_t)(n * p.H + hi) * p.W * p.C + c;
#pragma unroll
      for (int t = 0; t < span; ++t) {
        const int wi = w0 + t;
        if ((unsigned)wi >= (unsigned)p.W) continue;
        float xv[V];
        FV<V>::load(xv, xrow + (size_t)wi * p.C);
        int qv[V];
        if constexpr (Q) {
#pragma unroll
          for (int v = 0; v < V; ++v) qv[v] = quantize1(xv[v], s, p.qmax, p.trunc);
        }
#pragma unroll
        for (int u = 0; u < TW; ++u) {
          const int kw = t - u * SW;
          if (kw >= 0 && kw < KW) {
            WT wv[V];
            if constexpr (FIXED) {
#pragma unroll
              for (int v = 0; v < V; ++v) wv[v] = wreg[kh * KW_ + kw][v];
            } else {
              FV<V>::loadw(wv, (const WT*)p.w + (size_t)(kh * KW + kw) * p.OC + o);
            }
#pragma unroll
            for (int v = 0; v < V; ++v) {
              if constexpr (Q) iacc[u][v] += (unsigned)qv[v] * (unsigned)wv[v];
              else facc[u][v] = fmaf(xv[v], wv[v], facc[u][v]);
            }
          }
        }
      }
    }
    float* orow = p.out + ((size_t)(n * p.Ho + i) * p.Wo + j0) * p.OC + o;
#pragma unroll
    for (int u = 0; u < TW; ++u) {
      if (j0 + u < p.Wo) {
        float y[V];
#pragma unroll
        for (int v = 0; v < V; ++v) {
          if constexpr (Q) {
            y[v] = dequant1(iacc[u][v], p.inv[o + v], p.bias, o + v);
          } else {
            y[v] = p.bias ? __fadd_rn(facc[u][v], p.bias[o + v]) : facc[u][v];
            nonfinite += !isfinite(y[v]);
          }
        }
        FV<V>::store(orow + (size_t)u * p.OC, y);
      }
    }
  }
  count_nonfinite(p.stats, nonfinite);
  publish_stats(p.stats, p.slot);
}

// name: precision (f32; q32 = quantize on load, int32 accumulate, for INT8/16/32), c = channels per
// thread, w = output columns per thread (cuda/_tiling.py DW_TILE); _kKsS: a KxK kernel with column
// stride S fixed at compile time (cuda/_tiling.py DW_FIXED). MINB: blocks of 256 per SM that the
// registers must allow (3x3: 3, at most 85 registers; 5x5: 2, at most 128), so that a memory-bound
// kernel keeps enough warps in flight; the integer 5x5 would spill under its cap and measured slower
// than the generic kernel, so integers specialize 3x3 only.
#define QCONV_DW(NAME, Q, V, TW, K, S, MINB) \
  extern "C" __global__ void __launch_bounds__(256, MINB) NAME(const DwParams p) { wait_prior_grid(); dwconv<Q, V, TW, K, K, S>(p); }
#define QCONV_DW_ANY(NAME, Q, V, TW) \
  extern "C" __global__ void __launch_bounds__(256) NAME(const DwParams p) { wait_prior_grid(); dwconv<Q, V, TW, 0, 0, 0>(p); }
QCONV_DW_ANY(qconv_f32_dwconv_c4w4, false, 4, 4)
QCONV_DW_ANY(qconv_f32_dwconv_c1w4, false, 1, 4)
QCONV_DW_ANY(qconv_q32_dwconv_c4w4, true, 4, 4)
QCONV_DW_ANY(qconv_q32_dwconv_c1w4, true, 1, 4)
QCONV_DW(qconv_f32_dwconv_c4w4_k3s1, false, 4, 4, 3, 1, 3)
QCONV_DW(qconv_f32_dwconv_c4w4_k3s2, false, 4, 4, 3, 2, 3)
QCONV_DW(qconv_f32_dwconv_c4w4_k5s1, false, 4, 4, 5, 1, 2)
QCONV_DW(qconv_f32_dwconv_c4w4_k5s2, false, 4, 4, 5, 2, 2)
QCONV_DW(qconv_q32_dwconv_c4w4_k3s1, true, 4, 4, 3, 1, 3)
QCONV_DW(qconv_q32_dwconv_c4w4_k3s2, true, 4, 4, 3, 2, 3)
