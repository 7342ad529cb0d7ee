// Decode attention (1..16 query tokens) over the KV caches of lazymoe_jax/kv, exactly as their
// XLA `attend`: causal mask by positions, sliding window, gpt-oss sinks (one more logit per
// head in each denominator), any capacity S beyond the filled positions.
//
// One driver (Attend) shared by the three cache kinds, each a small struct that computes the
// scores of a block of positions and adds their values:
//   DenseCache   keys [K, D, S] (transposed), values [K, S, D], float32 (kv/dense.py)
//   LatentCache  [1, R + Dr, S]: keys [c, k_r], values its first R rows (kv/latent.py, MLA)
//   TqCache      TurboQuant codes (kv/turboquant.py, MSE variant): the query arrives rotated;
//                each key's codes are looked up in its codebook in registers, one block of
//                positions at a time, and dotted with all the query rows of its KV head; the
//                values are summed in the rotated space (rotated back by the caller, once).
// The query rows of one KV head (its G heads x T tokens, M = G * T) share every key read.
// Positions are walked in blocks with an online softmax; the work is split over (sequence,
// KV head) and, when those are too few for the pool, over chunks of positions whose partial
// softmax states are combined at the end (flash-decoding).
//
// Leading dimensions (jax.vmap with vmap_method="expand_dims") are read here: every operand
// has the output's leading dimensions or 1 in their place (broadcast, never copied).
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "attn_ops.h"
#include "ffi_common.h"

namespace lazymoe {
namespace {

constexpr int kBlock = 64;  // positions a block: its scores and decoded codes stay in L1
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// An operand seen per batch element: the byte offset of element b's core block.
struct Operand {
  const uint8_t* data = nullptr;
  std::vector<int64_t> off;
  template <class T>
  const T* at(int64_t b) const { return reinterpret_cast<const T*>(data + off[b]); }
};

// Binds buf (dtype t, dims lead + core) to op; core entries < 0 are read from the buffer and
// written back. A leading dim of 1 is broadcast over the output's.
std::string bind_operand(const ffi::AnyBuffer& buf, ffi::DataType t, const std::vector<int64_t>& lead,
                 std::vector<int64_t>& core, const std::string& what, Operand* op) {
  auto d = buf.dimensions();
  std::string err;
  if (buf.element_type() != t) err = what + ": dtype " + std::to_string(int(buf.element_type())) +
                                     ", expected " + std::to_string(int(t));
  if (err.empty() && d.size() != lead.size() + core.size())
    err = what + ": rank " + std::to_string(d.size()) + ", expected " +
          std::to_string(lead.size() + core.size());
  int64_t core_bytes = ffi::ByteWidth(t);
  for (size_t i = 0; err.empty() && i < core.size(); ++i) {
    const int64_t got = d[lead.size() + i];
    if (core[i] < 0) core[i] = got;
    if (got != core[i]) err = what + ": shape " + dims_str(d) + ", expected core " + dims_str(core);
    core_bytes *= core[i];
  }
  for (size_t i = 0; err.empty() && i < lead.size(); ++i)
    if (d[i] != lead[i] && d[i] != 1)
      err = what + ": batch dims " + dims_str(d) + " do not broadcast to " + dims_str(lead);
  if (!err.empty()) return err;
  int64_t nb = 1;
  for (int64_t l : lead) nb *= l;
  op->data = static_cast<const uint8_t*>(buf.untyped_data());
  op->off.assign(nb, 0);
  for (int64_t b = 0; b < nb; ++b) {  // row-major index over lead -> offset over d
    int64_t rest = b, off = 0, stride = core_bytes;
    for (int i = int(lead.size()) - 1; i >= 0; --i) {
      const int64_t ix = rest % lead[i];
      rest /= lead[i];
      if (d[i] != 1) off += ix * stride;
      stride *= d[i];
    }
    op->off[b] = off;
  }
  return "";
}

// What every cache kind shares: sizes, queries, positions, sinks, the output.
struct Problem {
  int64_t B = 1, T = 0, H = 0, K = 0, G = 0, D = 0, Dv = 0, S = 0;
  int64_t window = 0;  // 0: none
  float scale = 1.f;
  bool has_sinks = false;
  Operand q, pos, sinks;
  float* out = nullptr;
  std::vector<int64_t> lead;
  const AttnOps* ops = nullptr;

