/* conv_amx.c - the AMX kernels (conv_amx.inc) on the hardware's tiles: the only translation unit
 * built with AMX-TILE/AMX-INT8 (the pragma below), reached through qconv_amx_table after cpu_features.c
 * has checked the CPU and qconv_amx_unusable() has asked Linux for the tile data state once.
 * conv_amx_emu.c compiles the same kernels over an emulated tile file (the amx-emulated level).
 * INT8, INT16 and INT32 run on tiles (conv_amx.inc says how); FP32 is the AVX-512 kernel and
 * depthwise the AVX2 one. The AVX-512 vpdpwssd INT16 kernel stays reachable at the avx512 level. */
#if defined(__x86_64__) || defined(__i386__)
#define _GNU_SOURCE
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")

#include <cpuid.h>
#include <errno.h>
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "qconv_impl.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* ---- permission, once per process ------------------------------------------------------- */

static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static char amx_why[160];

static void amx_probe(void)
{
    unsigned a, b, c, d;
    const char *off = getenv("QCONV_NO_AMX");
    if (off != NULL && off[0] != '\0' && strcmp(off, "0") != 0) {
        snprintf(amx_why, sizeof amx_why, "AMX disabled by QCONV_NO_AMX=%.20s", off);
        return;
    }
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1)) {
        snprintf(amx_why, sizeof amx_why, "this CPU lacks AMX-TILE/AMX-INT8");
        return;
    }
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if (((lo >> 17) & 3) != 3) {
        snprintf(amx_why, sizeof amx_why, "the OS does not enable the tile state (XCR0 bits 17-18)");
        return;
    }
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) {
        snprintf(amx_why, sizeof amx_why, "arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) refused: %s",
                 strerror(errno));
        return;
    }
    amx_why[0] = '\0';
}

const char *qconv_amx_unusable(void)
{
    pthread_once(&amx_once, amx_probe);
    return amx_why[0] ? amx_why : NULL;
}

/* ---- the kernels ----------------------------------------------------------------------- */

extern void qconv_f32_conv__avx512(const qconv_conv_args *, int64_t, int64_t, int64_t, int64_t);

#define AMX_SFX amx
#define AMX_TABLE qconv_amx_table
#define AMX_NAME "amx"
#define AMX_F32_CONV qconv_f32_conv__avx512   /* the zmm FP32 kernel and its 14x32 (28x16 half) tile */
#define AMX_F32_NR 32
#define AMX_F32_MR 14
#define AMX_F32_MRH 28
#define TILE_LOADCONFIG(cfg) _tile_loadconfig(cfg)
#define TILE_RELEASE() _tile_release()
#define TILE_ZERO(t) _tile_zero(t)
#define TILE_LOADD(t, base, stride) _tile_loadd(t, base, stride)
#define TILE_STORED(t, base, stride) _tile_stored(t, base, stride)
#define TILE_DPBSSD(c, a, b) _tile_dpbssd(c, a, b)
#define TILE_DPBSUD(c, a, b) _tile_dpbsud(c, a, b)
#define TILE_DPBUSD(c, a, b) _tile_dpbusd(c, a, b)
#define TILE_DPBUUD(c, a, b) _tile_dpbuud(c, a, b)
#include "conv_amx.inc"

/* 4 independent tdpbssd per iteration into tmm0..3 (16 x 16 x 64 MACs each). */
double qconv_peak_body__amx(int instr, int64_t iters)
{
    (void)instr;
    int8_t src[1024] __attribute__((aligned(64)));
    memset(src, 1, sizeof src);
    load_config();
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, src, 64);
    _tile_loadd(5, src, 64);
    _tile_loadd(6, src, 64);
    _tile_loadd(7, src, 64);
    for (int64_t i = 0; i < iters; i++) {
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
    }
    int32_t out[256] __attribute__((aligned(64)));
    _tile_stored(0, out, 64);
    _tile_release();
    volatile int32_t sink = out[0];
    (void)sink;
    return 4.0 * 16.0 * 16.0 * 64.0 * (double)iters;
}

#endif /* x86 */
