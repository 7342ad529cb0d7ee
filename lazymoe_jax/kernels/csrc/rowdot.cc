// Row products for every encoding and ISA variant (see rowdot.h).
//
// Each encoding has a portable scalar kernel (the reference, correct on any CPU) and an
// AVX2 and an AVX-512 kernel (F/BW/VL/VNNI/VBMI), chosen at run time. The integer kernels give
// the same integer sums on every variant, except AVX2's int8 one, which quantises the
// activation to int16 (one finer level, within the same bound) since it has no VNNI.
//
// Integer inner loops use vpdpbusd (u8 x s8 -> s32 over 4 bytes; AVX2: vpmaddubsw then
// vpmaddwd by ones). The weight codes are made
// unsigned by a fixed offset and the activation stays signed, so the correction (offset x
// sum of the activation codes) depends on the activation only and is computed once in
// prepare() (Act::init), not per weight row: int8 w + 128, int4 nibbles + 8 (the low nibble is
// stored so already), mxfp4 2 x e2m1 + 12.
#include "rowdot.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#define LAZYMOE_X86 1
#include <immintrin.h>
#endif

namespace lazymoe {
namespace {

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {
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

inline float e8m0_to_f32(uint8_t s) {  // 2^(s - 127) from its bits; s = 0 reads 0 (as XLA's path)
  uint32_t u = uint32_t(s) << 23;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// 2 x e2m1 value of each 4-bit code (bit 3 the sign): exact small integers.
constexpr int8_t kE2M1x2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// ---- portable kernels: raw[r * M + m] for rows o..o+R-1 ------------------------------------
// float: the finished product; int8: the integer dot; int4 / mxfp4: sum over groups of the
// weight scale x integer group dot (the activation step is applied in combine()).

inline void float_raw_portable(const Weight& w, const Act& a, int64_t o, int R, float* raw) {
  const int M = a.tokens;
  const int64_t cn = a.cn;
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) {
      const float* x = a.xf + m * a.ldf;
      float acc[16] = {0};
      int64_t c = 0;
      if (w.enc == kF32) {
        const float* wr = static_cast<const float*>(w.w) + (o + r) * w.cols + a.c0;
        for (; c + 16 <= cn; c += 16)
          for (int k = 0; k < 16; ++k) acc[k] += wr[c + k] * x[c + k];
        for (; c < cn; ++c) acc[0] += wr[c] * x[c];
      } else {
        const uint16_t* wr = static_cast<const uint16_t*>(w.w) + (o + r) * w.cols + a.c0;
        for (; c + 16 <= cn; c += 16)
          for (int k = 0; k < 16; ++k) acc[k] += bf16_to_f32(wr[c + k]) * x[c + k];
        for (; c < cn; ++c) acc[0] += bf16_to_f32(wr[c]) * x[c];
      }
      float s = 0;
      for (int k = 0; k < 16; ++k) s += acc[k];
      raw[r * M + m] = s;
    }
  }
}

inline void i8_raw_portable(const Weight& w, const Act& a, int64_t o, int R, int32_t* raw) {
  const int M = a.tokens * a.levels;
  for (int r = 0; r < R; ++r) {
    const int8_t* wr = static_cast<const int8_t*>(w.w) + (o + r) * w.cols + a.c0;
    for (int m = 0; m < M; ++m) {
      const int8_t* q = a.q.data() + m * a.ldq;
      int32_t acc = 0;
      for (int64_t c = 0; c < a.cn; ++c) acc += int32_t(wr[c]) * int32_t(q[c]);
      raw[r * M + m] = acc;
    }
  }
}

inline void i4_raw_portable(const Weight& w, const Act& a, int64_t o, int R, float* raw) {
  const int M = a.tokens * a.levels, G = w.group;
  const int64_t N = w.cols / G, g0 = a.c0 / G, n = a.cn / G, npad = a.ldi;
  for (int r = 0; r < R; ++r) {
    const uint8_t* base = static_cast<const uint8_t*>(w.w) + (o + r) * (w.cols / 2) + g0;
    const uint16_t* sc = static_cast<const uint16_t*>(w.scale) + (o + r) * N + g0;
    for (int m = 0; m < M; ++m) {
      const int8_t* q = a.q.data() + m * a.ldq;
      float v = 0;
      for (int64_t g = 0; g < n; ++g) {
        int32_t acc = 0;
        for (int j = 0; j < G / 2; ++j) {
          const uint8_t b = base[j * N + g];
          const int8_t* qj = q + ((j / 2) * npad + g) * 4 + 2 * (j & 1);
          acc += (int32_t(b & 15) - 8) * qj[0] + (int32_t(int8_t(b)) >> 4) * qj[1];
        }
        v += f16_to_f32(sc[g]) * float(acc);
      }
      raw[r * M + m] = v;
    }
  }
}

inline void mx_raw_portable(const Weight& w, const Act& a, int64_t o, int R, float* raw) {
  const int M = a.tokens * a.levels;
  const int64_t nb = a.cn / 32, b0 = a.c0 / 32;
  for (int r = 0; r < R; ++r) {
    const uint8_t* base = static_cast<const uint8_t*>(w.w) + (o + r) * (w.cols / 2) + b0 * 16;
    const uint8_t* sc = static_cast<const uint8_t*>(w.scale) + (o + r) * (w.cols / 32) + b0;
    for (int m = 0; m < M; ++m) {
      const int8_t* q = a.q.data() + m * a.ldq;
      float v = 0;
      for (int64_t b = 0; b < nb; ++b) {
        const int8_t* qe = q + (b / 4) * 128 + (b % 4) * 16;
        int32_t acc = 0;
        for (int j = 0; j < 16; ++j) {
          const uint8_t byte = base[b * 16 + j];
          acc += kE2M1x2[byte & 15] * qe[j] + kE2M1x2[byte >> 4] * qe[64 + j];
        }
        v += e8m0_to_f32(sc[b]) * float(acc);
      }
      raw[r * M + m] = v;
    }
  }
}

// ---- combining the raw sums into outputs (shared by all variants) --------------------------

constexpr int kRowTile = 4;

inline void store_float(const float* raw, int R, int M, int64_t orel, float* y, int64_t ldy) {
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) y[m * ldy + orel + r] = raw[r * M + m];
}

inline void combine_i8(const Weight& w, const Act& a, const int32_t* raw, int64_t o, int R,
                       int64_t orel, float* y, int64_t ldy) {
  const int L = a.levels, M = a.tokens * L;
  const float* sw = static_cast<const float*>(w.scale);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < a.tokens; ++t) {
      float v = 0;
      for (int l = 0; l < L; ++l) v += a.scale[t * L + l] * float(raw[r * M + t * L + l]);
      y[t * ldy + orel + r] = v * sw[o + r];
    }
}