  int M() const { return int(G * T); }  // query rows of one KV head: row m = (t = m / G, g = m % G)
  // Visible key positions [lo, hi] of token t of batch element b (hi < lo: none).
  void visible(int64_t b, int64_t t, int64_t* lo, int64_t* hi) const {
    const int64_t p = pos.at<int32_t>(b)[t];
    *hi = std::min<int64_t>(p, S - 1);
    *lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
  }
};

// Binds q [lead, T, H, D], pos [lead, T], sinks [lead, H] and the output [lead, T, H, Dv].
std::string bind_common(Problem& pr, ffi::AnyBuffer q, ffi::AnyBuffer pos, ffi::AnyBuffer sinks,
                        ffi::Result<ffi::AnyBuffer>& out) {
  auto od = out->dimensions();
  if (od.size() < 3) return "output must be [..., T, H, Dv], got " + dims_str(od);
  pr.lead.assign(od.begin(), od.end() - 3);
  for (int64_t l : pr.lead) pr.B *= l;
  pr.T = od[od.size() - 3];
  pr.H = od[od.size() - 2];
  pr.Dv = od[od.size() - 1];
  if (out->element_type() != ffi::DataType::F32) return "output must be float32";
  std::vector<int64_t> qc = {pr.T, pr.H, -1}, pc = {pr.T}, sc = {pr.H};
  std::string err = bind_operand(q, ffi::DataType::F32, pr.lead, qc, "q", &pr.q);
  if (err.empty()) err = bind_operand(pos, ffi::DataType::S32, pr.lead, pc, "positions", &pr.pos);
  if (err.empty()) err = bind_operand(sinks, ffi::DataType::F32, pr.lead, sc, "sinks", &pr.sinks);
  pr.D = qc[2];
  pr.out = static_cast<float*>(out->untyped_data());
  return err;
}

// Per-part working memory.
struct Scratch {
  std::vector<float> q, sc, o, run_max, run_sum, dec;
  std::vector<uint8_t> idx;
  Scratch(const Problem& pr) : q(pr.M() * pr.D), sc(pr.M() * kBlock), o(pr.M() * pr.Dv),
      run_max(pr.M()), run_sum(pr.M()), dec(kBlock * pr.D), idx(kBlock * pr.D) {}
};

// ---- the cache kinds -----------------------------------------------------------------------
// scores(): raw q.k of rows q [M, D] at positions [s0, s0 + n) of (b, kh) into sc [M, kBlock]
// (before the scale); values(): o [M, Dv] += p [M, kBlock] x their values (p may be scaled in
// place); finish(): the last touch of an output row (mass: the probability on positions).

struct DenseCache {
  Operand k, v;  // k [lead, K, D, S], v [lead, K, S, D] float32
  void scores(const Problem& pr, Scratch& s, int64_t b, int64_t kh, int64_t s0, int n) const {
    const float* kt = k.at<float>(b) + kh * pr.D * pr.S + s0;
    pr.ops->scores_kd(s.q.data(), pr.M(), int(pr.D), kt, pr.S, n, s.sc.data(), kBlock);
  }
  void values(const Problem& pr, Scratch& s, int64_t b, int64_t kh, int64_t s0, int n) const {
    const float* vs = v.at<float>(b) + (kh * pr.S + s0) * pr.Dv;
    pr.ops->accum_sd(s.sc.data(), kBlock, pr.M(), n, vs, pr.Dv, int(pr.Dv), s.o.data(), int(pr.Dv));
  }
  void finish(const Problem&, int64_t, int64_t, int, float*, float) const {}
};

struct LatentCache {
  Operand k;  // [lead, 1, R + Dr, S] float32; the values are its first R = Dv rows
  void scores(const Problem& pr, Scratch& s, int64_t b, int64_t, int64_t s0, int n) const {
    pr.ops->scores_kd(s.q.data(), pr.M(), int(pr.D), k.at<float>(b) + s0, pr.S, n, s.sc.data(), kBlock);
  }
  void values(const Problem& pr, Scratch& s, int64_t b, int64_t, int64_t s0, int n) const {
    pr.ops->accum_ds(s.sc.data(), kBlock, pr.M(), n, k.at<float>(b) + s0, pr.S, int(pr.Dv),
                     s.o.data(), int(pr.Dv));
  }
  void finish(const Problem&, int64_t, int64_t, int, float*, float) const {}
};

// The codes of one side (keys or values) of a TurboQuant cache, as kv/turboquant.py packs
// them: channel groups [a, b) of `bits` bits, each stored in byte-aligned fields of width 1, 2
// or 4 (low bits in the narrowest), [lead, K, S, (b - a) * w / 8] uint8; norms f16 [lead, K, S, 1].
struct TqSide {
  struct Group {
    int64_t a = 0, b = 0;
    int bits = 0;
    std::vector<std::pair<int, Operand>> fields;  // (width, codes), low bits first
    const float* codebook = nullptr;              // 2^bits centroids
  };
  Operand norm;
  std::vector<Group> groups;
  bool covers_all = true;  // every channel in some group (else the rest read zero)

