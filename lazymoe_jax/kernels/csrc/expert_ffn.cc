// The routed experts of one layer for T tokens in one call:
//   out = sum_j weights[:, j] * (W_down_j act(W_gate_up_j x + b_gate_up_j) + b_down_j)
// with w_gate_up [2I, H] (gate rows, then up rows), w_down [H, I], in one encoding.
//
// The experts either all see every token (moe_ffn; moe_ffn_pooled with slots [k]) or each
// sees only the tokens that picked it (moe_ffn_pooled with slots [T, k]: one decode token of
// each of T sequences, grouped by expert as prefill groups a prompt); then a phase (0) first
// gathers and prepares each expert's tokens, and every token's sum runs over its own picks in
// their order. A token's result does not depend on which other tokens share the call.
//
// Work split in four claimed phases (run_phases), after the grouped form's phase 0: (1) row
// chunks of every expert's gate and up products, each finished by the activation into the
// expert's hidden rows [tokens of the expert, I]; (2) the hidden rows prepared for the down
// product, one unit per expert, over the whole expert width; (3) row chunks of every expert's
// down product (plus its bias) into the expert's own output [tokens of the expert, H]; (4)
// chunks of output rows, each token's weighted sum over its picks in order. Units of (1) and
// (3) follow the experts' weights in memory order, so a worker's share of a phase is one
// stream per expert (run_phases; reading each output chunk across the k experts, as (3) did
// before, made k short streams per unit). Each output element is written by one unit, and
// the result does not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <memory>
#include <utility>

#include "ffi_common.h"

namespace lazymoe {
namespace {

enum ActKind : int { kSilu = 0, kClampedSwiglu = 1 };

struct MoeJob {
  int isa = 0, enc = 0, group = 0, levels = 2, act = kSilu;
  float alpha = 1.702f, limit = 7.0f;
  int64_t t = 0, h = 0, inter = 0;
  int64_t k = 0;   // experts in the call
  int64_t kt = 0;  // picks per token: the columns of weights (k unless grouped)
  std::vector<Weight> gu, dn;
  std::vector<const float*> b_gu, b_dn;
  const float* x = nullptr;        // [T, H]
  const float* weights = nullptr;  // [T, kt]
  const float* init = nullptr;     // [T, H] the sums start from (may be out itself), or zeros
  float* out = nullptr;            // [T, H]
  // grouped: the tokens of expert j (ascending); empty: every expert sees every token
  std::vector<std::vector<int32_t>> members;
  std::vector<int64_t> te;          // tokens of expert j
  std::vector<int32_t> pick, row;   // [T, kt]: the expert of each pick (-1: none), its row there
  std::vector<std::vector<float>> xg;   // grouped: expert j's tokens' rows of x [te, H]
  std::vector<Act> ax;                  // x prepared for the gate_up rows: one, or per expert
  std::vector<std::vector<float>> hid;  // per expert [te, I]
  std::vector<Act> ah;                  // hid prepared for the down rows
  std::vector<std::vector<float>> ydn;  // per expert [te, H]: its down product plus bias
  int64_t chunk_i = 0, chunk_o = 0, units_i = 0, units_o = 0, chunk_s = 0;

  const Act& x_of(int64_t j) const { return ax[ax.size() == 1 ? 0 : j]; }

  // Phase 0 (grouped) unit j: expert j's tokens gathered and prepared for its gate_up rows.
  void prepare_x(int64_t j) {
    const int64_t n = te[j];
    xg[j].resize(size_t(n * h));
    for (int64_t r = 0; r < n; ++r)
      std::copy(x + members[j][r] * h, x + (members[j][r] + 1) * h, xg[j].data() + r * h);
    prepare(ax[j], isa, enc, gu[j].group, levels, xg[j].data(), h, int(n), 0, h);
  }

