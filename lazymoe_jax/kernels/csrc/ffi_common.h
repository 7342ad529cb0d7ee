// What the FFI handlers share: reading an encoded weight from its operands with checks, and
// splitting work over XLA:CPU's intra-op thread pool without blocking the handler.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#ifdef __linux__
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "rowdot.h"
#include "xla/ffi/api/ffi.h"

namespace lazymoe {
namespace ffi = xla::ffi;

inline std::string dims_str(ffi::AnyBuffer::Dimensions d) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < d.size(); ++i) s << (i ? ", " : "") << d[i];
  s << "]";
  return s.str();
}

inline std::string dims_str(const std::vector<int64_t>& d) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < d.size(); ++i) s << (i ? ", " : "") << d[i];
  s << "]";
  return s.str();
}

// "" when buffer b has dtype t and dimensions want, else a message naming it.
inline std::string check(const ffi::AnyBuffer& b, ffi::DataType t, const std::vector<int64_t>& want,
                         const std::string& what) {
  auto d = b.dimensions();
  bool ok = b.element_type() == t && d.size() == want.size();
  for (size_t i = 0; ok && i < want.size(); ++i) ok = d[i] == want[i];
  if (ok) return "";
  std::ostringstream s;
  s << what << ": got dtype " << int(b.element_type()) << " shape " << dims_str(d)
    << ", expected dtype " << int(t) << " shape " << dims_str(want);
  return s.str();
}

inline int arrays_per_weight(int enc) { return (enc == kF32 || enc == kBF16) ? 1 : 2; }

// Reads the weight at args[i] (and its scale at args[i + 1]) of encoding enc, checking
// dtypes and the layout of encodings.py. rows / cols < 0: take them from the array.
inline std::string read_weight(const ffi::RemainingArgs& args, size_t i, int enc, int group,
                               int64_t rows, int64_t cols, const std::string& what, Weight* w) {
  auto main = args.get<ffi::AnyBuffer>(i);
  if (!main.has_value()) return what + ": missing operand";
  ffi::AnyBuffer a = *main;
  auto d = a.dimensions();
  w->enc = enc;
  w->group = enc == kI4 ? group : (enc == kMXFP4 ? 32 : 0);
  w->w = a.untyped_data();
  const int64_t o = rows >= 0 ? rows : (d.size() > 0 ? d[0] : -1);
  std::string err;
  if (enc == kF32 || enc == kBF16) {
    const int64_t c = cols >= 0 ? cols : (d.size() == 2 ? d[1] : -1);
    err = check(a, enc == kF32 ? ffi::DataType::F32 : ffi::DataType::BF16, {o, c}, what);
    w->rows = o;
    w->cols = c;
    return err;
  }
  auto sb = args.get<ffi::AnyBuffer>(i + 1);
  if (!sb.has_value()) return what + ": missing scale operand";
  w->scale = sb->untyped_data();
  if (enc == kI8) {
    const int64_t c = cols >= 0 ? cols : (d.size() == 2 ? d[1] : -1);
    err = check(a, ffi::DataType::S8, {o, c}, what);
    if (err.empty()) err = check(*sb, ffi::DataType::F32, {o}, what + " scale");
    w->rows = o;
    w->cols = c;
  } else if (enc == kI4) {
    if (group != 32 && group != 64 && group != 128) return what + ": int4 group must be 32, 64 or 128";
    const int64_t c = cols >= 0 ? cols : (d.size() == 3 ? d[2] * group : -1);
    if (c % group) return what + ": int4 group does not divide the input width";
    err = check(a, ffi::DataType::S8, {o, group / 2, c / group}, what);
    if (err.empty()) err = check(*sb, ffi::DataType::F16, {o, c / group}, what + " scale");
    w->rows = o;
    w->cols = c;
  } else if (enc == kMXFP4) {
    const int64_t c = cols >= 0 ? cols : (d.size() == 3 ? d[1] * 32 : -1);
    if (c % 32) return what + ": mxfp4 blocks of 32 do not divide the input width";
    err = check(a, ffi::DataType::U8, {o, c / 32, 16}, what);
    if (err.empty()) err = check(*sb, ffi::DataType::U8, {o, c / 32}, what + " scale");
    w->rows = o;
    w->cols = c;
  } else {
    return what + ": unknown encoding id " + std::to_string(enc);
  }
  if (err.empty() && (w->cols > (int64_t(1) << 24) || w->cols <= 0 || w->rows <= 0))
    err = what + ": sizes out of range";
  return err;
}

