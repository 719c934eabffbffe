/* cpu_features.c - what this CPU and OS can run: CPUID/XGETBV detection (done once per process
 * and cached: CPUID traps to the hypervisor in a VM), the kernel family each qconv_isa names,
 * and the choice of the best usable one. */
#include "qconv.h"

#include <pthread.h>
#include <string.h>

#include "qconv_impl.h"

#if defined(QCONV_HAVE_X86)
#include <cpuid.h>

static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

static uint32_t detect_features(void)
{
    uint32_t f = 0;
#if defined(QCONV_HAVE_X86)
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
    if (!osxsave || !avx)
        return 0;
    uint64_t xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6)          /* XMM and YMM state saved by the OS */
        return 0;
    if (fma)
        f |= QCONV_CPU_FMA;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return f;
    if ((b >> 5) & 1)
        f |= QCONV_CPU_AVX2;
    int avx512f = (b >> 16) & 1, avx512vl = (b >> 31) & 1, avx512vnni = (c >> 11) & 1;
    if (avx512f && avx512vl && avx512vnni && (xcr0 & 0xE0) == 0xE0)
        f |= QCONV_CPU_AVX512VNNI_VL;
    int avx512bw = (b >> 30) & 1;
    if (avx512f && avx512bw && avx512vl && avx512vnni && (xcr0 & 0xE0) == 0xE0)
        f |= QCONV_CPU_AVX512;
    if (((d >> 24) & 1) && ((d >> 25) & 1) && ((xcr0 >> 17) & 3) == 3)   /* AMX-TILE, AMX-INT8, XTILECFG/DATA */
        f |= QCONV_CPU_AMX;
    unsigned max7 = a;
    if (max7 >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 4) & 1))
        f |= QCONV_CPU_AVXVNNI;
#endif
    return f;
}

static pthread_once_t features_once = PTHREAD_ONCE_INIT;
static uint32_t features_cached;

static void features_init(void)
{
    features_cached = detect_features();
}

static uint32_t features(void)
{
    pthread_once(&features_once, features_init);
    return features_cached;
}

int qconv_cpu_features(uint32_t *out)
{
    if (out == NULL)
        return QCONV_EINVAL;
    *out = features();
    return QCONV_OK;
}

const qconv_isa_table *qconv_table_for(int isa)
{
    switch (isa) {
    case QCONV_ISA_SCALAR: return &qconv_scalar_table;
#if defined(QCONV_HAVE_X86)
    case QCONV_ISA_AVX2: return &qconv_avx2_table;
    case QCONV_ISA_AVX512VNNI: return &qconv_avx512vnni_table;
    case QCONV_ISA_AVXVNNI: return &qconv_avxvnni_table;
    case QCONV_ISA_VNNI_EMULATED: return &qconv_vnni_emulated_table;
    case QCONV_ISA_AVX512: return &qconv_avx512_table;
    case QCONV_ISA_AMX: return &qconv_amx_table;
    case QCONV_ISA_AMX_EMULATED: return &qconv_amx_emulated_table;
#endif
    default: return NULL;
    }
}

int qconv_isa_usable(int isa)
{
    uint32_t f = features();
    int avx2 = (f & QCONV_CPU_AVX2) && (f & QCONV_CPU_FMA);
    switch (isa) {
    case QCONV_ISA_SCALAR: return 1;
#if defined(QCONV_HAVE_X86)
    case QCONV_ISA_AVX2: return avx2;
    case QCONV_ISA_AVX512VNNI: return avx2 && (f & QCONV_CPU_AVX512VNNI_VL);
    case QCONV_ISA_AVXVNNI: return avx2 && (f & QCONV_CPU_AVXVNNI);
    case QCONV_ISA_VNNI_EMULATED: return avx2;
    case QCONV_ISA_AVX512: return avx2 && (f & QCONV_CPU_AVX512);
    case QCONV_ISA_AMX: return avx2 && (f & QCONV_CPU_AVX512) && (f & QCONV_CPU_AMX) && qconv_amx_unusable() == NULL;
    case QCONV_ISA_AMX_EMULATED: return avx2;
#endif
    default: return 0;
    }
}

int qconv_isa_reason(int isa, char *buf, int64_t len)
{
    if (buf == NULL || len < 1)
        return QCONV_EINVAL;
    const char *why = "";
    uint32_t f = features();
    if (isa == QCONV_ISA_AUTO || isa == QCONV_ISA_SCALAR || qconv_isa_usable(isa)) {
        why = "";
    } else if (qconv_table_for(isa) == NULL) {
        why = "not an instruction-set level of this build";
    } else if (!((f & QCONV_CPU_AVX2) && (f & QCONV_CPU_FMA))) {
        why = "this CPU (or the OS) lacks AVX2/FMA";
    } else if (isa == QCONV_ISA_AVX512VNNI) {
        why = "this CPU (or the OS) lacks AVX512F/VL/VNNI with ZMM state";
    } else if (isa == QCONV_ISA_AVXVNNI) {
        why = "this CPU lacks AVX-VNNI";
#if defined(QCONV_HAVE_X86)
    } else if (isa == QCONV_ISA_AMX && qconv_amx_unusable() != NULL) {
        why = qconv_amx_unusable();   /* QCONV_NO_AMX, the CPU, XCR0, or arch_prctl refused */
#endif
    } else if (!(f & QCONV_CPU_AVX512)) {
        why = "this CPU (or the OS) lacks AVX512F/BW/VL/VNNI with ZMM state";
    } else {
        why = "this CPU or the OS lacks AMX-TILE/AMX-INT8";
    }
    size_t n = strlen(why);
    if ((int64_t)n >= len)
        n = (size_t)len - 1;
    memcpy(buf, why, n);
    buf[n] = '\0';
    return QCONV_OK;
}

int qconv_best_isa(int cap, int *isa)
{
    if (isa == NULL || cap < QCONV_ISA_AUTO || cap > QCONV_ISA_AMX_EMULATED)
        return QCONV_EINVAL;
    if (cap == QCONV_ISA_VNNI_EMULATED || cap == QCONV_ISA_AMX_EMULATED) {   /* tests only: that family or none */
        if (!qconv_isa_usable(cap))
            return QCONV_EISA;
        *isa = cap;
        return QCONV_OK;
    }
    /* Preference order; a cap admits the families at or below it in this order. */
    static const int order[] = {QCONV_ISA_AMX, QCONV_ISA_AVX512, QCONV_ISA_AVX512VNNI, QCONV_ISA_AVXVNNI,
                                QCONV_ISA_AVX2, QCONV_ISA_SCALAR};
    const int norder = (int)(sizeof order / sizeof order[0]);
    int rank_cap = 0;
    if (cap != QCONV_ISA_AUTO)
        for (int i = 0; i < norder; i++)
            if (order[i] == cap)
                rank_cap = i;
    for (int i = rank_cap; i < norder; i++)
        if (qconv_isa_usable(order[i])) {
            *isa = order[i];
            return QCONV_OK;
        }
    return QCONV_EISA;
}