  // Phase 1 unit u: gate / up rows [i0, i1) of expert u / units_i, then the activation.
  void gate_up(int64_t u) {
    const int64_t j = u / units_i, i0 = (u % units_i) * chunk_i;
    const int64_t i1 = std::min(inter, i0 + chunk_i), n = i1 - i0, tj = te[j];
    std::vector<float> gate(tj * n), up(tj * n);
    rows(gu[j], x_of(j), i0, i1, gate.data(), n);
    rows(gu[j], x_of(j), inter + i0, inter + i1, up.data(), n);
    for (int64_t tt = 0; tt < tj; ++tt)
      for (int64_t i = 0; i < n; ++i) {
        float g = gate[tt * n + i], uv = up[tt * n + i];
        if (b_gu[j]) {
          g += b_gu[j][i0 + i];
          uv += b_gu[j][inter + i0 + i];
        }
        float v;
        if (act == kSilu) {
          v = g / (1.0f + std::exp(-g)) * uv;
        } else {
          g = std::min(g, limit);
          uv = std::max(-limit, std::min(uv, limit));
          v = (uv + 1.0f) * (g / (1.0f + std::exp(-alpha * g)));
        }
        hid[j][tt * inter + i0 + i] = v;
      }
  }

  void prepare_down(int64_t j) {
    prepare(ah[j], isa, enc, group, levels, hid[j].data(), inter, int(te[j]), 0, inter);
  }

  // Phase 3 unit u: down rows [o0, o1) of expert u / units_o, plus its bias.
  void down(int64_t u) {
    const int64_t j = u / units_o, o0 = (u % units_o) * chunk_o;
    const int64_t o1 = std::min(h, o0 + chunk_o), n = o1 - o0;
    float* yd = ydn[j].data();
    rows(dn[j], ah[j], o0, o1, yd + o0, h);
    if (b_dn[j])
      for (int64_t tt = 0; tt < te[j]; ++tt)
        for (int64_t o = 0; o < n; ++o) yd[tt * h + o0 + o] += b_dn[j][o0 + o];
  }

