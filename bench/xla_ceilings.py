r"""The ceilings XLA-CPU puts on expert products here: why some kernel targets cannot be met.

  python -m bench.xla_ceilings [--seconds=0.5]

1. Decoding weights element by element (bf16 upcast, int4 nibbles, mxfp4 codes) ends in a fused
   multiply-reduce. Its speed in weights per second, for float32 / bfloat16 / int8 weights,
   both hot (one 512x1024 weight, 0.5-2 MB, in L2) and streamed from DRAM: if it is the same
   for every dtype and hot or cold, the loop is compute-bound and caps every elementwise-decoded
   encoding.
2. The only faster path is YNNPACK's int8 dot. Can it read packed int4? Native int4 (a bitcast
   of the packed bytes) as a dot operand, or converted to int8 first, against the int8 dot of
   the same bytes.
3. 64 tokens: f32, bf16-activation and int8 products against numpy float32 in the same run,
   with this CPU's float32 FMA peak (cores x GHz x 2 FMA units x 16 lanes x 2).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import psutil
from absl import app, flags

from lazymoe_jax.model import encodings
from lazymoe_jax.model.encodings import _dot, _int8_dot, _int8_matmul

F32 = jnp.float32
INT8 = encodings.get("int8")


def define_flags() -> None:
  flags.DEFINE_float("seconds", 0.5, "Time per measurement.")


FLAGS = flags.FLAGS


def median_time(fn, items, seconds: float) -> float:
  """Median seconds of fn(item), cycling through items (copies, so each call reads DRAM)."""
  fn(items[0])
  times, t_end, i = [], time.perf_counter() + seconds, 0
  while time.perf_counter() < t_end or len(times) < 5:
    t0 = time.perf_counter()
    fn(items[i % len(items)])
    times.append(time.perf_counter() - t0)
    i += 1
  return float(np.median(times))


def copies(make, nbytes: int, total: int = 512 << 20) -> list:
  return [make() for _ in range(max(2, total // nbytes))]


def elementwise_ceiling(rng, seconds: float) -> None:
  print("1. fused multiply-reduce sum(w.astype(f32) * x, axis=-1), one token (G weights/s)")

  @jax.jit
  def msum(w, x):
    return jnp.sum(w.astype(F32) * x[None, :], axis=-1)

  for dt in ("float32", "bfloat16", "int8"):
    row = []
    for o, c, total in ((512, 1024, 0), (5632, 1024, 512 << 20)):
      make = lambda: jnp.asarray((rng.standard_normal((o, c)) * 20).astype(dt))  # noqa: E731
      ws = [make()] if not total else copies(make, o * c * jnp.dtype(dt).itemsize, total)
      x = jnp.asarray(rng.standard_normal(c).astype(np.float32))
      t = median_time(lambda w: msum(w, x).block_until_ready(), ws, seconds)
      row.append(f"{'hot 512x1024' if not total else 'DRAM 5632x1024'} {o * c / t / 1e9:5.2f}")
    print(f"  {dt:9s} " + " | ".join(row))


def int4_paths(rng, seconds: float) -> None:
  print("2. packed int4 (two weights a byte) through the int8 dot, 5760x2880 weights, one token")
  o, c = 5760, 2880
  ws = copies(lambda: jnp.asarray(rng.integers(-128, 128, (o, c // 2), dtype=np.int8)),
              o * c // 2)
  xq = jnp.asarray(rng.integers(-127, 128, (2, c), dtype=np.int8))
  forms = {
      "int8 dot of the packed bytes (half the columns)":
          lambda p: _int8_dot(p, xq[:, :c // 2]),
      "native int4 operand (bitcast)":
          lambda p: _int_dot(jax.lax.bitcast_convert_type(p, jnp.int4).reshape(o, c), xq),
      "int4 -> int8 convert, then int8 dot":
          lambda p: _int_dot(jax.lax.bitcast_convert_type(p, jnp.int4).reshape(o, c)
                             .astype(jnp.int8), xq),
  }
  for name, form in forms.items():
    f = jax.jit(form)
    t = median_time(lambda p: f(p).block_until_ready(), ws, FLAGS.seconds)  # noqa: B023
    print(f"  {name:48s} {o * c // 2 / t / 1e9:6.2f} GB/s of packed bytes")


def _int_dot(w, xq):
  """w [O, C] (int4 or int8) . xq [2, C] int8 -> int32, as the engine's int8 products."""
  return jax.lax.dot_general(w, xq, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


def _bf16_activations(w, x):
  return _dot(w, x.astype(jnp.bfloat16))


def _int8_one_level(q, x):
  s = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.0
  return _dot(q, jnp.round(x / s).astype(jnp.int8)).astype(F32) * s[:, 0]


def fma_peak_gflops() -> tuple[float, str]:
  """cores x GHz x 2 FMA units x 16 float32 lanes x 2 flops. The clock is psutil's (on Linux
  cpufreq's maximum, else /proc/cpuinfo's current one: in a virtual machine the nominal clock,
  turbo may be higher)."""
  try:
    freqs = psutil.cpu_freq(percpu=True) or []
  except (OSError, NotImplementedError):
    freqs = []
  mhz = max([max(f.max, f.current) for f in freqs], default=0.0)
  if not mhz:
    return float("nan"), "unknown clock"
  cores = os.cpu_count() or 1
  return cores * mhz / 1e3 * 2 * 16 * 2, f"{cores} cores x {mhz / 1e3:.2f} GHz"


def many_tokens(rng, seconds: float, t: int = 64) -> None:
  o, c = 5760, 2880
  peak, how = fma_peak_gflops()
  x = rng.standard_normal((t, c)).astype(np.float32)
  npw = copies(lambda: rng.standard_normal((o, c)).astype(np.float32), o * c * 4)
  ref = 2 * o * c * t / median_time(lambda w: x @ w.T, npw, seconds) / 1e9
  print(f"3. {t} tokens, 5760x2880: numpy float32 {ref:.0f} GFLOP/s; float32 FMA peak "
        f"{peak:.0f} GFLOP/s ({how}, nominal); 2x numpy would be {2 * ref / peak:.0%} of it")
  xj = jnp.asarray(x)
  ones = jnp.ones(o, F32)  # row scales of 1: the products alone
  forms = {"float32 weights, f32 dot": ("float32", lambda w: _dot(w, xj)),
           "bf16 weights, bf16 activations": ("bfloat16", lambda w: _bf16_activations(w, xj)),
           "int8 weights, one-level int8 activations (lossy)": ("int8",
                                                                lambda w: _int8_one_level(w, xj)),
           "int8 weights, two-level int8 activations": ("int8",
                                                        lambda w: _int8_matmul(w, ones, xj)),
           "int8 weights, engine (f32 products by row blocks)": ("int8", lambda w: INT8.matmul(
               {"": w, "scale": ones}, xj))}
  for name, (dt, form) in forms.items():
    if dt == "int8":
      make = lambda: jnp.asarray(rng.integers(-127, 128, (o, c), dtype=np.int8))  # noqa: E731
    else:
      make = lambda: jnp.asarray(rng.standard_normal((o, c)).astype(dt))  # noqa: E731,B023
    ws = copies(make, o * c * jnp.dtype(dt).itemsize)
    f = jax.jit(form)
    sec = median_time(lambda w: f(w).block_until_ready(), ws, seconds)  # noqa: B023
    g = 2 * o * c * t / sec / 1e9
    print(f"  {name:50s} {g:6.0f} GFLOP/s = {g / ref:.2f}x numpy")
    del ws


def main(argv) -> None:
  del argv
  rng = np.random.default_rng(0)
  elementwise_ceiling(rng, FLAGS.seconds)
  int4_paths(rng, FLAGS.seconds)
  many_tokens(rng, FLAGS.seconds)


if __name__ == "__main__":
  define_flags()
  app.run(main)
