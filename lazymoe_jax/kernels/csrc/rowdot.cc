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


namespace lazymoe {
namespace {

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// nearbyint(v) for |v| < 2^22 in the default rounding mode, without the libm call that
// std::nearbyint is on baseline x86-64 (no SSE4.1 roundss): adding and taking away 1.5 x 2^23
// rounds to an integer, to nearest even, and the loops around it vectorise.
inline float round_even(float v) {
  constexpr float kMagic = 12582912.0f;  // (kept as two operations: no -ffast-math here)
  return (v + kMagic) - kMagic;
}

// max |x[c]| over c < n, in 8 independent partial maxima (so it vectorises without -ffast-math)
inline float abs_max(const float* x, int64_t n) {
  float m[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    for (int k = 0; k < 8; ++k) {
      const float v = std::fabs(x[c + k]);
      m[k] = m[k] > v ? m[k] : v;
    }
  for (; c < n; ++c) m[0] = std::max(m[0], std::fabs(x[c]));
  float r = 0;
  for (int k = 0; k < 8; ++k) r = std::max(r, m[k]);
  return r;
}

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
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
        v += half_to_float(sc[g]) * float(acc);
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

TGT2 inline int32_t hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// u8 x s8 dot of 4 bytes per int32 lane, added to acc: the AVX2 kernels' integer inner step.
// VNNI (kAvx2Vnni): one vpdpbusd on ymm (AVX512-VL + VNNI, EVEX-encoded). It is written as
// inline assembly so that these AVX2 functions need no AVX-512 target (whose code could not
// run on an AVX2-only CPU); the variant is only chosen where isa_supported() found the
// instructions. Plain AVX2: vpmaddubsw to int16 pairs, then vpmaddwd by ones. Both give the
// same int32 sums: the pair sums stay far inside int16 for the 4-bit codes (|code| <= 24,
// |x| <= 127), so vpmaddubsw never saturates.
template <bool VNNI>
TGT2 inline __m256i dot_u8s8(__m256i acc, __m256i w, __m256i x) {
  if (VNNI) {
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
    return acc;
  }
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}

// One token reads whole rows one after another (float_rows1, one-row int8 tiles) while the
// activation row fits in kSeqXBytes, a quarter of L1: the weights then stream as one sequence.
// With longer activations each row would reload x from L2, and tiles of rows that share each
// load of x are faster (BUILD_NOTES "session 10").
constexpr int64_t kSeqXBytes = 8192;

// Software prefetch of later row tiles: rows o+R.. at the same columns. The hardware
// prefetchers restart at every 4 KB page, and the int8 / int4 / mxfp4 rows of the expert
// shapes are 1-7 KB (BUILD_NOTES, "Integer kernels at the bandwidth"). Prefetches never fault,
// so past the last row they are harmless. Into L2 (T1), not L1: a weight line is read once, and
// L1's few miss buffers are left to the loads (mxfp4 one token 12.8 -> 20 GB/s on one core,
// int4 10.9 -> 13.4; float and int8 alike; BUILD_NOTES "session 13").
TGT2 inline void pf(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

// Prefetch distance in elements: whole row tiles of `tile` elements (`tile_bytes` bytes), so
// each prefetch lands on a row a later tile reads, and at least kAheadBytes ahead.
constexpr int64_t kAheadBytes = 8192;
inline int64_t ahead_of(int64_t tile, int64_t tile_bytes) {
  const int64_t tiles = (kAheadBytes + tile_bytes - 1) / std::max<int64_t>(tile_bytes, 1);
  return tile * std::max<int64_t>(1, tiles);
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
  const int64_t tile = int64_t(R) * w.cols;
  const int64_t ahead = ahead_of(tile, tile * (KIND == 1 ? 2 : 4));
  constexpr int64_t kLine = KIND == 1 ? 32 : 16;  // weights per 64-byte line
  for (int64_t c = 0; c < cv; c += 8) {
    if ((c & (kLine - 1)) == 0)
      for (int r = 0; r < R; ++r) pf(KIND == 1 ? static_cast<const void*>(wh[r] + ahead + c)
                                                : static_cast<const void*>(wf[r] + ahead + c));
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
// One token, float32 / bf16: rows one after another, each read front to back with four
// independent FMA chains. The tile is one contiguous stream (rows are adjacent), which the
// hardware prefetchers follow across rows, and the software prefetch runs kAheadBytes in
// front of it (past the range's last row it is wasted, never a fault). x stays in L1 (it is
// at most kSeqXBytes), so nothing is gained by interleaving rows.
template <int KIND>
TGT2 inline __m256 load8f(const char* row, int64_t c) {
  if (KIND == 1) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * 2));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + c);
}
template <int KIND>
TGT2 void float_rows1(const Weight& w, const Act& a, int64_t r0, int64_t r1, float* y) {
  constexpr int64_t kEl = KIND == 1 ? 2 : 4;
  const float* x = a.xf;
  const int64_t cn = a.cn, cv = cn / 32 * 32;
  for (int64_t o = r0; o < r1; ++o) {
    const char* row = static_cast<const char*>(w.w) + (o * w.cols + a.c0) * kEl;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    for (int64_t c = 0; c < cv; c += 32) {
      for (int64_t b = 0; b < 32 * kEl; b += 64) pf(row + c * kEl + b + kAheadBytes);
      acc0 = _mm256_fmadd_ps(load8f<KIND>(row, c), _mm256_loadu_ps(x + c), acc0);
      acc1 = _mm256_fmadd_ps(load8f<KIND>(row, c + 8), _mm256_loadu_ps(x + c + 8), acc1);
      acc2 = _mm256_fmadd_ps(load8f<KIND>(row, c + 16), _mm256_loadu_ps(x + c + 16), acc2);
      acc3 = _mm256_fmadd_ps(load8f<KIND>(row, c + 24), _mm256_loadu_ps(x + c + 24), acc3);
    }
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
    for (int64_t c = cv; c < cn; ++c)
      s += (KIND == 1 ? bf16_to_f32(reinterpret_cast<const uint16_t*>(row)[c])
                      : reinterpret_cast<const float*>(row)[c]) * x[c];
    y[o - r0] = s;
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
// VNNI (kAvx2Vnni): vpdpwssd fuses the multiply-add and the accumulation, the same int32 sums
// (no pair reaches -32768 x -32768: activations are clamped to +-32767), and tiles of 1-2 row x
// token pairs keep U = 4 / 2 accumulators each over consecutive 16-column steps, so the
// accumulation chain (vpdpwssd's latency) does not bound the loop; integer sums do not depend
// on that order. int32 lanes are flushed to int64 every 2048 columns (127 x 32767 x 256 < 2^31).
template <bool VNNI>
TGT2 inline __m256i madd16(__m256i acc, __m256i w, __m256i x) {
  if (VNNI) {
    asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
    return acc;
  }
  return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x));
}

template <int R, int MT, bool VNNI>
TGT2 void i8w_tile2(const Weight& w, const Act& a, const int16_t* q16, int64_t ld16, int64_t o,
                    int m0, int64_t* raw, int M) {
  constexpr int U = !VNNI ? 1 : (R * MT == 1 ? 4 : (R * MT == 2 ? 2 : 1));  // AVX2: one chain
  const int8_t* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = static_cast<const int8_t*>(w.w) + (o + r) * w.cols + a.c0;
  const int64_t ahead = ahead_of(int64_t(R) * w.cols, int64_t(R) * w.cols);
  const int16_t* x[MT];
  for (int m = 0; m < MT; ++m) x[m] = q16 + (m0 + m) * ld16;
  int64_t tot[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) tot[r][m] = 0;
  const int64_t cn = a.cn, cv = cn / 16 * 16;
  for (int64_t cb = 0; cb < cv; cb += 2048) {
    const int64_t ce = std::min<int64_t>(cv, cb + 2048);
    __m256i acc[R][MT][U];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m)
        for (int u = 0; u < U; ++u) acc[r][m][u] = _mm256_setzero_si256();
    int64_t c = cb;
    const int64_t cu = cb + (ce - cb) / (16 * U) * (16 * U);
    for (; c < cu; c += 16 * U) {
      if (((c - cb) & 63) == 0)
        for (int r = 0; r < R; ++r) pf(wr[r] + ahead + c);  // a row's next line, R rows on
      for (int u = 0; u < U; ++u) {
        __m256i wv[R];
        for (int r = 0; r < R; ++r)
          wv[r] = _mm256_cvtepi8_epi16(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[r] + c + 16 * u)));
        for (int m = 0; m < MT; ++m) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[m] + c + 16 * u));
          for (int r = 0; r < R; ++r) acc[r][m][u] = madd16<VNNI>(acc[r][m][u], wv[r], xv);
        }
      }
    }
    if constexpr (U > 1) for (; c < ce; c += 16) {  // the last < 16 U columns of the block
      __m256i wv[R];
      for (int r = 0; r < R; ++r)
        wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[r] + c)));
      for (int m = 0; m < MT; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[m] + c));
        for (int r = 0; r < R; ++r) acc[r][m][0] = madd16<VNNI>(acc[r][m][0], wv[r], xv);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) {
        __m256i s = acc[r][m][0];
        for (int u = 1; u < U; ++u) s = _mm256_add_epi32(s, acc[r][m][u]);  // < 2^31: as above
        alignas(32) int32_t lanes[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), s);
        for (int k = 0; k < 8; ++k) tot[r][m] += lanes[k];
      }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      for (int64_t c = cv; c < cn; ++c) tot[r][m] += int32_t(wr[r][c]) * int32_t(x[m][c]);
      raw[r * M + m0 + m] = tot[r][m];
    }
}

