// Row products of encoded weights, shared by the kernel families (expert_ffn.cc, gemv.cc).
//
// A weight is read in the exact layout lazymoe_jax/model/encodings.py stores it. An
// activation is prepared once per call (per token, per column range) into the form the
// weight's inner loop wants: float32 as it is for float weights; int8 (one or two levels:
// value, then residual) for the integer inner loops (vpdpbusd on AVX-512 VNNI). The variants
// compute the same integer sums (results differ by the order of float additions), except
// AVX2 with int8 weights (int16 activations, rowdot.cc). See BUILD_NOTES.md, "Native kernels".
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define LAZYMOE_X86 1
#include <immintrin.h>
#endif

namespace lazymoe {

enum Enc : int { kF32 = 0, kBF16 = 1, kI8 = 2, kI4 = 3, kMXFP4 = 4 };
// kAvx2Vnni: the AVX2 kernels with vpdpbusd (int4 / mxfp4) and vpdpwssd (int8) on ymm
// (AVX512-VL + VNNI) in the integer loops, the same integer sums (rowdot.cc, dot_u8s8, madd16),
// and zmm forms (AVX512-F / BW) of the same arithmetic where they gain: bit for bit kAvx2.
enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx2Vnni = 3 };
// The variants that read Act::avx2 and run the AVX2 kernels (and AVX2 attention).
inline bool avx2_family(int isa) { return isa == kAvx2 || isa == kAvx2Vnni; }

// IEEE float16 bits to float32 (int4 group scales, TurboQuant norms).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(man & 0x400)) {
      man <<= 1;
      --exp;
    }
    u = sign | (exp << 23) | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#ifdef LAZYMOE_X86
// The sum of a vector's 8 float lanes (the AVX2 kernels' final reduction).
__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

bool isa_supported(int isa);
int best_isa();

// One encoded weight [rows, cols]: f32 / bf16 / int8 [rows, cols]; int4 [rows, G/2, cols/G]
// (byte[o, j, g] = 16 q[o, gG + G/2 + j] + q[o, gG + j] + 8); mxfp4 [rows, cols/32, 16]
// (low nibble = even column). scale: int8 f32 [rows]; int4 f16 [rows, cols/G]; mxfp4 e8m0
// uint8 [rows, cols/32].
struct Weight {
  int enc = kF32, group = 0;
  const void* w = nullptr;
  const void* scale = nullptr;
  int64_t rows = 0, cols = 0;
};

// What the AVX2 kernels read instead of Act's own codes (rowdot.cc): int4 / mxfp4 codes and
// corrections reordered to the lanes of their unpacks / horizontal adds; int16 activations
// for int8 weights. Built in prepare() for the AVX2 family, once per activation.
struct Avx2Form {
  std::vector<int8_t> q;      // int4: [M][G/4][n32][4], groups in kI4Perm order per 32
  std::vector<int32_t> init;  // int4: [M][n32]; mxfp4: [M][nb8], blocks in kMxPerm order per 8
  int64_t ldq = 0, ldi = 0;
  std::vector<int8_t> qx;     // mxfp4, kPanelTokens or more: [M][nb8 / 8][8][8 x 4] (rowdot.cc)
  int64_t ldx = 0;
  std::vector<float> xc;      // float weights, kPanelTokens or more: [chunk][tokens][256] (rowdot.cc)
  std::vector<int16_t> xc16;  // int8 weights, avx2-vnni, kI8PanelTokens or more: [chunk][tokens][256]
  std::vector<int16_t> q16;   // int8 weights: [tokens][ld16], step s16[t] = max|x| / 32767
  std::vector<float> s16;
  int64_t ld16 = 0;
};

// An activation of `tokens` rows over weight columns [c0, c0 + cn), as `levels` int8 rows per
// token (M = levels * tokens rows, row m = level m % levels of token m / levels) for the
// integer encodings, or float32 rows for the float ones.
struct Act {
  int enc = kF32, group = 0, tokens = 0, levels = 1;
  int64_t c0 = 0, cn = 0;
  const float* xf = nullptr;  // column c of token t at xf[t * ldf + c] (float32)
  int64_t ldf = 0;
  std::vector<int8_t> q;       // [M][ldq], layout per encoding (rowdot.cc), zero padded; not
                               // built for int8 weights on the AVX2 family (they read int16_form)
  int64_t ldq = 0;
  std::vector<int32_t> init;  // [M][ldi]: what the biased (unsigned) weight codes add, negated
  int64_t ldi = 0;
  std::vector<float> scale;   // [M]: the int8 step of each row (as q)
  int isa = kPortable;        // the variant it was prepared for
  Avx2Form avx2;              // the AVX2 family only
};

// Prepares `a` for the kernels of variant isa and weights of encoding enc (group G for int4)
// from x [tokens][ldx] float32, whose columns 0..cn-1 multiply weight columns c0..c0+cn-1.
// `a` keeps a pointer to x (it must outlive `a`).
void prepare(Act& a, int isa, int enc, int group, int levels, const float* x, int64_t ldx,
             int tokens, int64_t c0, int64_t cn);

// y[t * ldy + (o - r0)] = sum_c W[o, a.c0 + c] * x[t, c] for o in [r0, r1), all tokens, with
// the kernels of the variant `a` was prepared for.
void rows(const Weight& w, const Act& a, int64_t r0, int64_t r1, float* y, int64_t ldy);

// The rows a rows() call should get at least (the callers' work units, otherwise `align`):
// the float panels read the activations once a call, for all its rows (rowdot.cc).
int64_t rows_align(int isa, int enc, int64_t tokens, int64_t align);

// Whether rows() of a single token over `cols` columns of an `enc` weight sums in another order
// than the same token among several (the AVX2 family's one-token float loop); every other
// product gives a token the same result whatever tokens share the call. A caller that needs
// that invariance runs such a token over two rows (expert_ffn.cc, slots per token).
bool one_token_sums_apart(int isa, int enc, int64_t cols);

}  // namespace lazymoe
