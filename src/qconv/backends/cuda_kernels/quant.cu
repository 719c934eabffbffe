// Quantize, pack and dequantize kernels (bit-exact to qconv.contract).
#include "qconv_common.cu"

// x (npix x C floats) -> padded (npix x Cp) of T, quantized; flag set when an input is not finite.
template <typename T>
QD void quantize_x_body(const float* __restrict__ x, T* __restrict__ out, long long npix, int C, int Cp,
                        float s, int qmax, int trunc, int* flag) {
  long long total = npix * Cp;
  int bad = 0;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    long long pix = i / Cp;
    int c = (int)(i - pix * Cp);
    int q = 0;
    if (c < C) {
      float t = x[pix * C + c];
      bad |= !isfinite(t);
      q = quantize1(t, s, qmax, trunc);
    }
    out[i] = (T)q;
  }
  if (bad) atomicOr(flag, 1);
}

// Fast path, C == Cp and 4 | total: float4 in, 4 quantized values out.
template <typename T> struct Vec4;
template <> struct Vec4<qs8> { typedef char4 type; };
template <> struct Vec4<qs16> { typedef short4 type; };
template <> struct Vec4<int> { typedef int4 type; };

template <typename T>
QD void quantize_x4_body(const float4* __restrict__ x, typename Vec4<T>::type* __restrict__ out, long long n4,
                         float s, int qmax, int trunc, int* flag) {
  int bad = 0;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n4;
       i += (long long)gridDim.x * blockDim.x) {
    float4 t = x[i];
    bad |= !isfinite(t.x) | !isfinite(t.y) | !isfinite(t.z) | !isfinite(t.w);
    typename Vec4<T>::type q;
    q.x = (T)quantize1(t.x, s, qmax, trunc); q.y = (T)quantize1(t.y, s, qmax, trunc);
    q.z = (T)quantize1(t.z, s, qmax, trunc); q.w = (T)quantize1(t.w, s, qmax, trunc);
    out[i] = q;
  }
  if (bad) atomicOr(flag, 1);
}

// w (T taps x OC x IC floats) -> packed [OCp][Kp] of T with k = tap*Cp + c; quantized when quant.
template <typename T>
QD void pack_w_body(const float* __restrict__ w, T* __restrict__ out, int taps, int OC, int IC, int Cp,
                    int OCp, int Kp, float s, int qmax, int trunc, int quant, int* flag) {
  long long total = (long long)OCp * Kp;
  int bad = 0;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    int o = (int)(i / Kp), k = (int)(i - (long long)o * Kp);
    int tap = k / Cp, c = k - tap * Cp;
    T q = (T)0;
    if (o < OC && tap < taps && c < IC) {
      float t = w[((long long)tap * OC + o) * IC + c];
      if (quant) { bad |= !isfinite(t); q = (T)quantize1(t, s, qmax, trunc); }
      else q = (T)t;
    }
    out[i] = q;
  }
  if (bad) atomicOr(flag, 2);
}

// y = float32(acc) * inv, in place (int32 in, float32 out, same buffer), one multiply, no FMA.
extern "C" __global__ void qconv_dequantize_s32(int4* buf, long long n4, float inv) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n4;
       i += (long long)gridDim.x * blockDim.x) {
    int4 a = buf[i];
    float4 y;
    y.x = __fmul_rn(__int2float_rn(a.x), inv); y.y = __fmul_rn(__int2float_rn(a.y), inv);
    y.z = __fmul_rn(__int2float_rn(a.z), inv); y.w = __fmul_rn(__int2float_rn(a.w), inv);
    ((float4*)buf)[i] = y;
  }
}
extern "C" __global__ void qconv_dequantize_s32_tail(int* buf, long long start, long long n, float inv) {
  long long i = start + blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i < n) ((float*)buf)[i] = __fmul_rn(__int2float_rn(buf[i]), inv);
}

#define QCONV_QUANT(SUF, T)                                                                         \
  extern "C" __global__ void qconv_quantize_x_##SUF(const float* x, T* out, long long npix, int C,   \
                                                    int Cp, float s, int qmax, int trunc, int* flag) { \
    quantize_x_body<T>(x, out, npix, C, Cp, s, qmax, trunc, flag);                                  \
  }                                                                                                 \
  extern "C" __global__ void qconv_quantize_x4_##SUF(const float4* x, Vec4<T>::type* out, long long n4, \
                                                     float s, int qmax, int trunc, int* flag) {     \
    quantize_x4_body<T>(x, out, n4, s, qmax, trunc, flag);                                          \
  }                                                                                                 \
  extern "C" __global__ void qconv_pack_w_##SUF(const float* w, T* out, int taps, int OC, int IC,   \
                                                int Cp, int OCp, int Kp, float s, int qmax,         \
                                                int trunc, int quant, int* flag) {                  \
    pack_w_body<T>(w, out, taps, OC, IC, Cp, OCp, Kp, s, qmax, trunc, quant, flag);                 \
  }

QCONV_QUANT(s8, qs8)
QCONV_QUANT(s16, qs16)
QCONV_QUANT(s32, int)

// FP32: channel padding of x (only when C % 4 != 0) and weight packing (no quantization).
extern "C" __global__ void qconv_pad_x_f32(const float* x, float* out, long long npix, int C, int Cp) {
  long long total = npix * Cp;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    long long pix = i / Cp;
    int c = (int)(i - pix * Cp);
    out[i] = c < C ? x[pix * C + c] : 0.0f;
  }
}
extern "C" __global__ void qconv_pack_w_f32(const float* w, float* out, int taps, int OC, int IC, int Cp,
                                            int OCp, int Kp) {
  pack_w_body<float>(w, out, taps, OC, IC, Cp, OCp, Kp, 1.0f, 0, 0, 0, 0);
}

// Stream gate: holds the stream until the host writes 1 to a mapped host word (or 5 s pass), so
// that everything enqueued behind it runs back to back and CUDA events time the GPU work alone,
// not the host's launch latency.
extern "C" __global__ void qconv_gate_wait(const volatile int* flag) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  while (*flag == 0) {
    __nanosleep(2000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    if (t - t0 > 5000000000ull) break;
  }
}
