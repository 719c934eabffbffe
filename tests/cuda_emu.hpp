// cuda_emu.hpp - enough of CUDA to run qconv's convolution kernels (wgmma, mma.sync, CUDA cores) on the host, for
// test_cuda_emulated.py (force-included before the kernel sources, whose PTX helpers the test
// replaces with the emu_* functions below).
//
// A block's threads are fibers (ucontext) on one OS thread, run round-robin; a fiber runs until it
// waits at a barrier (__syncthreads, or a warp's own barrier inside the warp-wide operations),
// an order of execution CUDA could also produce (one of many). Blocks run one after another.
// The warp-wide operations (ldmatrix, mma.sync, __reduce_add_sync, __shfl_sync) gather the 32 lanes'
// operands at the warp's barrier and give each lane its part, as the PTX ISA defines the fragments;
// wgmma's operands are in shared memory, so each thread computes its own accumulators from them.
// cp.async lands at its wait or at once (emu::late_copies), and wgmma is read at its issue and again
// at its wait (below), so a kernel that reads too early or overwrites too soon fails.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

struct dim3_ { unsigned x, y, z; };
static dim3_ blockIdx, blockDim, gridDim, threadIdx;
#define __device__
#define __forceinline__ inline
#define __global__
#define __launch_bounds__(...)
#define __shared__ static  // a block's shared arrays: blocks run one at a time
#define __align__(n)
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
struct int4 { int x, y, z, w; };
static inline float2 make_float2(float x, float y) { return {x, y}; }
static inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
using std::isfinite;
using std::max;
using std::min;
template <typename T> static inline T __ldg(const T* p) { return *p; }
template <typename T> static inline T __ldcg(const T* p) { return *p; }
static inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
static inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
static inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
static inline float __int2float_rn(int a) { return (float)a; }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline int __dp4a(int a, int b, int c) {
  unsigned s = (unsigned)c;
  for (int i = 0; i < 4; ++i) s += (unsigned)((int)(signed char)(a >> 8 * i) * (int)(signed char)(b >> 8 * i));
  return (int)s;
}
// one OS thread: the atomics are plain read-modify-writes
template <typename T> static inline T atomicAdd(T* a, T v) { T o = *a; *a = o + v; return o; }
static inline int atomicOr(int* a, int v) { int o = *a; *a |= v; return o; }
static inline void __threadfence() {}
static inline void __threadfence_system() {}

// Dynamic shared memory: one block at a time, so one array (the H100/H200 opt-in maximum).
alignas(1024) unsigned smem[232448 / 4];

namespace emu {
// The asynchronous operations a thread has issued and not yet waited for: cp.async copies (their
// source read at issue, written to shared memory only at cp.async.wait_group, the latest the
// hardware may), and wgmma products (computed at issue and again at wgmma.wait_group: a kernel
// that changes their operands in between is a race, counted in `races`).
struct Copy { void* dst; unsigned char bytes[16]; };
struct Product { int* d; std::vector<int> r; unsigned long long da, db; };
struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done;
  std::vector<Copy> copies;                  // issued since the last commit
  std::vector<std::vector<Copy>> copy_groups;
  std::vector<Product> products;
  std::vector<std::vector<Product>> product_groups;
};
struct Barrier { unsigned arrived = 0, gen = 0; };
struct Warp { Barrier bar; const void* p[32]; unsigned v[32][6]; };
static std::vector<Fiber> fibers;
static std::vector<Warp> warps;
static Barrier block_bar;
static Barrier named[16];  // bar.sync / bar.arrive ids
static ucontext_t sched;
static unsigned cur, progress, dynamic_smem, races;
// When cp.async lands: at its wait (the latest the hardware may: a read before the wait sees old
// data) or at once (the earliest: an overwrite of an operand a wgmma still reads shows at its wait).
static bool late_copies = true;

static inline void yield() { swapcontext(&fibers[cur].ctx, &sched); }

static inline void wait(Barrier& b, unsigned count) {
  const unsigned g = b.gen;
  if (++b.arrived == count) {
    b.arrived = 0;
    ++b.gen;
    ++progress;
    return;
  }
  while (b.gen == g) yield();
}
static inline Warp& warp() { return warps[threadIdx.x / 32]; }
static inline unsigned lane() { return threadIdx.x & 31; }
static inline void warp_sync() { wait(warp().bar, 32); }