inline void combine_grouped(const Act& a, const float* raw, int R, int64_t orel, float mult,
                            float* y, int64_t ldy) {
  const int L = a.levels, M = a.tokens * L;
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < a.tokens; ++t) {
      float v = 0;
      for (int l = 0; l < L; ++l) v += a.scale[t * L + l] * raw[r * M + t * L + l];
      y[t * ldy + orel + r] = v * mult;
    }
}

inline void rows_portable_impl(const Weight& w, const Act& a, int64_t r0, int64_t r1,
                               float* y, int64_t ldy) {
  const int M = a.tokens * a.levels;
  std::vector<float> rawf(size_t(kRowTile) * M);
  std::vector<int32_t> rawi(size_t(kRowTile) * M);
  for (int64_t o = r0; o < r1; o += kRowTile) {
    const int R = int(std::min<int64_t>(kRowTile, r1 - o));
    switch (w.enc) {
      case kF32:
      case kBF16:
        float_raw_portable(w, a, o, R, rawf.data());
        store_float(rawf.data(), R, M, o - r0, y, ldy);
        break;
      case kI8:
        i8_raw_portable(w, a, o, R, rawi.data());
        combine_i8(w, a, rawi.data(), o, R, o - r0, y, ldy);
        break;
      case kI4:
        i4_raw_portable(w, a, o, R, rawf.data());
        combine_grouped(a, rawf.data(), R, o - r0, 1.0f, y, ldy);
        break;
      case kMXFP4:
        mx_raw_portable(w, a, o, R, rawf.data());
        combine_grouped(a, rawf.data(), R, o - r0, 0.5f, y, ldy);
        break;
    }
  }
}

void rows_portable(const Weight& w, const Act& a, int64_t r0, int64_t r1, float* y,
                   int64_t ldy) {
  rows_portable_impl(w, a, r0, r1, y, ldy);
}

#ifdef LAZYMOE_X86
// ---- AVX2 kernels (no VNNI: vpmaddubsw u8 x s8 -> s16 pairs, then vpmaddwd by ones) --------
#define TGT2 __attribute__((target("avx2,fma,f16c")))

TGT2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
TGT2 inline int32_t hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// kind 0 float32, 1 bf16 (shifted to f32): weights decoded once per 8 columns, one FMA a token.
template <int R, int MT, int KIND>
TGT2 void float_tile2(const Weight& w, const Act& a, int64_t o, int m0, float* raw, int M) {
  __m256 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_ps();
  const float* x[MT];
  for (int m = 0; m < MT; ++m) x[m] = a.xf + (m0 + m) * a.ldf;
  const int64_t cn = a.cn, cv = cn / 8 * 8;
  const uint16_t* wh[R];
  const float* wf[R];
  for (int r = 0; r < R; ++r) {
    wh[r] = static_cast<const uint16_t*>(w.w) + (o + r) * w.cols + a.c0;
    wf[r] = static_cast<const float*>(w.w) + (o + r) * w.cols + a.c0;
  }
  for (int64_t c = 0; c < cv; c += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) {
      if (KIND == 1) {
        const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wh[r] + c)));
        wv[r] = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
      } else {
        wv[r] = _mm256_loadu_ps(wf[r] + c);
      }
    }
    for (int m = 0; m < MT; ++m) {
      const __m256 xv = _mm256_loadu_ps(x[m] + c);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      float s = hsum8(acc[r][m]);
      for (int64_t c = cv; c < cn; ++c)
        s += (KIND == 1 ? bf16_to_f32(wh[r][c]) : wf[r][c]) * x[m][c];
      raw[r * M + m0 + m] = s;
    }
}
template <int R, int MT>
TGT2 void f32_tile2(const Weight& w, const Act& a, int64_t o, int m0, float* raw, int M) {
  float_tile2<R, MT, 0>(w, a, o, m0, raw, M);
}
template <int R, int MT>
TGT2 void bf16_tile2(const Weight& w, const Act& a, int64_t o, int m0, float* raw, int M) {
  float_tile2<R, MT, 1>(w, a, o, m0, raw, M);
}


