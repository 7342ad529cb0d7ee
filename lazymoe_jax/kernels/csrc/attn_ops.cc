// Portable and AVX2 inner loops of decode attention (see attn_ops.h).
#include "attn_ops.h"

#include <cmath>
#include <cstring>

#include "rowdot.h"


namespace lazymoe {

namespace {

// ---- portable ----------------------------------------------------------------------------
void scores_kd_portable(const float* q, int M, int D, const float* kt, int64_t ldk, int n,
                        float* out, int ldo) {
  for (int m = 0; m < M; ++m) {
    float* o = out + int64_t(m) * ldo;
    for (int j = 0; j < n; ++j) o[j] = 0.f;
    for (int d = 0; d < D; ++d) {
      const float qd = q[int64_t(m) * D + d];
      const float* k = kt + d * ldk;
      for (int j = 0; j < n; ++j) o[j] += qd * k[j];
    }
  }
}

void scores_sd_portable(const float* q, int M, int D, const float* c, int n, float* out,
                        int ldo) {
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < n; ++j) {
      float s = 0.f;
      for (int d = 0; d < D; ++d) s += q[int64_t(m) * D + d] * c[int64_t(j) * D + d];
      out[int64_t(m) * ldo + j] = s;
    }
}

void accum_sd_portable(const float* p, int ldp, int M, int n, const float* v, int64_t ldv,
                       int Dv, float* o, int ldo) {
  for (int m = 0; m < M; ++m) {
    float* om = o + int64_t(m) * ldo;
    for (int j = 0; j < n; ++j) {
      const float pj = p[int64_t(m) * ldp + j];
      const float* vj = v + j * ldv;
      for (int d = 0; d < Dv; ++d) om[d] += pj * vj[d];
    }
  }
}

void accum_ds_portable(const float* p, int ldp, int M, int n, const float* vt, int64_t ldv,
                       int Dv, float* o, int ldo) {
  for (int m = 0; m < M; ++m)
    for (int d = 0; d < Dv; ++d) {
      float s = 0.f;
      for (int j = 0; j < n; ++j) s += p[int64_t(m) * ldp + j] * vt[d * ldv + j];
      o[int64_t(m) * ldo + d] += s;
    }
}

float exp_sum_portable(float* x, int n, float mx) {
  float s = 0.f;
  for (int j = 0; j < n; ++j) s += (x[j] = std::exp(x[j] - mx));
  return s;
}

void lookup_portable(const uint8_t* idx, int n, const float* table, int bits, float* out) {
  (void)bits;
  for (int i = 0; i < n; ++i) out[i] = table[idx[i]];
}

void unpack4_portable(const uint8_t* bytes, int n, uint8_t* idx) {
  for (int i = 0; i < n / 2; ++i) {
    idx[2 * i] = bytes[i] & 15;
    idx[2 * i + 1] = bytes[i] >> 4;
  }
}

void halves_portable(const uint16_t* h, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = half_to_float(h[i]);
}

const AttnOps kPortableOps = {scores_kd_portable, scores_sd_portable, accum_sd_portable,
                              accum_ds_portable,  exp_sum_portable,   lookup_portable,
                              unpack4_portable,   halves_portable};

#ifdef LAZYMOE_X86
// ---- AVX2 --------------------------------------------------------------------------------
#define TGT2 __attribute__((target("avx2,fma")))


// Lanes [0, k) on, k in 0..8 (a tail of k valid floats).
TGT2 inline __m256i tail_mask(int k) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), lane);
}