typedef void (*Kernel)(const void* params);
static const void* run_params;
static Kernel run_kernel;
static inline void land(const std::vector<Copy>& group) {
  for (const Copy& c : group) std::memcpy(c.dst, c.bytes, 16);
}
// cp.async.wait_group n: all but the n most recent committed groups have landed.
static inline void copies_wait(size_t n) {
  Fiber& f = fibers[cur];
  while (f.copy_groups.size() > n) {
    land(f.copy_groups.front());
    f.copy_groups.erase(f.copy_groups.begin());
  }
}
// Every copy this thread issued, committed or not.
static inline void copies_land_all() {
  copies_wait(0);
  land(fibers[cur].copies);
  fibers[cur].copies.clear();
}
static void entry(int i) {
  run_kernel(run_params);
  copies_land_all();  // (a kernel that never waits for its copies: they land at its end)
  fibers[i].done = true;
  ++progress;
}

// Every block of the grid, its threads as fibers: 0, or 1 where the threads stop making progress
// (a barrier some thread never reaches), 3 where a wgmma's operands changed before its wait.
static int launch(Kernel k, const void* params, dim3_ grid, unsigned threads, unsigned smem_bytes) {
  races = 0;
  gridDim = grid;
  dynamic_smem = smem_bytes;
  blockDim = {threads, 1, 1};
  run_kernel = k;
  run_params = params;
  fibers.assign(threads, Fiber{});
  warps.assign((threads + 31) / 32, Warp{});
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        block_bar = Barrier{};
        for (Barrier& b : named) b = Barrier{};
        std::memset(smem, 0xA5, sizeof smem);  // no block sees another's leftovers as zeros
        for (unsigned t = 0; t < threads; ++t) {
          Fiber& f = fibers[t];
          f.stack.resize(1 << 18);
          f.done = false;
          f.copies.clear();
          f.copy_groups.clear();
          f.products.clear();
          f.product_groups.clear();
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &sched;
          makecontext(&f.ctx, (void (*)())entry, 1, (int)t);
        }
        for (unsigned live = threads; live;) {
          const unsigned before = progress;
          live = 0;
          for (unsigned t = 0; t < threads; ++t) {
            if (fibers[t].done) continue;
            cur = t;
            threadIdx = {t, 0, 0};
            swapcontext(&sched, &fibers[t].ctx);
            live += !fibers[t].done;
          }
          if (live && progress == before) return 1;
        }
      }
  return races ? 3 : 0;
}
}  // namespace emu

static inline void __syncthreads() { emu::wait(emu::block_bar, blockDim.x); }

// The sum of v over the warp's lanes, to every lane.
static inline unsigned __reduce_add_sync(unsigned, unsigned v) {
  emu::Warp& w = emu::warp();
  w.v[emu::lane()][0] = v;
  emu::warp_sync();
  unsigned s = 0;
  for (int l = 0; l < 32; ++l) s += w.v[l][0];
  emu::warp_sync();
  return s;
}

// lane src's v, to every lane of the warp
static inline unsigned __shfl_sync(unsigned, unsigned v, int src) {
  emu::Warp& w = emu::warp();
  w.v[emu::lane()][0] = v;
  emu::warp_sync();
  const unsigned r = w.v[src & 31][0];
  emu::warp_sync();
  return r;
}
static inline int __shfl_sync(unsigned mask, int v, int src) { return (int)__shfl_sync(mask, (unsigned)v, src); }
static inline unsigned __shfl_xor_sync(unsigned mask, unsigned v, int x) { return __shfl_sync(mask, v, (int)emu::lane() ^ x); }

// A shared-memory address: the offset into the one dynamic shared array (1 KiB aligned, as the
// swizzle atoms need).
static inline unsigned emu_smem_u32(const void* p) { return (unsigned)((const char*)p - (const char*)smem); }

// cp.async 16 bytes (zeros where !valid); commit; wait_group n; the mbarrier arrive that follows
// the thread's copies (they land first).
static inline void emu_cp_async16(void* dst, const void* src, bool valid) {
  emu::Copy c{dst, {}};
  if (valid) std::memcpy(c.bytes, src, 16);
  if (emu::late_copies) emu::fibers[emu::cur].copies.push_back(c);
  else std::memcpy(dst, c.bytes, 16);
}
static inline void emu_cp_async_commit() {
  emu::Fiber& f = emu::fibers[emu::cur];
  f.copy_groups.push_back(std::move(f.copies));
  f.copies.clear();
}
template <int N> static inline void emu_cp_async_wait() { emu::copies_wait(N); }

