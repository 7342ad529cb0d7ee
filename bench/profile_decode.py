r"""Where one decode layer's time goes: the gpt-oss-120b slice with every expert resident.

  python -m bench.profile_decode [--layers=2] [--steps=16] [--context=256]
      [--workdir=/tmp/overhead] [--trace_dir=DIR] [--json=FILE]

Builds (once, in --workdir) a slice of gpt-oss-120b with its real shapes (hidden 2880, 128
MXFP4 experts of width 2880, top-4, 64 q / 8 kv heads of 64, vocab 201,088, sinks, sliding
windows, biases; bench.make_synthetic.make_gpt_oss_mxfp4, random weights), loads it with
`dense_dtype=int8` and a pool that holds every expert of the slice, reads them all, then:

1. **un-instrumented**: the engine's own decode step (seq.advance: every layer, no head),
   per-layer wall = step / layers; the output head alone;
2. **instrumented**: the same decode steps through the engine's own layer loop
   (Forward.run), with its calls wrapped: each jitted program (attn_router, moe_decode) is
   waited for (block_until_ready) and timed from call to return (its dispatch) and to done;
   the pool's acquire and the prefetch calls are timed; the host time between them is the
   loop's own (the ids to the host between attn_router and acquire, the slot tuple between
   acquire and moe_decode, the rest of the loop between a layer's end and the next program);
3. **parts**, each its own program on the same inputs: attention's int8 products (wqkv, wo),
   attention + router (steps.attn_router), the router alone, the routers of the layers
   ahead (the prefetch guesses), the moe_ffn kernel alone; and what a launch costs: the
   arguments of attn_router / moe_decode through a program that computes nothing;
4. **floor**: the bytes a decode step reads (the layer's dense params, its KV cache at
   capacity, k experts; the head's) / numpy's float32 gemv bandwidth measured in the same run.

Medians (and minima: the shared machine's noise only adds) over steps x layers. The
instrumented sum exceeds the un-instrumented wall by what waiting costs (host work no longer
overlaps the device). Only public model code and the engine's loop are used, so the same
file measures an older tree (PYTHONPATH) for a before/after. The store is several GB and is
left in --workdir (delete it when done).
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


class Recorder:
  """Named lists of seconds, and the timeline of the last wrapped event (for the gaps)."""

  def __init__(self):
    self.t: dict[str, list[float]] = collections.defaultdict(list)
    self.on = False
    self.last_end: tuple[str, float] | None = None

  def add(self, name: str, seconds: float) -> None:
    if self.on:
      self.t[name].append(seconds)

  def gap(self, name: str, start: float) -> None:
    """The host time between the previous wrapped event's end and this one's start."""
    if self.last_end is not None:
      self.add(f"gap: {self.last_end[0]} -> {name}", start - self.last_end[1])

  def stat(self, name: str) -> tuple[float, float]:
    v = self.t.get(name)
    return (float(np.median(v)), float(np.min(v))) if v else (0.0, 0.0)


def wrap_program(rec: Recorder, name: str, fn, args_log: dict):
  """fn, timed from call to return (dispatch) and to done (waited for)."""
  def wrapped(*args, **kw):
    t0 = time.perf_counter()
    rec.gap(name, t0)
    out = fn(*args, **kw)
    t1 = time.perf_counter()
    jax.block_until_ready(out)
    t2 = time.perf_counter()
    rec.add(f"{name}: dispatch (call returns)", t1 - t0)
    rec.add(f"{name}: total, waited for", t2 - t0)
    rec.last_end = (name, t2)
    if rec.on and out is not None:
      args_log[name] = (args, out)
    return out
  return wrapped


def wrap_host(rec: Recorder, name: str, fn):
  def wrapped(*args, **kw):
    t0 = time.perf_counter()
    rec.gap(name, t0)
    out = fn(*args, **kw)
    t1 = time.perf_counter()
    rec.add(name, t1 - t0)
    rec.last_end = (name, t1)
    return out
  return wrapped


def block_ms(fn, *args, n: int = 1) -> list[float]:
  out = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - t0)
  return out


def part_programs(spec):
  """Programs for the parts, built from the model code only (same in every tree)."""
  from lazymoe_jax import kernels  # pylint: disable=import-outside-toplevel
  from lazymoe_jax.model import layers  # pylint: disable=import-outside-toplevel
  from lazymoe_jax.model.routers import route  # pylint: disable=import-outside-toplevel
  act = spec.moe.act

  def router(p, xn):
    return route(spec.moe.router, layers.linear(xn, p["router"], p.get("router_bias")),
                 p.get("router_score_bias"))

  def guesses(routers, h):
    return [router(r, layers.rms_norm(h, r["mlp_norm"], spec.norm_eps))[0] for r in routers]

  def moe_ffn(slots, xn, w):
    enc = slots[0]["w_gate_up"].encoding.name
    return kernels.moe_ffn(enc, tuple({t: wt.arrays for t, wt in ex.items()} for ex in slots),
                           xn, w, (act.kind, act.alpha, act.limit))

  return {"wqkv": jax.jit(lambda p, x: layers.linear(x, p["wqkv"], p.get("bqkv"))),
          "wo": jax.jit(lambda p, o: layers.linear(o, p["wo"], p.get("bo"))),
          "router": jax.jit(router), "guesses": jax.jit(guesses), "moe_ffn": jax.jit(moe_ffn),
          "noop": jax.jit(lambda *args: jnp.zeros((1,), jnp.float32))}


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  import lazymoe_jax  # pylint: disable=import-outside-toplevel
  from lazymoe_jax import kernels  # pylint: disable=import-outside-toplevel
  from lazymoe_jax.model import steps  # pylint: disable=import-outside-toplevel
  from lazymoe_jax.model.spec import DENSE_MLP  # pylint: disable=import-outside-toplevel
  from bench.bench_decode import numpy_gemv_bandwidth  # pylint: disable=import-outside-toplevel
  store = ensure_slice(FLAGS.workdir, FLAGS.layers)
  ctx = FLAGS.context
  eng = lazymoe_jax.load(store, expert_slots=FLAGS.layers * 128, dense_dtype="int8",
                         max_context=ctx)
  spec, fwd, pool = eng.spec, eng.forward, eng.pool
  if any(spec.layers[i].mlp == DENSE_MLP for i in range(len(spec.layers))):
    raise SystemExit("the slice has a dense layer: this profiler times MoE layers only.")
  t0 = time.perf_counter()
  for layer in spec.moe_layers:  # every expert resident: no reads while decoding
    pool.acquire(layer, range(spec.num_experts))
  L = len(spec.layers)
  print(f"kernels {kernels.mode()} ({kernels.isa() if kernels.mode() == 'native' else '-'}), "
        f"{L} MoE layers, {pool.num_slots} slots, all {len(pool.table)} experts resident (read "
        f"in {time.perf_counter() - t0:.0f} s), KV capacity {ctx}; lazymoe_jax from "
        f"{os.path.dirname(os.path.dirname(lazymoe_jax.__file__))}", flush=True)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 2048, FLAGS.prompt + 12 + 2 * FLAGS.steps).astype(np.int32)
  seq = eng.session(ctx)
  seq.advance(ids[:FLAGS.prompt])
  i = FLAGS.prompt
  for _ in range(3):  # compile the decode programs
    seq.feed(ids[i:i + 1])
    i += 1
  reads0 = pool.misses
  cache_sizes = lambda: {n: getattr(steps, n)._cache_size()  # noqa: E731  pylint: disable=protected-access
                         for n in ("attn_router", "moe_decode", "embed", "head")}
  sizes0 = cache_sizes()
  ref = numpy_gemv_bandwidth()
  load0 = os.getloadavg()[0]
  # 1. un-instrumented
  walls = []
  for _ in range(FLAGS.steps):
    t0 = time.perf_counter()
    seq.advance(ids[i:i + 1]).block_until_ready()
    walls.append(time.perf_counter() - t0)
    i += 1
  x = seq.advance(ids[i:i + 1])
  i += 1
  head = block_ms(lambda: steps.head(spec, fwd.globals, x), n=6)[1:]
  # 2. instrumented: the engine's loop with its calls wrapped
  rec, args_log = Recorder(), {}
  originals = {n: getattr(steps, n) for n in ("attn_router", "moe_decode")}
  for n, f in originals.items():
    setattr(steps, n, wrap_program(rec, n, f, args_log))
  pool.acquire = wrap_host(rec, "pool.acquire", pool.acquire)
  fwd._prefetch = wrap_host(rec, "prefetch calls", fwd._prefetch)  # pylint: disable=protected-access
  try:
    for s in range(FLAGS.steps + 1):
      rec.on, rec.last_end = s > 0, None  # the first step warms the wrappers up
      seq.advance(ids[i:i + 1]).block_until_ready()
      i += 1
  finally:
    rec.on = False
    for n, f in originals.items():
      setattr(steps, n, f)
    del pool.acquire, fwd._prefetch  # back to the class's methods
  sizes1 = cache_sizes()
  if FLAGS.trace_dir:
    with jax.profiler.trace(FLAGS.trace_dir):
      for _ in range(4):
        seq.advance(ids[i:i + 1]).block_until_ready()
        i += 1
  # 3. parts, each its own program, on the last layer's inputs
  progs = part_programs(spec)
  (a_args, a_out), (m_args, _) = args_log["attn_router"], args_log["moe_decode"]
  _, _, window, p, xa, pos, _, ahead = a_args  # Forward.run's positional call
  h, xn = a_out[0], a_out[1]
  weights, slot_arrays = m_args[4], m_args[5]
  layer = next(n for n, q in enumerate(fwd.layers) if q is p)
  cache = seq.cache[layer]  # the one attn_router got was donated
  all_ahead = tuple(fwd.routers[a] for a in fwd.moe_order[1:4])  # what the first layer guesses
  o = jnp.zeros((1, spec.attention.num_heads * spec.attention.head_dim), jnp.float32)
  parts_s = {}

  def part(name, fn, *args):
    fn(*args)  # compile
    parts_s[name] = block_ms(fn, *args, n=2 * FLAGS.steps)

  c2 = jax.tree.map(jnp.copy, cache)
  part("attention + router (steps.attn_router, no guesses)", lambda: steps.attn_router(
      spec, fwd.kv, window, p, xa, pos, jax.tree.map(jnp.copy, c2)))
  part("  copy of the cache (inside the line above)", lambda: jax.tree.map(jnp.copy, c2))
  part("  wqkv product (int8)", progs["wqkv"], p, xa)
  part("  wo product (int8)", progs["wo"], p, o)
  part("router", progs["router"], p, xn)
  part(f"guesses: routers of the next {len(all_ahead)} MoE layers", progs["guesses"],
       all_ahead, h)
  part("moe_ffn kernel alone (k experts)", progs["moe_ffn"], slot_arrays, xn, weights)
  part("launch: empty program, attn_router's arguments", progs["noop"], p, xa, pos, cache,
       ahead)
  part("launch: empty program, moe_decode's arguments", progs["noop"], *m_args[1:])
  # 4. the floor
  kv_bytes = eng.kv.nbytes(list(seq.cache)) / L
  dense = np.mean([sum(a.nbytes for a in jax.tree.leaves(q)) for q in fwd.layers])
  ex_bytes = spec.num_experts_per_tok * eng.experts.bytes_per_expert
  layer_floor = dense + ex_bytes + kv_bytes
  g = fwd.globals
  head_bytes = sum(a.nbytes for a in jax.tree.leaves(g["lm_head"])) + g["final_norm"].nbytes
  # report
  ms = lambda s: s * 1e3  # noqa: E731
  rows = []

  def row(name, med, mn):
    rows.append((name, ms(med), ms(mn)))

  layer_wall = float(np.median(walls)) / L
  print(f"numpy f32 gemv reference: {ref:.1f} GB/s (same run); load average {load0:.1f}")
  print(f"\nper decode layer (ms; median, min over {FLAGS.steps} steps x {L} layers):")
  names = [("attn_router", "attn_router (attention + router [+ guesses])"),
           ("moe_decode", "moe_decode (the k experts)")]
  loop = [("gap: attn_router -> pool.acquire", "host: ids to the host (the router sync) + loop"),
          ("pool.acquire", "host: pool.acquire"),
          ("gap: pool.acquire -> moe_decode", "host: slot tuple + loop"),
          ("gap: moe_decode -> prefetch calls", "host: loop"),
          ("prefetch calls", "host: prefetch calls"),
          ("gap: prefetch calls -> attn_router", "host: loop to the next layer's program")]
  engine_sum = [0.0, 0.0]
  for key, label in names[:1] + loop[:3] + names[1:] + loop[3:]:
    if key in ("attn_router", "moe_decode"):
      med, mn = rec.stat(f"{key}: total, waited for")
      row(f"{label}, waited for", med, mn)
      row("  of which its dispatch (call returns)", *rec.stat(f"{key}: dispatch (call returns)"))
    else:
      med, mn = rec.stat(key)
      row(label, med, mn)
    engine_sum[0] += med
    engine_sum[1] += mn
  for name, v in parts_s.items():
    row(f"part: {name}", float(np.median(v)), float(np.min(v)))
  row("SUM of the instrumented engine path", *engine_sum)
  row("UN-INSTRUMENTED per-layer wall (decode step without head / layers)", layer_wall,
      float(np.min(walls)) / L)
  row("output head (per token, alone)", float(np.median(head)), float(np.min(head)))
  for name, med, mn in rows:
    print(f"  {name:72s} {med:8.3f} {mn:8.3f}")
  wqkv = sum(a.nbytes for a in jax.tree.leaves(p["wqkv"]))
  wo = sum(a.nbytes for a in jax.tree.leaves(p["wo"]))
  best = lambda name: float(np.min(parts_s[name]))  # noqa: E731
  rates = {"experts (moe_ffn, mxfp4)": ex_bytes / best("moe_ffn kernel alone (k experts)"),
           "wqkv (int8)": wqkv / best("  wqkv product (int8)"),
           "wo (int8)": wo / best("  wo product (int8)"),
           "head (int8)": head_bytes / float(np.min(head))}
  print("\nkernel bandwidth at the min time (weight bytes / time; x numpy gemv):")
  for name, r in rates.items():
    print(f"  {name:28s} {r / 1e9:6.2f} GB/s ({r / 1e9 / ref:.2f}x)")
  print(f"\nbandwidth floor: layer {layer_floor / 1e6:.1f} MB (dense {dense / 1e6:.1f}, experts "
        f"{ex_bytes / 1e6:.1f}, KV {kv_bytes / 1e6:.1f}) / {ref:.1f} GB/s = "
        f"{ms(layer_floor / ref / 1e9):.2f} ms; head {head_bytes / 1e6:.0f} MB = "
        f"{ms(head_bytes / ref / 1e9):.2f} ms")
  full = 36 * layer_wall + float(np.median(head))
  print(f"gpt-oss-120b compute at this per-layer wall, 36 layers + head: {ms(full):.0f} ms/token "
        f"= {1 / full:.2f} tok/s (target: layer <= 8 ms)")
  print(f"guesses computed per layer: {len(ahead)}; reads during the timed steps: "
        f"{pool.misses - reads0}; compiled programs before/after: {sizes0} / {sizes1}; load "
        f"average at the end {os.getloadavg()[0]:.1f}")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"rows_ms_median_min": rows, "numpy_gemv_GBps": ref,
                 "rates_GBps": {k: v / 1e9 for k, v in rates.items()},
                 "layer_floor_ms": ms(layer_floor / ref / 1e9), "load_average": load0,
                 "lazymoe_jax": lazymoe_jax.__file__}, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