// TILE<R, mt, V>(...) for the token tile mt in 1..4 (the AVX2 tiles with a VNNI flag).
#define LAZYMOE_MT_SWITCH_V(TILE, R, V, ...)     \
  switch (mt) {                                  \
    case 1: TILE<R, 1, V>(__VA_ARGS__); break;   \
    case 2: TILE<R, 2, V>(__VA_ARGS__); break;   \
    case 3: TILE<R, 3, V>(__VA_ARGS__); break;   \
    default: TILE<R, 4, V>(__VA_ARGS__); break;  \
  }

// Inlined into rows_avx2: as a call of its own, the plain AVX2 one-token loop fell from 32 to
// 19-22 GB/s L2-hot (gcc then laid the tiles out differently).
template <bool VNNI>
TGT2 inline __attribute__((always_inline)) void i8w_tiles2(int rr, int mt, const Weight& w,
                                                           const Act& a, const int16_t* q16,
                                                           int64_t ld16, int64_t o, int m0,
                                                           int64_t* raw, int M) {
  if (rr == 4) {
    if (mt == 2) i8w_tile2<4, 2, VNNI>(w, a, q16, ld16, o, m0, raw, M);
    else i8w_tile2<4, 1, VNNI>(w, a, q16, ld16, o, m0, raw, M);
  } else if (rr == 2) {
    LAZYMOE_MT_SWITCH_V(i8w_tile2, 2, VNNI, w, a, q16, ld16, o, m0, raw, M)
  } else {
    LAZYMOE_MT_SWITCH_V(i8w_tile2, 1, VNNI, w, a, q16, ld16, o, m0, raw, M)
  }
}

// Activation layouts of the AVX2 int4 / mxfp4 tiles, made once in prepare() from Act
// (whose layout the portable and AVX-512 kernels read): the same codes and corrections,
// reordered to the lanes where the tiles' unpacks / horizontal adds leave each group or block.
// int4: unpacklo/hi_epi8 then unpacklo/hi_epi16 of two 32-byte nibble rows leave dword k of
// vector d (8 dwords) holding group kI4Perm[8 d + k] of the chunk.
constexpr int kI4Perm[32] = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23,
                             8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
// mxfp4: two levels of vphaddd over 4 vectors of 2 blocks leave the 8 blocks in this order.
constexpr int kMxPerm[8] = {0, 2, 4, 6, 1, 3, 5, 7};

void avx2_form(const Act& a, int M, Avx2Form& p) {
  if (a.enc == kI4) {
    const int G = a.group;
    const int64_t n = a.cn / G, n32 = round_up(std::max<int64_t>(n, 1), 32);
    p.ldq = (G / 4) * n32 * 4;
    p.ldi = n32;
    p.q.assign(size_t(M) * p.ldq, 0);
    p.init.assign(size_t(M) * p.ldi, 0);
    for (int m = 0; m < M; ++m)
      for (int64_t g = 0; g < n32; ++g) {
        const int64_t src = g / 32 * 32 + kI4Perm[g % 32];
        if (src >= n) continue;
        p.init[m * p.ldi + g] = a.init[m * a.ldi + src];
        for (int jp = 0; jp < G / 4; ++jp)
          std::memcpy(&p.q[m * p.ldq + (jp * n32 + g) * 4],
                      &a.q[m * a.ldq + (jp * a.ldi + src) * 4], 4);
      }
  } else if (a.enc == kMXFP4) {
    const int64_t nb = a.cn / 32, nb8 = round_up(std::max<int64_t>(nb, 1), 8);
    p.ldi = nb8;
    p.init.assign(size_t(M) * nb8, 0);
    for (int m = 0; m < M; ++m)
      for (int64_t b = 0; b < nb8; ++b) {
        const int64_t src = b / 8 * 8 + kMxPerm[b % 8];
        if (src < nb) p.init[m * nb8 + b] = a.init[m * a.ldi + 4 * src];
      }
  }
}

// Rows o..o+R-1 of an mxfp4 weight over the call's blocks b0..b0+nb-1 (mx_tile2, mx_pairs, mx_panel).
template <int R>
struct MxRows {
  int64_t nbt, nb, b0, rows, ahead, sahead;
  const uint8_t* base[R];
  const uint8_t* sc[R];
  int64_t o;
  MxRows(const Weight& w, const Act& a, int64_t o_)
      : nbt(w.cols / 32), nb(a.cn / 32), b0(a.c0 / 32), rows(w.rows),
        ahead(ahead_of(int64_t(R) * (w.cols / 2), int64_t(R) * (w.cols / 2))),
        sahead(ahead / (w.cols / 2) * nbt), o(o_) {
    for (int r = 0; r < R; ++r) {
      base[r] = static_cast<const uint8_t*>(w.w) + (o + r) * (w.cols / 2) + b0 * 16;
      sc[r] = static_cast<const uint8_t*>(w.scale) + (o + r) * nbt + b0;
    }
  }
  // Row r's codes of blocks b..b+7 (copied into tw / ts, zero padded, where reading on would
  // pass the array's end), prefetching later rows; *sv: the 8 e8m0 scales as floats in kMxPerm
  // order (s << 23), those past the call's blocks 0.
  TGT2 const uint8_t* chunk(int r, int64_t b, uint8_t* tw, uint8_t* ts, __m256* sv) const {
    const uint8_t* wp = base[r] + b * 16;
    const uint8_t* sp = sc[r] + b;
    if (b + 8 > nb && (o + r) * nbt + b0 + b + 8 > rows * nbt) {  // the last rows
      std::memset(tw, 0, 128);
      std::memset(ts, 0, 16);
      std::memcpy(tw, wp, (nb - b) * 16);
      std::memcpy(ts, sp, nb - b);
      wp = tw;
      sp = ts;
    }
    pf(wp + ahead);
    pf(wp + ahead + 64);
    if (!(b & 63)) pf(sc[r] + b + sahead);  // the scales of the rows the weights' prefetch reads
    const __m128i sperm = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i lane_blk = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m128i s8 = _mm_shuffle_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sp)), sperm);
    __m256i si = _mm256_slli_epi32(_mm256_cvtepu8_epi32(s8), 23);
    if (b + 8 > nb)
      si = _mm256_and_si256(si, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(nb - b)), lane_blk));
    *sv = _mm256_castsi256_ps(si);
    return wp;
  }
};

// mxfp4, 8 blocks (128 bytes, 256 weights) a step per row: nibbles through the vpshufb table
// of 2 x e2m1 + 12, vpmaddubsw against the signed codes, vpmaddwd by ones, then two levels of
// vphaddd fold the 4 vectors of 2 blocks into one int32 per block, so the correction, the
// int -> float conversion and the FMA with the 8 e8m0 scales (one load, s << 23) come once per
// 8 blocks. A tail reads on into the next row (zero activations there, its scales masked to
// 0); only where that would pass the end of the array is the chunk copied first.
template <int R, int MT, bool VNNI>
TGT2 void mx_tile2(const Weight& w, const Act& a, const Avx2Form& p, int64_t o, int m0,
                   float* raw, int M) {
  const MxRows<R> mr(w, a, o);
  const int64_t nb = mr.nb;
  const __m256i lut = _mm256_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0,
                                       12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0);
  const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  __m256 accf[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) accf[r][m] = _mm256_setzero_ps();
  alignas(32) uint8_t tw[R][128], ts[R][16];
  for (int64_t b = 0; b < nb; b += 8) {
    __m256 sv[R];
    const uint8_t* wp[R];
    for (int r = 0; r < R; ++r) wp[r] = mr.chunk(r, b, tw[r], ts[r], &sv[r]);
    __m256i h01[R][MT], h2[R][MT];
    for (int k = 0; k < 4; ++k) {
      __m256i wl[R], wh[R];
      for (int r = 0; r < R; ++r) {
        const __m256i raw8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp[r] + 32 * k));
        wl[r] = _mm256_shuffle_epi8(lut, _mm256_and_si256(raw8, low4));
        wh[r] = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(raw8, 4), low4));
      }
      // blocks b + 2k, b + 2k + 1 in Act's layout: per 4 blocks 64 even-, then 64 odd-column codes
      const int64_t off = (b / 4) * 128 + (k >> 1) * 128 + (k & 1) * 32;
      for (int m = 0; m < MT; ++m) {
        const int8_t* q = a.q.data() + (m0 + m) * a.ldq + off;
        const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
        const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64));
        for (int r = 0; r < R; ++r) {
          __m256i pk;
          if (VNNI) {
            pk = dot_u8s8<true>(dot_u8s8<true>(_mm256_setzero_si256(), wl[r], xe), wh[r], xo);
          } else {
            const __m256i s16 =
                _mm256_add_epi16(_mm256_maddubs_epi16(wl[r], xe), _mm256_maddubs_epi16(wh[r], xo));
            pk = _mm256_madd_epi16(s16, ones);
          }
          if (k == 0 || k == 2) (k == 0 ? h01[r][m] : h2[r][m]) = pk;
          else if (k == 1) h01[r][m] = _mm256_hadd_epi32(h01[r][m], pk);
          else h01[r][m] = _mm256_hadd_epi32(h01[r][m], _mm256_hadd_epi32(h2[r][m], pk));
        }
      }
    }
    for (int m = 0; m < MT; ++m) {
      const __m256i init = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(p.init.data() + (m0 + m) * p.ldi + b));
      for (int r = 0; r < R; ++r)
        accf[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(h01[r][m], init)), sv[r],
                                     accf[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) raw[r * M + m0 + m] = hsum8(accf[r][m]);
}

