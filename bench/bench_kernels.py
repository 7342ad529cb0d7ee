r"""One expert FFN per encoding, beside numpy's float32 products measured in the same run.

  python -m bench.bench_kernels [--shapes=mixtral,qwen3,gptoss] [--encodings=...] [--seconds=1]

For each realistic expert shape (hidden x expert width) and encoding, the engine's own jitted
SwiGLU expert (model/layers.swiglu, the code decode runs: native kernels or XLA as
LAZYMOE_KERNELS selects; bench_native prints both side by side) is timed for 1 token (weight bytes
per second) and for 8 and 64 tokens (GFLOP/s), and printed as a ratio of numpy float32:
matrix-vector bandwidth for 1 token, matrix-matrix GFLOP/s for 8 and 64 tokens, on the same
weights. Medians of repeated runs after a warm-up. Both sides cycle through copies of the
weights totalling 768 MB, so every call reads them from DRAM (as a pool slot is read).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lazymoe_jax.model import encodings, layers

SHAPES = {"mixtral": (4096, 14336), "qwen3": (2048, 768), "gptoss": (2880, 2880),
          "synth": (1024, 2816)}  # synth: bench.vs_llamacpp's default model

def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_list("shapes", list(SHAPES), "Expert shapes to run.")
  flags.DEFINE_list("encodings", ["float32", "bfloat16", "int8", "int4-g32", "mxfp4"],
                    "Encodings.")
  flags.DEFINE_float("seconds", 1.0, "Time per measurement.")
  flags.DEFINE_string("json", None, "Also write the rows here.")


FLAGS = flags.FLAGS


def timeit(fn, seconds: float) -> float:
  """Median seconds per call."""
  fn()
  t_end, times = time.perf_counter() + seconds, []
  while time.perf_counter() < t_end or len(times) < 5:
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


COLD_BYTES = 768 << 20  # cycle through copies of the weights totalling this: never in cache


class Cycle:
  """Round-robin over copies of the weights, so every call streams them from DRAM, as an
  expert fetched from the pool does (a small expert timed alone would sit in the L3 cache)."""

  def __init__(self, make, nbytes: int):
    self.items = [make() for _ in range(max(1, -(-COLD_BYTES // nbytes)))]
    self.i = 0

  def next(self):
    self.i = (self.i + 1) % len(self.items)
    return self.items[self.i]


def numpy_reference(w_gu: np.ndarray, w_d: np.ndarray, seconds: float, gemms: bool = True) -> dict:
  """numpy f32: matrix-vector bytes/s (both matrices) and GFLOP/s at 8 and 64 tokens (unless
  not `gemms`)."""
  h = w_gu.shape[1]
  ws = Cycle(lambda: (w_gu.copy(), w_d.copy()), w_gu.nbytes + w_d.nbytes)
  x1 = np.random.default_rng(1).standard_normal(h, dtype=np.float32)
  xi = np.random.default_rng(2).standard_normal(w_d.shape[1], dtype=np.float32)

  def gemv():
    a, b = ws.next()
    return a @ x1, b @ xi
  t = timeit(gemv, seconds)
  out = {"gemv_GBps": (w_gu.nbytes + w_d.nbytes) / t / 1e9}
  for m in (8, 64) if gemms else ():
    xm = np.random.default_rng(3).standard_normal((m, h), dtype=np.float32)
    xim = np.random.default_rng(4).standard_normal((m, w_d.shape[1]), dtype=np.float32)

    def gemm():
      a, b = ws.next()
      return xm @ a.T, xim @ b.T
    t = timeit(gemm, seconds)
    out[f"gemm{m}_GFLOPs"] = 2 * m * (w_gu.size + w_d.size) / t / 1e9
  return out


def random_expert(hidden: int, inter: int, rng: np.random.Generator):
  """float32 w_gate_up [2I, H] and w_down [H, I], small Gaussian weights."""
  return (rng.standard_normal((2 * inter, hidden), dtype=np.float32) * 0.02,
          rng.standard_normal((hidden, inter), dtype=np.float32) * 0.02)


def encoded_copies(enc, w_gu: np.ndarray, w_d: np.ndarray, wrap=lambda arrays: arrays):
  """(Cycle of device copies of the encoded expert as (gate_up, down), bytes of one copy);
  `wrap` turns each {suffix: array} into what the timed function takes."""
  gu, dn = enc.encode(w_gu), enc.encode(w_d)
  nbytes = sum(a.nbytes for a in gu.values()) + sum(a.nbytes for a in dn.values())
  return Cycle(lambda: (wrap({k: jax.device_put(v.copy()) for k, v in gu.items()}),
                        wrap({k: jax.device_put(v.copy()) for k, v in dn.items()})),
               nbytes), nbytes


def bench_shape(name: str, hidden: int, inter: int, encs: list[str], seconds: float) -> list[dict]:
  rng = np.random.default_rng(0)
  w_gu, w_d = random_expert(hidden, inter, rng)
  ref = numpy_reference(w_gu, w_d, seconds)
  print(f"\n{name}: hidden {hidden}, expert width {inter} | numpy f32: gemv "
        f"{ref['gemv_GBps']:.1f} GB/s, 8 tok {ref['gemm8_GFLOPs']:.1f} GFLOP/s, "
        f"64 tok {ref['gemm64_GFLOPs']:.1f} GFLOP/s")
  rows = []
  for enc_name in encs:
    enc = encodings.get(enc_name)
    experts, nbytes = encoded_copies(enc, w_gu, w_d, lambda a, e=enc: encodings.Weight(e, a))
    fn = jax.jit(layers.swiglu)
    row = {"shape": name, "encoding": enc_name, "expert_MB": nbytes / 1e6}
    for m in (1, 8, 64):
      x = jnp.asarray(rng.standard_normal((m, hidden), dtype=np.float32))
      t = timeit(lambda: fn(*experts.next(), x).block_until_ready(), seconds)
      if m == 1:
        row["tok1_ms"] = t * 1e3
        row["tok1_GBps"] = nbytes / t / 1e9
        row["tok1_ratio"] = row["tok1_GBps"] / ref["gemv_GBps"]
      else:
        row[f"tok{m}_GFLOPs"] = 2 * m * (w_gu.size + w_d.size) / t / 1e9
        row[f"tok{m}_ratio"] = row[f"tok{m}_GFLOPs"] / ref[f"gemm{m}_GFLOPs"]
    print(f"  {enc_name:9s} {nbytes / 1e6:8.1f} MB | 1 tok {row['tok1_ms']:7.2f} ms "
          f"{row['tok1_GBps']:5.1f} GB/s = {row['tok1_ratio']:.2f}x numpy gemv | 8 tok "
          f"{row['tok8_GFLOPs']:6.1f} GFLOP/s = {row['tok8_ratio']:.2f}x | 64 tok "
          f"{row['tok64_GFLOPs']:6.1f} GFLOP/s = {row['tok64_ratio']:.2f}x", flush=True)
    rows.append({**row, **{f"numpy_{k}": v for k, v in ref.items()}})
    experts = None  # free the copies before the next encoding
  return rows


def main(argv) -> None:
  del argv
  rows = []
  for name in FLAGS.shapes:
    rows += bench_shape(name, *SHAPES[name], FLAGS.encodings, FLAGS.seconds)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