// int8 weights against int16 activations (one level, step max|x| / 32767, finer than the two
// int8 levels of the other variants): vpmaddwd of the sign-extended weight, 2 ops per 16
// products a token where two int8 levels through vpmaddubsw take 8 per 32 (no VNNI on AVX2).
// int32 lanes are flushed to int64 every 2048 columns (127 x 32767 x 256 < 2^31).
template <int R, int MT>
TGT2 void i8w_tile2(const Weight& w, const Act& a, const int16_t* q16, int64_t ld16, int64_t o,
                    int m0, int64_t* raw, int M) {
  const int8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = static_cast<const int8_t*>(w.w) + (o + r) * w.cols + a.c0;
  const int16_t* x[MT];
  for (int m = 0; m < MT; ++m) x[m] = q16 + (m0 + m) * ld16;
  int64_t tot[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) tot[r][m] = 0;
  const int64_t cn = a.cn, cv = cn / 16 * 16;
  for (int64_t cb = 0; cb < cv; cb += 2048) {
    const int64_t ce = std::min<int64_t>(cv, cb + 2048);
    __m256i acc[R][MT];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_si256();
    for (int64_t c = cb; c < ce; c += 16) {
      __m256i wv[R];
      for (int r = 0; r < R; ++r)
        wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[r] + c)));
      for (int m = 0; m < MT; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[m] + c));
        for (int r = 0; r < R; ++r) acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(wv[r], xv));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) {
        alignas(32) int32_t lanes[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[r][m]);
        for (int k = 0; k < 8; ++k) tot[r][m] += lanes[k];
      }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      for (int64_t c = cv; c < cn; ++c) tot[r][m] += int32_t(wr[r][c]) * int32_t(x[m][c]);
      raw[r * M + m0 + m] = tot[r][m];
    }
}

// int4, 8 groups side by side (one int32 lane each): bytes of nibble rows j, j+1 interleaved,
// widened to words (b_j, b_j+1); shift and mask give (lo_j, hi_j, lo_j+1, hi_j+1) per dword
// as unsigned codes (+8; the xor 0x80 turns hi into hi + 8), matching prepare()'s layout.
template <int MT>
TGT2 void i4_tile2(const Weight& w, const Act& a, int64_t o, int m0, float* raw, int M) {
  const int G = w.group;
  const int64_t N = w.cols / G, g0 = a.c0 / G, n = a.cn / G, npad = a.ldi;
  const uint8_t* base = static_cast<const uint8_t*>(w.w) + o * (w.cols / 2) + g0;
  const uint16_t* sc = static_cast<const uint16_t*>(w.scale) + o * N + g0;
  const __m256i ones = _mm256_set1_epi16(1), nib = _mm256_set1_epi8(0x0f);
  const __m128i flip = _mm_set1_epi8(char(0x80));
  __m256 accf[MT];
  for (int m = 0; m < MT; ++m) accf[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < n; g += 8) {
    const int64_t ng = std::min<int64_t>(8, n - g);
    __m256i acc[MT];
    for (int m = 0; m < MT; ++m)
      acc[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.init.data() + (m0 + m) * a.ldi + g));
    for (int jp = 0; jp < G / 4; ++jp) {
      const uint8_t* p = base + (2 * jp) * N + g;
      __m128i lo, hi;
      if (ng == 8) {
        lo = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
        hi = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + N));
      } else {  // tail: zero bytes read as codes (8, 8) against zero activations
        alignas(16) uint8_t t0[16] = {0}, t1[16] = {0};
        std::memcpy(t0, p, ng);
        std::memcpy(t1, p + N, ng);
        lo = _mm_load_si128(reinterpret_cast<const __m128i*>(t0));
        hi = _mm_load_si128(reinterpret_cast<const __m128i*>(t1));
      }
      const __m256i d = _mm256_cvtepu8_epi16(_mm_xor_si128(_mm_unpacklo_epi8(lo, hi), flip));
      const __m256i wv = _mm256_and_si256(_mm256_or_si256(d, _mm256_slli_epi16(d, 4)), nib);
      for (int m = 0; m < MT; ++m) {
        const __m256i xv = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(a.q.data() + (m0 + m) * a.ldq + (jp * npad + g) * 4));
        acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones));
      }
    }
    alignas(16) uint16_t s16[8] = {0};
    std::memcpy(s16, sc + g, ng * 2);
    const __m256 s = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(s16)));
    for (int m = 0; m < MT; ++m) accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]), s, accf[m]);
  }
  for (int m = 0; m < MT; ++m) raw[m0 + m] = hsum8(accf[m]);
}