// Rows o..o+R-1 of an int4 weight over the call's groups g0..g0+n-1 (i4_tile2, i4_pairs, i4_panel): row
// starts, scale starts, and the prefetch distance.
template <int R>
struct I4Rows {
  int G;
  int64_t N, g0, n, rowb, end, ahead, sahead, o;
  const uint8_t* base[R];
  const uint16_t* sc[R];
  I4Rows(const Weight& w, const Act& a, int64_t o_)
      : G(w.group), N(w.cols / G), g0(a.c0 / G), n(a.cn / G), rowb(w.cols / 2),
        end(w.rows * rowb), ahead(ahead_of(int64_t(R) * rowb, int64_t(R) * rowb)),
        sahead(ahead / rowb * N), o(o_) {
    for (int r = 0; r < R; ++r) {
      base[r] = static_cast<const uint8_t*>(w.w) + (o + r) * rowb + g0;
      sc[r] = static_cast<const uint16_t*>(w.scale) + (o + r) * N + g0;
    }
  }
  // Row r's nibble rows of groups g..g+31 (returned; *ld apart) and their f16 scales (*sp). In
  // the last chunk the scales of the groups past n read as 0 from ts (the codes there meet zero
  // activations); where reading on would pass the array's end, the codes are first copied into
  // tw ([G/2][32]).
  TGT2 const uint8_t* chunk(int r, int64_t g, std::vector<uint8_t>& tw, uint16_t* ts, int64_t* ld,
                       const uint16_t** sp) const {
    const uint8_t* wp = base[r] + g;
    *ld = N;
    *sp = sc[r] + g;
    pf(*sp + sahead);  // the scales of the rows the weights' prefetch reads (64 B: 32 groups)
    if (g + 32 > n) {
      std::memset(ts, 0, 32 * sizeof(uint16_t));
      std::memcpy(ts, *sp, (n - g) * 2);
      *sp = ts;
      if ((o + r) * rowb + g0 + (G / 2 - 1) * N + g + 32 > end) {
        tw.assign(size_t(G / 2) * 32, 0);
        for (int j = 0; j < G / 2; ++j) std::memcpy(&tw[j * 32], wp + j * N, n - g);
        wp = tw.data();
        *ld = 32;
      }
    }
    return wp;
  }
};

// The 4 vectors of one pair of int4 nibble rows j, j + 1 (at pj, pj + ld; see i4_tile2): the
// low / high nibbles (the high one + 8 by the xor 0x80), unpacked to bytes (lo, hi) then words
// (j, j + 1), so that each dword holds the 4 unsigned codes of one group (order kI4Perm).
TGT2 inline void i4_unpack(const uint8_t* pj, int64_t ld, __m256i* dv) {
  const __m256i nib = _mm256_set1_epi8(0x0f), flip = _mm256_set1_epi8(char(0x80));
  const __m256i y0 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pj)), flip);
  const __m256i y1 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pj + ld)), flip);
  const __m256i l0 = _mm256_and_si256(y0, nib), h0 = _mm256_and_si256(_mm256_srli_epi16(y0, 4), nib);
  const __m256i l1 = _mm256_and_si256(y1, nib), h1 = _mm256_and_si256(_mm256_srli_epi16(y1, 4), nib);
  const __m256i a0 = _mm256_unpacklo_epi8(l0, h0), b0 = _mm256_unpackhi_epi8(l0, h0);
  const __m256i a1 = _mm256_unpacklo_epi8(l1, h1), b1 = _mm256_unpackhi_epi8(l1, h1);
  dv[0] = _mm256_unpacklo_epi16(a0, a1);
  dv[1] = _mm256_unpackhi_epi16(a0, a1);
  dv[2] = _mm256_unpacklo_epi16(b0, b1);
  dv[3] = _mm256_unpackhi_epi16(b0, b1);
}

// int4, 32 groups side by side per row: per pair of nibble rows j, j+1 (32 bytes each, N
// apart in the stored [G/2, N] row) the low / high nibbles (the high one + 8 by the xor 0x80),
// then unpack bytes (lo, hi) and words (j, j+1): 4 vectors whose dwords are the 4 unsigned
// codes of one group each (order kI4Perm), one vpmaddubsw + vpmaddwd per vector and token,
// int32 per group; the f16 group scales once per group. 128 weights per 16 decode ops, where
// the 8-group form took 9 per 32. Tails as in mx_tile2 (read on; copy only at the array end).
template <int R, int MT, bool VNNI>
TGT2 void i4_tile2(const Weight& w, const Act& a, const Avx2Form& p, int64_t o, int m0,
                   float* raw, int M) {
  const I4Rows<R> ir(w, a, o);
  const int G = ir.G;
  const int64_t n = ir.n, ahead = ir.ahead;
  __m256 accf[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) accf[r][m] = _mm256_setzero_ps();
  std::vector<uint8_t> tw[R];  // a chunk copied at the array's end: [G/2][32]
  for (int64_t g = 0; g < n; g += 32) {
    const uint8_t* wp[R];
    int64_t ld[R];
    alignas(32) uint16_t ts[R][32];
    const uint16_t* sp[R];
    for (int r = 0; r < R; ++r) wp[r] = ir.chunk(r, g, tw[r], ts[r], &ld[r], &sp[r]);
    __m256i acc[R][MT][4];
    for (int m = 0; m < MT; ++m)
      for (int d = 0; d < 4; ++d) {
        const __m256i init = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(p.init.data() + (m0 + m) * p.ldi + g + 8 * d));
        for (int r = 0; r < R; ++r) acc[r][m][d] = init;
      }
    for (int jp = 0; jp < G / 4; ++jp) {
      __m256i dv[R][4];
      for (int r = 0; r < R; ++r) {
        const uint8_t* pj = wp[r] + (2 * jp) * ld[r];
        pf(pj + ahead);
        pf(pj + ld[r] + ahead);
        i4_unpack(pj, ld[r], dv[r]);
      }
      for (int m = 0; m < MT; ++m) {
        const int8_t* q = p.q.data() + (m0 + m) * p.ldq + (jp * p.ldi + g) * 4;
        for (int d = 0; d < 4; ++d) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * d));
          for (int r = 0; r < R; ++r)
            acc[r][m][d] = dot_u8s8<VNNI>(acc[r][m][d], dv[r][d], xv);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int d = 0; d < 4; ++d) {  // scales of groups 4d..4d+3 and 16+4d..16+4d+3
        const __m128i s = _mm_unpacklo_epi64(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sp[r] + 4 * d)),
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sp[r] + 16 + 4 * d)));
        const __m256 sf = _mm256_cvtph_ps(s);
        for (int m = 0; m < MT; ++m)
          accf[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][m][d]), sf, accf[r][m]);
      }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) raw[r * M + m0 + m] = hsum8(accf[r][m]);
}

// ---- many tokens: decoded panels (int4, mxfp4) ----------------------------------------------
// The tiles above decode a row's codes again for every 1-4 tokens they run. From kPanelTokens
// tokens on, a chunk of 1, 2 or 4 rows (32 groups / 8 blocks) is decoded once into vectors whose
// dwords each hold 4 codes of one group / block, and every token then runs over them: the
// integer step is a load and a vpdpbusd. Each (row, token) gets the same int32 group / block
// sums as in the tiles, and the same float operations in the same order (per chunk, the 4
// vectors of 8 groups, or the 8 blocks, one FMA each, then hsum8): results are the tiles' bit
// for bit, so a token's product does not depend on how many tokens share the call.
constexpr int kPanelTokens = 4;
// The panel bodies are inlined into their wrappers, so that avx2-vnni's (i4_panel4, mx_panel4)
// compile them with AVX-512VL's 32 ymm registers: 4 rows x 4 tokens of accumulators.
#define LAZYMOE_INLINE __attribute__((always_inline)) inline
// From 32 tokens: at 8-16 the 4-row panels ran slower than 2 rows (bench_native, BUILD_NOTES
// "session 20"); at 32-64 faster (the activations of a token block are then read from L2).
constexpr int kPanel4Tokens = 32;
// tokens a step: R x 4 accumulators, R weight vectors and 1 of x (R = 2: 11 ymm, no spills in
// AVX2's 16; R = 4: 21, in AVX-512VL's 32)
constexpr int kPanelMT = 4;

// Dwords of 4 vectors, each [block 2k: dwords s0..s3 | block 2k + 1: s0..s3] (k = 0..3), to 4
// vectors of one s each whose 8 dwords are the 8 blocks in kMxPerm order.
TGT2 inline void transpose_blocks(const __m256i u[4], __m256i* out) {
  const __m256i t0 = _mm256_unpacklo_epi32(u[0], u[1]), t1 = _mm256_unpacklo_epi32(u[2], u[3]);
  const __m256i t2 = _mm256_unpackhi_epi32(u[0], u[1]), t3 = _mm256_unpackhi_epi32(u[2], u[3]);
  out[0] = _mm256_unpacklo_epi64(t0, t1);
  out[1] = _mm256_unpackhi_epi64(t0, t1);
  out[2] = _mm256_unpacklo_epi64(t2, t3);
  out[3] = _mm256_unpackhi_epi64(t2, t3);
}

