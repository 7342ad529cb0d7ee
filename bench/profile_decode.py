r"""Where one decode layer's time goes: the gpt-oss-120b slice with every expert resident.

  python -m bench.profile_decode [--layers=2] [--steps=16] [--context=256]
      [--workdir=/tmp/overhead] [--trace_dir=DIR] [--json=FILE]

Builds (once, in --workdir) a slice of gpt-oss-120b with its real shapes (hidden 2880, 128
MXFP4 experts of width 2880, top-4, 64 q / 8 kv heads of 64, vocab 201,088, sinks, sliding
windows, biases; bench.make_synthetic.make_gpt_oss_mxfp4, random weights), loads it with
`dense_dtype=int8` and a pool that holds every expert of the slice, reads them all, and then:

1. the engine's own decode step, un-instrumented (seq.advance: every layer, no head), gives
   the per-layer wall time; the output head is timed alone;
2. the same layers again with every program waited for (block_until_ready) and every host
   step timed on its own: attention (its int8 products timed apart), the router, the
   prefetch routers (the guesses for the layers ahead), the device->host sync on the ids,
   the pool's acquire, the slot tuple, the expert call, the prefetch calls; and what a
   program launch costs (the same arguments through a program that computes nothing);
3. the bandwidth floor of a layer and of the head: the bytes a decode step reads (dense
   params, the KV cache at its capacity, the k experts) / numpy's float32 gemv bandwidth
   measured in the same run (bench.bench_decode).

The instrumented sum exceeds the un-instrumented wall by what waiting costs (no overlap of
host work with the device); both are printed. The store is several GB: --workdir should be
on a disk with room, and is left in place (delete it when done).
"""

from __future__ import annotations

import collections
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_integer("layers", 2, "Layers in the slice (experts resident: 128 per layer).")
  flags.DEFINE_integer("steps", 16, "Decode steps timed (after warm-up steps that compile).")
  flags.DEFINE_integer("prompt", 8, "Prompt tokens.")
  flags.DEFINE_integer("context", 256, "KV cache capacity (positions).")
  flags.DEFINE_string("workdir", "/tmp/overhead", "Where the slice and its store go.")
  flags.DEFINE_string("trace_dir", None, "Also write a jax.profiler trace of 4 decode steps.")
  flags.DEFINE_string("json", None, "Also write the figures here.")


def ensure_slice(workdir: str, layers: int) -> str:
  """The slice's store (built once: HF-layout checkpoint, converted, the checkpoint deleted)."""
  import shutil  # pylint: disable=import-outside-toplevel
  from bench import make_synthetic  # pylint: disable=import-outside-toplevel
  from checkpoints_tools import convert_hf  # pylint: disable=import-outside-toplevel
  hf = os.path.join(workdir, f"gptoss120b-slice-{layers}L")
  store = hf + "-store"
  if not os.path.exists(os.path.join(store, "manifest.json")):
    if not os.path.exists(os.path.join(hf, "config.json")):
      make_synthetic.make_gpt_oss_mxfp4(hf, layers)
    convert_hf.convert(hf, store, overwrite=True, log=lambda s: None)  # MXFP4 kept as published
    shutil.rmtree(hf, ignore_errors=True)
  return store


def _ms(seconds: float) -> float:
  return seconds * 1e3


class Timer:
  """Per-name lists of seconds; `median(name)` in seconds."""

  def __init__(self):
    self.t: dict[str, list[float]] = collections.defaultdict(list)

  def add(self, name: str, seconds: float) -> None:
    self.t[name].append(seconds)

  def median(self, name: str) -> float:
    return float(np.median(self.t[name])) if self.t.get(name) else 0.0


def timed(timer: Timer, name: str, fn, *args, block: bool = True):
  t0 = time.perf_counter()
  out = fn(*args)
  if block:
    jax.block_until_ready(out)
  timer.add(name, time.perf_counter() - t0)
  return out


