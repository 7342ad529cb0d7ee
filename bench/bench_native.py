r"""Native kernels vs the XLA path vs numpy float32, one expert FFN per encoding, one run.

  python -m bench.bench_native [--shapes=mixtral,qwen3,gptoss] [--encodings=...] [--seconds=1]
      [--tokens=1,8,64] [--isa=avx2]

For each expert shape (hidden x expert width) and encoding: the engine's jitted XLA SwiGLU
(the encoding's own XLA products) and kernels.moe_ffn with one expert
(weight 1), for 1 token (weight bytes per second, ratio to numpy's float32 gemv bandwidth on
the same weights) and for more tokens (GFLOP/s, ratio to numpy's float32 matrix product).
Every side cycles through copies of the weights totalling 768 MB, so each call streams them
from DRAM. Medians after a warm-up; the machine is shared, so repeat and interleave.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.bench_kernels import SHAPES, encoded_copies, numpy_reference, random_expert, timeit
from lazymoe_jax import kernels
from lazymoe_jax.model import encodings, layers


def define_flags() -> None:
  flags.DEFINE_list("shapes", list(SHAPES), "Expert shapes to run.")
  flags.DEFINE_list("encodings", ["float32", "bfloat16", "int8", "int4-g32", "mxfp4"],
                    "Encodings.")
  flags.DEFINE_list("tokens", ["1", "8", "64"], "Token counts (the first 1: bandwidth).")
  flags.DEFINE_float("seconds", 1.0, "Time per measurement.")
  flags.DEFINE_string("isa", None, "Force a native variant (LAZYMOE_KERNELS_ISA).")
  flags.DEFINE_bool("xla", True, "Also time the XLA path.")
  flags.DEFINE_string("json", None, "Also write the rows here.")


FLAGS = flags.FLAGS


def _xla_swiglu(enc, gu: dict, dn: dict, x):
  """The XLA path of one SwiGLU expert: the encoding's own products (Encoding.matmul never
  takes the native kernels, whatever LAZYMOE_KERNELS says)."""
  g = enc.matmul(gu, x)
  i = g.shape[1] // 2
  return enc.matmul(dn, layers.activate(layers.SILU, g[:, :i], g[:, i:]))


def bench_shape(name: str, hidden: int, inter: int, encs: list[str], tokens: list[int],
                seconds: float, with_xla: bool) -> list[dict]:
  rng = np.random.default_rng(0)
  w_gu, w_d = random_expert(hidden, inter, rng)
  ref = numpy_reference(w_gu, w_d, seconds)  # gemv and 8 / 64-token products
  flops = 2 * (w_gu.size + w_d.size)
  print(f"\n{name}: hidden {hidden}, expert width {inter} | numpy f32: gemv "
        f"{ref['gemv_GBps']:.1f} GB/s, 8 tok {ref['gemm8_GFLOPs']:.1f}, 64 tok "
        f"{ref['gemm64_GFLOPs']:.1f} GFLOP/s | native isa {kernels.isa()}")
  rows = []
  for enc_name in encs:
    enc = encodings.get(enc_name)
    experts, nbytes = encoded_copies(enc, w_gu, w_d)
    xla_fn = jax.jit(lambda gu, dn, x, enc=enc: _xla_swiglu(enc, gu, dn, x))
    nat_fn = jax.jit(lambda gu, dn, x, w, e=enc_name: kernels.moe_ffn(
        e, ({"w_gate_up": gu, "w_down": dn},), x, w))
    row = {"shape": name, "encoding": enc_name, "expert_MB": nbytes / 1e6, "isa": kernels.isa()}
    line = [f"  {enc_name:9s} {nbytes / 1e6:7.1f} MB"]
    for m in tokens:
      x = jnp.asarray(rng.standard_normal((m, hidden), dtype=np.float32))
      w1 = jnp.ones((m, 1), jnp.float32)
      sides = {"native": lambda: nat_fn(*experts.next(), x, w1).block_until_ready()}
      if with_xla:
        sides["xla"] = lambda: xla_fn(*experts.next(), x).block_until_ready()
      for side, fn in sides.items():
        t = timeit(fn, seconds)
        if m == 1:
          row[f"{side}_tok1_GBps"] = nbytes / t / 1e9
          row[f"{side}_tok1_ratio"] = row[f"{side}_tok1_GBps"] / ref["gemv_GBps"]
        else:
          row[f"{side}_tok{m}_GFLOPs"] = m * flops / t / 1e9
          key = f"gemm{m}_GFLOPs"
          if key in ref:
            row[f"{side}_tok{m}_ratio"] = row[f"{side}_tok{m}_GFLOPs"] / ref[key]
      for side in sides:
        if m == 1:
          line.append(f"1 tok {side} {row[f'{side}_tok1_GBps']:5.1f} GB/s "
                      f"({row[f'{side}_tok1_ratio']:.2f}x)")
        else:
          r = row.get(f"{side}_tok{m}_ratio")
          line.append(f"{m} tok {side} {row[f'{side}_tok{m}_GFLOPs']:6.1f} GFLOP/s" +
                      (f" ({r:.2f}x)" if r is not None else ""))
    print(" | ".join(line), flush=True)
    rows.append({**row, **{f"numpy_{k}": v for k, v in ref.items()}})
    experts = None
  return rows


def main(argv) -> None:
  del argv
  if FLAGS.isa:
    os.environ["LAZYMOE_KERNELS_ISA"] = FLAGS.isa
  if kernels.mode() != "native":
    raise SystemExit("native kernels unavailable: nothing to compare.")
  tokens = [int(t) for t in FLAGS.tokens]
  rows = []
  for name in FLAGS.shapes:
    rows += bench_shape(name, *SHAPES[name], FLAGS.encodings, tokens, FLAGS.seconds, FLAGS.xla)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
