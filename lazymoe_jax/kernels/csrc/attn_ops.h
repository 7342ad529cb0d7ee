// The inner loops of decode attention (attention.cc), one table of them per ISA variant.
//
// Every cache kind is read through these few products over a block of positions, so each
// has a portable scalar version (the reference, correct on any CPU) beside the AVX2 one;
// the AVX-512 variant uses the AVX2 table (no AVX-512 machine to test on, BUILD_NOTES).
// Matrices are row-major with explicit leading dimensions (ld*), in float32.
#pragma once

#include <cstdint>

namespace lazymoe {

struct AttnOps {
  // out[m * ldo + j] = sum_d q[m * D + d] * kt[d * ldk + j], m < M, j < n: keys stored
  // transposed ([D, S], dense and latent caches).
  void (*scores_kd)(const float* q, int M, int D, const float* kt, int64_t ldk, int n,
                    float* out, int ldo);
  // out[m * ldo + j] = sum_d q[m * D + d] * c[j * D + d]: keys row-major (decoded codes).
  void (*scores_sd)(const float* q, int M, int D, const float* c, int n, float* out, int ldo);
  // o[m * ldo_ + d] += sum_j p[m * ldp + j] * v[j * ldv + d], d < Dv: values [S, Dv].
  void (*accum_sd)(const float* p, int ldp, int M, int n, const float* v, int64_t ldv, int Dv,
                   float* o, int ldo);
  // o[m * ldo_ + d] += sum_j p[m * ldp + j] * vt[d * ldv + j]: values transposed [Dv, S].
  void (*accum_ds)(const float* p, int ldp, int M, int n, const float* vt, int64_t ldv, int Dv,
                   float* o, int ldo);
  // x[j] = exp(x[j] - mx) for j < n; returns their sum.
  float (*exp_sum)(float* x, int n, float mx);
  // out[i] = table[idx[i]] for i < n (a 2^bits-entry codebook, bits <= 4).
  void (*lookup)(const uint8_t* idx, int n, const float* table, int bits, float* out);
  // idx[2i] = low nibble, idx[2i + 1] = high nibble of bytes[i], i < n / 2 (n even).
  void (*unpack4)(const uint8_t* bytes, int n, uint8_t* idx);
  // out[i] = the IEEE float16 h[i] as float32, i < n (TurboQuant norms).
  void (*halves)(const uint16_t* h, int n, float* out);
};

// The table of variant `isa` (rowdot.h's Isa; every x86 variant takes the AVX2 table).
const AttnOps& attn_ops(int isa);

}  // namespace lazymoe
