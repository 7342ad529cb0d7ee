// Dense products x [T, C] @ W^T -> [T, O] (q/k/v/o, router, shared experts, output head),
// W in one of the encodings of rowdot.h; the rows of W are claimed in units by the pool's
// workers (run_phases).
#include <memory>

#include "ffi_common.h"

namespace lazymoe {
namespace {

ffi::Future LinearImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                       ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t enc, int64_t group,
                       int64_t isa, int64_t levels) {
  std::string err = check_common(int(isa), int(levels));
  if (!err.empty()) return failed("linear: " + err);
  auto xd = x.dimensions();
  if (xd.size() != 2) return failed("linear: x must be [T, C], got " + dims_str(xd));
  const int64_t t = xd[0], c = xd[1];
  auto job = std::make_shared<std::pair<Weight, Act>>();
  Weight& w = job->first;
  if (args.size() != size_t(arrays_per_weight(int(enc))))
    return failed("linear: expected " + std::to_string(arrays_per_weight(int(enc))) +
                  " weight operands, got " + std::to_string(args.size()));
  err = read_weight(args, 0, int(enc), int(group), -1, c, "linear weight", &w);
  if (!err.empty()) return failed(err);
  auto yd = y->dimensions();
  if (yd.size() != 2 || yd[0] != t || yd[1] != w.rows)
    return failed("linear: output shape " + dims_str(yd) + " is not [T, O]");
  if (t == 0) {
    ffi::Promise p;
    ffi::Future f(p);
    p.SetAvailable();
    return f;
  }
  prepare(job->second, int(isa), int(enc), w.group, int(levels), x.typed_data(), c, int(t), 0, c);
  const int parts = num_parts(pool, double(w.rows) * c * t);
  float* out = y->typed_data();
  const int64_t o = w.rows;
  // claimed units of ~64K weights x tokens (multiples of the 4-row tile): a worker that starts
  // late (a pool thread woken from sleep, tens of microseconds here) leaves its share to the
  // others
  const int64_t per = rows_per_unit(o, double(c) * t, 65536.0, rows_align(int(isa), int(enc), t, 4));
  std::vector<Phase> phases(1);
  phases[0] = {(o + per - 1) / per, [job, per, o, out](int64_t u) {
                 const int64_t r0 = u * per, r1 = std::min(o, r0 + per);
                 rows(job->first, job->second, r0, r1, out + r0, o);
               }};
  return run_phases(pool, parts, std::move(phases), [] {});
}

}  // namespace
}  // namespace lazymoe

XLA_FFI_DEFINE_HANDLER_SYMBOL(LazymoeLinear, lazymoe::LinearImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int64_t>("enc")
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("levels"));

extern "C" {
// For the Python loader (ctypes): the variant chosen at load, and what this CPU can run.
__attribute__((visibility("default"))) int lazymoe_best_isa() { return lazymoe::best_isa(); }
__attribute__((visibility("default"))) int lazymoe_isa_supported(int isa) {
  return lazymoe::isa_supported(isa) ? 1 : 0;
}
}