// mxfp4 activation codes in the panel's order: per 8 blocks, for s = 0..7, the dword of
// columns 4s..4s+3 of each block (kMxPerm order), from Act's even / odd column codes.
TGT2 void mx_panel_form(const Act& a, int M, Avx2Form& p) {
  const int64_t nb8 = a.ldq / 32;  // Act pads to whole steps of 8 blocks
  p.ldx = nb8 * 32;
  p.qx.assign(size_t(M) * p.ldx, 0);
  for (int m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb8; b += 8) {
      __m256i lo[4], hi[4];
      for (int k = 0; k < 4; ++k) {
        const int8_t* q = a.q.data() + m * a.ldq + (b / 4) * 128 + (k >> 1) * 128 + (k & 1) * 32;
        const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
        const __m256i od = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64));
        lo[k] = _mm256_unpacklo_epi8(e, od);  // columns 0..15 of blocks 2k | 2k + 1
        hi[k] = _mm256_unpackhi_epi8(e, od);  // columns 16..31
      }
      __m256i* out = reinterpret_cast<__m256i*>(p.qx.data() + m * p.ldx + b * 32);
      __m256i v[8];
      transpose_blocks(lo, v);
      transpose_blocks(hi, v + 4);
      for (int s = 0; s < 8; ++s) _mm256_storeu_si256(out + s, v[s]);
    }
}

template <int R, int MT, bool VNNI>
TGT2 LAZYMOE_INLINE void i4_panel_step(const __m256i* pan, const __m256* sf, const Avx2Form& p,
                               int G, int64_t g, int m0, float* accf, int M) {
  for (int d = 0; d < 4; ++d) {
    __m256i acc[R][MT];
    for (int m = 0; m < MT; ++m) {
      const __m256i init = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(p.init.data() + (m0 + m) * p.ldi + g + 8 * d));
      for (int r = 0; r < R; ++r) acc[r][m] = init;
    }
    const int8_t* q0 = p.q.data() + m0 * p.ldq + (g + 8 * d) * 4;
    for (int jp = 0; jp < G / 4; ++jp) {
      __m256i wv[R];
      for (int r = 0; r < R; ++r) wv[r] = _mm256_load_si256(pan + (r * (G / 4) + jp) * 4 + d);
      for (int m = 0; m < MT; ++m) {
        const __m256i xv = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(q0 + m * p.ldq + jp * p.ldi * 4));
        for (int r = 0; r < R; ++r) acc[r][m] = dot_u8s8<VNNI>(acc[r][m], wv[r], xv);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) {
        float* f = accf + (r * M + m0 + m) * 8;
        _mm256_storeu_ps(f, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][m]), sf[r * 4 + d],
                                            _mm256_loadu_ps(f)));
      }
  }
}

// int4, rows o..o+R-1, all M tokens: raw[r * M + m] as i4_tile2 leaves it. accf: R * M * 8.
template <int R, bool VNNI>
TGT2 LAZYMOE_INLINE void i4_panel_body(const Weight& w, const Act& a, const Avx2Form& p, int64_t o,
                                       float* raw, int M, float* accf) {
  const I4Rows<R> ir(w, a, o);
  const int G = ir.G;
  const int64_t n = ir.n, ahead = ir.ahead;
  std::fill(accf, accf + size_t(R) * M * 8, 0.0f);
  alignas(32) __m256i pan[R * 32 * 4];  // [R][G/4][4], G <= 128
  __m256 sf[R * 4];
  std::vector<uint8_t> tw[R];
  for (int64_t g = 0; g < n; g += 32) {
    for (int r = 0; r < R; ++r) {  // decode as i4_tile2 does, once for every token
      int64_t ld;
      alignas(32) uint16_t ts[32];
      const uint16_t* sp;
      const uint8_t* wp = ir.chunk(r, g, tw[r], ts, &ld, &sp);
      for (int jp = 0; jp < G / 4; ++jp) {
        const uint8_t* pj = wp + (2 * jp) * ld;
        pf(pj + ahead);
        pf(pj + ld + ahead);
        i4_unpack(pj, ld, pan + (r * (G / 4) + jp) * 4);
      }
      for (int d = 0; d < 4; ++d)
        sf[r * 4 + d] = _mm256_cvtph_ps(_mm_unpacklo_epi64(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sp + 4 * d)),
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sp + 16 + 4 * d))));
    }
    for (int m0 = 0; m0 < M; m0 += kPanelMT) {
      switch (std::min(kPanelMT, M - m0)) {
        case 1: i4_panel_step<R, 1, VNNI>(pan, sf, p, G, g, m0, accf, M); break;
        case 2: i4_panel_step<R, 2, VNNI>(pan, sf, p, G, g, m0, accf, M); break;
        case 3: i4_panel_step<R, 3, VNNI>(pan, sf, p, G, g, m0, accf, M); break;
        default: i4_panel_step<R, 4, VNNI>(pan, sf, p, G, g, m0, accf, M); break;
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) raw[r * M + m] = hsum8(_mm256_loadu_ps(accf + (r * M + m) * 8));
}

template <int R, int MT, bool VNNI>
TGT2 LAZYMOE_INLINE void mx_panel_step(const __m256i* pan, const __m256* sv, const Avx2Form& p,
                               int64_t b, int m0, float* accf, int M) {
  __m256i acc[R][MT];
  for (int m = 0; m < MT; ++m) {
    const __m256i init = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(p.init.data() + (m0 + m) * p.ldi + b));
    for (int r = 0; r < R; ++r) acc[r][m] = init;
  }
  const int8_t* x0 = p.qx.data() + m0 * p.ldx + b * 32;
  for (int s = 0; s < 8; ++s) {
    __m256i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm256_load_si256(pan + r * 8 + s);
    for (int m = 0; m < MT; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x0 + m * p.ldx + s * 32));
      for (int r = 0; r < R; ++r) acc[r][m] = dot_u8s8<VNNI>(acc[r][m], wv[r], xv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      float* f = accf + (r * M + m0 + m) * 8;
      _mm256_storeu_ps(f, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][m]), sv[r], _mm256_loadu_ps(f)));
    }
}

// mxfp4, rows o..o+R-1, all M tokens: raw[r * M + m] as mx_tile2 leaves it. accf: R * M * 8.
template <int R, bool VNNI>
TGT2 LAZYMOE_INLINE void mx_panel_body(const Weight& w, const Act& a, const Avx2Form& p, int64_t o,
                                       float* raw, int M, float* accf) {
  const MxRows<R> mr(w, a, o);
  const int64_t nb = mr.nb;
  const __m256i lut = _mm256_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0,
                                       12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  std::fill(accf, accf + size_t(R) * M * 8, 0.0f);
  alignas(32) __m256i pan[R * 8];
  alignas(32) uint8_t tw[R][128], ts[R][16];
  for (int64_t b = 0; b < nb; b += 8) {
    __m256 sv[R];
    for (int r = 0; r < R; ++r) {  // decode as mx_tile2 does, once for every token
      const uint8_t* wp = mr.chunk(r, b, tw[r], ts[r], &sv[r]);
      __m256i lo[4], hi[4];
      for (int k = 0; k < 4; ++k) {
        const __m256i raw8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32 * k));
        const __m256i wl = _mm256_shuffle_epi8(lut, _mm256_and_si256(raw8, low4));
        const __m256i wh = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(raw8, 4), low4));
        lo[k] = _mm256_unpacklo_epi8(wl, wh);
        hi[k] = _mm256_unpackhi_epi8(wl, wh);
      }
      __m256i v[8];
      transpose_blocks(lo, v);
      transpose_blocks(hi, v + 4);
      for (int s = 0; s < 8; ++s) _mm256_store_si256(pan + r * 8 + s, v[s]);
    }
    for (int m0 = 0; m0 < M; m0 += kPanelMT) {
      switch (std::min(kPanelMT, M - m0)) {
        case 1: mx_panel_step<R, 1, VNNI>(pan, sv, p, b, m0, accf, M); break;
        case 2: mx_panel_step<R, 2, VNNI>(pan, sv, p, b, m0, accf, M); break;
        case 3: mx_panel_step<R, 3, VNNI>(pan, sv, p, b, m0, accf, M); break;
        default: mx_panel_step<R, 4, VNNI>(pan, sv, p, b, m0, accf, M); break;
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) raw[r * M + m] = hsum8(_mm256_loadu_ps(accf + (r * M + m) * 8));
}

// The panels as calls of their own (1-2 rows; rows_avx2 would otherwise carry their buffers
// in its own frame).
template <int R, bool VNNI>
TGT2 __attribute__((noinline)) void i4_panel(const Weight& w, const Act& a, const Avx2Form& p,
                                             int64_t o, float* raw, int M, float* accf) {
  i4_panel_body<R, VNNI>(w, a, p, o, raw, M, accf);
}
template <int R, bool VNNI>
TGT2 __attribute__((noinline)) void mx_panel(const Weight& w, const Act& a, const Avx2Form& p,
                                             int64_t o, float* raw, int M, float* accf) {
  mx_panel_body<R, VNNI>(w, a, p, o, raw, M, accf);
}

