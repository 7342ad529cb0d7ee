r"""Native kernels vs the XLA path vs numpy float32, one expert FFN per encoding, one run.

  python -m bench.bench_native [--shapes=mixtral,qwen3,gptoss] [--encodings=...] [--seconds=1]
      [--tokens=1,8,64] [--isa=avx2] [--experts=1|family]

For each expert shape (hidden x expert width) and encoding: the engine's jitted XLA SwiGLU
(the encoding's own XLA products) and the native expert kernel as the decode step runs it,
kernels.moe_ffn_pooled over experts laid out in an arena of pool slots (store/pool.py's
slot_offsets), with one expert a call (weight 1) — or, with --experts=family, the family's
top-k experts in one call, as a decode step makes it (Mixtral 2, Qwen3 8, gpt-oss 4) — for 1 token (weight bytes per second, ratio to numpy's float32 gemv bandwidth on
the same weights) and for more tokens (GFLOP/s, ratio to numpy's float32 matrix product).
Every side cycles through copies of the weights totalling 768 MB, so each call streams them
from DRAM. Medians after a warm-up; the machine is shared, so repeat and interleave. The
one-token ratio is measured in alternating blocks: native calls, then numpy gemv calls over
the same float32 weights (k experts' gate_up and down), four times over, each side's median
over its blocks (the memory bandwidth of these VMs moves by up to 3x within a minute, so a
reference measured apart from its pair is no reference).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.bench_kernels import (COLD_BYTES, SHAPES, Cycle, encoded_copies, numpy_reference,
                                 random_expert, timeit)
from lazymoe_jax import kernels
from lazymoe_jax.model import encodings, layers
from lazymoe_jax.store import pool


def define_flags() -> None:
  flags.DEFINE_list("shapes", list(SHAPES), "Expert shapes to run.")
  flags.DEFINE_list("encodings", ["float32", "bfloat16", "int8", "int4-g32", "mxfp4"],
                    "Encodings.")
  flags.DEFINE_list("tokens", ["1", "8", "64"], "Token counts (the first 1: bandwidth).")
  flags.DEFINE_float("seconds", 1.0, "Time per measurement.")
  flags.DEFINE_string("isa", None, "Force a native variant (LAZYMOE_KERNELS_ISA).")
  flags.DEFINE_bool("xla", True, "Also time the XLA path.")
  flags.DEFINE_string("json", None, "Also write the rows here.")
  flags.DEFINE_string("experts", "1", "Experts per call: a number, or 'family' (the shape's "
                      "top-k, FAMILY_K).")


# Experts a token routes to in each shape's family (a layer's experts go in one call).
FAMILY_K = {"mixtral": 2, "qwen3": 8, "gptoss": 4, "synth": 2}


FLAGS = flags.FLAGS


def _xla_swiglu(enc, gu: dict, dn: dict, x):
  """The XLA path of one SwiGLU expert: the encoding's own products (Encoding.matmul never
  takes the native kernels, whatever LAZYMOE_KERNELS says)."""
  g = enc.matmul(gu, x)
  i = g.shape[1] // 2
  return enc.matmul(dn, layers.activate(layers.SILU, g[:, :i], g[:, i:]))


def timeit_pair(fa, fb, seconds: float, rounds: int = 4) -> tuple[float, float]:
  """Median seconds per call of fa and of fb, timed in alternating blocks of seconds / rounds
  each. Blocks, not single calls: both sides' thread pools spin for a while after a call
  (numpy's BLAS and XLA's), and a call made during the other side's spin loses a core."""
  ta, tb = [], []
  for _ in range(rounds):
    for f, ts in ((fa, ta), (fb, tb)):
      f()  # the first call of a block waits out the other pool's spinning: not counted
      t_end, n = time.perf_counter() + seconds / rounds, 0
      while time.perf_counter() < t_end or n < 2:
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
        n += 1
  return float(np.median(ta)), float(np.median(tb))