def instrumented_layer(eng, timer: Timer, layer: int, x, pos, cache, progs: dict):
  """One MoE layer of Forward.run's decode path, every program waited for and every host step
  timed; the engine's fused program (attn_router with its guesses) is also run, for its own
  time and its outputs (so the cache advances exactly as in the engine)."""
  from lazymoe_jax.model import steps  # pylint: disable=import-outside-toplevel
  fwd, spec, pool = eng.forward, eng.spec, eng.pool
  p = fwd.layers[layer]
  window = spec.layers[layer].window
  # the parts, each its own program (on a copy of the cache: attn_router below advances it)
  c2 = jax.tree.map(jnp.copy, cache)
  jax.block_until_ready(c2)
  xn_in = timed(timer, "attention: input norm", progs["attn_norm"], p, x)
  timed(timer, "attention: wqkv product", progs["wqkv"], p, xn_in)
  o = jnp.zeros((1, spec.attention.num_heads * spec.attention.head_dim), jnp.float32)
  timed(timer, "attention: wo product", progs["wo"], p, o)
  h, xn, _ = timed(timer, "attention (whole)", steps.attention_block, spec, fwd.kv, window, p,
                   x, pos, c2)
  timed(timer, "router", steps.route_block, spec, p, h, xn, ())
  t0 = time.perf_counter()
  ahead = fwd._layers_ahead(layer) if fwd.prefetch else []  # pylint: disable=protected-access
  routers = tuple(fwd.routers[a] for a in ahead)
  timer.add("host: ahead list + router tuple", time.perf_counter() - t0)
  if ahead:
    timed(timer, "router + prefetch routers", steps.route_block, spec, p, h, xn, routers)
  # the engine's own program, waited for
  t0 = time.perf_counter()
  out = steps.attn_router(spec, fwd.kv, window, p, x, pos, cache, routers)
  timer.add("dispatch: attn_router (call returns)", time.perf_counter() - t0)
  jax.block_until_ready(out)
  timer.add("attn_router (engine's program)", time.perf_counter() - t0)
  h, xn, ids, weights, cache, guesses = out
  t0 = time.perf_counter()
  ids = np.asarray(ids)[:1]
  timer.add("host sync: ids to host (ready)", time.perf_counter() - t0)
  t0 = time.perf_counter()
  slots = pool.acquire(layer, ids[0])
  timer.add("host: pool.acquire", time.perf_counter() - t0)
  t0 = time.perf_counter()
  slot_arrays = tuple(pool.arrays(s) for s in slots)
  timer.add("host: slot tuple", time.perf_counter() - t0)
  t0 = time.perf_counter()
  x = steps.moe_decode(spec, p, h, xn, weights, slot_arrays)
  timer.add("dispatch: moe_decode (call returns)", time.perf_counter() - t0)
  x.block_until_ready()
  timer.add("experts: moe_decode (engine's program)", time.perf_counter() - t0)
  timed(timer, "experts: moe_ffn kernel alone", progs["moe_ffn"], xn, weights, slot_arrays)
  t0 = time.perf_counter()
  fwd._prefetch(ahead, guesses)  # pylint: disable=protected-access
  timer.add("host: prefetch calls (guesses to host, pool.prefetch)", time.perf_counter() - t0)
  # what launching a program costs: the same arguments, nothing computed
  timed(timer, "launch: empty program, attn_router's arguments", progs["noop"], p, x, pos,
        cache, routers)
  timed(timer, "launch: empty program, moe_decode's arguments", progs["noop"], p, h, xn,
        weights, slot_arrays)
  return x, cache


def programs(eng) -> dict:
  """The sub-programs the breakdown times apart (the engine's programs are timed as they are)."""
  from lazymoe_jax import kernels  # pylint: disable=import-outside-toplevel
  from lazymoe_jax.model import layers  # pylint: disable=import-outside-toplevel
  spec = eng.spec
  act = spec.moe.act
  enc = eng.pool.arrays(0)["w_gate_up"].encoding.name
  return {
      "attn_norm": jax.jit(lambda p, x: layers.rms_norm(x, p["attn_norm"], spec.norm_eps)),
      "wqkv": jax.jit(lambda p, x: layers.linear(x, p["wqkv"], p.get("bqkv"))),
      "wo": jax.jit(lambda p, o: layers.linear(o, p["wo"], p.get("bo"))),
      "moe_ffn": jax.jit(lambda xn, w, slots: kernels.moe_ffn(
          enc, tuple({t: wt.arrays for t, wt in ex.items()} for ex in slots), xn, w,
          (act.kind, act.alpha, act.limit))),
      "noop": jax.jit(lambda *args: args[1][:1] * 0),
  }