// A panel call's buffers, kept per thread (slot: which buffer of a type): a call takes
// ~10 us, and allocating and zeroing its 20-100 KB each time cost a visible share of it.
template <typename T, int Slot>
T* scratch(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// ---- many tokens, float32 / bf16 weights: float panels (avx2-vnni, zmm) ------------------------
// The float tiles above reload 1-4 whole activation rows (4 B a column) for every 2-4 weight
// rows: at 64 tokens of a 4096-column product, ~80 KB a tile from L2, at a third of the FMA
// peak. From kPanelTokens tokens on, the avx2-vnni variant (whose CPUs have AVX-512F) runs the
// product as a blocked matrix product in zmm registers (32 of them):
// - a chunk of kFpK columns of every row of the call is decoded once into float32 pairs of
//   rows, pan[pair][8 columns][row 2p: 8 | row 2p + 1: 8];
// - the activations come by chunk, contiguous (Avx2Form::xc, prepare()); a block of kFpTB
//   tokens' chunk (24 KB) stays in L1 while every group of 4 row pairs (an 8 KB slice of the
//   panel, also in L1) runs over it in register tiles of 4 pairs x kFpMT tokens;
// - the accumulators are kept in memory (accf) between chunks.
// Each zmm half is one (row, token) accumulator of float_tile2 over the same columns in the
// same order, reduced by the same hsum8 and the same scalar tail: results equal the tiles' bit
// for bit, on either side of the threshold and on plain AVX2. The rows a call gets matter (the
// activations are read once per chunk for all of them): the callers give calls of at least
// 32 rows (rows_align).
#define TGTZ __attribute__((target("avx2,fma,f16c,avx512f,avx512vl")))
// Full unrolling of the register tiles' fixed loops: without it gcc 12 keeps the accumulator
// arrays on the stack (a load and a store around every FMA / vpdpwssd).
#define LAZYMOE_UNROLL _Pragma("GCC unroll 8")
constexpr int kFpMT = 6;       // tokens a register tile (4 pairs x 6 tokens: 24 zmm)
constexpr int kFpTB = 24;      // tokens a block (their chunk of activations: 24 KB)
constexpr int64_t kFpK = 256;  // columns a chunk

// Whether rows() takes the float panels (and prepare() builds Avx2Form::xc for them).
inline bool float_panels_for(int isa, int enc, int64_t tokens) {
  return isa == kAvx2Vnni && (enc == kF32 || enc == kBF16) && tokens >= kPanelTokens;
}

template <int RP, int MT>
TGTZ void float_panel_tile(const float* pan, int64_t n8, const float* xc, float* accf,
                           int64_t ldacc, bool first) {
  __m512 acc[RP][MT];
LAZYMOE_UNROLL
  for (int p = 0; p < RP; ++p)
LAZYMOE_UNROLL
    for (int m = 0; m < MT; ++m)
      acc[p][m] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(accf + p * ldacc + m * 16);
  for (int64_t s = 0; s < n8; ++s) {
    __m512 wv[RP];
LAZYMOE_UNROLL
    for (int p = 0; p < RP; ++p) wv[p] = _mm512_loadu_ps(pan + (p * (kFpK / 8) + s) * 16);
LAZYMOE_UNROLL
    for (int m = 0; m < MT; ++m) {
      const __m512 xv = _mm512_castpd_ps(  // vbroadcastf64x4: one load (AVX512F, not DQ)
          _mm512_broadcast_f64x4(_mm256_loadu_pd(reinterpret_cast<const double*>(xc + m * kFpK + s * 8))));
LAZYMOE_UNROLL
      for (int p = 0; p < RP; ++p) acc[p][m] = _mm512_fmadd_ps(wv[p], xv, acc[p][m]);
    }
  }
LAZYMOE_UNROLL
  for (int p = 0; p < RP; ++p)
LAZYMOE_UNROLL
    for (int m = 0; m < MT; ++m) _mm512_storeu_ps(accf + p * ldacc + m * 16, acc[p][m]);
}

template <int RP>
TGTZ void float_panel_tokens(int mt, const float* pan, int64_t n8, const float* xc, float* accf,
                             int64_t ldacc, bool first) {
#define LAZYMOE_FP(MT) float_panel_tile<RP, MT>(pan, n8, xc, accf, ldacc, first)
  switch (mt) {
    case 1: LAZYMOE_FP(1); break;
    case 2: LAZYMOE_FP(2); break;
    case 3: LAZYMOE_FP(3); break;
    case 4: LAZYMOE_FP(4); break;
    case 5: LAZYMOE_FP(5); break;
    default: LAZYMOE_FP(6); break;
  }
#undef LAZYMOE_FP
}

// The activations by column chunk: xc[chunk][token][kFpK] (zero padded), so that a block of
// tokens' chunk is one contiguous piece. Read in place, rows of a power-of-two width (4096 x
// 4 B) fall in the same few L1 sets and evict each other.
void float_panel_form(const Act& a, Avx2Form& p) {
  const int M = a.tokens;
  const int64_t cv = a.cn / 8 * 8, nch = (cv + kFpK - 1) / kFpK;
  p.xc.assign(size_t(nch) * M * kFpK, 0.0f);
  for (int64_t ch = 0; ch < nch; ++ch) {
    const int64_t c0 = ch * kFpK, n = std::min<int64_t>(kFpK, cv - c0);
    for (int m = 0; m < M; ++m)
      std::memcpy(p.xc.data() + (size_t(ch) * M + m) * kFpK, a.xf + m * a.ldf + c0, n * 4);
  }
}

// Rows r0..r1 of a float32 (KIND 0) or bf16 (KIND 1) weight, all tokens, into y (rows_avx2's
// many-token float path on the avx2-vnni variant).
template <int KIND>
TGTZ void float_panels(const Weight& w, const Act& a, int64_t r0, int64_t r1, float* y,
                       int64_t ldy) {
  constexpr int64_t kEl = KIND == 1 ? 2 : 4;
  const int M = a.tokens;
  const int64_t R = r1 - r0, NP = (R + 1) / 2;
  const int64_t cn = a.cn, cv = cn / 8 * 8;
  const char* base = static_cast<const char*>(w.w);
  float* pan = scratch<float, 0>(size_t(NP) * kFpK * 2);
  float* accf = scratch<float, 1>(size_t(NP) * M * 16);  // [pair][token][16], set by chunk 0
  const int64_t ldacc = int64_t(M) * 16;
  for (int64_t c0 = 0; c0 < cv; c0 += kFpK) {
    const int64_t n8 = std::min<int64_t>(kFpK, cv - c0) / 8;
    for (int64_t p = 0; p < NP; ++p) {  // pair p: rows r0 + 2p, r0 + 2p + 1 (zeros past r1)
      const char* ra = base + ((r0 + 2 * p) * w.cols + a.c0 + c0) * kEl;
      const bool two = 2 * p + 1 < R;
      const char* rb = ra + w.cols * kEl;
      float* dst = pan + p * kFpK * 2;
      for (int64_t s = 0; s < n8; ++s) {
        _mm256_storeu_ps(dst + s * 16, load8f<KIND>(ra, s * 8));
        _mm256_storeu_ps(dst + s * 16 + 8, two ? load8f<KIND>(rb, s * 8) : _mm256_setzero_ps());
      }
    }
    const float* xch = a.avx2.xc.data() + size_t(c0 / kFpK) * M * kFpK;
    for (int tb = 0; tb < M; tb += kFpTB) {
      const int tn = std::min(kFpTB, M - tb);
      for (int64_t p0 = 0; p0 < NP; p0 += 4) {
        const int rp = int(std::min<int64_t>(4, NP - p0));
        for (int m0 = tb; m0 < tb + tn; m0 += kFpMT) {
          const int mt = std::min(kFpMT, tb + tn - m0);
          const float* pp = pan + p0 * kFpK * 2;
          const float* xm = xch + size_t(m0) * kFpK;
          float* am = accf + p0 * ldacc + m0 * 16;
          switch (rp) {
            case 1: float_panel_tokens<1>(mt, pp, n8, xm, am, ldacc, c0 == 0); break;
            case 2: float_panel_tokens<2>(mt, pp, n8, xm, am, ldacc, c0 == 0); break;
            case 3: float_panel_tokens<3>(mt, pp, n8, xm, am, ldacc, c0 == 0); break;
            default: float_panel_tokens<4>(mt, pp, n8, xm, am, ldacc, c0 == 0); break;
          }
        }
      }
    }
  }
  // reduce each half as float_tile2 does: hsum8, then the scalar tail
  for (int64_t r = 0; r < R; ++r) {
    const char* row = base + ((r0 + r) * w.cols + a.c0) * kEl;
    for (int m = 0; m < M; ++m) {
      float s = cv ? hsum8(_mm256_loadu_ps(accf + (r / 2) * ldacc + m * 16 + (r & 1) * 8))
                   : 0.0f;
      const float* xm = a.xf + m * a.ldf;
      for (int64_t c = cv; c < cn; ++c)
        s += (KIND == 1 ? bf16_to_f32(reinterpret_cast<const uint16_t*>(row)[c])
                        : reinterpret_cast<const float*>(row)[c]) * xm[c];
      y[m * ldy + r] = s;
    }
  }
}

// ---- many tokens, int8 weights: int8 panels (avx2-vnni, zmm) ----------------------------------
// The same blocked product as the float panels, in integers: a chunk of kI8K columns of every
// row of the call is widened once to int16 row pairs, pan[pair][16 columns][row 2p: 16 | row
// 2p + 1: 16]; the int16 activations (int16_form) come by chunk, contiguous (Avx2Form::xc16);
// a block of kI8TB tokens' chunk (12 KB) stays in L1 while groups of 4 row pairs run over it in
// register tiles of 4 pairs x kI8MT tokens of vpdpwssd (zmm: 16 int16 of one row, 8 pairs, a
// half). The int32 lanes are folded into int64 totals every kI8Fold columns, as i8w_tile2
// folds its 2048-column blocks, so no lane can overflow (2048 / 8 = 256 products a lane, each
// |w x| <= 127 x 32767: < 2^30). Integer sums do not depend on their order: the totals, and so
// the results, equal the tiles' bit for bit.
#define TGTZI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))
constexpr int kI8MT = 6;          // tokens a register tile (4 pairs x 6 tokens: 24 zmm)
constexpr int kI8TB = 24;         // tokens a block (their chunk of int16 activations: 12 KB)
constexpr int64_t kI8K = 256;     // columns a chunk
constexpr int64_t kI8Fold = 2048; // columns between folds of the int32 lanes
// From 8 tokens: at 4 the panels' widening pass costs more than the 2 x 4 tiles' reuse of
// each weight load (bench_native moe_ffn, BUILD_NOTES "session 19"); 8 runs the same.
constexpr int kI8PanelTokens = 8;

// Whether rows() takes the int8 or float panels (and prepare() builds their activation form).
inline bool zmm_panels_for(int isa, int enc, int64_t tokens) {
  return float_panels_for(isa, enc, tokens) ||
         (isa == kAvx2Vnni && enc == kI8 && tokens >= kI8PanelTokens);
}

template <int RP, int MT>
TGTZI void int8_panel_tile(const int16_t* pan, int64_t n16, const int16_t* xc, int32_t* acc32,
                           int64_t ldacc, bool first) {
  __m512i acc[RP][MT];
LAZYMOE_UNROLL
  for (int p = 0; p < RP; ++p)
LAZYMOE_UNROLL
    for (int m = 0; m < MT; ++m)
      acc[p][m] = first ? _mm512_setzero_si512() : _mm512_loadu_si512(acc32 + p * ldacc + m * 16);
  for (int64_t s = 0; s < n16; ++s) {
    __m512i wv[RP];
LAZYMOE_UNROLL
    for (int p = 0; p < RP; ++p) wv[p] = _mm512_loadu_si512(pan + (p * (kI8K / 16) + s) * 32);
LAZYMOE_UNROLL
    for (int m = 0; m < MT; ++m) {
      const __m512i xv = _mm512_broadcast_i64x4(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + m * kI8K + s * 16)));
      // inline asm, as madd16: with the intrinsic gcc 12 copies every accumulator through
      // another register and the stack each step (2x slower)
LAZYMOE_UNROLL
      for (int p = 0; p < RP; ++p) asm("vpdpwssd %2, %1, %0" : "+v"(acc[p][m]) : "v"(wv[p]), "v"(xv));
    }
  }