// mxfp4, 2 blocks a step: 32 packed bytes, vpshufb through the 2 x e2m1 + 12 table.
template <int MT>
TGT2 void mx_tile2(const Weight& w, const Act& a, int64_t o, int m0, float* raw, int M) {
  const int64_t nb = a.cn / 32, b0 = a.c0 / 32;
  const uint8_t* base = static_cast<const uint8_t*>(w.w) + o * (w.cols / 2) + b0 * 16;
  const uint8_t* sc = static_cast<const uint8_t*>(w.scale) + o * (w.cols / 32) + b0;
  const __m256i lut = _mm256_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0,
                                       12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0);
  const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  __m256 accf[MT];
  for (int m = 0; m < MT; ++m) accf[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b += 2) {
    __m256i raw8;
    __m256 sv;
    if (b + 2 <= nb) {
      raw8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + b * 16));
      sv = _mm256_setr_m128(_mm_set1_ps(e8m0_to_f32(sc[b])), _mm_set1_ps(e8m0_to_f32(sc[b + 1])));
    } else {  // one block left: the other lane reads zero codes against zero activations
      raw8 = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(base + b * 16)));
      sv = _mm256_setr_m128(_mm_set1_ps(e8m0_to_f32(sc[b])), _mm_setzero_ps());
    }
    const __m256i wl = _mm256_shuffle_epi8(lut, _mm256_and_si256(raw8, low4));
    const __m256i wh = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(raw8, 4), low4));
    const int64_t off = (b / 4) * 128 + (b % 4) * 16;
    for (int m = 0; m < MT; ++m) {
      const int8_t* q = a.q.data() + (m0 + m) * a.ldq + off;
      const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
      const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64));
      const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(wl, xe), _mm256_maddubs_epi16(wh, xo));
      const __m256i init = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(a.init.data() + (m0 + m) * a.ldi + b * 4));
      const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(s16, ones), init);
      accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sv, accf[m]);
    }
  }
  for (int m = 0; m < MT; ++m) raw[m0 + m] = hsum8(accf[m]);
}

#define LAZYMOE_MT_SWITCH(TILE, R, ...)       \
  switch (mt) {                               \
    case 1: TILE<R, 1>(__VA_ARGS__); break;   \
    case 2: TILE<R, 2>(__VA_ARGS__); break;   \
    case 3: TILE<R, 3>(__VA_ARGS__); break;   \
    default: TILE<R, 4>(__VA_ARGS__); break;  \
  }
#define LAZYMOE_MT_SWITCH1(TILE, ...)      \
  switch (mt) {                            \
    case 1: TILE<1>(__VA_ARGS__); break;   \
    case 2: TILE<2>(__VA_ARGS__); break;   \
    case 3: TILE<3>(__VA_ARGS__); break;   \
    default: TILE<4>(__VA_ARGS__); break;  \
  }