def pooled_experts(enc_name: str, w_gu: np.ndarray, w_d: np.ndarray, k: int):
  """(jitted fn(slots, x, weights), the next k slots' index array each call, bytes of one
  expert): copies of the encoded expert in an arena of pool slots totalling COLD_BYTES, as
  ExpertPool lays them out (the base XLA-aligned, not page-aligned as the pool's mapping); each
  call takes the next k slots, so every call streams from DRAM."""
  enc = encodings.get(enc_name)
  gu, dn = enc.encode(w_gu), enc.encode(w_d)
  arrays = {f"w_gate_up.{n}": a for n, a in gu.items()} | {f"w_down.{n}": a for n, a in dn.items()}
  per_slot, offsets = pool.slot_offsets({n: a.shape for n, a in arrays.items()},
                                        {n: a.dtype for n, a in arrays.items()})
  num = max(k + 1, -(-COLD_BYTES // per_slot))
  arena = np.zeros((num, per_slot), np.uint8)
  for n, off in offsets.items():
    raw = np.ascontiguousarray(arrays[n]).reshape(-1).view(np.uint8)
    arena[:, off:off + raw.size] = raw
  arena = jax.device_put(arena.reshape(-1))  # an argument of the program, as the pool's arena
  layout = (w_d.shape[1], per_slot, tuple(offsets.get(n, -1) for n in (
      "w_gate_up.", "w_gate_up.scale", "w_down.", "w_down.scale", "b_gate_up.", "b_down.")))
  prog = jax.jit(lambda a, s, x, w: kernels.moe_ffn_pooled(enc_name, a, layout, s, x, w))
  fn = lambda s, x, w: prog(arena, s, x, w)  # not closed over: XLA would copy it in as a constant
  picks = [jnp.asarray([(c * k + j) % num for j in range(k)], jnp.int32) for c in range(num)]
  state = {"i": 0}

  def next_slots():
    state["i"] = (state["i"] + 1) % len(picks)
    return picks[state["i"]]
  nbytes = sum(a.nbytes for a in arrays.values())
  return fn, next_slots, nbytes


def bench_shape(name: str, hidden: int, inter: int, encs: list[str], tokens: list[int],
                seconds: float, with_xla: bool, k: int = 1) -> list[dict]:
  rng = np.random.default_rng(0)
  w_gu, w_d = random_expert(hidden, inter, rng)
  ref = numpy_reference(w_gu, w_d, seconds)  # gemv and 8 / 64-token products
  flops = 2 * (w_gu.size + w_d.size)
  print(f"\n{name}: hidden {hidden}, expert width {inter} | numpy f32: gemv "
        f"{ref['gemv_GBps']:.1f} GB/s, 8 tok {ref['gemm8_GFLOPs']:.1f}, 64 tok "
        f"{ref['gemm64_GFLOPs']:.1f} GFLOP/s | native isa {kernels.isa()}, {k} expert(s) a call")
  rows = []
  f32 = Cycle(lambda: (w_gu.copy(), w_d.copy()), w_gu.nbytes + w_d.nbytes)
  x1 = rng.standard_normal(hidden, dtype=np.float32)
  xi = rng.standard_normal(inter, dtype=np.float32)

  def numpy_gemv():  # k experts' float32 gemvs, as one native call's k experts
    for _ in range(k):
      a, b = f32.next()
      a @ x1, b @ xi  # pylint: disable=pointless-statement
  for enc_name in encs:
    enc = encodings.get(enc_name)
    nat_fn, next_slots, nbytes = pooled_experts(enc_name, w_gu, w_d, k)
    experts = encoded_copies(enc, w_gu, w_d)[0] if with_xla else None
    xla_fn = jax.jit(lambda gu, dn, x, enc=enc: _xla_swiglu(enc, gu, dn, x))
    nbytes *= k  # per call: k distinct slots, as k routed experts
    row = {"shape": name, "encoding": enc_name, "expert_MB": nbytes / 1e6 / k, "isa": kernels.isa(),
           "experts_per_call": k}
    line = [f"  {enc_name:9s} {nbytes / 1e6:7.1f} MB"]
    gemv = ref["gemv_GBps"]
    for m in tokens:
      x = jnp.asarray(rng.standard_normal((m, hidden), dtype=np.float32))
      w1 = jnp.ones((m, k), jnp.float32)
      sides = {"native": lambda: nat_fn(next_slots(), x, w1).block_until_ready()}
      if with_xla:
        sides["xla"] = lambda: xla_fn(*experts.next(), x).block_until_ready()
      for side, fn in sides.items():
        if m == 1 and side == "native":
          t, t_np = timeit_pair(fn, numpy_gemv, seconds)
          gemv = k * (w_gu.nbytes + w_d.nbytes) / t_np / 1e9
          row["numpy_gemv_paired_GBps"] = gemv
        else:
          t = timeit(fn, seconds)
        if m == 1:
          row[f"{side}_tok1_GBps"] = (nbytes if side == "native" else nbytes / k) / t / 1e9
          row[f"{side}_tok1_ratio"] = row[f"{side}_tok1_GBps"] / gemv
        else:
          row[f"{side}_tok{m}_GFLOPs"] = m * flops * (k if side == "native" else 1) / t / 1e9
          key = f"gemm{m}_GFLOPs"
          if key in ref:
            row[f"{side}_tok{m}_ratio"] = row[f"{side}_tok{m}_GFLOPs"] / ref[key]
      for side in sides:
        if m == 1:
          line.append(f"1 tok {side} {row[f'{side}_tok1_GBps']:5.1f} GB/s "
                      f"({row[f'{side}_tok1_ratio']:.2f}x numpy's {gemv:.1f})")
        else:
          r = row.get(f"{side}_tok{m}_ratio")
          line.append(f"{m} tok {side} {row[f'{side}_tok{m}_GFLOPs']:6.1f} GFLOP/s" +
                      (f" ({r:.2f}x)" if r is not None else ""))
    print(" | ".join(line), flush=True)
    rows.append({**row, **{f"numpy_{k}": v for k, v in ref.items()}})
    experts = nat_fn = None
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
    k = FAMILY_K[name] if FLAGS.experts == "family" else int(FLAGS.experts)
    rows += bench_shape(name, *SHAPES[name], FLAGS.encodings, tokens, FLAGS.seconds, FLAGS.xla, k)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