  // The norms of positions [s0, s0 + n) into out (contiguous f16 in the cache).
  void norms(const Problem& pr, int64_t b, int64_t kh, int64_t s0, int n, float* out) const {
    pr.ops->halves(norm.at<uint16_t>(b) + kh * pr.S + s0, n, out);
  }

  // Unpacks the `bits`-bit indices of n channels from g's fields at row `row` (n a multiple of
  // a row's channels: consecutive rows are consecutive in every field) into idx.
  void unpack(const Problem& pr, const Group& g, int64_t b, int64_t row, int n, uint8_t* idx) const {
    const int nch = int(g.b - g.a);
    if (g.bits == 4) {
      pr.ops->unpack4(g.fields[0].second.at<uint8_t>(b) + row * (nch / 2), n, idx);
      return;
    }
    std::fill(idx, idx + n, uint8_t(0));
    int shift = 0;
    for (const auto& [w, op] : g.fields) {
      const uint8_t* f = op.at<uint8_t>(b) + row * (nch * w / 8);
      const int per = 8 / w, mask = (1 << w) - 1;
      for (int i = 0; i < n; ++i) idx[i] |= uint8_t(((f[i / per] >> ((i % per) * w)) & mask) << shift);
      shift += w;
    }
  }

  // The rotated unit vectors of positions [s0, s0 + n) into s.dec [n, D]: the indices unpacked
  // to bytes, then looked up in the group's codebook (in registers). One group of every
  // channel (the usual case) is one run over the whole block; otherwise per position.
  void decode(const Problem& pr, Scratch& s, int64_t b, int64_t kh, int64_t s0, int n) const {
    const int64_t D = pr.D;
    if (groups.size() == 1 && covers_all) {
      const Group& g = groups[0];
      unpack(pr, g, b, kh * pr.S + s0, int(n * D), s.idx.data());
      pr.ops->lookup(s.idx.data(), int(n * D), g.codebook, g.bits, s.dec.data());
      return;
    }
    for (int j = 0; j < n; ++j) {
      float* c = s.dec.data() + j * D;
      if (!covers_all) std::fill(c, c + D, 0.f);
      const int64_t row = kh * pr.S + s0 + j;
      for (const Group& g : groups) {
        const int nch = int(g.b - g.a);
        unpack(pr, g, b, row, nch, s.idx.data());
        pr.ops->lookup(s.idx.data(), nch, g.codebook, g.bits, c + g.a);
      }
    }
  }
};

struct TqCache {
  TqSide k, v;
  Operand qbias;   // [lead, T, H]: q . k_shift, added to the scores (with sinks; else zeros)
  Operand vshift;  // [lead, K, D]: the rotated value shift, added back times the mass
  std::vector<float> codebooks;

  void scores(const Problem& pr, Scratch& s, int64_t b, int64_t kh, int64_t s0, int n) const {
    k.decode(pr, s, b, kh, s0, n);
    const int M = pr.M();
    pr.ops->scores_sd(s.q.data(), M, int(pr.D), s.dec.data(), n, s.sc.data(), kBlock);
    float nrm[kBlock];
    k.norms(pr, b, kh, s0, n, nrm);
    const float* bias = qbias.at<float>(b);
    for (int m = 0; m < M; ++m) {
      const float bm = bias[(m / pr.G) * pr.H + kh * pr.G + m % pr.G];
      float* row = s.sc.data() + m * kBlock;
      for (int j = 0; j < n; ++j) row[j] = row[j] * nrm[j] + bm;
    }
  }
  void values(const Problem& pr, Scratch& s, int64_t b, int64_t kh, int64_t s0, int n) const {
    v.decode(pr, s, b, kh, s0, n);
    float nrm[kBlock];
    v.norms(pr, b, kh, s0, n, nrm);
    for (int m = 0; m < pr.M(); ++m) {
      float* row = s.sc.data() + m * kBlock;
      for (int j = 0; j < n; ++j) row[j] *= nrm[j];
    }
    pr.ops->accum_sd(s.sc.data(), kBlock, pr.M(), n, s.dec.data(), pr.D, int(pr.Dv), s.o.data(),
                     int(pr.Dv));
  }
  void finish(const Problem& pr, int64_t b, int64_t kh, int, float* dst, float mass) const {
    const float* sh = vshift.at<float>(b) + kh * pr.Dv;
    for (int64_t d = 0; d < pr.Dv; ++d) dst[d] += mass * sh[d];
  }
};

// ---- the driver ----------------------------------------------------------------------------
template <class Cache>
struct Attend {
  Problem pr;
  Cache cache;
  int64_t chunks = 1;                    // position chunks per (b, kh)
  std::vector<float> part_o, part_max, part_sum;  // [unit][M][Dv], [unit][M] when chunks > 1

