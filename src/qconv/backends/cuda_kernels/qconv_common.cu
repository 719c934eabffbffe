// qconv CUDA kernels: shared definitions (included by every module file; compiled by NVRTC).
//
// Layouts (see cuda.py):
//   activations: NHWC, channels padded to Cp so one pixel is Cw = Cp*elem/4 32-bit words,
//                Cw a multiple of 4 (so every 16-byte chunk lies inside one pixel);
//   weights:     packed [OCp][Kpw] words, k = (kh*KW + kw)*Cp + c, zero-padded in OC and K;
//   output:      [M][OC] = NHWC, M = N*H*W, int32 accumulators or float32.
#pragma once

typedef signed char qs8;
typedef short qs16;
#define QD __device__ __forceinline__

// 'SAME' stride-1 implicit GEMM description, passed by value (mirrored by a ctypes.Structure).
struct ConvParams {
  const unsigned* x;      // activations, Cw words per pixel
  const unsigned* w;      // packed weights [OCp][Kpw]
  void* out;              // [M][OC]
  int N, H, W, Cw;        // input
  int KH, KW, pt, pl;     // kernel and top/left padding
  int OC, Kpw, M, T;      // output channels, packed K in words, N*H*W, KH*KW
  int ktiles, ktiles_per_split;
  int mode;               // 0: store raw, 1: store float(acc)*inv (int only), 2: atomic add raw
  float inv;
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

// Loads one BM x BKW-word A tile (implicit im2col of NHWC activations) and one BN x BKW B tile
// (packed weights) into shared memory with 16-byte cp.async; rows padded to SW words.
template <int BM, int BN, int BKW, int NT>
struct TileLoader {
  static constexpr int SW = BKW + 4;
  static constexpr int CPR = BKW / 4;                  // 16-byte chunks per row
  static constexpr int CA = (BM * CPR + NT - 1) / NT;  // A chunks per thread
  static constexpr int CB = (BN * CPR + NT - 1) / NT;
  int a_nh[CA], a_h[CA], a_w[CA];                      // image row base n*H, h, w (h huge if m >= M)
  int j;                                               // this thread's chunk column

  QD TileLoader(const ConvParams& p, int m0, int tid) {
    j = tid % CPR;
#pragma unroll
    for (int c = 0; c < CA; ++c) {
      int row = (tid + c * NT) / CPR;
      int m = m0 + row;
      if (m < p.M && row < BM) {
        int hw = p.H * p.W;
        int n = m / hw, r = m - n * hw;
        int h = r / p.W;
        a_nh[c] = n * p.H; a_h[c] = h; a_w[c] = r - h * p.W;
      } else {
        a_nh[c] = 0; a_h[c] = -(1 << 28); a_w[c] = 0;
      }
    }
  }

  QD void load(const ConvParams& p, unsigned* As, unsigned* Bs, int kt, int n0, int tid) const {
    int kword = kt * BKW + j * 4;
    int tap = kword / p.Cw;
    int cw = kword - tap * p.Cw;
    int kh = tap / p.KW;
    int kw = tap - kh * p.KW;
    bool tap_ok = tap < p.T;
#pragma unroll
    for (int c = 0; c < CA; ++c) {
      int idx = tid + c * NT;
      if (CA * NT == BM * CPR || idx < BM * CPR) {
        int row = idx / CPR;
        int hi = a_h[c] + kh - p.pt, wi = a_w[c] + kw - p.pl;
        bool ok = tap_ok && (unsigned)hi < (unsigned)p.H && (unsigned)wi < (unsigned)p.W;
        const unsigned* src = ok ? p.x + ((size_t)((a_nh[c] + hi) * p.W + wi) * p.Cw + cw) : p.x;
        cp_async16(As + row * SW + j * 4, src, ok);
      }
    }
#pragma unroll
    for (int c = 0; c < CB; ++c) {
      int idx = tid + c * NT;
      if (CB * NT == BN * CPR || idx < BN * CPR) {
        int row = idx / CPR;
        const unsigned* src = p.w + (size_t)(n0 + row) * p.Kpw + kt * BKW + j * 4;
        cp_async16(Bs + row * SW + j * 4, src, true);
      }
    }
  }
};

// Epilogue store of one accumulator (float or 32-bit integer bits) according to p.mode.
QD void store_out(const ConvParams& p, int m, int o, float v) {
  if (m < p.M && o < p.OC) {
    float* out = (float*)p.out + (size_t)m * p.OC + o;
    if (p.mode == 2) atomicAdd(out, v); else *out = v;
  }
}
QD void store_out(const ConvParams& p, int m, int o, unsigned v) {
  if (m < p.M && o < p.OC) {
    size_t i = (size_t)m * p.OC + o;
    if (p.mode == 1) ((float*)p.out)[i] = __fmul_rn(__int2float_rn((int)v), p.inv);
    else if (p.mode == 2) atomicAdd((unsigned*)p.out + i, v);  // modulo 2^32, order-free
    else ((unsigned*)p.out)[i] = v;
  }
}
