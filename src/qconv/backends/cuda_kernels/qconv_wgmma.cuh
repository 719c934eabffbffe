// Hopper's warpgroup tensor-core instructions (sm_90a only): wgmma.mma_async s8 x s8 -> s32 with
// both operands in shared memory, read through 64-bit matrix descriptors.
//
// Operand layout: K-major rows of 128 bytes (128 int8) in 128-byte-swizzled atoms of 8 rows (1 KiB,
// 1 KiB aligned): the 16-byte chunk j of row r lives at r*128 + ((j ^ (r & 7)) << 4). TileLoader
// writes that layout when SWZ is true. A k-step of 32 bytes inside the row is addressed by moving
// the descriptor's start by 32 bytes; the hardware applies the same XOR to the address bits.
//
// The accumulators are plain registers tied "+r" to the asm: they may be read only after
// wgmma_wait<0>() (and the first wgmma of a group must follow wgmma_fence()). The s32 accumulation
// (no .satfinite) wraps modulo 2^32, as the contract asks.
#pragma once

// Descriptor: start address >> 4 (bits 0-13), leading byte offset >> 4 (16-29; unused by swizzled
// K-major layouts, 1 by convention), stride byte offset >> 4 (32-45: 1 KiB from one 8-row atom to the
// next), base offset 0 (49-51: atoms are 1 KiB aligned), layout 1 = 128-byte swizzle (62-63).
QD unsigned long long wgmma_desc(unsigned smem_addr) {
  return (unsigned long long)((smem_addr & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) |
         (1ull << 62);
}

// The same without swizzle, for [16-byte K chunk][row][16 bytes] (the window kernel): rows 16 bytes
// apart, so any row can start an operand; 128 bytes between 8-row core matrices (stride offset),
// k_stride bytes between the two 16-byte chunks of a 32-byte k-step (leading offset), layout 0.
QD unsigned long long wgmma_desc_plain(unsigned smem_addr, unsigned k_stride) {
  return (unsigned long long)((smem_addr & 0x3FFFF) >> 4) | ((unsigned long long)(k_stride >> 4) << 16) |
         ((unsigned long long)(128 >> 4) << 32);
}

QD void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
QD void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> QD void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory"); }
// Makes this thread's completed generic-proxy writes to shared memory (cp.async included) visible
// to the async proxy that wgmma reads through; then a barrier publishes them to the warpgroups.
QD void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// D(64 x N, s32) += A(64 x 32 s8, descriptor a) * B(N x 32 s8, K-major, descriptor b), one warpgroup.
// The operand lists are written out: PTX needs them literal.
template <int N> QD void wgmma_s8(int (&d)[N / 2], unsigned long long a, unsigned long long b);
template <> QD void wgmma_s8<64>(int (&d)[32], unsigned long long a, unsigned long long b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
      : "l"(a), "l"(b), "r"(1));
}
template <> QD void wgmma_s8<128>(int (&d)[64], unsigned long long a, unsigned long long b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "l"(a), "l"(b), "r"(1));
}

// mbarriers in shared memory (sm_80+), for the warp-specialized kernel's producer / consumer ring.
// A fresh barrier is in phase 0; wait(parity) returns once the phase of that parity has completed,
// and wait(1) on a fresh barrier returns at once (the phase before 0 counts as completed), so the
// producer waits on "empty" with the consumers' parity flipped.
QD void mbar_init(unsigned long long* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(smem_u32(bar)), "r"(count) : "memory");
}
QD void mbar_arrive(unsigned long long* bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" :: "r"(smem_u32(bar)) : "memory");
}
// Arrives on the barrier once every cp.async this thread issued before has landed (.noinc: the
// arrival counts toward the barrier's expected count; the thread does not block).
QD void mbar_arrive_cp_async(unsigned long long* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" :: "r"(smem_u32(bar)) : "memory");
}
QD void mbar_wait(unsigned long long* bar, unsigned parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" :: "r"(smem_u32(bar)), "r"(parity) : "memory");
}

// Named barriers 1..15 (0 is __syncthreads'): arrive does not wait; sync waits until `count` threads
// (whole warps) have arrived or synced.
QD void named_bar_sync(int id, int count) { asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(count) : "memory"); }
QD void named_bar_arrive(int id, int count) { asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(count) : "memory"); }