  int64_t units() const { return pr.B * pr.K * chunks; }

  // Visible-position union [lo, hi] of batch element b over its tokens.
  void span(int64_t b, int64_t* lo, int64_t* hi) const {
    *lo = pr.S;
    *hi = -1;
    for (int64_t t = 0; t < pr.T; ++t) {
      int64_t l, h;
      pr.visible(b, t, &l, &h);
      if (h >= l) {
        *lo = std::min(*lo, l);
        *hi = std::max(*hi, h);
      }
    }
  }

  // Runs unit u (batch b, KV head kh, chunk c): online softmax over its positions into
  // run_max / run_sum / o of the scratch.
  void run_unit(int64_t u, Scratch& s) const {
    const int64_t c = u % chunks, bk = u / chunks, b = bk / pr.K, kh = bk % pr.K;
    const int M = pr.M();
    const int64_t D = pr.D;
    for (int m = 0; m < M; ++m) {  // gather the rows: m = (t, g) -> head kh * G + g
      const float* src = pr.q.at<float>(b) + ((m / pr.G) * pr.H + kh * pr.G + m % pr.G) * D;
      std::copy(src, src + D, s.q.data() + m * D);
    }
    std::fill(s.o.begin(), s.o.end(), 0.f);
    std::fill(s.run_max.begin(), s.run_max.end(), kNegInf);
    std::fill(s.run_sum.begin(), s.run_sum.end(), 0.f);
    int64_t lo, hi;
    span(b, &lo, &hi);
    if (hi < lo) return;
    const int64_t len = hi - lo + 1, c0 = lo + len * c / chunks, c1 = lo + len * (c + 1) / chunks;
    std::vector<int64_t> rlo(pr.T), rhi(pr.T);
    for (int64_t t = 0; t < pr.T; ++t) pr.visible(b, t, &rlo[t], &rhi[t]);
    for (int64_t s0 = c0; s0 < c1; s0 += kBlock) {
      const int n = int(std::min<int64_t>(kBlock, c1 - s0));
      cache.scores(pr, s, b, kh, s0, n);
      for (int m = 0; m < M; ++m) {
        float* row = s.sc.data() + m * kBlock;
        const int64_t a = std::max(rlo[m / pr.G], s0) - s0, e = std::min(rhi[m / pr.G], s0 + n - 1) - s0;
        if (a > e) {
          std::fill(row, row + n, 0.f);
          continue;
        }
        float mx = kNegInf;
        for (int64_t j = a; j <= e; ++j) mx = std::max(mx, row[j] *= pr.scale);
        const float mnew = std::max(mx, s.run_max[m]);
        const float alpha = s.run_max[m] == kNegInf ? 0.f : std::exp(s.run_max[m] - mnew);
        std::fill(row, row + a, 0.f);
        std::fill(row + e + 1, row + n, 0.f);
        const float l = pr.ops->exp_sum(row + a, int(e - a + 1), mnew);
        s.run_sum[m] = s.run_sum[m] * alpha + l;
        s.run_max[m] = mnew;
        if (alpha != 1.f)
          for (int64_t d = 0; d < pr.Dv; ++d) s.o[m * pr.Dv + d] *= alpha;
      }
      cache.values(pr, s, b, kh, s0, n);
    }
  }

