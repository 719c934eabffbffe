/* amx_emu.h - AMX-TILE and AMX-INT8 in plain C, for conv_amx_emu.c only: the kernels of
 * conv_amx.inc run on any x86-64 CPU with these functions in place of the tile instructions.
 *
 * Semantics follow the Intel SDM (LDTILECFG, TILELOADD, TILESTORED, TILEZERO, TDPB[SU]{2}D,
 * TILERELEASE) for palette 1: 8 tiles of up to 16 rows x 64 bytes, each tile's rows and bytes per
 * row (colsb) taken from the loaded configuration.
 *   - A load reads exactly rows x colsb bytes (row r at base + r * stride) and zeroes the rest of
 *     the tile, so a sanitizer sees the same reads the hardware makes; a store writes exactly
 *     rows x colsb bytes.
 *   - tdpb**d: dst.dword[m][n] += sum over k < a.colsb / 4 of the four byte products of
 *     a.row[m].dword[k] and b.row[k].dword[n], each byte sign- or zero-extended by the
 *     instruction's letters; a plain 32-bit add, so it wraps modulo 2^32 (no saturation).
 *   - Where the hardware raises #UD or #GP (tile not configured, shapes that do not chain,
 *     repeated tile operands, a bad configuration), the emulator prints why and aborts: a kernel
 *     bug that would kill the process on the AMX machine kills the test process here too.
 * State is per thread (each worker loads its configuration, as on the hardware). */
#ifndef QCONV_AMX_EMU_H
#define QCONV_AMX_EMU_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int configured;           /* palette 1 loaded (0: the init state) */
    uint8_t rows[8];
    uint16_t colsb[8];
    uint8_t data[8][16][64];  /* tmm0..tmm7 */
} amx_emu_state;

static __thread amx_emu_state amx_emu;

static void amx_emu_fault(const char *insn, const char *why)
{
    fprintf(stderr, "qconv amx-emulated: %s would fault on AMX hardware: %s\n", insn, why);
    abort();
}

/* A tile operand: a configured tmm0..tmm7. */
static inline void amx_emu_check(const char *insn, int t)
{
    if (!amx_emu.configured)
        amx_emu_fault(insn, "no tile configuration loaded (#UD)");
    if (t < 0 || t > 7 || amx_emu.rows[t] == 0)
        amx_emu_fault(insn, "tile not configured by palette 1 (#UD)");
}

/* LDTILECFG: byte 0 palette, byte 1 start_row, bytes 16..47 colsb[16], bytes 48..63 rows[16]. */
static inline void amx_emu_loadconfig(const void *cfg)
{
    const uint8_t *c = cfg;
    memset(&amx_emu, 0, sizeof amx_emu);
    if (c[0] == 0)
        return;   /* palette 0: the init state */
    if (c[0] != 1 || c[1] != 0)
        amx_emu_fault("ldtilecfg", "only palette 1 with start_row 0 is emulated");
    for (int i = 2; i < 16; i++)
        if (c[i] != 0)
            amx_emu_fault("ldtilecfg", "reserved bytes must be zero (#GP)");
    for (int t = 0; t < 16; t++) {
        uint16_t colsb = (uint16_t)(c[16 + 2 * t] | c[17 + 2 * t] << 8);
        uint8_t rows = c[48 + t];
        if (t >= 8 ? (colsb | rows) != 0 : rows > 16 || colsb > 64 || (rows == 0) != (colsb == 0))
            amx_emu_fault("ldtilecfg", "a tile's rows/colsb are out of palette 1's range (#GP)");
        if (t < 8) {
            amx_emu.rows[t] = rows;
            amx_emu.colsb[t] = colsb;
        }
    }
    amx_emu.configured = 1;
}

static inline void amx_emu_release(void)
{
    memset(&amx_emu, 0, sizeof amx_emu);
}

static inline void amx_emu_zero(int t)
{
    amx_emu_check("tilezero", t);
    memset(amx_emu.data[t], 0, sizeof amx_emu.data[t]);
}