inline ffi::Future failed(const std::string& msg) {
  ffi::Promise p;
  ffi::Future f(p);
  p.SetError(ffi::Error(ffi::ErrorCode::kInvalidArgument, "lazymoe kernels: " + msg));
  return f;
}

inline std::string check_common(int isa, int levels) {
  if (!isa_supported(isa)) return "ISA variant " + std::to_string(isa) + " is not supported by this CPU";
  if (levels != 1 && levels != 2) return "levels must be 1 or 2";
  return "";
}

// One phase of run_phases(): `units` independent pieces of work, run(u) for u < units.
struct Phase {
  int64_t units = 0;
  std::function<void(int64_t)> run;
};

inline void spin_pause(int& spins) {
  if (++spins < 64) {
#ifdef LAZYMOE_X86
    _mm_pause();
#endif
  } else {
    std::this_thread::yield();
  }
}

// LAZYMOE_KERNELS_TRACE set (to anything; a diagnostic, BUILD_NOTES "session 10"): every
// run_phases() call prints one line to stderr when it returns: the call's start (T, seconds of
// the steady clock), then per worker the microseconds after the call at which it started and
// entered each phase, and the units it ran there ("w1@40 p0@42 n21/44 ..."), on Linux also the
// CPU and thread it started on ("cpu1 tid4242"); the calling thread's part ends with the time
// its pool tasks were scheduled by ("scheduled@1"). A pool worker that has not ended by then is
// left out of the line (its units are still counted in "n").
inline bool trace_phases() {
  static const bool on = std::getenv("LAZYMOE_KERNELS_TRACE") != nullptr;
  return on;
}

// A contiguous range of a phase's units, [front, back) packed in one atomic word, claimed from
// the front by its owner and from the back by the others (BUILD_NOTES "session 13").
struct Span {
  std::atomic<uint64_t> fb{0};
  static uint64_t pack(uint32_t f, uint32_t b) { return uint64_t(b) << 32 | f; }
  void set(int64_t f, int64_t b) { fb.store(pack(uint32_t(f), uint32_t(b))); }
  // The claimed unit, or -1 when the range is empty.
  int64_t take(bool from_front) {
    uint64_t v = fb.load(std::memory_order_relaxed);
    for (;;) {
      const uint32_t f = uint32_t(v), b = uint32_t(v >> 32);
      if (f >= b) return -1;
      const uint64_t nv = from_front ? pack(f + 1, b) : pack(f, b - 1);
      if (fb.compare_exchange_weak(v, nv, std::memory_order_relaxed)) return from_front ? f : b - 1;
    }
  }
};