  // Combines the chunks' states of (b, kh) with the sink into the output rows.
  void finish(int64_t b, int64_t kh, const float* const* o, const float* const* mx,
              const float* const* sm, int nc) const {
    const int M = pr.M();
    for (int m = 0; m < M; ++m) {
      const int64_t t = m / pr.G, h = kh * pr.G + m % pr.G;
      float top = pr.has_sinks ? pr.sinks.at<float>(b)[h] : kNegInf;
      for (int c = 0; c < nc; ++c) top = std::max(top, mx[c][m]);
      float* dst = pr.out + ((b * pr.T + t) * pr.H + h) * pr.Dv;
      std::fill(dst, dst + pr.Dv, 0.f);
      float mass = 0.f;
      for (int c = 0; c < nc; ++c) {
        if (mx[c][m] == kNegInf) continue;
        const float w = std::exp(mx[c][m] - top);
        mass += sm[c][m] * w;
        for (int64_t d = 0; d < pr.Dv; ++d) dst[d] += w * o[c][m * pr.Dv + d];
      }
      const float denom = mass + (pr.has_sinks ? std::exp(pr.sinks.at<float>(b)[h] - top) : 0.f);
      if (denom > 0.f) {
        for (int64_t d = 0; d < pr.Dv; ++d) dst[d] /= denom;
        mass /= denom;
      }
      cache.finish(pr, b, kh, m, dst, mass);
    }
  }

};

// Runs job's units on the pool's workers (run_phases); the job lives until the last has ended.
template <class Cache>
ffi::Future launch(ffi::ThreadPool& pool, std::shared_ptr<Attend<Cache>> job) {
  Problem& pr = job->pr;
  if (pr.H % pr.K) return failed("attention: query heads " + std::to_string(pr.H) +
                                 " not a multiple of KV heads " + std::to_string(pr.K));
  pr.G = pr.H / pr.K;
  if (pr.B * pr.T * pr.H == 0 || pr.S == 0) {
    std::fill(pr.out, pr.out + pr.B * pr.T * pr.H * pr.Dv, 0.f);
    ffi::Promise p;
    ffi::Future f(p);
    p.SetAvailable();
    return f;
  }
  const double work = double(pr.B) * pr.K * pr.M() * pr.S * (pr.D + pr.Dv);
  const int parts = num_parts(pool, work);
  job->chunks = (pr.B * pr.K) % parts == 0 ? 1 : parts;
  const int64_t nu = job->units(), M = pr.M();
  if (job->chunks > 1) {
    job->part_o.assign(nu * M * pr.Dv, 0.f);
    job->part_max.assign(nu * M, 0.f);
    job->part_sum.assign(nu * M, 0.f);
  }
  // one claimed unit per (sequence, KV head, chunk of positions): each writes its own output
  // or partial slot, so the result does not depend on which worker ran a unit; the split into
  // chunks follows the number of workers (parts), and so do the last bits of the result
  std::vector<Phase> phases(1);
  phases[0] = {nu, [job, M](int64_t u) {
                 const Problem& pr = job->pr;
                 Scratch s(pr);
                 job->run_unit(u, s);
                 if (job->chunks == 1) {
                   const float *o = s.o.data(), *mx = s.run_max.data(), *sm = s.run_sum.data();
                   job->finish(u / pr.K, u % pr.K, &o, &mx, &sm, 1);
                 } else {
                   std::copy(s.o.begin(), s.o.end(), job->part_o.begin() + u * M * pr.Dv);
                   std::copy(s.run_max.begin(), s.run_max.end(), job->part_max.begin() + u * M);
                   std::copy(s.run_sum.begin(), s.run_sum.end(), job->part_sum.begin() + u * M);
                 }
               }};
  auto finish_fn = [job, M] {
    const int64_t nc = job->chunks;
    if (nc == 1) return;
    const Problem& pr = job->pr;
    std::vector<const float*> o(nc), mx(nc), sm(nc);
    for (int64_t bk = 0; bk < pr.B * pr.K; ++bk) {
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t u = bk * nc + c;
        o[c] = job->part_o.data() + u * M * pr.Dv;
        mx[c] = job->part_max.data() + u * M;
        sm[c] = job->part_sum.data() + u * M;
      }
      job->finish(bk / pr.K, bk % pr.K, o.data(), mx.data(), sm.data(), int(nc));
    }
  };
  return run_phases(pool, parts, std::move(phases), finish_fn);
}

// Common attributes: window (0: none), scale, has_sinks, isa.
std::string set_attrs(Problem& pr, int64_t window, float scale, int64_t has_sinks, int64_t isa) {
  if (!isa_supported(int(isa))) return "ISA variant " + std::to_string(isa) + " is not supported by this CPU";
  if (window < 0) return "window must be >= 0 (0: none)";
  pr.window = window;
  pr.scale = scale;
  pr.has_sinks = has_sinks != 0;
  pr.ops = &attn_ops(int(isa));
  return "";
}

ffi::Future DenseImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer pos,
                      ffi::AnyBuffer sinks, ffi::AnyBuffer k, ffi::AnyBuffer v,
                      ffi::Result<ffi::AnyBuffer> out, int64_t window, float scale,
                      int64_t has_sinks, int64_t isa) {
  auto job = std::make_shared<Attend<DenseCache>>();
  Problem& pr = job->pr;
  std::string err = set_attrs(pr, window, scale, has_sinks, isa);
  if (err.empty()) err = bind_common(pr, q, pos, sinks, out);
  std::vector<int64_t> kc = {-1, pr.D, -1};
  if (err.empty()) err = bind_operand(k, ffi::DataType::F32, pr.lead, kc, "dense keys [K, D, S]", &job->cache.k);
  pr.K = kc[0];
  pr.S = kc[2];
  std::vector<int64_t> vc = {pr.K, pr.S, pr.Dv};
  if (err.empty()) err = bind_operand(v, ffi::DataType::F32, pr.lead, vc, "dense values [K, S, D]", &job->cache.v);
  if (!err.empty()) return failed("dense attention: " + err);
  return launch(pool, job);
}

