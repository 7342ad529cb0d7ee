// The routed experts of one layer for T tokens in one call:
//   out = sum_j weights[:, j] * (W_down_j act(W_gate_up_j x + b_gate_up_j) + b_down_j)
// with w_gate_up [2I, H] (gate rows, then up rows), w_down [H, I], in one encoding.
//
// Work split without a barrier: part p of the pool takes the expert-width slice [i0, i1) of
// every expert: its gate and up rows, the activation, and its columns of w_down, giving a
// partial [T, H] output; the part that ends last adds the partials and the down biases. So
// the intermediate activation of a part is quantised over its own slice (its own int8 step).
#include <cmath>
#include <memory>

#include "ffi_common.h"

namespace lazymoe {
namespace {

enum ActKind : int { kSilu = 0, kClampedSwiglu = 1 };

struct MoeJob {
  int isa = 0, enc = 0, group = 0, levels = 2, act = kSilu;
  float alpha = 1.702f, limit = 7.0f;
  int64_t t = 0, h = 0, inter = 0, k = 0;
  std::vector<Weight> gu, dn;
  std::vector<const float*> b_gu, b_dn;
  const float* weights = nullptr;  // [T, k]
  float* out = nullptr;            // [T, H]
  Act ax;                          // x prepared for the gate_up rows
  std::vector<int64_t> bounds;     // parts + 1 boundaries of the expert width
  std::vector<std::vector<float>> partial;

  void work(int p) {
    const int64_t i0 = bounds[p], i1 = bounds[p + 1], n = i1 - i0;
    std::vector<float>& acc = partial[p];
    acc.assign(size_t(t * h), 0.0f);
    if (n <= 0) return;
    std::vector<float> gate(t * n), up(t * n), hid(t * n), yd(t * h);
    for (int64_t j = 0; j < k; ++j) {
      rows(isa, gu[j], ax, i0, i1, gate.data(), n);
      rows(isa, gu[j], ax, inter + i0, inter + i1, up.data(), n);
      for (int64_t tt = 0; tt < t; ++tt)
        for (int64_t i = 0; i < n; ++i) {
          float g = gate[tt * n + i], u = up[tt * n + i];
          if (b_gu[j]) {
            g += b_gu[j][i0 + i];
            u += b_gu[j][inter + i0 + i];
          }
          float v;
          if (act == kSilu) {
            v = g / (1.0f + std::exp(-g)) * u;
          } else {
            g = std::min(g, limit);
            u = std::max(-limit, std::min(u, limit));
            v = (u + 1.0f) * (g / (1.0f + std::exp(-alpha * g)));
          }
          hid[tt * n + i] = v;
        }
      Act ah;
      prepare(ah, enc, group, levels, hid.data(), n, int(t), i0, n);
      rows(isa, dn[j], ah, 0, h, yd.data(), h);
      for (int64_t tt = 0; tt < t; ++tt) {
        const float wj = weights[tt * k + j];
        float* a = acc.data() + tt * h;
        const float* d = yd.data() + tt * h;
        for (int64_t o = 0; o < h; ++o) a[o] += wj * d[o];
      }
    }
  }