// Runs the phases in order on `parts` workers (the calling thread and parts - 1 pool tasks),
// then finish(), and returns a completed future. Each worker owns a contiguous share of every
// phase's units and runs it front to back, so its weight rows stream as one sequence; a worker
// that has run its share takes units from the back of the others' shares, so a worker that
// starts late or is descheduled leaves the rest of its share to the others. (A single shared
// counter dealt the units out alternately, and each worker's stream restarted at every unit:
// int4 one token at 14 GB/s on two threads against 32 for two separate streams.) Phase i + 1
// starts when every unit of phase i has completed. A worker with nothing left to claim waits
// only for units that running workers have claimed, never for a task that has not started, so
// it cannot deadlock on a busy pool (a late task finds everything claimed and returns). The
// calling thread waits so for the last phase too, then runs finish() itself: the future is
// complete when XLA gets it, so XLA's thread never sleeps on it and is never woken by a pool
// thread (on these VMs a wake-up costs ~50 us; BUILD_NOTES "session 10").
inline ffi::Future run_phases(ffi::ThreadPool& pool, int parts, std::vector<Phase> phases,
                              std::function<void()> finish) {
  struct Ctl {
    std::vector<Phase> phases;
    int parts = 1;
    std::unique_ptr<Span[]> spans;  // [phase][worker]
    std::unique_ptr<std::atomic<int64_t>[]> done;
    std::chrono::steady_clock::time_point t0;  // for the trace
    std::mutex mu;
    std::string trace;  // the lines of the pool workers that have ended
  };
  auto ctl = std::make_shared<Ctl>();
  ctl->t0 = std::chrono::steady_clock::now();
  for (Phase& ph : phases) {
    ph.units = std::max<int64_t>(ph.units, 1);  // run(0) of an empty phase
    if (ph.units >= (int64_t(1) << 32)) return failed("a phase of 2^32 units or more (Span is 32-bit)");
  }
  const size_t np = phases.size();
  parts = std::max(parts, 1);
  ctl->phases = std::move(phases);
  ctl->parts = parts;
  ctl->spans.reset(new Span[np * parts]);
  ctl->done.reset(new std::atomic<int64_t>[np]);
  for (size_t i = 0; i < np; ++i) {
    const int64_t u = ctl->phases[i].units;
    for (int w = 0; w < parts; ++w) ctl->spans[i * parts + w].set(u * w / parts, u * (w + 1) / parts);
    ctl->done[i].store(0);
  }
  auto wait_done = [](const Ctl& c, size_t i) {  // every unit of phase i has completed
    int spins = 0;
    while (c.done[i].load(std::memory_order_acquire) < c.phases[i].units) spin_pause(spins);
  };
  // Runs the phases; returns the worker's trace line (empty unless tracing).
  auto worker = [ctl, np, wait_done](int wid) -> std::string {
    const bool tr = trace_phases();
    std::string line;
    auto at = [&](const char* what, long long n) {  // " p1@1293": phase 1 entered at 1293 us
      const double us = std::chrono::duration<double, std::micro>(
                            std::chrono::steady_clock::now() - ctl->t0).count();
      char buf[48];
      snprintf(buf, sizeof buf, " %s%lld@%.0f", what, n, us);
      line += buf;
    };
    if (tr) {
      at("w", wid);
#ifdef __linux__
      char buf[48];  // " cpu1 tid4242": where the worker runs
      snprintf(buf, sizeof buf, " cpu%d tid%ld", sched_getcpu(), long(syscall(SYS_gettid)));
      line += buf;
#endif
    }
    for (size_t i = 0; i < np; ++i) {
      if (i > 0) wait_done(*ctl, i - 1);
      if (tr) at("p", (long long)i);
      const Phase& ph = ctl->phases[i];
      long long ran = 0;
      Span* sp = &ctl->spans[i * ctl->parts];
      for (int v = 0; v < ctl->parts;) {  // own share (v = 0), then the others' from the back
        const int owner = (wid + v) % ctl->parts;
        const int64_t u = sp[owner].take(v == 0);
        if (u < 0) {
          ++v;
          continue;
        }
        ph.run(u);
        ++ran;
        ctl->done[i].fetch_add(1, std::memory_order_acq_rel);
      }
      if (tr) {  // " n21/44": 21 of the phase's 44 units
        char buf[48];
        snprintf(buf, sizeof buf, " n%lld/%lld", ran, (long long)ph.units);
        line += buf;
      }
    }
    if (tr) at("done", 0);
    return line;
  };
  for (int p = 1; p < parts; ++p)
    pool.Schedule([worker, ctl, p] {
      std::string line = worker(p);
      if (!line.empty()) {
        std::lock_guard<std::mutex> lock(ctl->mu);
        ctl->trace += line;
      }
    });
  const double sched_us = trace_phases() ? std::chrono::duration<double, std::micro>(
                              std::chrono::steady_clock::now() - ctl->t0).count() : 0.0;
  std::string line = worker(0);
  if (trace_phases() && parts > 1) {
    char buf[48];
    snprintf(buf, sizeof buf, " scheduled@%.0f", sched_us);
    line += buf;
  }
  if (np > 0) wait_done(*ctl, np - 1);
  finish();
  if (!line.empty()) {
    std::lock_guard<std::mutex> lock(ctl->mu);
    const double t0 = std::chrono::duration<double>(ctl->t0.time_since_epoch()).count();
    fprintf(stderr, "lazymoe phases: T%.6f%s |%s\n", t0, ctl->trace.c_str(), line.c_str());
  }
  ffi::Promise promise;
  ffi::Future future(promise);
  promise.SetAvailable();
  return future;
}

// Units of about `target` weights each over n rows of `per_row` weights: rows per unit, a
// multiple of `align` (the row tiles), at least `align`.
inline int64_t rows_per_unit(int64_t n, double per_row, double target, int64_t align) {
  int64_t r = int64_t(target / std::max(per_row, 1.0)) / align * align;
  r = std::max<int64_t>(r, align);
  return std::min<int64_t>(r, std::max<int64_t>(n, 1));
}

// Workers per call: the pool's threads, at most LAZYMOE_KERNELS_THREADS when that is set (to
// measure one core, BUILD_NOTES "session 10").
inline int num_parts(ffi::ThreadPool& pool, double work) {
  static const char* cap_env = std::getenv("LAZYMOE_KERNELS_THREADS");
  static const int64_t cap = cap_env ? std::atoll(cap_env) : 0;
  int64_t n = pool.num_threads();
  if (cap > 0) n = std::min(n, cap);
  if (work < double(1 << 16)) return 1;  // tiny products: one fork-join costs more
  return int(std::max<int64_t>(1, std::min<int64_t>(n, 64)));
}

}  // namespace lazymoe