  // Phase 4 unit u: output rows [o0, o1), the weighted sum over each token's picks in order.
  void sum(int64_t u) {
    const int64_t o0 = u * chunk_s, o1 = std::min(h, o0 + chunk_s);
    for (int64_t tt = 0; tt < t; ++tt) {
      float* y = out + tt * h;
      if (!init)
        std::fill(y + o0, y + o1, 0.0f);
      else if (init != out)
        std::copy(init + tt * h + o0, init + tt * h + o1, y + o0);
      for (int64_t j = 0; j < kt; ++j) {
        const int32_t e = pick[tt * kt + j];
        if (e < 0) continue;
        const float wj = weights[tt * kt + j];
        const float* d = ydn[e].data() + int64_t(row[tt * kt + j]) * h;
        for (int64_t o = o0; o < o1; ++o) y[o] += wj * d[o];
      }
    }
  }
};

// Runs a job whose weights are bound; members empty: every expert sees every token.
ffi::Future launch(ffi::ThreadPool pool, std::shared_ptr<MoeJob> job, const float* x,
                   const float* weights, float* out);

// The shared attributes of both handlers, checked.
std::string set_attrs(MoeJob& jb, int64_t enc, int64_t group, int64_t isa, int64_t levels,
                      int64_t act, float alpha, float limit) {
  std::string err = check_common(int(isa), int(levels));
  if (!err.empty()) return err;
  if (act != kSilu && act != kClampedSwiglu) return "unknown activation id";
  jb.isa = int(isa);
  jb.enc = int(enc);
  jb.group = int(group);
  jb.levels = int(levels);
  jb.act = int(act);
  jb.alpha = alpha;
  jb.limit = limit;
  return "";
}

ffi::Future MoeFfnImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> weights, ffi::RemainingArgs args,
                       ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t enc, int64_t group,
                       int64_t isa, int64_t levels, int64_t act, float alpha, float limit,
                       int64_t has_bias) {
  auto xd = x.dimensions(), wd = weights.dimensions();
  if (xd.size() != 2) return failed("moe_ffn: x must be [T, H], got " + dims_str(xd));
  auto job = std::make_shared<MoeJob>();
  MoeJob& jb = *job;
  std::string err = set_attrs(jb, enc, group, isa, levels, act, alpha, limit);
  if (!err.empty()) return failed("moe_ffn: " + err);
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
  return launch(pool, job, x.typed_data(), weights.typed_data(), y->typed_data());
}

// Runs a job whose weights are bound (gu, dn, b_gu, b_dn, t, h, inter, k, kt and the
// attributes; members, pick and row when grouped).
ffi::Future launch(ffi::ThreadPool pool, std::shared_ptr<MoeJob> job, const float* x,
                   const float* weights, float* out) {
  MoeJob& jb = *job;
  jb.x = x;
  jb.weights = weights;
  jb.out = out;
  if (jb.t == 0) {
    ffi::Promise p;
    ffi::Future f(p);
    p.SetAvailable();
    return f;
  }
  const bool grouped = !jb.members.empty();
  if (grouped) {
    jb.te.resize(jb.k);
    for (int64_t j = 0; j < jb.k; ++j) jb.te[j] = int64_t(jb.members[j].size());
    jb.xg.resize(jb.k);
    jb.ax.resize(jb.k);
  } else {  // pick j of token t is expert j, row t
    jb.kt = jb.k;
    jb.te.assign(jb.k, jb.t);
    jb.pick.resize(jb.t * jb.k);
    jb.row.resize(jb.t * jb.k);
    for (int64_t tt = 0; tt < jb.t; ++tt)
      for (int64_t j = 0; j < jb.k; ++j) {
        jb.pick[tt * jb.k + j] = int32_t(j);
        jb.row[tt * jb.k + j] = int32_t(tt);
      }
    jb.ax.resize(1);
    prepare(jb.ax[0], jb.isa, jb.enc, jb.gu[0].group, jb.levels, x, jb.h, int(jb.t), 0, jb.h);
  }
  int64_t pairs = 0;  // (token, expert) products
  for (int64_t n : jb.te) pairs += n;
  const int64_t tm = std::max<int64_t>(1, (pairs + jb.k - 1) / std::max<int64_t>(jb.k, 1));
  const int parts = num_parts(pool, 3.0 * double(jb.inter) * jb.h * pairs);
  // units of ~256K weights: gate + up rows of H columns; down rows of I columns; output rows
  // of kt x T sums (~64K); tm: an expert's tokens on average
  jb.chunk_i = rows_per_unit(jb.inter, 2.0 * jb.h * tm, 262144.0, rows_align(jb.isa, jb.enc, tm, 16));
  jb.chunk_o = rows_per_unit(jb.h, double(jb.inter) * tm, 262144.0, rows_align(jb.isa, jb.enc, tm, 4));
  jb.chunk_s = rows_per_unit(jb.h, double(jb.kt) * jb.t, 65536.0, 16);
  jb.units_i = (jb.inter + jb.chunk_i - 1) / jb.chunk_i;
  jb.units_o = (jb.h + jb.chunk_o - 1) / jb.chunk_o;
  jb.hid.resize(jb.k);
  jb.ydn.resize(jb.k);
  for (int64_t j = 0; j < jb.k; ++j) {
    jb.hid[j].assign(size_t(jb.te[j] * jb.inter), 0.0f);
    jb.ydn[j].assign(size_t(jb.te[j] * jb.h), 0.0f);
  }
  jb.ah.resize(jb.k);
  std::vector<Phase> phases;
  if (grouped) phases.push_back({jb.k, [job](int64_t j) { job->prepare_x(j); }});
  phases.push_back({jb.k * jb.units_i, [job](int64_t u) { job->gate_up(u); }});
  phases.push_back({jb.k, [job](int64_t j) { job->prepare_down(j); }});
  phases.push_back({jb.k * jb.units_o, [job](int64_t u) { job->down(u); }});
  phases.push_back({(jb.h + jb.chunk_s - 1) / jb.chunk_s, [job](int64_t u) { job->sum(u); }});
  return run_phases(pool, parts, std::move(phases), [] {});
}

// Bytes of a [rows, cols] weight's data and scale arrays in `enc` (encodings.py's layouts).
void weight_bytes(int enc, int group, int64_t rows, int64_t cols, int64_t* data, int64_t* scale) {
  switch (enc) {
    case kF32: *data = rows * cols * 4; *scale = 0; break;
    case kBF16: *data = rows * cols * 2; *scale = 0; break;
    case kI8: *data = rows * cols; *scale = rows * 4; break;
    case kI4: *data = rows * cols / 2; *scale = rows * (cols / group) * 2; break;
    default: *data = rows * cols / 2; *scale = rows * (cols / 32); break;  // kMXFP4
  }
}

// The same experts, located in the expert pool's arena (store/pool.py: every slot's arrays
// carved out of one mapping, `slot_bytes` apart) by slot indices, an input of the program:
// a decode step can pick its experts without a round trip to the host. slots [k]: every
// token runs through the k experts; slots [T, k]: token t through its own row, -1 for no
// expert (a batch's padding rows), each distinct slot's expert run once over the tokens
// naming it, the slots in ascending order. Each token's sum starts from its row of `init`
// (zeros, or the sums of earlier experts: aliased to the output, it is added to in place).
// offsets = the byte offsets inside a slot of w_gate_up, its scale, w_down, its scale,
// b_gate_up, b_down (-1: absent).
ffi::Future MoeFfnPooledImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::S32> slots,
                             ffi::AnyBuffer arena, ffi::Buffer<ffi::F32> init,
                             ffi::Result<ffi::Buffer<ffi::F32>> y,
                             int64_t enc, int64_t group, int64_t isa, int64_t levels, int64_t act,
                             float alpha, float limit, int64_t inter, int64_t slot_bytes,
                             ffi::Span<const int64_t> offsets) {
  auto xd = x.dimensions(), wd = weights.dimensions(), sd = slots.dimensions();
  if (xd.size() != 2) return failed("moe_ffn_pooled: x must be [T, H], got " + dims_str(xd));
  if (sd.size() != 1 && !(sd.size() == 2 && sd[0] == xd[0]))
    return failed("moe_ffn_pooled: slots must be [k] or [T, k] with T = " +
                  std::to_string(xd[0]) + " (x's rows), got " + dims_str(sd));
  const bool grouped = sd.size() == 2;
  auto job = std::make_shared<MoeJob>();
  MoeJob& jb = *job;
  std::string err = set_attrs(jb, enc, group, isa, levels, act, alpha, limit);
  if (!err.empty()) return failed("moe_ffn_pooled: " + err);
  if (enc < kF32 || enc > kMXFP4)
    return failed("moe_ffn_pooled: unknown encoding id " + std::to_string(enc));
  if (enc == kI4 && group != 32 && group != 64 && group != 128)
    return failed("moe_ffn_pooled: int4 group must be 32, 64 or 128");
  jb.t = xd[0];
  jb.h = xd[1];
  jb.kt = sd[sd.size() - 1];
  jb.inter = inter;
  if (jb.kt <= 0) return failed("moe_ffn_pooled: slots must name at least one expert");
  constexpr int64_t kMaxWidth = int64_t(1) << 24;  // as read_weight's column limit
  if (jb.h > kMaxWidth || inter > kMaxWidth)
    return failed("moe_ffn_pooled: expert sizes out of range");
  if (wd.size() != 2 || wd[0] != jb.t || wd[1] != jb.kt)
    return failed("moe_ffn_pooled: weights must be [T, k] = [" + std::to_string(jb.t) + ", " +
                  std::to_string(jb.kt) + "], got " + dims_str(wd));
  auto yd = y->dimensions();
  if (yd.size() != 2 || yd[0] != jb.t || yd[1] != jb.h)
    return failed("moe_ffn_pooled: output shape " + dims_str(yd) + " is not [T, H]");
  auto id = init.dimensions();
  if (id.size() != 2 || id[0] != jb.t || id[1] != jb.h)
    return failed("moe_ffn_pooled: init shape " + dims_str(id) + " is not [T, H]");
  if (arena.element_type() != ffi::DataType::U8 || arena.dimensions().size() != 1)
    return failed("moe_ffn_pooled: the arena must be uint8 [bytes]");
  if (offsets.size() != 6) return failed("moe_ffn_pooled: offsets must have 6 entries");
  const int grp = enc == kI4 ? int(group) : 32;
  if (inter <= 0 || jb.h <= 0 || (enc >= kI4 && (jb.h % grp || inter % grp)))
    return failed("moe_ffn_pooled: expert sizes do not fit the encoding's blocks");
  // every array's extent inside a slot, checked against slot_bytes
  int64_t size[6];
  weight_bytes(int(enc), grp, 2 * inter, jb.h, &size[0], &size[1]);
  weight_bytes(int(enc), grp, jb.h, inter, &size[2], &size[3]);
  size[4] = 2 * inter * 4;
  size[5] = jb.h * 4;
  const bool scaled = arrays_per_weight(int(enc)) == 2;
  const bool has_bias = offsets[4] >= 0;
  if ((offsets[5] >= 0) != has_bias) return failed("moe_ffn_pooled: give both biases, or none");
  for (int a = 0; a < 6; ++a) {
    const bool need = a == 0 || a == 2 || ((a == 1 || a == 3) && scaled) || (a >= 4 && has_bias);
    // written as size > room so that no sum can overflow; 4-byte aligned for the float
    // scales and biases (the pool aligns every array to a page)
    if (need && (offsets[a] < 0 || offsets[a] % 4 || offsets[a] > slot_bytes ||
                 size[a] > slot_bytes - offsets[a]))
      return failed("moe_ffn_pooled: array " + std::to_string(a) + " at offset " +
                    std::to_string(offsets[a]) + " does not fit a slot of " +
                    std::to_string(slot_bytes) + " bytes (or is not 4-byte aligned)");
  }
  const int64_t num_slots = slot_bytes > 0 ? arena.dimensions()[0] / slot_bytes : 0;
  const uint8_t* base = static_cast<const uint8_t*>(arena.untyped_data());
  const int32_t* sl = slots.typed_data();
  const int64_t count = grouped ? jb.t * jb.kt : jb.kt;
  for (int64_t i = 0; i < count; ++i)
    if (sl[i] < (grouped ? -1 : 0) || sl[i] >= num_slots)
      return failed("moe_ffn_pooled: slot " + std::to_string(sl[i]) + " of " +
                    (grouped ? "token " + std::to_string(i / jb.kt) + ", pick " +
                                   std::to_string(i % jb.kt)
                             : "expert " + std::to_string(i)) +
                    " is outside the pool's " + std::to_string(num_slots) + " slots" +
                    (grouped ? " (-1: none)" : ""));
  std::vector<int32_t> used(sl, sl + jb.kt);  // the experts' slots, in the call's order
  if (grouped) {  // distinct slots ascending; each token's picks mapped to (expert, row)
    used.assign(sl, sl + count);
    std::sort(used.begin(), used.end());
    used.erase(std::unique(used.begin(), used.end()), used.end());
    if (!used.empty() && used[0] < 0) used.erase(used.begin());
    jb.members.assign(used.size(), {});
    jb.pick.assign(size_t(count), -1);
    jb.row.assign(size_t(count), 0);
    for (int64_t tt = 0; tt < jb.t; ++tt)
      for (int64_t j = 0; j < jb.kt; ++j) {
        const int32_t s = sl[tt * jb.kt + j];
        if (s < 0) continue;
        const int32_t e = int32_t(std::lower_bound(used.begin(), used.end(), s) - used.begin());
        jb.pick[tt * jb.kt + j] = e;
        jb.row[tt * jb.kt + j] = int32_t(jb.members[e].size());
        jb.members[e].push_back(int32_t(tt));
      }
    // where a single token's product sums in another order than several tokens' (rowdot.h),
    // an expert that one token picked runs over that row twice: the layer loop runs every
    // expert over two rows at least, and the results equal it bit for bit
    if (one_token_sums_apart(int(isa), int(enc), jb.h) ||
        one_token_sums_apart(int(isa), int(enc), inter))
      for (auto& m : jb.members)
        if (m.size() == 1) m.push_back(m[0]);
  }
  jb.k = int64_t(used.size());
  if (jb.k == 0) {  // every row padding: the sums as they start
    if (init.typed_data() != y->typed_data())
      std::copy(init.typed_data(), init.typed_data() + jb.t * jb.h, y->typed_data());
    jb.t = 0;
  }
  jb.init = init.typed_data();
  for (int64_t j = 0; j < jb.k; ++j) {
    const uint8_t* s0 = base + int64_t(used[j]) * slot_bytes;
    Weight g, d;
    g.enc = d.enc = int(enc);
    g.group = d.group = enc == kI4 ? int(group) : (enc == kMXFP4 ? 32 : 0);
    g.w = s0 + offsets[0];
    g.scale = scaled ? s0 + offsets[1] : nullptr;
    g.rows = 2 * inter;
    g.cols = jb.h;
    d.w = s0 + offsets[2];
    d.scale = scaled ? s0 + offsets[3] : nullptr;
    d.rows = jb.h;
    d.cols = inter;
    jb.gu.push_back(g);
    jb.dn.push_back(d);
    jb.b_gu.push_back(has_bias ? reinterpret_cast<const float*>(s0 + offsets[4]) : nullptr);
    jb.b_dn.push_back(has_bias ? reinterpret_cast<const float*>(s0 + offsets[5]) : nullptr);
  }
  return launch(pool, job, x.typed_data(), weights.typed_data(), y->typed_data());
}

}  // namespace
}  // namespace lazymoe