TGT2 void rows_avx2(const Weight& w, const Act& a, int64_t r0, int64_t r1, float* y,
                    int64_t ldy) {
  // int8 weights: int16 activations quantised here from the float32 rows (see i8w_tile2)
  const bool i8 = w.enc == kI8;
  const int M = i8 ? a.tokens : a.tokens * a.levels;
  const bool fl = w.enc == kF32 || w.enc == kBF16;
  std::vector<float> rawf(size_t(kRowTile) * M);
  std::vector<int64_t> raw64(size_t(kRowTile) * M);
  std::vector<int16_t> q16;
  std::vector<float> s16;
  const int64_t ld16 = (a.cn + 15) / 16 * 16;
  if (i8) {
    q16.assign(size_t(M) * ld16, 0);
    s16.assign(M, 1.0f);
    for (int t = 0; t < M; ++t) {
      const float* xr = a.xf + t * a.ldf;
      float amax = 0;
      for (int64_t c = 0; c < a.cn; ++c) amax = std::max(amax, std::fabs(xr[c]));
      const float s = amax > 0 ? amax / 32767.0f : 1.0f;
      for (int64_t c = 0; c < a.cn; ++c)
        q16[t * ld16 + c] = int16_t(std::max(-32767.0f, std::min(32767.0f, std::nearbyint(xr[c] / s))));
      s16[t] = s;
    }
  }
  // 16 ymm registers. Float forms: 4 rows x 2 tokens for 1-2 tokens (enough independent FMA
  // chains for one), 2 rows x 4 tokens for more (each weight decode then feeds 4 tokens);
  // int8 2 x 4; int4 / mxfp4 1 x 4.
  const bool wide = fl && M >= 3;
  const int rmax = fl ? (wide ? 2 : 4) : (w.enc == kI8 ? 2 : 1);
  const int mtmax = fl && !wide ? 2 : 4;
  for (int64_t o = r0; o < r1; o += rmax) {
    const int R = int(std::min<int64_t>(rmax, r1 - o));
    for (int m0 = 0; m0 < M; m0 += mtmax) {
      const int mt = std::min(mtmax, M - m0);
      float* rf = rawf.data();
      int64_t* r64 = raw64.data();
      if (fl) {
        for (int r0t = 0; r0t < R;) {  // rmax rows at a time, then single rows
          const int rr = R - r0t >= rmax ? rmax : 1;
          float* rfr = rf + r0t * M;
#define LAZYMOE_FL(TILE) \
  if (rr == 4) { if (mt == 2) TILE<4, 2>(w, a, o + r0t, m0, rfr, M); else TILE<4, 1>(w, a, o + r0t, m0, rfr, M); } \
  else if (rr == 2) { LAZYMOE_MT_SWITCH(TILE, 2, w, a, o + r0t, m0, rfr, M) } \
  else { LAZYMOE_MT_SWITCH(TILE, 1, w, a, o + r0t, m0, rfr, M) }
          if (w.enc == kF32) { LAZYMOE_FL(f32_tile2) }
          else { LAZYMOE_FL(bf16_tile2) }
#undef LAZYMOE_FL
          r0t += rr;
        }
        continue;
      }
      switch (w.enc) {
        case kI8:
          if (R == 2) { LAZYMOE_MT_SWITCH(i8w_tile2, 2, w, a, q16.data(), ld16, o, m0, r64, M) }
          else { LAZYMOE_MT_SWITCH(i8w_tile2, 1, w, a, q16.data(), ld16, o, m0, r64, M) }
          break;
        case kI4: LAZYMOE_MT_SWITCH1(i4_tile2, w, a, o, m0, rf, M) break;
        case kMXFP4: LAZYMOE_MT_SWITCH1(mx_tile2, w, a, o, m0, rf, M) break;
        default: break;
      }
    }
    if (i8) {
      const float* sw = static_cast<const float*>(w.scale);
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < a.tokens; ++t)
          y[t * ldy + o - r0 + r] = (s16[t] * float(raw64[r * M + t])) * sw[o + r];
      continue;
    }
    switch (w.enc) {
      case kF32:
      case kBF16: store_float(rawf.data(), R, M, o - r0, y, ldy); break;
      case kI4: combine_grouped(a, rawf.data(), R, o - r0, 1.0f, y, ldy); break;
      case kMXFP4: combine_grouped(a, rawf.data(), R, o - r0, 0.5f, y, ldy); break;
    }
  }
}

// ---- AVX-512 kernels -------------------------------------------------------------------------
#define TGT512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,fma,f16c")))

TGT512 inline __mmask16 mask16(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
}
TGT512 inline __mmask64 mask64(int64_t n) {
  return n >= 64 ? __mmask64(~0ull) : __mmask64((1ull << n) - 1);
}

// float32 / bf16 weights: R rows x MT tokens of FMAs on float32; one weight load feeds MT
// tokens, one activation load R rows.
template <int R, int MT, bool BF16>
TGT512 void float_tile512(const Weight& w, const Act& a, int64_t o, int m0, float* raw, int M) {
  __m512 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  const float* x[MT];
  for (int m = 0; m < MT; ++m) x[m] = a.xf + (m0 + m) * a.ldf;
  const int64_t cn = a.cn;
  for (int64_t c = 0; c < cn; c += 16) {
    const __mmask16 k = mask16(cn - c);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) {
      if (BF16) {
        const uint16_t* wr = static_cast<const uint16_t*>(w.w) + (o + r) * w.cols + a.c0;
        __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, wr + c));
        wv[r] = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
      } else {
        const float* wr = static_cast<const float*>(w.w) + (o + r) * w.cols + a.c0;
        wv[r] = _mm512_maskz_loadu_ps(k, wr + c);
      }
    }
    for (int m = 0; m < MT; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(k, x[m] + c);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) raw[r * M + m0 + m] = _mm512_reduce_add_ps(acc[r][m]);
}

