r"""The planner that explains itself: a store's memory plan and its predicted speed, before a
single token is run.

  python -m lazymoe_jax.plan --model=STORE --memory_budget_gb=8 [--json] [--kv_bits=4]
      [--max_context=N] [--dense_dtype=int8] [--parallel=N]

Prints the memory plan (the engine's own: engine/budget.plan_store, from the manifest; with
--parallel, the KV caches of that many sequences decoding together, as the server's
--parallel plans them), then the
per-token cost model and what it predicts:
- disk bandwidth, measured on the store's own expert chunk files with the engine's read path
  (store/experts.read_chunk: O_DIRECT into page-aligned buffers, 8 reads in flight as the
  engine's reader pool);
- compute, measured by running the first MoE layer's programs (its real dense params and
  experts; attention + router, the k-expert decode, a prompt's grouped expert step) for a
  few iterations: measured rather than recorded, because it depends on this machine, its load
  and the kernels built here. The output head is not loaded (it can be the largest dense
  tensor): its time is its bytes at the measured layer's dense bytes per second (an estimate);
- decode: bytes read per token = MoE layers x k x (1 - hit) x expert bytes, with hit = slots /
  experts (near-uniform routing: a trained model's locality raises it); token time = compute +
  reads (demand reads wait; prefetch can hide at most min(compute, reads): the upper figure);
- time to first token for a 64-token prompt: each MoE layer reads the distinct experts the
  prompt picks (E (1 - (1 - k/E)^64) under uniform routing), cold, plus the prompt's compute
  (compilation excluded);
- what would change it: twice the budget, int4 experts, a 3.5 and a 7 GB/s disk (predictions).
With --json the figures are also printed as one JSON object, last on stdout.
"""

from __future__ import annotations

import json
import mmap
import time

import numpy as np
from absl import app, flags

from lazymoe_jax.engine.budget import (GB, MARGIN_BASE, MAX_PLANNED_CONTEXT, MemoryPlan,  # noqa: F401  (the API before session 7)
                                       make_plan, plan_store, resident_bytes, runtime_bytes)

PROMPT_TOKENS = 64
READ_DEPTH = 8  # reads in flight: the engine's reader pool (store/experts._READERS)