// ldmatrix .m8n8 .b16, N matrices: lanes 8i..8i+7 give matrix i's row addresses, and lane l gets
// word l % 4 of row l / 4 of each matrix.
template <int N> static inline void emu_ldsm(unsigned* r, const unsigned* p) {
  emu::Warp& w = emu::warp();
  const unsigned l = emu::lane();
  w.p[l] = p;
  emu::warp_sync();
  for (int i = 0; i < N; ++i) r[i] = ((const unsigned*)w.p[8 * i + l / 4])[l % 4];
  emu::warp_sync();
}

// The warp's A and B fragments, every lane's, once all 32 lanes have given theirs (an mma's input).
static inline const emu::Warp& emu_gather(const unsigned (&a)[4], const unsigned (&b)[2]) {
  emu::Warp& w = emu::warp();
  const unsigned l = emu::lane();
  for (int i = 0; i < 4; ++i) w.v[l][i] = a[i];
  w.v[l][4] = b[0];
  w.v[l][5] = b[1];
  emu::warp_sync();
  return w;
}

// mma.sync m16n8k32 .row.col .s32 (A 16x32, B 32x8, each .s8 or .u8), no .satfinite: D = A*B + C
// modulo 2^32. Fragments (PTX ISA): lane l = 4g + t holds A rows g (registers 0, 2) and g + 8
// (1, 3), bytes 4t..4t+3 of K 0..15 (registers 0, 1) and 16..31 (2, 3); B column g, the same K
// bytes in registers 0 and 1; C/D rows g (0, 1) and g + 8 (2, 3), columns 2t and 2t + 1.
template <bool AS, bool BS>
static inline void emu_mma_16832(int (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  const emu::Warp& w = emu_gather(a, b);
  const unsigned l = emu::lane();
  auto byte = [](unsigned word, int k, bool s) {
    const unsigned u = (word >> (8 * (k % 4))) & 0xFF;
    return s ? (int)(signed char)u : (int)u;
  };
  const int g = l / 4, t = l % 4;
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r / 2), col = 2 * t + r % 2;
    unsigned acc = (unsigned)d[r];
    for (int k = 0; k < 32; ++k) {
      const int av = byte(w.v[(row % 8) * 4 + (k % 16) / 4][row / 8 + 2 * (k / 16)], k, AS);
      const int bv = byte(w.v[col * 4 + (k % 16) / 4][4 + k / 16], k, BS);
      acc += (unsigned)(av * bv);
    }
    d[r] = (int)acc;
  }
  emu::warp_sync();
}

// mma.sync m16n8k8 .row.col .f32.tf32.tf32.f32: lane l = 4g + t holds A rows g (registers 0, 2)
// and g + 8 (1, 3), columns t (0, 1) and t + 4 (2, 3); B column g, rows t and t + 4; C/D as m16n8k32.
// The products of TF32 values are exact in float32; they are summed here in k order with fmaf.
static inline void emu_mma_tf32_1688(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  const emu::Warp& w = emu_gather(a, b);
  const unsigned l = emu::lane();
  const int g = l / 4, t = l % 4;
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r / 2), col = 2 * t + r % 2;
    float acc = d[r];
    for (int k = 0; k < 8; ++k)
      acc = std::fmaf(__uint_as_float(w.v[(row % 8) * 4 + k % 4][row / 8 + 2 * (k / 4)]),
                      __uint_as_float(w.v[col * 4 + k % 4][4 + k / 4]), acc);
    d[r] = acc;
  }
  emu::warp_sync();
}