namespace {
// The attributes both handlers take first, in the order of set_attrs' parameters.
template <typename Binding>
auto moe_attrs(Binding&& b) {
  return std::move(b)
      .template Attr<int64_t>("enc")
      .template Attr<int64_t>("group")
      .template Attr<int64_t>("isa")
      .template Attr<int64_t>("levels")
      .template Attr<int64_t>("act")
      .template Attr<float>("alpha")
      .template Attr<float>("limit");
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LazymoeMoeFfn, lazymoe::MoeFfnImpl,
                              moe_attrs(xla::ffi::Ffi::Bind()
                                            .Ctx<xla::ffi::ThreadPool>()
                                            .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // x [T, H]
                                            .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // weights [T, k]
                                            .RemainingArgs()                         // per expert
                                            .Ret<xla::ffi::Buffer<xla::ffi::F32>>())  // [T, H]
                                  .Attr<int64_t>("has_bias"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LazymoeMoeFfnPooled, lazymoe::MoeFfnPooledImpl,
                              moe_attrs(xla::ffi::Ffi::Bind()
                                            .Ctx<xla::ffi::ThreadPool>()
                                            .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // x [T, H]
                                            .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // weights [T, k]
                                            .Arg<xla::ffi::Buffer<xla::ffi::S32>>()  // slots [k]
                                            .Arg<xla::ffi::AnyBuffer>()  // arena uint8 [bytes]
                                            .Arg<xla::ffi::Buffer<xla::ffi::F32>>()  // init [T, H]
                                            .Ret<xla::ffi::Buffer<xla::ffi::F32>>())  // [T, H]
                                  .Attr<int64_t>("inter")
                                  .Attr<int64_t>("slot_bytes")
                                  .Attr<xla::ffi::Span<const int64_t>>("offsets"));
