r"""TurboQuant KV cache: distortion against the paper, bytes, and decode attention time.

  python -m bench.bench_kv [--contexts=4096,16384] [--head_dim=128] [--notables]

1. Distortion of unit vectors (dim 128): measured E|u - u_hat|^2 per bit width beside the
   paper's Lloyd-Max figures and the (sqrt(3) pi / 2) 4^-b bound; the prod variant's
   inner-product error mean and variance.
2. Bytes per token per layer (keys + values, norms included) against bf16 and f32 caches.
3. One decode step's attention over a cache filled to each context, gpt-oss-like (64 query /
   8 KV heads x 64) and Mixtral-like (32 / 8 x 128) heads: the float32 cache and TurboQuant 4
   bits, each through the native kernel and the XLA path (LAZYMOE_KERNELS), in one run.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lazymoe_jax.model.spec import cache_spec
from lazymoe_jax.engine.memory import keep_heap_warm
from lazymoe_jax.kv import DenseKV, TurboQuantKV
from lazymoe_jax.kv.turboquant import TurboQuant

PAPER = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}
LLOYD_GAUSS = {1: 0.3634, 2: 0.1175, 3: 0.0345, 4: 0.0095}
PROD_PAPER = {1: 1.57, 2: 0.56, 3: 0.18, 4: 0.047}


def define_flags() -> None:
  flags.DEFINE_list("contexts", ["4096", "16384"], "Filled cache lengths.")
  flags.DEFINE_integer("head_dim", 128, "Head dimension (distortion and bytes tables).")
  flags.DEFINE_bool("tables", True, "Print the distortion and bytes tables first.")


FLAGS = flags.FLAGS


def distortion(d: int) -> None:
  u = np.random.default_rng(0).standard_normal((8192, d)).astype(np.float32)
  u /= np.linalg.norm(u, axis=1, keepdims=True)
  y = np.random.default_rng(1).standard_normal(d).astype(np.float32)
  y /= np.linalg.norm(y)
  print(f"| bits | E|u-u_hat|^2 (dim {d}) | Lloyd-Max limit | paper | bound | prod mean | "
        "prod var x d (paper) |\n|---|---|---|---|---|---|---|")
  for b in (1, 2, 3, 4):
    tq = TurboQuant(d, b)
    mse = float(np.mean(np.sum((np.asarray(tq.decode(tq.encode(u))) - u) ** 2, axis=1)))
    pq = TurboQuant(d, b, variant="prod")
    err = np.asarray(pq.decode(pq.encode(u))) @ y - u @ y
    print(f"| {b} | {mse:.4f} | {LLOYD_GAUSS[b]} | {PAPER[b]} | "
          f"{math.sqrt(3) * math.pi / 2 * 4.0 ** -b:.4f} | {err.mean():+.1e} | "
          f"{np.var(err) * d:.3f} ({PROD_PAPER[b]}) |")


def bytes_table(d: int, kv_heads: int) -> None:
  print(f"\nbytes per token per layer ({kv_heads} KV heads x dim {d}, keys + values):")
  f32, bf16 = 2 * kv_heads * d * 4, 2 * kv_heads * d * 2
  for bits in (4, 3.5, 3, 2.5, 2):
    tq = TurboQuant(d, bits).bytes_per_vector() * 2 * kv_heads
    print(f"  {bits} bits: {tq:.0f} B (bf16 {bf16} B: {bf16 / tq:.2f}x smaller; f32 {f32} B)")


# (name, query heads, KV heads, head dim)
SHAPES = (("gpt-oss", 64, 8, 64), ("mixtral", 32, 8, 128))


def _time(f, *args) -> float:
  """Median of 10 calls, ms (after one warm-up call that compiles)."""
  f(*args).block_until_ready()
  times = []
  for _ in range(10):
    t0 = time.perf_counter()
    f(*args).block_until_ready()
    times.append(time.perf_counter() - t0)
  return float(np.median(times)) * 1e3


def attention_time(contexts: list[int]) -> None:
  """One decode token's attention, native kernel and XLA path side by side in one run."""
  rng = np.random.default_rng(0)
  print("\ndecode attention, one token (ms, median of 10; native / XLA in the same run):")
  print("| shape | positions | f32 native | f32 XLA | tq4 native | tq4 XLA | tq4 native / f32 native |"
        "\n|---|---|---|---|---|---|---|")
  for shape, q_heads, kv_heads, d in SHAPES:
    cfg = cache_spec(kv_heads, d)
    for n in contexts:
      k = jnp.asarray(rng.standard_normal((n, kv_heads, d)).astype(np.float32))
      q = jnp.asarray(rng.standard_normal((1, q_heads, d)).astype(np.float32))
      pos = jnp.asarray([n - 1], jnp.int32)
      ms = {}
      for name, kv in (("f32", DenseKV()), ("tq4", TurboQuantKV(4.0, 4.0))):
        cache = jax.jit(kv.update)(kv.init(cfg, n)[0], k, k, 0)
        for mode in ("native", "xla"):
          os.environ["LAZYMOE_KERNELS"] = mode  # read when the program is traced
          f = jax.jit(lambda c, q, p, kv=kv: kv.attend(c, q, p, None, d ** -0.5))
          ms[name, mode] = _time(f, cache, q, pos)
        del cache
      os.environ.pop("LAZYMOE_KERNELS")
      print(f"| {shape} {q_heads}/{kv_heads}x{d} | {n} | {ms['f32', 'native']:.2f} | "
            f"{ms['f32', 'xla']:.2f} | {ms['tq4', 'native']:.2f} | {ms['tq4', 'xla']:.2f} | "
            f"{ms['tq4', 'native'] / ms['f32', 'native']:.2f} |", flush=True)


def main(argv) -> None:
  del argv
  keep_heap_warm()  # as the engine does (large per-step temporaries stay mapped)
  if FLAGS.tables:
    distortion(128)
    bytes_table(FLAGS.head_dim, 8)
  attention_time([int(c) for c in FLAGS.contexts])


if __name__ == "__main__":
  define_flags()
  app.run(main)