  void finish() {
    for (int64_t tt = 0; tt < t; ++tt) {
      float* y = out + tt * h;
      for (int64_t o = 0; o < h; ++o) {
        float s = 0;
        for (size_t p = 0; p < partial.size(); ++p) s += partial[p][tt * h + o];
        y[o] = s;
      }
      for (int64_t j = 0; j < k; ++j)
        if (b_dn[j]) {
          const float wj = weights[tt * k + j];
          for (int64_t o = 0; o < h; ++o) y[o] += wj * b_dn[j][o];
        }
    }
  }
};

ffi::Future MoeFfnImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> weights, ffi::RemainingArgs args,
                       ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t enc, int64_t group,
                       int64_t isa, int64_t levels, int64_t act, float alpha, float limit,
                       int64_t has_bias) {
  std::string err = check_common(int(isa), int(levels));
  if (!err.empty()) return failed("moe_ffn: " + err);
  if (act != kSilu && act != kClampedSwiglu) return failed("moe_ffn: unknown activation id");
  auto xd = x.dimensions(), wd = weights.dimensions();
  if (xd.size() != 2) return failed("moe_ffn: x must be [T, H], got " + dims_str(xd));
  auto job = std::make_shared<MoeJob>();
  MoeJob& jb = *job;
  jb.isa = int(isa);
  jb.enc = int(enc);
  jb.group = int(group);
  jb.levels = int(levels);
  jb.act = int(act);
  jb.alpha = alpha;
  jb.limit = limit;
  jb.t = xd[0];
  jb.h = xd[1];
  const int na = arrays_per_weight(int(enc));
  const int per = 2 * na + (has_bias ? 2 : 0);
  if (args.size() == 0 || args.size() % per)
    return failed("moe_ffn: " + std::to_string(args.size()) + " expert operands is not a multiple of " +
                  std::to_string(per) + " (arrays per expert)");
  jb.k = int64_t(args.size()) / per;
  if (wd.size() != 2 || wd[0] != jb.t || wd[1] != jb.k)
    return failed("moe_ffn: weights must be [T, k] = [" + std::to_string(jb.t) + ", " +
                  std::to_string(jb.k) + "], got " + dims_str(wd));
  auto yd = y->dimensions();
  if (yd.size() != 2 || yd[0] != jb.t || yd[1] != jb.h)
    return failed("moe_ffn: output shape " + dims_str(yd) + " is not [T, H]");
  for (int64_t j = 0; j < jb.k; ++j) {
    const size_t base = size_t(j * per);
    const std::string e = "expert " + std::to_string(j);
    Weight g, d;
    err = read_weight(args, base, int(enc), int(group), -1, jb.h, e + " w_gate_up", &g);
    if (err.empty() && (g.rows % 2)) err = e + " w_gate_up: odd number of rows";
    if (err.empty()) {
      if (j == 0) jb.inter = g.rows / 2;
      if (g.rows != 2 * jb.inter) err = e + " w_gate_up: rows differ from expert 0";
    }
    if (err.empty())
      err = read_weight(args, base + na, int(enc), int(group), jb.h, jb.inter, e + " w_down", &d);
    if (!err.empty()) return failed("moe_ffn: " + err);
    jb.gu.push_back(g);
    jb.dn.push_back(d);
    const float* bg = nullptr;
    const float* bd = nullptr;
    if (has_bias) {
      auto b1 = args.get<ffi::AnyBuffer>(base + 2 * na), b2 = args.get<ffi::AnyBuffer>(base + 2 * na + 1);
      if (!b1.has_value() || !b2.has_value()) return failed("moe_ffn: " + e + " missing bias");
      err = check(*b1, ffi::DataType::F32, {2 * jb.inter}, e + " b_gate_up");
      if (err.empty()) err = check(*b2, ffi::DataType::F32, {jb.h}, e + " b_down");
      if (!err.empty()) return failed("moe_ffn: " + err);
      bg = static_cast<const float*>(b1->untyped_data());
      bd = static_cast<const float*>(b2->untyped_data());
    }
    jb.b_gu.push_back(bg);
    jb.b_dn.push_back(bd);
  }
  jb.weights = weights.typed_data();
  jb.out = y->typed_data();
  if (jb.t == 0) {
    ffi::Promise p;
    ffi::Future f(p);
    p.SetAvailable();
    return f;
  }
  prepare(jb.ax, jb.enc, jb.gu[0].group, jb.levels, x.typed_data(), jb.h, int(jb.t), 0, jb.h);
  const int parts = num_parts(pool, 3.0 * double(jb.inter) * jb.h * jb.k * jb.t);
  // slice boundaries: multiples of the int4 group (>= 64) or of 64 columns, the last at I
  const int64_t unit = jb.enc == kI4 ? std::max<int64_t>(64, group) : 64;
  jb.bounds.resize(parts + 1);
  for (int p = 0; p < parts; ++p)
    jb.bounds[p] = std::min(jb.inter, (jb.inter * p / parts + unit / 2) / unit * unit);
  jb.bounds[parts] = jb.inter;
  jb.partial.resize(parts);
  return run_parts(pool, parts, [job](int p) { job->work(p); }, [job] { job->finish(); });
}

}  // namespace
}  // namespace lazymoe

XLA_FFI_DEFINE_HANDLER_SYMBOL(LazymoeMoeFfn, lazymoe::MoeFfnImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // x [T, H]
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // weights [T, k]
                                  .RemainingArgs()                         // per expert
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()  // [T, H]
                                  .Attr<int64_t>("enc")
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("levels")
                                  .Attr<int64_t>("act")
                                  .Attr<float>("alpha")
                                  .Attr<float>("limit")
                                  .Attr<int64_t>("has_bias"));