static inline void amx_emu_loadd(int t, const void *base, int64_t stride)
{
    amx_emu_check("tileloadd", t);
    memset(amx_emu.data[t], 0, sizeof amx_emu.data[t]);
    for (int r = 0; r < amx_emu.rows[t]; r++)
        memcpy(amx_emu.data[t][r], (const char *)base + r * stride, amx_emu.colsb[t]);
}

static inline void amx_emu_stored(int t, void *base, int64_t stride)
{
    amx_emu_check("tilestored", t);
    for (int r = 0; r < amx_emu.rows[t]; r++)
        memcpy((char *)base + r * stride, amx_emu.data[t][r], amx_emu.colsb[t]);
}

/* One byte of a tile row as the instruction reads it: sign- or zero-extended. */
static inline int32_t amx_emu_byte(const uint8_t *row, int i, int is_signed)
{
    return is_signed ? (int32_t)(int8_t)row[i] : (int32_t)row[i];
}

static inline void amx_emu_dp(const char *insn, int c, int a, int b, int sa, int sb)
{
    amx_emu_check(insn, c);
    amx_emu_check(insn, a);
    amx_emu_check(insn, b);
    if (c == a || c == b || a == b)
        amx_emu_fault(insn, "the three tile operands must differ (#UD)");
    const int m_rows = amx_emu.rows[c], k_dw = amx_emu.colsb[a] / 4, n_dw = amx_emu.colsb[c] / 4;
    if (amx_emu.colsb[c] % 4 || amx_emu.colsb[a] % 4 || amx_emu.rows[a] != m_rows ||
        amx_emu.rows[b] != k_dw || amx_emu.colsb[b] != amx_emu.colsb[c])
        amx_emu_fault(insn, "tile shapes do not chain: dst M x 4N, a M x 4K, b K x 4N (#UD)");
    for (int m = 0; m < m_rows; m++) {
        uint32_t acc[16];
        memcpy(acc, amx_emu.data[c][m], sizeof acc);
        const uint8_t *ar = amx_emu.data[a][m];
        for (int k = 0; k < k_dw; k++) {
            const uint8_t *br = amx_emu.data[b][k];
            const int32_t a0 = amx_emu_byte(ar, 4 * k, sa), a1 = amx_emu_byte(ar, 4 * k + 1, sa);
            const int32_t a2 = amx_emu_byte(ar, 4 * k + 2, sa), a3 = amx_emu_byte(ar, 4 * k + 3, sa);
            for (int n = 0; n < n_dw; n++) {   /* |four products| <= 4 * 255^2: no int32 overflow */
                int32_t p = a0 * amx_emu_byte(br, 4 * n, sb) + a1 * amx_emu_byte(br, 4 * n + 1, sb) +
                            a2 * amx_emu_byte(br, 4 * n + 2, sb) + a3 * amx_emu_byte(br, 4 * n + 3, sb);
                acc[n] += (uint32_t)p;   /* the dword add wraps */
            }
        }
        memset(amx_emu.data[c][m], 0, 64);   /* bytes past colsb are zeroed, as the SDM writes the row */
        memcpy(amx_emu.data[c][m], acc, (size_t)n_dw * 4);
    }
}

#define TILE_LOADCONFIG(cfg) amx_emu_loadconfig(cfg)
#define TILE_RELEASE() amx_emu_release()
#define TILE_ZERO(t) amx_emu_zero(t)
#define TILE_LOADD(t, base, stride) amx_emu_loadd((t), (base), (stride))
#define TILE_STORED(t, base, stride) amx_emu_stored((t), (base), (stride))
#define TILE_DPBSSD(c, a, b) amx_emu_dp("tdpbssd", (c), (a), (b), 1, 1)
#define TILE_DPBSUD(c, a, b) amx_emu_dp("tdpbsud", (c), (a), (b), 1, 0)
#define TILE_DPBUSD(c, a, b) amx_emu_dp("tdpbusd", (c), (a), (b), 0, 1)
#define TILE_DPBUUD(c, a, b) amx_emu_dp("tdpbuud", (c), (a), (b), 0, 0)

#endif /* QCONV_AMX_EMU_H */