LAZYMOE_UNROLL
  for (int p = 0; p < RP; ++p)
LAZYMOE_UNROLL
    for (int m = 0; m < MT; ++m) _mm512_storeu_si512(acc32 + p * ldacc + m * 16, acc[p][m]);
}

template <int RP>
TGTZI void int8_panel_tokens(int mt, const int16_t* pan, int64_t n16, const int16_t* xc,
                             int32_t* acc32, int64_t ldacc, bool first) {
#define LAZYMOE_IP(MT) int8_panel_tile<RP, MT>(pan, n16, xc, acc32, ldacc, first)
  switch (mt) {
    case 1: LAZYMOE_IP(1); break;
    case 2: LAZYMOE_IP(2); break;
    case 3: LAZYMOE_IP(3); break;
    case 4: LAZYMOE_IP(4); break;
    case 5: LAZYMOE_IP(5); break;
    default: LAZYMOE_IP(6); break;
  }
#undef LAZYMOE_IP
}

// The int16 activations by column chunk: xc16[chunk][token][kI8K] (zero padded).
void int8_panel_form(const Act& a, Avx2Form& p) {
  const int M = a.tokens;
  const int64_t cv = a.cn / 16 * 16, nch = (cv + kI8K - 1) / kI8K;
  p.xc16.assign(size_t(nch) * M * kI8K, 0);
  for (int64_t ch = 0; ch < nch; ++ch) {
    const int64_t c0 = ch * kI8K, n = std::min<int64_t>(kI8K, cv - c0);
    for (int m = 0; m < M; ++m)
      std::memcpy(p.xc16.data() + (size_t(ch) * M + m) * kI8K, p.q16.data() + m * p.ld16 + c0, n * 2);
  }
}

// Rows r0..r1 of an int8 weight, all tokens, into y (rows_avx2's many-token int8 path on the
// avx2-vnni variant).
TGTZI void int8_panels(const Weight& w, const Act& a, int64_t r0, int64_t r1, float* y,
                       int64_t ldy) {
  const int M = a.tokens;
  const int64_t R = r1 - r0, NP = (R + 1) / 2;
  const int64_t cn = a.cn, cv = cn / 16 * 16;
  const int8_t* base = static_cast<const int8_t*>(w.w);
  const Avx2Form& pa = a.avx2;
  int16_t* pan = scratch<int16_t, 0>(size_t(NP) * kI8K * 2);
  int32_t* acc32 = scratch<int32_t, 0>(size_t(NP) * M * 16);  // [pair][token][16] (first)
  int64_t* tot = scratch<int64_t, 0>(size_t(R) * M);          // [row][token]
  std::fill(tot, tot + size_t(R) * M, int64_t(0));
  const int64_t ldacc = int64_t(M) * 16;
  for (int64_t c0 = 0; c0 < cv; c0 += kI8K) {
    const int64_t n16 = std::min<int64_t>(kI8K, cv - c0) / 16;
    for (int64_t p = 0; p < NP; ++p) {  // pair p: rows r0 + 2p, r0 + 2p + 1 (zeros past r1)
      const int8_t* ra = base + (r0 + 2 * p) * w.cols + a.c0 + c0;
      const bool two = 2 * p + 1 < R;
      int16_t* dst = pan + p * kI8K * 2;
      if (c0 + kI8K < cv)  // the pair's next chunk, into L2 (the rows are 128+ streams)
        for (int64_t b = 0; b < kI8K; b += 64) {
          pf(ra + kI8K + b);
          if (two) pf(ra + w.cols + kI8K + b);
        }
      for (int64_t s = 0; s < n16; ++s) {
        const __m256i va = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ra + s * 16)));
        const __m256i vb = two ? _mm256_cvtepi8_epi16(_mm_loadu_si128(
                                     reinterpret_cast<const __m128i*>(ra + w.cols + s * 16)))
                               : _mm256_setzero_si256();
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + s * 32), va);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + s * 32 + 16), vb);
      }
    }
    const bool first = c0 % kI8Fold == 0;
    const int16_t* xch = pa.xc16.data() + size_t(c0 / kI8K) * M * kI8K;
    for (int tb = 0; tb < M; tb += kI8TB) {
      const int tn = std::min(kI8TB, M - tb);
      for (int64_t p0 = 0; p0 < NP; p0 += 4) {
        const int rp = int(std::min<int64_t>(4, NP - p0));
        for (int m0 = tb; m0 < tb + tn; m0 += kI8MT) {
          const int mt = std::min(kI8MT, tb + tn - m0);
          const int16_t* pp = pan + p0 * kI8K * 2;
          const int16_t* xm = xch + size_t(m0) * kI8K;
          int32_t* am = acc32 + p0 * ldacc + m0 * 16;
          switch (rp) {
            case 1: int8_panel_tokens<1>(mt, pp, n16, xm, am, ldacc, first); break;
            case 2: int8_panel_tokens<2>(mt, pp, n16, xm, am, ldacc, first); break;
            case 3: int8_panel_tokens<3>(mt, pp, n16, xm, am, ldacc, first); break;
            default: int8_panel_tokens<4>(mt, pp, n16, xm, am, ldacc, first); break;
          }
        }
      }
    }
    if ((c0 + kI8K) % kI8Fold == 0 || c0 + kI8K >= cv)  // fold the lanes into the totals
      for (int64_t r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) {
          const int32_t* l = acc32 + (r / 2) * ldacc + m * 16 + (r & 1) * 8;
          int64_t s = 0;
          for (int k = 0; k < 8; ++k) s += l[k];
          tot[r * M + m] += s;
        }
  }
  const float* sw = static_cast<const float*>(w.scale);
  for (int64_t r = 0; r < R; ++r) {
    const int8_t* row = base + (r0 + r) * w.cols + a.c0;
    for (int m = 0; m < M; ++m) {
      int64_t t = tot[r * M + m];
      const int16_t* xm = pa.q16.data() + m * pa.ld16;
      for (int64_t c = cv; c < cn; ++c) t += int32_t(row[c]) * int32_t(xm[c]);
      y[m * ldy + r] = (pa.s16[m] * float(t)) * sw[r0 + r];
    }
  }
}

// ---- one token, int4 / mxfp4 weights: row pairs in zmm (avx2-vnni) ----------------------------
// The ymm tiles of one token (i4_tile2<2, 1>, mx_tile2<2, 1>) need more than AVX2's 16
// registers and spill their accumulators; and every decode op covers 64 weights. The avx2-vnni
// variant (AVX-512 F / BW / VL / VNNI) runs 2 row pairs at a time in zmm: each pair of rows sits
// in one register, row 2p in the low 256 bits and row 2p + 1 in the high, so one decode op
// covers both rows, the activation vector is broadcast to both halves by its load, and the 32
// zmm registers hold every accumulator. Every ymm operation of the tiles (the unpacks and
// vpshufb work within 128-bit lanes) is done on each half as the tile does it on its row, in
// the same order, so the results are the tiles' bit for bit (and avx2 / avx2-vnni stay equal).
#define TGTZB __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))

// The int4 / mxfp4 panels of 4 rows, with 32 registers (avx2-vnni): each activation load then
// feeds 4 rows, and each token block's activations are read once for 4 rows, not 2.
TGTZB void i4_panel4(const Weight& w, const Act& a, const Avx2Form& p, int64_t o, float* raw,
                     int M, float* accf) {
  i4_panel_body<4, true>(w, a, p, o, raw, M, accf);
}
TGTZB void mx_panel4(const Weight& w, const Act& a, const Avx2Form& p, int64_t o, float* raw,
                     int M, float* accf) {
  mx_panel_body<4, true>(w, a, p, o, raw, M, accf);
}

TGTZB inline __m512i pair_load(const uint8_t* lo, const uint8_t* hi) {
  return _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo))),
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi)), 1);
}