ffi::Future LatentImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer pos,
                       ffi::AnyBuffer sinks, ffi::AnyBuffer k, ffi::Result<ffi::AnyBuffer> out,
                       int64_t window, float scale, int64_t has_sinks, int64_t isa) {
  auto job = std::make_shared<Attend<LatentCache>>();
  Problem& pr = job->pr;
  std::string err = set_attrs(pr, window, scale, has_sinks, isa);
  if (err.empty()) err = bind_common(pr, q, pos, sinks, out);
  std::vector<int64_t> kc = {1, pr.D, -1};
  if (err.empty()) err = bind_operand(k, ffi::DataType::F32, pr.lead, kc, "latent cache [1, R + Dr, S]", &job->cache.k);
  pr.K = 1;
  pr.S = kc[2];
  if (err.empty() && pr.Dv > pr.D) err = "value_dim above the cached rows";
  if (!err.empty()) return failed("latent attention: " + err);
  return launch(pool, job);
}

// Reads one side's operands args[*at..] (norm, then each group's fields) as `groups` =
// [a0, b0, bits0, a1, ...] says; codebooks are taken from cb in the same order.
std::string bind_tq_side(const Problem& pr, const ffi::RemainingArgs& args, size_t* at,
                         ffi::Span<const int64_t> groups, const float** cb, const float* cb_end,
                         const std::string& what, TqSide* side) {
  auto nb = args.get<ffi::AnyBuffer>((*at)++);
  if (!nb.has_value()) return what + ": missing norm operand";
  std::vector<int64_t> nc = {pr.K, pr.S, 1};
  std::string err = bind_operand(*nb, ffi::DataType::F16, pr.lead, nc, what + " norm", &side->norm);
  if (!err.empty()) return err;
  if (groups.size() % 3) return what + ": groups must be (start, stop, bits) triples";
  int64_t covered = 0;
  for (size_t i = 0; i < groups.size(); i += 3) {
    TqSide::Group g;
    g.a = groups[i];
    g.b = groups[i + 1];
    g.bits = int(groups[i + 2]);
    if (g.bits < 1 || g.bits > 4 || g.a < 0 || g.b > pr.D || g.b <= g.a || (g.b - g.a) % 8)
      return what + ": bad channel group";
    covered += g.b - g.a;
    for (int w : {1, 2, 4}) {
      if (!(g.bits & w)) continue;
      auto fb = args.get<ffi::AnyBuffer>((*at)++);
      if (!fb.has_value()) return what + ": missing code operand";
      std::vector<int64_t> fc = {pr.K, pr.S, (g.b - g.a) * w / 8};
      Operand op;
      err = bind_operand(*fb, ffi::DataType::U8, pr.lead, fc, what + " codes", &op);
      if (!err.empty()) return err;
      g.fields.emplace_back(w, std::move(op));
    }
    g.codebook = *cb;
    *cb += 1 << g.bits;
    if (*cb > cb_end) return what + ": too few codebook entries";
    side->groups.push_back(std::move(g));
  }
  side->covers_all = covered == pr.D;
  return "";
}