// exp(x) to ~2 ulp for x <= 0 (Cephes' expf polynomial on [-ln2/2, ln2/2], times 2^n);
// inputs below -87 give 0, as the float exp underflows.
TGT2 inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// 4 query rows x 16 positions a tile: one key load feeds 4 broadcast FMAs.
template <int MR>
TGT2 void scores_kd_tile(const float* q, int D, const float* kt, int64_t ldk, int n, float* out,
                         int ldo) {
  for (int j = 0; j < n; j += 16) {
    const int left = n - j;
    const __m256i m0 = tail_mask(left), m1 = tail_mask(left - 8);
    const bool full = left >= 16;
    __m256 acc0[MR], acc1[MR];
    for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
    for (int d = 0; d < D; ++d) {
      const float* k = kt + d * ldk + j;
      const __m256 k0 = full ? _mm256_loadu_ps(k) : _mm256_maskload_ps(k, m0);
      const __m256 k1 = full ? _mm256_loadu_ps(k + 8) : _mm256_maskload_ps(k + 8, m1);
      for (int r = 0; r < MR; ++r) {
        const __m256 qv = _mm256_broadcast_ss(q + int64_t(r) * D + d);
        acc0[r] = _mm256_fmadd_ps(qv, k0, acc0[r]);
        acc1[r] = _mm256_fmadd_ps(qv, k1, acc1[r]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      float* o = out + int64_t(r) * ldo + j;
      _mm256_maskstore_ps(o, m0, acc0[r]);
      _mm256_maskstore_ps(o + 8, m1, acc1[r]);
    }
  }
}

TGT2 void scores_kd_avx2(const float* q, int M, int D, const float* kt, int64_t ldk, int n,
                         float* out, int ldo) {
  int m = 0;
  for (; m + 4 <= M; m += 4) scores_kd_tile<4>(q + int64_t(m) * D, D, kt, ldk, n, out + int64_t(m) * ldo, ldo);
  for (; m < M; ++m) scores_kd_tile<1>(q + int64_t(m) * D, D, kt, ldk, n, out + int64_t(m) * ldo, ldo);
}

// 4 rows x 2 positions a tile; horizontal sums at the end of each dot.
template <int MR, int NJ>
TGT2 void scores_sd_tile(const float* q, int D, const float* c, float* out, int ldo) {
  __m256 acc[MR][NJ];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NJ; ++j) acc[r][j] = _mm256_setzero_ps();
  const int dv = D / 8 * 8;
  for (int d = 0; d < dv; d += 8) {
    __m256 cv[NJ];
    for (int j = 0; j < NJ; ++j) cv[j] = _mm256_loadu_ps(c + int64_t(j) * D + d);
    for (int r = 0; r < MR; ++r) {
      const __m256 qv = _mm256_loadu_ps(q + int64_t(r) * D + d);
      for (int j = 0; j < NJ; ++j) acc[r][j] = _mm256_fmadd_ps(qv, cv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NJ; ++j) {
      float s = hsum8(acc[r][j]);
      for (int d = dv; d < D; ++d) s += q[int64_t(r) * D + d] * c[int64_t(j) * D + d];
      out[int64_t(r) * ldo + j] = s;
    }
}

TGT2 void scores_sd_avx2(const float* q, int M, int D, const float* c, int n, float* out,
                         int ldo) {
  int m = 0;
  for (; m + 4 <= M; m += 4) {
    int j = 0;
    for (; j + 2 <= n; j += 2)
      scores_sd_tile<4, 2>(q + int64_t(m) * D, D, c + int64_t(j) * D, out + int64_t(m) * ldo + j, ldo);
    for (; j < n; ++j)
      scores_sd_tile<4, 1>(q + int64_t(m) * D, D, c + int64_t(j) * D, out + int64_t(m) * ldo + j, ldo);
  }
  for (; m < M; ++m)
    for (int j = 0; j < n; ++j)
      scores_sd_tile<1, 1>(q + int64_t(m) * D, D, c + int64_t(j) * D, out + int64_t(m) * ldo + j, ldo);
}

// 2 rows x 32 value columns a tile: 4 value loads feed 8 FMAs.
template <int MR>
TGT2 void accum_sd_tile(const float* p, int ldp, int n, const float* v, int64_t ldv, int width,
                        float* o, int ldo) {
  __m256i mask[4];
  for (int i = 0; i < 4; ++i) mask[i] = tail_mask(width - 8 * i);
  __m256 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_maskload_ps(o + int64_t(r) * ldo + 8 * i, mask[i]);
  const bool full = width >= 32;
  for (int j = 0; j < n; ++j) {
    const float* vj = v + j * ldv;
    __m256 vv[4];
    for (int i = 0; i < 4; ++i) vv[i] = full ? _mm256_loadu_ps(vj + 8 * i) : _mm256_maskload_ps(vj + 8 * i, mask[i]);
    for (int r = 0; r < MR; ++r) {
      const __m256 pv = _mm256_broadcast_ss(p + int64_t(r) * ldp + j);
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm256_fmadd_ps(pv, vv[i], acc[r][i]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < 4; ++i) _mm256_maskstore_ps(o + int64_t(r) * ldo + 8 * i, mask[i], acc[r][i]);
}

TGT2 void accum_sd_avx2(const float* p, int ldp, int M, int n, const float* v, int64_t ldv,
                        int Dv, float* o, int ldo) {
  for (int d = 0; d < Dv; d += 32) {
    const int width = Dv - d < 32 ? Dv - d : 32;
    int m = 0;
    for (; m + 2 <= M; m += 2)
      accum_sd_tile<2>(p + int64_t(m) * ldp, ldp, n, v + d, ldv, width, o + int64_t(m) * ldo + d, ldo);
    for (; m < M; ++m)
      accum_sd_tile<1>(p + int64_t(m) * ldp, ldp, n, v + d, ldv, width, o + int64_t(m) * ldo + d, ldo);
  }
}

// 4 rows x 2 value columns a tile, each a dot over the block's positions.
template <int MR, int ND>
TGT2 void accum_ds_tile(const float* p, int ldp, int n, const float* vt, int64_t ldv, float* o,
                        int ldo) {
  __m256 acc[MR][ND];
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < ND; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int j = 0; j < n; j += 8) {
    const __m256i mask = tail_mask(n - j);
    __m256 vv[ND];
    for (int i = 0; i < ND; ++i) vv[i] = _mm256_maskload_ps(vt + i * ldv + j, mask);
    for (int r = 0; r < MR; ++r) {
      const __m256 pv = _mm256_maskload_ps(p + int64_t(r) * ldp + j, mask);
      for (int i = 0; i < ND; ++i) acc[r][i] = _mm256_fmadd_ps(pv, vv[i], acc[r][i]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < ND; ++i) o[int64_t(r) * ldo + i] += hsum8(acc[r][i]);
}

TGT2 void accum_ds_avx2(const float* p, int ldp, int M, int n, const float* vt, int64_t ldv,
                        int Dv, float* o, int ldo) {
  int m = 0;
  for (; m + 4 <= M; m += 4) {
    int d = 0;
    for (; d + 2 <= Dv; d += 2)
      accum_ds_tile<4, 2>(p + int64_t(m) * ldp, ldp, n, vt + d * ldv, ldv, o + int64_t(m) * ldo + d, ldo);
    for (; d < Dv; ++d)
      accum_ds_tile<4, 1>(p + int64_t(m) * ldp, ldp, n, vt + d * ldv, ldv, o + int64_t(m) * ldo + d, ldo);
  }
  for (; m < M; ++m)
    for (int d = 0; d < Dv; ++d)
      accum_ds_tile<1, 1>(p + int64_t(m) * ldp, ldp, n, vt + d * ldv, ldv, o + int64_t(m) * ldo + d, ldo);
}

TGT2 float exp_sum_avx2(float* x, int n, float mx) {
  const __m256 m = _mm256_set1_ps(mx);
  __m256 s = _mm256_setzero_ps();
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), m));
    _mm256_storeu_ps(x + j, e);
    s = _mm256_add_ps(s, e);
  }
  if (j < n) {
    const __m256i mask = tail_mask(n - j);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_maskload_ps(x + j, mask), m));
    _mm256_maskstore_ps(x + j, mask, e);
    s = _mm256_add_ps(s, _mm256_and_ps(e, _mm256_castsi256_ps(mask)));
  }
  return hsum8(s);
}