def layer_bytes(eng, layer: int, with_guesses: bool) -> dict:
  """Bytes one decode step of `layer` reads: dense params, KV cache at capacity, k experts
  (and the routers of the layers ahead, when the guesses run)."""
  fwd = eng.forward
  dense = sum(a.nbytes for a in jax.tree.leaves(fwd.layers[layer]))
  guesses = 0
  if with_guesses and fwd.prefetch:
    guesses = sum(a.nbytes for a_ in fwd._layers_ahead(layer)  # pylint: disable=protected-access
                  for a in jax.tree.leaves(fwd.routers[a_]))
  return {"dense": dense, "guess_routers": guesses,
          "experts": eng.spec.num_experts_per_tok * eng.experts.bytes_per_expert}


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  import lazymoe_jax  # pylint: disable=import-outside-toplevel
  from lazymoe_jax import kernels  # pylint: disable=import-outside-toplevel
  from lazymoe_jax.model import steps  # pylint: disable=import-outside-toplevel
  from bench.bench_decode import numpy_gemv_bandwidth  # pylint: disable=import-outside-toplevel
  store = ensure_slice(FLAGS.workdir, FLAGS.layers)
  ctx = FLAGS.context
  eng = lazymoe_jax.load(store, expert_slots=FLAGS.layers * 128, dense_dtype="int8",
                         max_context=ctx)
  spec = eng.spec
  t0 = time.perf_counter()
  for layer in spec.moe_layers:  # every expert resident: no reads while decoding
    eng.pool.acquire(layer, range(spec.num_experts))
  print(f"kernels {kernels.mode()} ({kernels.isa() if kernels.mode() == 'native' else '-'}), "
        f"{len(spec.moe_layers)} MoE layers, {eng.pool.num_slots} slots, all "
        f"{len(eng.pool.table)} experts resident (read in {time.perf_counter() - t0:.0f} s), "
        f"KV capacity {ctx}; load average {os.getloadavg()[0]:.1f}", flush=True)
  ref = numpy_gemv_bandwidth()
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 2048, FLAGS.prompt + 4 + 3 * FLAGS.steps + 8).astype(np.int32)
  seq = eng.session(ctx)
  seq.advance(ids[:FLAGS.prompt])
  i = FLAGS.prompt
  for _ in range(3):  # compile the decode programs
    seq.feed(ids[i:i + 1])
    i += 1
  pool = eng.pool
  reads0, sizes0 = pool.misses, {n: getattr(steps, n)._cache_size()  # pylint: disable=protected-access
                                 for n in ("attn_router", "moe_decode", "embed", "head")}
  # 1. un-instrumented: the engine's decode step without the head, then the head alone
  walls = []
  for _ in range(FLAGS.steps):
    t0 = time.perf_counter()
    seq.advance(ids[i:i + 1]).block_until_ready()
    walls.append(time.perf_counter() - t0)
    i += 1
  x = seq.advance(ids[i:i + 1])
  i += 1
  head_s = []
  for _ in range(5):
    t0 = time.perf_counter()
    steps.head(spec, eng.forward.globals, x).block_until_ready()
    head_s.append(time.perf_counter() - t0)
  step_s, head = float(np.median(walls)), float(np.median(head_s[1:]))
  layer_wall = step_s / len(spec.layers)
  # 2. instrumented: the same decode layers, every program waited for
  timer = Timer()
  progs = programs(eng)
  for s in range(FLAGS.steps + 2):
    if s == 2:
      timer = Timer()  # the first two compile the sub-programs
    fwd = eng.forward
    pos = jnp.asarray(np.array([seq.position], np.int32))
    xs = timed(timer, "embed (per token)", steps.embed, spec, fwd.globals,
               jnp.asarray(ids[i:i + 1]))
    for layer in range(len(spec.layers)):
      xs, seq.cache[layer] = instrumented_layer(eng, timer, layer, xs, pos, seq.cache[layer],
                                                progs)
    seq.position += 1
    i += 1
  sizes1 = {n: getattr(steps, n)._cache_size()  # pylint: disable=protected-access
            for n in sizes0}
  if FLAGS.trace_dir:
    with jax.profiler.trace(FLAGS.trace_dir):
      for _ in range(4):
        seq.advance(ids[i:i + 1]).block_until_ready()
        i += 1
  # 3. the floor
  L = len(spec.layers)
  nb = [layer_bytes(eng, layer, True) for layer in range(L)]
  kv_bytes = eng.kv.nbytes(list(seq.cache)) / L
  layer_floor = (np.mean([b["dense"] + b["experts"] + b["guess_routers"] for b in nb]) + kv_bytes)
  g = eng.forward.globals
  head_bytes = sum(a.nbytes for a in jax.tree.leaves(g["lm_head"])) + g["final_norm"].nbytes
  m = timer.median
  per_layer = lambda name: m(name)  # noqa: E731  (medians are per layer already)
  parts = [
      ("attention (whole: norm, wqkv, rope, KV update, scores, wo, residual, norm)",
       per_layer("attention (whole)")),
      ("  of which wqkv product (int8)", per_layer("attention: wqkv product")),
      ("  of which wo product (int8)", per_layer("attention: wo product")),
      ("router", per_layer("router")),
      ("prefetch routers (router + guesses - router)",
       max(0.0, per_layer("router + prefetch routers") - per_layer("router"))
       if timer.t.get("router + prefetch routers") else 0.0),
      ("attn_router, the engine's fused program", per_layer("attn_router (engine's program)")),
      ("  its dispatch (call returns)", per_layer("dispatch: attn_router (call returns)")),
      ("host sync: ids to host (array ready)", per_layer("host sync: ids to host (ready)")),
      ("host: ahead list + router tuple", per_layer("host: ahead list + router tuple")),
      ("host: pool.acquire", per_layer("host: pool.acquire")),
      ("host: slot tuple", per_layer("host: slot tuple")),
      ("experts: moe_decode, the engine's program", per_layer("experts: moe_decode (engine's program)")),
      ("  its dispatch (call returns)", per_layer("dispatch: moe_decode (call returns)")),
      ("  the moe_ffn kernel alone", per_layer("experts: moe_ffn kernel alone")),
      ("host: prefetch calls", per_layer("host: prefetch calls (guesses to host, pool.prefetch)")),
      ("launch: empty program, attn_router's arguments",
       per_layer("launch: empty program, attn_router's arguments")),
      ("launch: empty program, moe_decode's arguments",
       per_layer("launch: empty program, moe_decode's arguments")),
  ]
  engine_sum = sum(per_layer(n) for n in (
      "attn_router (engine's program)", "host sync: ids to host (ready)",
      "host: ahead list + router tuple", "host: pool.acquire", "host: slot tuple",
      "experts: moe_decode (engine's program)",
      "host: prefetch calls (guesses to host, pool.prefetch)"))
  print(f"numpy f32 gemv reference: {ref:.1f} GB/s (same run)")
  print(f"\nper decode layer, medians over {FLAGS.steps} steps x {L} layers (ms):")
  for name, s in parts:
    print(f"  {name:70s} {_ms(s):8.3f}")
  print(f"  {'sum of the engine path, each part waited for':70s} {_ms(engine_sum):8.3f}")
  print(f"  {'UN-INSTRUMENTED per-layer wall (decode step without head / layers)':70s} "
        f"{_ms(layer_wall):8.3f}")
  print(f"  {'embed (per token)':70s} {_ms(m('embed (per token)')):8.3f}")
  print(f"  {'output head (per token, alone)':70s} {_ms(head):8.3f}")
  ex_bytes = nb[0]["experts"]
  wqkv = sum(a.nbytes for a in jax.tree.leaves(eng.forward.layers[0]["wqkv"]))
  wo = sum(a.nbytes for a in jax.tree.leaves(eng.forward.layers[0]["wo"]))
  rates = {
      "experts (moe_ffn, mxfp4)": ex_bytes / m("experts: moe_ffn kernel alone"),
      "wqkv (int8)": wqkv / m("attention: wqkv product"),
      "wo (int8)": wo / m("attention: wo product"),
      "head (int8)": head_bytes / head,
  }
  print("\nkernel bandwidth (weight bytes / time; x numpy gemv):")
  for name, r in rates.items():
    print(f"  {name:28s} {r / 1e9:6.2f} GB/s ({r / 1e9 / ref:.2f}x)")
  print(f"\nbandwidth floor: layer {layer_floor / 1e6:.1f} MB (dense {nb[0]['dense'] / 1e6:.1f}, "
        f"experts {ex_bytes / 1e6:.1f}, KV {kv_bytes / 1e6:.1f}, guess routers "
        f"{np.mean([b['guess_routers'] for b in nb]) / 1e6:.1f}) / {ref:.1f} GB/s = "
        f"{_ms(layer_floor / ref / 1e9):.2f} ms; head {head_bytes / 1e6:.0f} MB = "
        f"{_ms(head_bytes / ref / 1e9):.2f} ms")
  full = 36 * layer_wall + head
  print(f"gpt-oss-120b compute, 36 layers + head: {_ms(full):.0f} ms/token = {1 / full:.2f} tok/s "
        f"(target: layer <= 8 ms)")
  print(f"reads during the timed steps: {pool.misses - reads0}; compiled programs before/after "
        f"the timed steps: {sizes0} / {sizes1}; load average {os.getloadavg()[0]:.1f}")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"parts_ms": {n: _ms(s) for n, s in parts}, "engine_sum_ms": _ms(engine_sum),
                 "layer_wall_ms": _ms(layer_wall), "head_ms": _ms(head), "numpy_gemv_GBps": ref,
                 "rates_GBps": {k: v / 1e9 for k, v in rates.items()},
                 "layer_floor_ms": _ms(layer_floor / ref / 1e9),
                 "load_average": os.getloadavg()[0]}, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