TGTZB inline __m512i bcast256(const void* p) {
  return _mm512_broadcast_i64x4(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
}

// The two halves' hsum8, as hsum8 of each row's ymm.
TGTZB inline void pair_hsum(__m512 v, float* lo, float* hi) {
  *lo = hsum8(_mm512_castps512_ps256(v));
  *hi = hsum8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

// int4, one token, rows o..o+2 PR-1 (PR row pairs) as i4_tile2<2 PR, 1> computes them.
template <int PR>
TGTZB void i4_pairs(const Weight& w, const Act& a, const Avx2Form& p, int64_t o, int m0,
                    float* raw, int M) {
  constexpr int R = 2 * PR;
  const I4Rows<R> ir(w, a, o);
  const int G = ir.G;
  const int64_t n = ir.n, ahead = ir.ahead;
  const __m512i nib = _mm512_set1_epi8(0x0f), flip = _mm512_set1_epi8(char(0x80));
  __m512 accf[PR];
LAZYMOE_UNROLL
  for (int q = 0; q < PR; ++q) accf[q] = _mm512_setzero_ps();
  std::vector<uint8_t> tw[R];
  const int8_t* xq = p.q.data() + m0 * p.ldq;
  const int32_t* xi = p.init.data() + m0 * p.ldi;
  for (int64_t g = 0; g < n; g += 32) {
    const uint8_t* wp[R];
    int64_t ld[R];
    alignas(32) uint16_t ts[R][32];
    const uint16_t* sp[R];
    for (int r = 0; r < R; ++r) wp[r] = ir.chunk(r, g, tw[r], ts[r], &ld[r], &sp[r]);
    __m512i acc[PR][4];
LAZYMOE_UNROLL
    for (int d = 0; d < 4; ++d) {
      const __m512i init = bcast256(xi + g + 8 * d);
LAZYMOE_UNROLL
      for (int q = 0; q < PR; ++q) acc[q][d] = init;
    }
    const bool fetch = !(g & 32);  // chunks g, g + 32 share each nibble row's cache line
    for (int jp = 0; jp < G / 4; ++jp) {
      const int8_t* xv = xq + (jp * p.ldi + g) * 4;
      __m512i x[4];
LAZYMOE_UNROLL
      for (int d = 0; d < 4; ++d) x[d] = bcast256(xv + 32 * d);
LAZYMOE_UNROLL
      for (int q = 0; q < PR; ++q) {
        const uint8_t* pa = wp[2 * q] + (2 * jp) * ld[2 * q];
        const uint8_t* pb = wp[2 * q + 1] + (2 * jp) * ld[2 * q + 1];
        if (fetch) {
          pf(pa + ahead);
          pf(pa + ld[2 * q] + ahead);
          pf(pb + ahead);
          pf(pb + ld[2 * q + 1] + ahead);
        }
        const __m512i y0 = _mm512_xor_si512(pair_load(pa, pb), flip);
        const __m512i y1 = _mm512_xor_si512(pair_load(pa + ld[2 * q], pb + ld[2 * q + 1]), flip);
        const __m512i l0 = _mm512_and_si512(y0, nib), h0 = _mm512_and_si512(_mm512_srli_epi16(y0, 4), nib);
        const __m512i l1 = _mm512_and_si512(y1, nib), h1 = _mm512_and_si512(_mm512_srli_epi16(y1, 4), nib);
        const __m512i a0 = _mm512_unpacklo_epi8(l0, h0), b0 = _mm512_unpackhi_epi8(l0, h0);
        const __m512i a1 = _mm512_unpacklo_epi8(l1, h1), b1 = _mm512_unpackhi_epi8(l1, h1);
        acc[q][0] = _mm512_dpbusd_epi32(acc[q][0], _mm512_unpacklo_epi16(a0, a1), x[0]);
        acc[q][1] = _mm512_dpbusd_epi32(acc[q][1], _mm512_unpackhi_epi16(a0, a1), x[1]);
        acc[q][2] = _mm512_dpbusd_epi32(acc[q][2], _mm512_unpacklo_epi16(b0, b1), x[2]);
        acc[q][3] = _mm512_dpbusd_epi32(acc[q][3], _mm512_unpackhi_epi16(b0, b1), x[3]);
      }
    }
LAZYMOE_UNROLL
    for (int q = 0; q < PR; ++q)
LAZYMOE_UNROLL
      for (int d = 0; d < 4; ++d) {  // scales of groups 4d..4d+3 and 16+4d..16+4d+3, both rows
        const uint16_t* sa = sp[2 * q];
        const uint16_t* sb = sp[2 * q + 1];
        const __m128i s0 = _mm_unpacklo_epi64(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sa + 4 * d)),
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sa + 16 + 4 * d)));
        const __m128i s1 = _mm_unpacklo_epi64(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sb + 4 * d)),
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sb + 16 + 4 * d)));
        const __m512 sf = _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(s0), s1, 1));
        accf[q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[q][d]), sf, accf[q]);
      }
  }
  for (int q = 0; q < PR; ++q)
    pair_hsum(accf[q], &raw[(2 * q) * M + m0], &raw[(2 * q + 1) * M + m0]);
}

// vphaddd of each 128-bit lane, which AVX-512 lacks: [a0+a1, a2+a3, b0+b1, b2+b3] per lane.
TGTZB inline __m512i hadd_lanes(__m512i a, __m512i b) {
  const __m512 fa = _mm512_castsi512_ps(a), fb = _mm512_castsi512_ps(b);
  return _mm512_add_epi32(_mm512_castps_si512(_mm512_shuffle_ps(fa, fb, _MM_SHUFFLE(2, 0, 2, 0))),
                          _mm512_castps_si512(_mm512_shuffle_ps(fa, fb, _MM_SHUFFLE(3, 1, 3, 1))));
}

// mxfp4, one token: PR row pairs as mx_tile2<2 PR, 1> computes them (VNNI).
template <int PR>
TGTZB void mx_pairs(const Weight& w, const Act& a, const Avx2Form& p, int64_t o, int m0,
                    float* raw, int M) {
  constexpr int R = 2 * PR;
  const MxRows<R> mr(w, a, o);
  const int64_t nb = mr.nb;
  const __m512i lut = _mm512_broadcast_i32x4(
      _mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  __m512 accf[PR];
LAZYMOE_UNROLL
  for (int q = 0; q < PR; ++q) accf[q] = _mm512_setzero_ps();
  alignas(32) uint8_t tw[R][128], ts[R][16];
  const int8_t* xq = a.q.data() + m0 * a.ldq;
  const int32_t* xi = p.init.data() + m0 * p.ldi;
  for (int64_t b = 0; b < nb; b += 8) {
    __m256 sv[R];
    const uint8_t* wp[R];
    for (int r = 0; r < R; ++r) wp[r] = mr.chunk(r, b, tw[r], ts[r], &sv[r]);
    __m512i h01[PR], h2[PR];
LAZYMOE_UNROLL
    for (int k = 0; k < 4; ++k) {
      const int64_t off = (b / 4) * 128 + (k >> 1) * 128 + (k & 1) * 32;
      const __m512i xe = bcast256(xq + off), xo = bcast256(xq + off + 64);
LAZYMOE_UNROLL
      for (int q = 0; q < PR; ++q) {
        const __m512i raw8 = pair_load(wp[2 * q] + 32 * k, wp[2 * q + 1] + 32 * k);
        const __m512i wl = _mm512_shuffle_epi8(lut, _mm512_and_si512(raw8, low4));
        const __m512i wh = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(raw8, 4), low4));
        const __m512i pk =
            _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wl, xe), wh, xo);
        if (k == 0) h01[q] = pk;
        else if (k == 1) h01[q] = hadd_lanes(h01[q], pk);
        else if (k == 2) h2[q] = pk;
        else h01[q] = hadd_lanes(h01[q], hadd_lanes(h2[q], pk));
      }
    }
    const __m512i init = bcast256(xi + b);
LAZYMOE_UNROLL
    for (int q = 0; q < PR; ++q) {
      const __m512 s = _mm512_castpd_ps(_mm512_insertf64x4(
          _mm512_castpd256_pd512(_mm256_castps_pd(sv[2 * q])), _mm256_castps_pd(sv[2 * q + 1]), 1));
      accf[q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(h01[q], init)), s, accf[q]);
    }
  }
  for (int q = 0; q < PR; ++q)
    pair_hsum(accf[q], &raw[(2 * q) * M + m0], &raw[(2 * q + 1) * M + m0]);
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