// Codebook lookups in registers: vpermps over 8 entries, two of them and a blend on the
// index's bit 3 for 16 (4 bits).
TGT2 void lookup_avx2(const uint8_t* idx, int n, const float* table, int bits, float* out) {
  float padded[16] = {0};
  std::memcpy(padded, table, sizeof(float) << bits);
  const __m256 lo = _mm256_loadu_ps(padded), hi = _mm256_loadu_ps(padded + 8);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    int64_t raw;
    std::memcpy(&raw, idx + i, 8);
    const __m256i ix = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(raw));
    __m256 c = _mm256_permutevar8x32_ps(lo, ix);
    if (bits == 4)
      c = _mm256_blendv_ps(c, _mm256_permutevar8x32_ps(hi, ix),
                           _mm256_castsi256_ps(_mm256_slli_epi32(ix, 28)));
    _mm256_storeu_ps(out + i, c);
  }
  for (; i < n; ++i) out[i] = table[idx[i]];
}

TGT2 void unpack4_avx2(const uint8_t* bytes, int n, uint8_t* idx) {
  const __m128i low4 = _mm_set1_epi8(15);
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + i / 2));
    const __m128i l = _mm_and_si128(b, low4), h = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(idx + i), _mm_unpacklo_epi8(l, h));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(idx + i + 16), _mm_unpackhi_epi8(l, h));
  }
  unpack4_portable(bytes + i / 2, n - i, idx + i);
}

// vcvtph2ps (F16C: every AVX2 CPU has it, and the AVX2 expert kernels use it too).
__attribute__((target("avx2,fma,f16c"))) void halves_avx2(const uint16_t* h, int n, float* out) {
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  halves_portable(h + i, n - i, out + i);
}

const AttnOps kAvx2Ops = {scores_kd_avx2, scores_sd_avx2, accum_sd_avx2, accum_ds_avx2,
                          exp_sum_avx2,   lookup_avx2,    unpack4_avx2,  halves_avx2};
#endif

}  // namespace

const AttnOps& attn_ops(int isa) {
#ifdef LAZYMOE_X86
  if (avx2_family(isa) || isa == kAvx512) return kAvx2Ops;
#endif
  (void)isa;
  return kPortableOps;
}

}  // namespace lazymoe