// int8 weights: (w + 128) as u8 against the signed activation codes; Act::init = -128 sum(q).
template <int R, int MT>
TGT512 void i8_tile512(const Weight& w, const Act& a, int64_t o, int m0, int32_t* raw, int M) {
  __m512i acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_si512();
  const int8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = static_cast<const int8_t*>(w.w) + (o + r) * w.cols + a.c0;
  const int8_t* x[MT];
  for (int m = 0; m < MT; ++m) x[m] = a.q.data() + (m0 + m) * a.ldq;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const int64_t cn = a.cn;
  for (int64_t c = 0; c < cn; c += 64) {
    const __mmask64 k = mask64(cn - c);  // masked-off weights read 0 -> 128, times x = 0 (pad)
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(k, wr[r] + c), flip);
    for (int m = 0; m < MT; ++m) {
      const __m512i xv = _mm512_loadu_si512(x[m] + c);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbusd_epi32(acc[r][m], wv[r], xv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m)
      raw[r * M + m0 + m] = _mm512_reduce_add_epi32(acc[r][m]) + a.init[(m0 + m) * a.ldi];
}

// int4: the group index is the minor axis of the stored [G/2, N] row, so 16 groups are done
// side by side, one int32 lane each. For a pair of nibble rows j, j+1 (16 bytes each, N apart)
// vpermb builds per lane the four codes (lo_j, hi_j, lo_j+1, hi_j+1) of one group, matched by
// the activation laid out the same way in prepare(); then one vpdpbusd per activation row.
template <int R, int MT>
TGT512 void i4_tile512(const Weight& w, const Act& a, int64_t o, int m0, float* raw, int M) {
  const int G = w.group;
  const int64_t N = w.cols / G, g0 = a.c0 / G, n = a.cn / G, npad = a.ldi;
  const uint8_t* base[R];
  const uint16_t* sc[R];
  for (int r = 0; r < R; ++r) {
    base[r] = static_cast<const uint8_t*>(w.w) + (o + r) * (w.cols / 2) + g0;
    sc[r] = static_cast<const uint16_t*>(w.scale) + (o + r) * N + g0;
  }
  alignas(64) uint8_t idx_bytes[64];
  for (int i = 0; i < 16; ++i) {
    idx_bytes[4 * i + 0] = uint8_t(i);
    idx_bytes[4 * i + 1] = uint8_t(i);
    idx_bytes[4 * i + 2] = uint8_t(64 + i);
    idx_bytes[4 * i + 3] = uint8_t(64 + i);
  }
  const __m512i idx = _mm512_load_si512(idx_bytes);
  const __m512i odd_bytes = _mm512_set1_epi16(int16_t(0xff00));
  const __m512i nib = _mm512_set1_epi16(0x0f0f);
  const __m512i hi_bias = _mm512_set1_epi16(0x0800);
  __m512 accf[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) accf[r][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < n; g += 16) {
    const __mmask16 k = mask16(n - g);
    __m512i acc[R][MT];
    for (int m = 0; m < MT; ++m) {
      const __m512i init = _mm512_loadu_si512(a.init.data() + (m0 + m) * a.ldi + g);
      for (int r = 0; r < R; ++r) acc[r][m] = init;
    }
    for (int jp = 0; jp < G / 4; ++jp) {
      __m512i xv[MT];
      for (int m = 0; m < MT; ++m)
        xv[m] = _mm512_loadu_si512(a.q.data() + (m0 + m) * a.ldq + (jp * npad + g) * 4);
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = base[r] + (2 * jp) * N + g;
        const __m512i lo = _mm512_castsi128_si512(_mm_maskz_loadu_epi8(k, p));
        const __m512i hi = _mm512_castsi128_si512(_mm_maskz_loadu_epi8(k, p + N));
        const __m512i t = _mm512_permutex2var_epi8(lo, idx, hi);  // bytes b_j b_j b_j1 b_j1
        const __m512i u = _mm512_srli_epi16(t, 4);  // odd bytes: b >> 4
        const __m512i s = _mm512_ternarylogic_epi32(t, u, odd_bytes, 0xd8);  // odd ? u : t
        const __m512i wv = _mm512_ternarylogic_epi32(s, nib, hi_bias, 0x6a);  // (s & 0f) ^ 08
        for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_dpbusd_epi32(acc[r][m], wv, xv[m]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, sc[r] + g));
      for (int m = 0; m < MT; ++m)
        accf[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][m]), s, accf[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) raw[r * M + m0 + m] = _mm512_reduce_add_ps(accf[r][m]);
}

// mxfp4: 64 bytes = 4 blocks; nibbles through a 16-entry vpshufb table of 2 x e2m1 + 12
// (unsigned); the 128-bit lane of a block gives its 4 int32 lanes, scaled by its e8m0 scale.
template <int R, int MT>
TGT512 void mx_tile512(const Weight& w, const Act& a, int64_t o, int m0, float* raw, int M) {
  const int64_t nb = a.cn / 32, b0 = a.c0 / 32;
  const uint8_t* base[R];
  const uint8_t* sc[R];
  for (int r = 0; r < R; ++r) {
    base[r] = static_cast<const uint8_t*>(w.w) + (o + r) * (w.cols / 2) + b0 * 16;
    sc[r] = static_cast<const uint8_t*>(w.scale) + (o + r) * (w.cols / 32) + b0;
  }
  const __m512i lut = _mm512_broadcast_i32x4(
      _mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  const __m128i spread = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m512 accf[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) accf[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b += 4) {
    const int64_t nk = std::min<int64_t>(4, nb - b);
    const __mmask64 kb = mask64(16 * nk);
    const __mmask16 ks = mask16(nk);
    __m512i wl[R], wh[R];
    __m512 sv[R];
    for (int r = 0; r < R; ++r) {
      const __m512i raw8 = _mm512_maskz_loadu_epi8(kb, base[r] + b * 16);
      wl[r] = _mm512_shuffle_epi8(lut, _mm512_and_si512(raw8, low4));
      wh[r] = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(raw8, 4), low4));
      const __m128i s4 = _mm_shuffle_epi8(_mm_maskz_loadu_epi8(ks, sc[r] + b), spread);
      sv[r] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu8_epi32(s4), 23));
    }
    for (int m = 0; m < MT; ++m) {
      const int8_t* q = a.q.data() + (m0 + m) * a.ldq + (b / 4) * 128;
      const __m512i xe = _mm512_loadu_si512(q), xo = _mm512_loadu_si512(q + 64);
      const __m512i init = _mm512_loadu_si512(a.init.data() + (m0 + m) * a.ldi + b * 4);
      for (int r = 0; r < R; ++r) {
        __m512i p = _mm512_dpbusd_epi32(init, wl[r], xe);
        p = _mm512_dpbusd_epi32(p, wh[r], xo);
        accf[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sv[r], accf[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) raw[r * M + m0 + m] = _mm512_reduce_add_ps(accf[r][m]);
}

template <int R, int MT>
TGT512 void f32_tile512(const Weight& w, const Act& a, int64_t o, int m0, float* raw, int M) {
  float_tile512<R, MT, false>(w, a, o, m0, raw, M);
}
template <int R, int MT>
TGT512 void bf16_tile512(const Weight& w, const Act& a, int64_t o, int m0, float* raw, int M) {
  float_tile512<R, MT, true>(w, a, o, m0, raw, M);
}

TGT512 void rows_avx512(const Weight& w, const Act& a, int64_t r0, int64_t r1, float* y,
                        int64_t ldy) {
  const int M = a.tokens * a.levels;
  std::vector<float> rawf(size_t(kRowTile) * M);
  std::vector<int32_t> rawi(size_t(kRowTile) * M);
  // rows per tile: 4 for the float and int8 loops, 2 for int4 / mxfp4 (more registers a row)
  const int rmax = (w.enc == kI4 || w.enc == kMXFP4) ? 2 : 4;
  for (int64_t o = r0; o < r1; o += rmax) {
    const int R = int(std::min<int64_t>(rmax, r1 - o));
    for (int m0 = 0; m0 < M; m0 += 4) {
      const int mt = std::min(4, M - m0);
      float* rf = rawf.data();
      int32_t* ri = rawi.data();
      switch (w.enc) {
        case kF32:
          if (R == 4) { LAZYMOE_MT_SWITCH(f32_tile512, 4, w, a, o, m0, rf, M) }
          else { for (int r = 0; r < R; ++r) { LAZYMOE_MT_SWITCH(f32_tile512, 1, w, a, o + r, m0, rf + r * M, M) } }
          break;
        case kBF16:
          if (R == 4) { LAZYMOE_MT_SWITCH(bf16_tile512, 4, w, a, o, m0, rf, M) }
          else { for (int r = 0; r < R; ++r) { LAZYMOE_MT_SWITCH(bf16_tile512, 1, w, a, o + r, m0, rf + r * M, M) } }
          break;
        case kI8:
          if (R == 4) { LAZYMOE_MT_SWITCH(i8_tile512, 4, w, a, o, m0, ri, M) }
          else { for (int r = 0; r < R; ++r) { LAZYMOE_MT_SWITCH(i8_tile512, 1, w, a, o + r, m0, ri + r * M, M) } }
          break;
        case kI4:
          if (R == 2) { LAZYMOE_MT_SWITCH(i4_tile512, 2, w, a, o, m0, rf, M) }
          else { LAZYMOE_MT_SWITCH(i4_tile512, 1, w, a, o, m0, rf, M) }
          break;
        case kMXFP4:
          if (R == 2) { LAZYMOE_MT_SWITCH(mx_tile512, 2, w, a, o, m0, rf, M) }
          else { LAZYMOE_MT_SWITCH(mx_tile512, 1, w, a, o, m0, rf, M) }
          break;
      }
    }
    switch (w.enc) {
      case kF32:
      case kBF16: store_float(rawf.data(), R, M, o - r0, y, ldy); break;
      case kI8: combine_i8(w, a, rawi.data(), o, R, o - r0, y, ldy); break;
      case kI4: combine_grouped(a, rawf.data(), R, o - r0, 1.0f, y, ldy); break;
      case kMXFP4: combine_grouped(a, rawf.data(), R, o - r0, 0.5f, y, ldy); break;
    }
  }
}
#endif  // LAZYMOE_X86

// Quantises each token row x[0..cn) to `levels` int8 rows (value, then residual), each with
// its own step max|.| / 127; lin[m][c], scale[m].
void quantise(const float* x, int64_t ldx, int tokens, int levels, int64_t cn,
              std::vector<int8_t>& lin, std::vector<float>& scale) {
  lin.assign(size_t(tokens) * levels * cn, 0);
  scale.assign(size_t(tokens) * levels, 1.0f);
  std::vector<float> r(cn);
  for (int t = 0; t < tokens; ++t) {
    std::memcpy(r.data(), x + t * ldx, cn * sizeof(float));
    for (int l = 0; l < levels; ++l) {
      float amax = 0;
      for (int64_t c = 0; c < cn; ++c) amax = std::max(amax, std::fabs(r[c]));
      const float s = amax > 0 ? amax / 127.0f : 1.0f;
      int8_t* q = lin.data() + (size_t(t) * levels + l) * cn;
      for (int64_t c = 0; c < cn; ++c) {
        const float v = std::nearbyint(r[c] / s);
        q[c] = int8_t(std::max(-127.0f, std::min(127.0f, v)));
        r[c] -= float(q[c]) * s;
      }
      scale[t * levels + l] = s;
    }
  }
}

}  // namespace

bool isa_supported(int isa) {
  if (isa == kPortable) return true;
#ifdef LAZYMOE_X86
  __builtin_cpu_init();
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
#endif
  return false;
}

int best_isa() {
  if (isa_supported(kAvx512)) return kAvx512;
  if (isa_supported(kAvx2)) return kAvx2;
  return kPortable;
}

void prepare(Act& a, int enc, int group, int levels, const float* x, int64_t ldx, int tokens,
             int64_t c0, int64_t cn) {
  a.enc = enc;
  a.group = group;
  a.tokens = tokens;
  a.c0 = c0;
  a.cn = cn;
  a.xf = x;  // kept for every encoding (the AVX2 int8 kernel quantises it to int16 itself)
  a.ldf = ldx;
  if (enc == kF32 || enc == kBF16) {
    a.levels = 1;
    return;
  }
  a.levels = levels;
  const int M = tokens * levels;
  std::vector<int8_t> lin;
  quantise(x, ldx, tokens, levels, cn, lin, a.scale);
  if (enc == kI8) {
    a.ldq = round_up(std::max<int64_t>(cn, 1), 64);
    a.ldi = 1;
    a.q.assign(size_t(M) * a.ldq, 0);
    a.init.assign(M, 0);
    for (int m = 0; m < M; ++m) {
      int32_t sum = 0;
      for (int64_t c = 0; c < cn; ++c) {
        a.q[m * a.ldq + c] = lin[m * cn + c];
        sum += lin[m * cn + c];
      }
      a.init[m] = -128 * sum;
    }
  } else if (enc == kI4) {
    const int G = group;
    const int64_t n = cn / G, npad = round_up(std::max<int64_t>(n, 1), 16);
    a.ldq = G * npad;  // [G/4][npad][4]: codes (lo_j, hi_j, lo_j+1, hi_j+1) of group g
    a.ldi = npad;
    a.q.assign(size_t(M) * a.ldq, 0);
    a.init.assign(size_t(M) * a.ldi, 0);
    for (int m = 0; m < M; ++m) {
      const int8_t* l = lin.data() + m * cn;
      int8_t* q = a.q.data() + m * a.ldq;
      for (int64_t g = 0; g < n; ++g) {
        int32_t sum = 0;
        for (int j = 0; j < G / 2; ++j) {
          int8_t* d = q + ((j / 2) * npad + g) * 4 + 2 * (j & 1);
          d[0] = l[g * G + j];
          d[1] = l[g * G + G / 2 + j];
          sum += d[0] + d[1];
        }
        a.init[m * a.ldi + g] = -8 * sum;
      }
    }
  } else {  // kMXFP4
    const int64_t nb = cn / 32, nbp = round_up(std::max<int64_t>(nb, 1), 4);
    a.ldq = nbp * 32;  // per 4 blocks: 64 even-column codes, then 64 odd-column codes
    a.ldi = nbp * 4;   // per block 4 int32 lanes, the first holding -12 sum(codes)
    a.q.assign(size_t(M) * a.ldq, 0);
    a.init.assign(size_t(M) * a.ldi, 0);
    for (int m = 0; m < M; ++m) {
      const int8_t* l = lin.data() + m * cn;
      int8_t* q = a.q.data() + m * a.ldq;
      for (int64_t b = 0; b < nb; ++b) {
        int8_t* d = q + (b / 4) * 128 + (b % 4) * 16;
        int32_t sum = 0;
        for (int j = 0; j < 16; ++j) {
          d[j] = l[b * 32 + 2 * j];
          d[64 + j] = l[b * 32 + 2 * j + 1];
          sum += d[j] + d[64 + j];
        }
        a.init[m * a.ldi + 4 * b] = -12 * sum;
      }
    }
  }
}

void rows(int isa, const Weight& w, const Act& a, int64_t r0, int64_t r1, float* y,
          int64_t ldy) {
  if (r1 <= r0) return;
#ifdef LAZYMOE_X86
  if (isa == kAvx512) return rows_avx512(w, a, r0, r1, y, ldy);
  if (isa == kAvx2) return rows_avx2(w, a, r0, r1, y, ldy);
#endif
  rows_portable(w, a, r0, r1, y, ldy);
}

}  // namespace lazymoe