// VNNI (kAvx2Vnni): the int4 / mxfp4 tiles take vpdpbusd, the int8 ones vpdpwssd; the float
// products are the same.
template <bool VNNI>
TGT2 void rows_avx2(const Weight& w, const Act& a, int64_t r0, int64_t r1, float* y,
                    int64_t ldy) {
  if ((w.enc == kF32 || w.enc == kBF16) && a.tokens == 1 && a.cn * 4 <= kSeqXBytes) {
    if (w.enc == kF32) float_rows1<0>(w, a, r0, r1, y); else float_rows1<1>(w, a, r0, r1, y);
    return;
  }
  if (zmm_panels_for(a.isa, w.enc, a.tokens)) {
    if (w.enc == kF32) float_panels<0>(w, a, r0, r1, y, ldy);
    else if (w.enc == kBF16) float_panels<1>(w, a, r0, r1, y, ldy);
    else int8_panels(w, a, r0, r1, y, ldy);
    return;
  }
  // int8 weights: the int16 activations of prepare() (see i8w_tile2)
  const bool i8 = w.enc == kI8;
  const int M = i8 ? a.tokens : a.tokens * a.levels;
  if (VNNI && (w.enc == kI4 || w.enc == kMXFP4) && M == 1) {  // row pairs in zmm
    const bool i4 = w.enc == kI4;
    float raw[4];
    for (int64_t o = r0; o < r1; o += 4) {
      const int R = int(std::min<int64_t>(4, r1 - o));
      if (R == 4) {
        if (i4) i4_pairs<2>(w, a, a.avx2, o, 0, raw, 1); else mx_pairs<2>(w, a, a.avx2, o, 0, raw, 1);
      } else {  // 1-3 rows: a pair, then a single row
        if (R >= 2) {
          if (i4) i4_pairs<1>(w, a, a.avx2, o, 0, raw, 1); else mx_pairs<1>(w, a, a.avx2, o, 0, raw, 1);
        }
        if (R & 1) {
          if (i4) i4_tile2<1, 1, VNNI>(w, a, a.avx2, o + R - 1, 0, raw + R - 1, 1);
          else mx_tile2<1, 1, VNNI>(w, a, a.avx2, o + R - 1, 0, raw + R - 1, 1);
        }
      }
      combine_grouped(a, raw, R, o - r0, i4 ? 1.0f : 0.5f, y, ldy);
    }
    return;
  }
  if ((w.enc == kI4 || w.enc == kMXFP4) && M >= kPanelTokens) {  // decoded panels
    const bool i4 = w.enc == kI4, four = VNNI && M >= kPanel4Tokens;
    std::vector<float> raw(4 * size_t(M)), accf(4 * size_t(M) * 8);
    float* rw = raw.data();
    float* ac = accf.data();
    for (int64_t o = r0; o < r1;) {
      const int R = four && r1 - o >= 4 ? 4 : (r1 - o >= 2 ? 2 : 1);
      if (R == 4) {
        if (i4) i4_panel4(w, a, a.avx2, o, rw, M, ac); else mx_panel4(w, a, a.avx2, o, rw, M, ac);
      } else if (R == 2) {
        if (i4) i4_panel<2, VNNI>(w, a, a.avx2, o, rw, M, ac);
        else mx_panel<2, VNNI>(w, a, a.avx2, o, rw, M, ac);
      } else {
        if (i4) i4_panel<1, VNNI>(w, a, a.avx2, o, rw, M, ac);
        else mx_panel<1, VNNI>(w, a, a.avx2, o, rw, M, ac);
      }
      combine_grouped(a, rw, R, o - r0, i4 ? 1.0f : 0.5f, y, ldy);
      o += R;
    }
    return;
  }
  const bool fl = w.enc == kF32 || w.enc == kBF16;
  std::vector<float> rawf(size_t(kRowTile) * M);
  std::vector<int64_t> raw64(size_t(kRowTile) * M);
  const Avx2Form& pa = a.avx2;
  const int16_t* q16 = pa.q16.data();
  const int64_t ld16 = pa.ld16;
  const float* s16 = pa.s16.data();
  // 16 ymm registers. Float forms: 4 rows x 2 tokens for 1-2 tokens (enough independent FMA
  // chains for one), 2 rows x 4 tokens for more (each weight decode then feeds 4 tokens).
  // int8: 4 x 1-2, else 2 x 4. int4 (4 accumulators a row and token) and mxfp4 (3): 2 rows
  // for one token (one activation load feeds both), else 1 row x 2 (int4) / 4 (mxfp4) tokens.
  const bool wide = fl && M >= 3;
  int rmax, mtmax;
  if (fl) {
    rmax = wide ? 2 : 4;
    mtmax = wide ? 4 : 2;
  } else if (i8) {
    rmax = M == 1 && a.cn * 2 <= kSeqXBytes ? 1 : (M <= 2 ? 4 : 2);  // x: int16
    mtmax = M <= 2 ? 2 : 4;
  } else {
    rmax = M == 1 ? 2 : 1;
    mtmax = M == 1 ? 1 : (w.enc == kI4 ? 2 : 4);
  }
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
      for (int r0t = 0; r0t < R;) {  // rmax rows at a time, then single rows
        const int rr = R - r0t >= rmax ? rmax : 1;
        const int64_t ot = o + r0t;
        switch (w.enc) {
          case kI8: {
            i8w_tiles2<VNNI>(rr, mt, w, a, q16, ld16, ot, m0, r64 + r0t * M, M);
            break;
          }
          case kI4:
            if (rr == 2) i4_tile2<2, 1, VNNI>(w, a, pa, ot, m0, rf + r0t * M, M);
            else if (mt == 2) i4_tile2<1, 2, VNNI>(w, a, pa, ot, m0, rf + r0t * M, M);
            else i4_tile2<1, 1, VNNI>(w, a, pa, ot, m0, rf + r0t * M, M);
            break;
          case kMXFP4:
            if (rr == 2) mx_tile2<2, 1, VNNI>(w, a, pa, ot, m0, rf + r0t * M, M);
            else { LAZYMOE_MT_SWITCH_V(mx_tile2, 1, VNNI, w, a, pa, ot, m0, rf + r0t * M, M) }
            break;
          default: break;
        }
        r0t += rr;
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
  // Rows of more than a page are read in strides the hardware prefetchers lose: software
  // prefetch of the next row tile there (shorter rows stream as one sequence; there it cost).
  const int64_t ahead = ahead_of(int64_t(R) * (w.cols / 2), int64_t(R) * (w.cols / 2));
  const bool far = w.cols / 2 > 4096;
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
        if (far && (g & 63) == 0) {
          pf(p + ahead);
          pf(p + N + ahead);
        }
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
  const int64_t ahead = ahead_of(int64_t(R) * (w.cols / 2), int64_t(R) * (w.cols / 2));
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
      pf(base[r] + b * 16 + ahead);
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
      const float amax = abs_max(r.data(), cn);
      const float s = amax > 0 ? amax / 127.0f : 1.0f;
      int8_t* q = lin.data() + (size_t(t) * levels + l) * cn;
      for (int64_t c = 0; c < cn; ++c) {
        float v = round_even(r[c] / s);
        v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
        q[c] = int8_t(v);
        r[c] -= v * s;
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
  if (isa == kAvx2)  // F16C: the int4 scales and TurboQuant norms (every AVX2 CPU has it)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  if (isa == kAvx2Vnni)
    return isa_supported(kAvx2) && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
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
  if (isa_supported(kAvx2Vnni)) return kAvx2Vnni;
  if (isa_supported(kAvx2)) return kAvx2;
  return kPortable;
}

namespace {

// int16 activations of the AVX2 int8 kernel: one level, step max|x| / 32767.
void int16_form(const Act& a, Avx2Form& p) {
  p.ld16 = (a.cn + 15) / 16 * 16;
  p.q16.assign(size_t(a.tokens) * p.ld16, 0);
  p.s16.assign(a.tokens, 1.0f);
  for (int t = 0; t < a.tokens; ++t) {
    const float* xr = a.xf + t * a.ldf;
    const float amax = abs_max(xr, a.cn);
    const float s = amax > 0 ? amax / 32767.0f : 1.0f;
    for (int64_t c = 0; c < a.cn; ++c) {
      const float v = round_even(xr[c] / s);
      p.q16[t * p.ld16 + c] = int16_t(v < -32767.0f ? -32767.0f : (v > 32767.0f ? 32767.0f : v));
    }
    p.s16[t] = s;
  }
}

void prepare_codes(Act& a, int enc, int group, int levels, const float* x, int64_t ldx,
                   int tokens, int64_t c0, int64_t cn) {
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
  // int8 weights on the AVX2 family read only the int16 activations of int16_form
  if (enc == kI8 && avx2_family(a.isa)) return;
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
    const int64_t nb = cn / 32, nbp = round_up(std::max<int64_t>(nb, 1), 8);  // AVX2: 8 a step
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

}  // namespace

void prepare(Act& a, int isa, int enc, int group, int levels, const float* x, int64_t ldx,
             int tokens, int64_t c0, int64_t cn) {
  a.isa = isa;
  prepare_codes(a, enc, group, levels, x, ldx, tokens, c0, cn);
#ifdef LAZYMOE_X86
  if (float_panels_for(isa, enc, tokens)) float_panel_form(a, a.avx2);
#endif
  if (!avx2_family(isa) || enc == kF32 || enc == kBF16) return;
  if (enc == kI8) {
    int16_form(a, a.avx2);  // the AVX2 int8 kernel reads only these
#ifdef LAZYMOE_X86
    if (zmm_panels_for(isa, enc, tokens)) int8_panel_form(a, a.avx2);
#endif
    return;
  }
#ifdef LAZYMOE_X86
  avx2_form(a, a.tokens * a.levels, a.avx2);
  if (enc == kMXFP4 && a.tokens * a.levels >= kPanelTokens) mx_panel_form(a, a.tokens * a.levels, a.avx2);
#endif
}

int64_t rows_align(int isa, int enc, int64_t tokens, int64_t align) {
#ifdef LAZYMOE_X86
  // 32 rows: the activations' chunk is read from L2 once for 16 row pairs
  if (zmm_panels_for(isa, enc, tokens)) return std::max<int64_t>(align, 32);
#endif
  return align;
}

bool one_token_sums_apart(int isa, int enc, int64_t cols) {
  // the condition under which rows_avx2 takes float_rows1
  return avx2_family(isa) && (enc == kF32 || enc == kBF16) && cols * 4 <= kSeqXBytes;
}

void rows(const Weight& w, const Act& a, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  if (r1 <= r0) return;
  const int isa = a.isa;
#ifdef LAZYMOE_X86
  if (isa == kAvx512) return rows_avx512(w, a, r0, r1, y, ldy);
  if (isa == kAvx2) return rows_avx2<false>(w, a, r0, r1, y, ldy);
  if (isa == kAvx2Vnni) return rows_avx2<true>(w, a, r0, r1, y, ldy);
#endif
  rows_portable(w, a, r0, r1, y, ldy);
}

}  // namespace lazymoe