def measure_disk(experts, n: int = 24, seed: int = 0) -> float:
  """GB/s reading `n` distinct random experts with the engine's read path, READ_DEPTH at once,
  into page-aligned buffers (O_DIRECT)."""
  rng = np.random.default_rng(seed)
  total = len(experts.layers) * int(next(iter(experts.specs.values()))["shape"][1])
  picks = rng.choice(total, min(n, total), replace=False)
  e_per = total // len(experts.layers)
  bufs = []
  for _ in range(READ_DEPTH):
    arena = mmap.mmap(-1, sum(-(-b // 4096) * 4096 for b in experts.nbytes.values()))
    views, off = {}, 0
    for name, nb in experts.nbytes.items():
      views[name] = np.frombuffer(arena, np.uint8, nb, off).view(experts.dtypes[name]).reshape(
          experts.shapes[name])
      off += -(-nb // 4096) * 4096
    bufs.append(views)
  t0 = time.perf_counter()
  nbytes = 0
  for start in range(0, len(picks), READ_DEPTH):
    handles = [experts.start_read(experts.layers[p // e_per], p % e_per, bufs[i])
               for i, p in enumerate(picks[start:start + READ_DEPTH])]
    nbytes += sum(experts.finish_read(h) for h in handles)
  return nbytes / (time.perf_counter() - t0) / GB


def _timed(fn, n: int) -> float:
  """Median seconds of fn() over n runs after one warm-up (compilation) run."""
  fn()
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def measure_compute(store_dir: str, manifest: dict, spec, kv, dense_dtype: str | None,
                    experts, iters: int = 5) -> dict:
  """Seconds of the first MoE layer's programs on its real params: attention + router for one
  token and for a 64-token prompt, the k-expert decode, one expert over a prompt's share of
  tokens; and the layer's dense bytes (for the head's estimate)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from lazymoe_jax.engine import budget, weights  # pylint: disable=import-outside-toplevel
  from lazymoe_jax.model import encodings, steps  # pylint: disable=import-outside-toplevel
  layer = spec.moe_layers[0]
  part = f"layer_{layer:03d}"
  enc = encodings.get(dense_dtype) if dense_dtype is not None else None
  p = weights.load_part(store_dir, part, budget.dense_tensors(store_dir, manifest)[part], spec,
                        enc)
  k, e_count = spec.num_experts_per_tok, spec.num_experts
  ex = []
  for e in range(k):
    buf = {n: np.empty(experts.shapes[n], experts.dtypes[n]) for n in experts.specs}
    experts.read_into(layer, e, buf)
    ex.append(experts.as_tree({n: jax.device_put(a) for n, a in buf.items()}))
  window = spec.layers[layer].window
  rng = np.random.default_rng(0)
  out = {"layer_dense_bytes": sum(a.nbytes for a in jax.tree.leaves(p))}
  for t in (1, PROMPT_TOKENS):
    x = jnp.asarray(rng.standard_normal((t, spec.hidden_size), np.float32))
    pos = jnp.arange(t, dtype=jnp.int32)

    def attn(x=x, pos=pos, t=t):
      cache = kv.init(spec, max(128, t))[layer]
      r = steps.attn_router(spec, kv, window, p, x, pos, cache)
      jax.block_until_ready(r)
      return r
    out[f"attn_router_{t}_s"] = _timed(attn, iters)
  h, xn, _, w, _ = attn(x=jnp.ones((1, spec.hidden_size), jnp.float32),
                           pos=jnp.zeros(1, jnp.int32), t=1)
  w = jnp.full((1, k), 1.0 / k, jnp.float32)
  out["moe_decode_s"] = _timed(
      lambda: steps.moe_decode(spec, steps.shared_params(p), h, xn, w, tuple(ex)).block_until_ready(), iters)
  distinct = e_count * (1 - (1 - k / e_count) ** PROMPT_TOKENS)
  share = max(1, int(round(PROMPT_TOKENS * k / distinct)))
  b = 1 << (max(share, 2) - 1).bit_length()
  xp = jnp.asarray(rng.standard_normal((PROMPT_TOKENS, spec.hidden_size), np.float32))
  idx = jnp.arange(b, dtype=jnp.int32) % PROMPT_TOKENS
  wt = jnp.ones(b, jnp.float32)
  acc = jnp.zeros_like(xp)
  out["expert_prompt_s"] = _timed(lambda: steps.expert_scatter_add(
      spec, jnp.zeros_like(acc), xp, idx, wt, ex[0]).block_until_ready(), iters)
  out["prompt_distinct_experts"] = distinct
  return out


def predict(store_dir: str, memory_budget_gb: float, *, kv_bits: float | None = None,
            max_context: int | None = None, dense_dtype: str | None = None,
            disk_gbps: float | None = None, parallel: int = 1) -> dict:
  """The memory plan, the measured disk and compute, and the predicted speed (module doc)."""
  from lazymoe_jax import families  # pylint: disable=import-outside-toplevel
  from lazymoe_jax import kv as kv_lib  # pylint: disable=import-outside-toplevel
  from lazymoe_jax.model import encodings  # pylint: disable=import-outside-toplevel
  from lazymoe_jax.store import format as fmt  # pylint: disable=import-outside-toplevel
  from lazymoe_jax.store.experts import ExpertStore  # pylint: disable=import-outside-toplevel
  runtime = runtime_bytes()  # first: measured as the engine measures it
  manifest = fmt.read_manifest(store_dir)
  opts = dict(manifest=manifest, kv_bits=kv_bits, max_context=max_context,
              dense_dtype=dense_dtype, sequences=parallel)
  plan = plan_store(store_dir, memory_budget_gb, runtime, **opts)
  spec = families.spec_from_hf(manifest["hf_config"])
  kv = kv_lib.make(kv_bits, mla=spec.attention.cache_kind == "latent")
  experts = ExpertStore(store_dir, manifest)
  disk = disk_gbps or measure_disk(experts)
  comp = measure_compute(store_dir, manifest, spec, kv, dense_dtype, experts)
  tables = manifest["dense"].get("tensors") or {}
  from lazymoe_jax.engine import budget  # pylint: disable=import-outside-toplevel
  tables = budget.dense_tensors(store_dir, manifest)
  head_bytes = _head_bytes(manifest, spec, tables, dense_dtype)
  dense_gbps = comp["layer_dense_bytes"] / comp["attn_router_1_s"] / GB
  head_s = head_bytes / (dense_gbps * GB)
  moe, layers = len(spec.moe_layers), spec.num_hidden_layers
  total = moe * spec.num_experts
  k = spec.num_experts_per_tok
  compute_s = layers * comp["attn_router_1_s"] + moe * comp["moe_decode_s"] + head_s

  def model(slots: int, bpe: float, gbps: float) -> dict:
    hit = min(1.0, slots / total)
    read = moe * k * (1 - hit) * bpe
    token_s = compute_s + read / (gbps * GB)
    d = comp["prompt_distinct_experts"]
    prompt_read = moe * min(d, spec.num_experts) * bpe
    ttft = (prompt_read / (gbps * GB) + layers * comp[f"attn_router_{PROMPT_TOKENS}_s"] +
            moe * d * comp["expert_prompt_s"] + head_s)
    return {"hit_rate": hit, "bytes_read_per_token": read, "disk_s_per_token": read / (gbps * GB),
            "compute_s_per_token": compute_s, "decode_tokens_per_s": 1 / token_s,
            "decode_tokens_per_s_overlapped": 1 / max(compute_s, read / (gbps * GB)),
            "prompt_bytes_read": prompt_read, "time_to_first_token_s": ttft}

  base = model(plan.slots, plan.bytes_per_expert, disk)
  try:
    roomy = plan_store(store_dir, 2 * memory_budget_gb, runtime, **opts)
    more = model(roomy.slots, plan.bytes_per_expert, disk)
  except Exception:  # pylint: disable=broad-except
    more = None
  enc = experts.encoding
  int4 = encodings.get("int4-g32")
  bpe4 = plan.bytes_per_expert * int4.bytes_per_weight() / enc.bytes_per_weight()
  slots4 = min(total, (plan.budget_bytes - plan.runtime_and_dense_bytes - plan.kv_bytes -
                       plan.margin_bytes) // int(bpe4))
  return {"memory_plan": plan.as_dict(), "plan": plan.describe(), "disk_GBps": disk,
          "disk_measured": disk_gbps is None, "compute": comp, "head_bytes": head_bytes,
          "head_s_estimate": head_s, **base,
          "what_if": {f"budget_{2 * memory_budget_gb:g}_GB": more,
                      "int4_experts": model(slots4, bpe4, disk),
                      "disk_3.5_GBps": model(plan.slots, plan.bytes_per_expert, 3.5),
                      "disk_7_GBps": model(plan.slots, plan.bytes_per_expert, 7.0)}}


def _head_bytes(manifest: dict, spec, tables: dict, dense_dtype: str | None) -> int:
  from lazymoe_jax.engine import budget  # pylint: disable=import-outside-toplevel
  from lazymoe_jax.model import encodings  # pylint: disable=import-outside-toplevel
  g = tables["globals"]
  keys = [k for k in g if k.startswith("lm_head")] or ["embed"]
  n = sum(budget._nbytes(g[k]) for k in keys)  # pylint: disable=protected-access
  if budget.reencodes_head(manifest, tables, dense_dtype):
    t = g[keys[0]]
    rows, cols = t["shape"]
    n = int(rows * cols * encodings.get(dense_dtype).bytes_per_weight() + rows * 4)
  del spec
  return n


def report(r: dict) -> str:
  """The human-readable printout of `predict`'s figures."""
  c = r["compute"]
  lines = [r["plan"],
           f"disk: {r['disk_GBps']:.2f} GB/s ({'measured on the store' if r['disk_measured'] else 'given'}"
           f", O_DIRECT, {READ_DEPTH} reads in flight)",
           f"compute (measured, one MoE layer): attention+router {c['attn_router_1_s'] * 1e3:.2f} ms"
           f", k-expert decode {c['moe_decode_s'] * 1e3:.2f} ms; prompt of {PROMPT_TOKENS}: "
           f"attention+router {c[f'attn_router_{PROMPT_TOKENS}_s'] * 1e3:.1f} ms, "
           f"{c['prompt_distinct_experts']:.1f} distinct experts x "
           f"{c['expert_prompt_s'] * 1e3:.2f} ms; head {r['head_s_estimate'] * 1e3:.1f} ms "
           f"(estimated from its {r['head_bytes'] / 1e6:.0f} MB)",
           "per token (cost model): "
           f"read {r['bytes_read_per_token'] / 1e6:.1f} MB at hit {r['hit_rate']:.1%} "
           f"(slots / experts, uniform routing) = disk {r['disk_s_per_token'] * 1e3:.1f} ms, "
           f"compute {r['compute_s_per_token'] * 1e3:.1f} ms",
           f"predicted: decode {r['decode_tokens_per_s']:.2f} tok/s (up to "
           f"{r['decode_tokens_per_s_overlapped']:.2f} if prefetch hid every read), time to "
           f"first token ({PROMPT_TOKENS}-token prompt, cold, no compilation) "
           f"{r['time_to_first_token_s']:.2f} s reading {r['prompt_bytes_read'] / GB:.2f} GB",
           "what would change it (predictions):"]
  for name, m in r["what_if"].items():
    lines.append(f"  {name}: " + ("does not plan" if m is None else
                                  f"decode {m['decode_tokens_per_s']:.2f} tok/s, time to first "
                                  f"token {m['time_to_first_token_s']:.2f} s, hit "
                                  f"{m['hit_rate']:.1%}"))
  return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("model", None, "Store folder (python -m checkpoints_tools.convert_hf).")
  flags.DEFINE_float("memory_budget_gb", 8.0, "Memory budget (GB, 1e9 bytes).")
  flags.DEFINE_float("kv_bits", None, "TurboQuant KV cache bits (as lazymoe_jax.generate).")
  flags.DEFINE_integer("max_context", None, "Positions the KV cache is planned for.")
  flags.DEFINE_enum("dense_dtype", None, ["bfloat16", "int8"], "Dense re-encoding at load.")
  flags.DEFINE_float("disk_gbps", None, "Use this disk bandwidth instead of measuring it.")
  flags.DEFINE_integer("parallel", 1, "Sequences decoded together (the server's --parallel): "
                       "the plan holds their KV caches.", lower_bound=1)
  flags.DEFINE_bool("json", False, "Also print the figures as one JSON object, last.")
  flags.mark_flags_as_required(["model"])


def main(argv) -> None:
  del argv
  from lazymoe_jax import cli  # pylint: disable=import-outside-toplevel

  def work():
    r = predict(FLAGS.model, FLAGS.memory_budget_gb, kv_bits=FLAGS.kv_bits,
                max_context=FLAGS.max_context, dense_dtype=FLAGS.dense_dtype,
                disk_gbps=FLAGS.disk_gbps, parallel=FLAGS.parallel)
    print(report(r), flush=True)
    if FLAGS.json:
      print(json.dumps(r), flush=True)
  cli.run(work)


if __name__ == "__main__":
  define_flags()
  app.run(main)