// wgmma.mma_async m64nNk32 .s32.s8.s8 with both operands in shared memory through descriptors:
// start >> 4 (bits 0-13), leading byte offset >> 4 (16-29), stride byte offset >> 4 (32-45),
// layout (62-63: 0 none, 1 = 128-byte swizzle). Byte kb of K-major row r of an operand:
//   none:    start + (r / 8) * SBO + (r % 8) * 16 + (kb / 16) * LBO + kb % 16   (8x16-byte core matrices)
//   128B:    a = start + (r / 8) * SBO + (r % 8) * 128 + kb, then bits 4-6 ^= bits 7-9.
// Read at issue: the kernels keep an operand's shared memory unchanged until wgmma.wait_group, so
// this is one of the hardware's executions (one that cannot show a too-early overwrite).
static inline int emu_wgmma_byte(unsigned long long desc, int r, int kb) {
  const unsigned start = (unsigned)(desc & 0x3FFF) << 4, lbo = (unsigned)((desc >> 16) & 0x3FFF) << 4,
                 sbo = (unsigned)((desc >> 32) & 0x3FFF) << 4, layout = (unsigned)(desc >> 62);
  unsigned a;
  if (layout == 1) {
    a = start + (r / 8) * sbo + (r % 8) * 128 + kb;
    a ^= ((a >> 7) & 7) << 4;
  } else if (layout == 0) {
    a = start + (r / 8) * sbo + (r % 8) * 16 + (kb / 16) * lbo + kb % 16;
  } else {
    std::fprintf(stderr, "cuda_emu: wgmma descriptor layout %u not emulated\n", layout);
    std::abort();
  }
  return (int)((const signed char*)smem)[a];
}
// The accumulators (PTX ISA, m64nNk32 s32): warp q of the warpgroup holds rows 16q + l/4 (+8);
// n8 block i columns 8i + 2(l%4) (+1), as d[4i + {0: (r, c), 1: (r, c+1), 2: (r+8, c), 3: (r+8, c+1)}].
// This thread's n = N/2 products of A x B (the accumulators' layout above), as read now.
static inline std::vector<int> emu_wgmma_products(int n, unsigned long long da, unsigned long long db) {
  const int q = (threadIdx.x / 32) % 4, l = threadIdx.x % 32;
  std::vector<int> r(n);
  for (int i = 0; i < n / 4; ++i)
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * q + l / 4 + 8 * (e / 2), col = 8 * i + 2 * (l % 4) + e % 2;
      unsigned acc = 0;
      for (int k = 0; k < 32; ++k) acc += (unsigned)(emu_wgmma_byte(da, row, k) * emu_wgmma_byte(db, col, k));
      r[4 * i + e] = (int)acc;
    }
  return r;
}
// Issued: the products are read now and added at the wait, which reads them again (a difference is
// a race: the kernel changed an operand before wgmma.wait_group).
template <int N>
static inline void emu_wgmma_s8(int (&d)[N / 2], unsigned long long da, unsigned long long db) {
  emu::fibers[emu::cur].products.push_back({d, emu_wgmma_products(N / 2, da, db), da, db});
}
static inline void emu_wgmma_commit() {
  emu::Fiber& f = emu::fibers[emu::cur];
  f.product_groups.push_back(std::move(f.products));
  f.products.clear();
}
template <int N> static inline void emu_wgmma_wait() {
  emu::Fiber& f = emu::fibers[emu::cur];
  while (f.product_groups.size() > (size_t)N) {
    for (const emu::Product& p : f.product_groups.front()) {
      if (emu_wgmma_products((int)p.r.size(), p.da, p.db) != p.r) ++emu::races;
      for (size_t i = 0; i < p.r.size(); ++i) p.d[i] = (int)((unsigned)p.d[i] + (unsigned)p.r[i]);
    }
    f.product_groups.erase(f.product_groups.begin());
  }
}

// mbarrier: the 8 bytes hold the expected count (bits 0-15), the arrivals of the current phase
// (16-31) and the completed phases (32-63). wait(parity) returns once the current phase's parity
// differs, i.e. the phase of that parity has completed (a fresh barrier: wait(1) returns at once).
static inline void emu_mbar_init(unsigned long long* bar, unsigned count) { *bar = count; }
// An arrive lets the others run at once (a valid order, and the one that shows a release that
// comes too early: say, of a buffer whose wgmma has not been waited for).
static inline void emu_mbar_arrive(unsigned long long* bar) {
  unsigned long long v = *bar;
  const unsigned long long expected = v & 0xFFFF, arrived = ((v >> 16) & 0xFFFF) + 1;
  if (arrived == expected) *bar = expected | (((v >> 32) + 1) << 32);
  else *bar = expected | (arrived << 16) | ((v >> 32) << 32);
  ++emu::progress;
  emu::yield();
}
static inline void emu_mbar_arrive_cp_async(unsigned long long* bar) {
  emu::copies_land_all();
  emu_mbar_arrive(bar);
}
static inline void emu_mbar_wait(unsigned long long* bar, unsigned parity) {
  while (((*bar >> 32) & 1) == parity) emu::yield();
}
// bar.sync id, count waits until count threads have arrived (bar.arrive arrives without waiting).
static inline void emu_named_bar_sync(int id, int count) { emu::wait(emu::named[id], count); }
static inline void emu_named_bar_arrive(int id, int count) {
  emu::Barrier& b = emu::named[id];
  if (++b.arrived == (unsigned)count) {
    b.arrived = 0;
    ++b.gen;
  }
  ++emu::progress;
  emu::yield();
}