ffi::Future TqImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer pos,
                   ffi::AnyBuffer sinks, ffi::AnyBuffer qbias, ffi::AnyBuffer vshift,
                   ffi::RemainingArgs args, ffi::Result<ffi::AnyBuffer> out, int64_t window,
                   float scale, int64_t has_sinks, int64_t isa, int64_t kv_heads, int64_t capacity,
                   ffi::Span<const int64_t> k_groups, ffi::Span<const int64_t> v_groups,
                   ffi::Span<const float> codebooks) {
  auto job = std::make_shared<Attend<TqCache>>();
  Problem& pr = job->pr;
  TqCache& c = job->cache;
  std::string err = set_attrs(pr, window, scale, has_sinks, isa);
  if (err.empty()) err = bind_common(pr, q, pos, sinks, out);
  pr.K = kv_heads;
  pr.S = capacity;
  if (err.empty() && pr.Dv != pr.D) err = "values must have the query's width";
  std::vector<int64_t> bc = {pr.T, pr.H}, sc = {pr.K, pr.D};
  if (err.empty()) err = bind_operand(qbias, ffi::DataType::F32, pr.lead, bc, "score bias [T, H]", &c.qbias);
  if (err.empty()) err = bind_operand(vshift, ffi::DataType::F32, pr.lead, sc, "value shift [K, D]", &c.vshift);
  c.codebooks.assign(codebooks.begin(), codebooks.end());
  const float* cb = c.codebooks.data();
  const float* cb_end = cb + c.codebooks.size();
  size_t at = 0;
  if (err.empty()) err = bind_tq_side(pr, args, &at, k_groups, &cb, cb_end, "keys", &c.k);
  if (err.empty()) err = bind_tq_side(pr, args, &at, v_groups, &cb, cb_end, "values", &c.v);
  if (err.empty() && at != args.size()) err = "unexpected extra operands";
  if (!err.empty()) return failed("turboquant attention: " + err);
  return launch(pool, job);
}

}  // namespace
}  // namespace lazymoe

XLA_FFI_DEFINE_HANDLER_SYMBOL(LazymoeAttnDense, lazymoe::DenseImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()  // q [..., T, H, D]
                                  .Arg<xla::ffi::AnyBuffer>()  // positions [..., T] int32
                                  .Arg<xla::ffi::AnyBuffer>()  // sinks [..., H]
                                  .Arg<xla::ffi::AnyBuffer>()  // keys [..., K, D, S]
                                  .Arg<xla::ffi::AnyBuffer>()  // values [..., K, S, D]
                                  .Ret<xla::ffi::AnyBuffer>()  // [..., T, H, D]
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("has_sinks")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LazymoeAttnLatent, lazymoe::LatentImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()  // q [..., T, H, R + Dr]
                                  .Arg<xla::ffi::AnyBuffer>()  // positions
                                  .Arg<xla::ffi::AnyBuffer>()  // sinks
                                  .Arg<xla::ffi::AnyBuffer>()  // latents [..., 1, R + Dr, S]
                                  .Ret<xla::ffi::AnyBuffer>()  // [..., T, H, R]
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("has_sinks")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LazymoeAttnTurboquant, lazymoe::TqImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()  // rotated q [..., T, H, D]
                                  .Arg<xla::ffi::AnyBuffer>()  // positions
                                  .Arg<xla::ffi::AnyBuffer>()  // sinks
                                  .Arg<xla::ffi::AnyBuffer>()  // score bias [..., T, H]
                                  .Arg<xla::ffi::AnyBuffer>()  // rotated value shift [..., K, D]
                                  .RemainingArgs()             // key norm, key codes, value norm, value codes
                                  .Ret<xla::ffi::AnyBuffer>()  // rotated output [..., T, H, D]
                                  .Attr<int64_t>("window")
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("has_sinks")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("kv_heads")
                                  .Attr<int64_t>("capacity")
                                  .Attr<xla::ffi::Span<const int64_t>>("k_groups")
                                  .Attr<xla::ffi::Span<const int64_t>>("v_groups")
                                  .Attr<xla::ffi::Span<const float>>("codebooks"));
