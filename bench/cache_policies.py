r"""Expert-cache policies compared on a model's real decode traces (default: the demo model).

  python -m bench.cache_policies [--model=STORE] [--tokens=1024] [--slots=8,12,16,20,24]

Decodes held-out text token by token (teacher-forced: each step feeds the next real token, so
the routing is the model's on real text, not on its own greedy loops) through the real engine
and pool, for every policy x pool size, with and without speculative prefetch. Prints the hit
rate of the acquires and the experts read from disk per token (misses + prefetch reads), which
is what bounds speed once the model streams from disk. The prompt's prefill is excluded.
The last row is the oracle: Belady's MIN on the same trace (evict the expert whose next use is
farthest away). It needs the future, so it is no policy, but it bounds what any policy could
reach at that pool size.
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags, logging

import lazymoe_jax
from checkpoints_tools import corpus, default_model
from lazymoe_jax.store.pool import POLICIES


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_string("model", None, "Store folder (default: the shipped demo model).")
  flags.DEFINE_integer("tokens", 1024, "Decode steps (held-out tokens, in windows).")
  flags.DEFINE_integer("window", 128, "Tokens per sequence (a fresh KV cache each).")
  flags.DEFINE_list("slots", ["8", "12", "16", "20", "24"], "Pool sizes.")
  flags.DEFINE_list("policies", list(POLICIES), "Policies.")
  flags.DEFINE_string("json", None, "Write the rows here too.")


FLAGS = flags.FLAGS


def oracle_hit_rate(acquires: list[list[tuple[int, int]]], slots: int,
                    counted: list[bool] | None = None) -> float:
  """Belady's MIN on a sequence of acquires (each: the (layer, expert) keys that must be
  resident at once): on a miss with a full pool, evict the resident key used again farthest in
  the future (never one of the same acquire). The hit rate of the acquires `counted` marks (by
  default all; the others only warm the pool). No eviction policy scores higher at this pool
  size."""
  # waves first (an acquire larger than the pool is held a pool-full at a time, as the
  # engine's prefill does), then each wave's next uses: a key needed in a later wave of the
  # same acquire is needed sooner than one only needed by the next acquire
  waves, count = [], []
  for i, wanted in enumerate(acquires):
    for w0 in range(0, max(len(wanted), 1), slots):
      waves.append(wanted[w0:w0 + slots])
      count.append(counted is None or counted[i])
  upcoming: list[dict] = [{} for _ in waves]  # wave index -> {key: index of next use}
  last: dict[tuple[int, int], int] = {}
  for i in range(len(waves) - 1, -1, -1):
    upcoming[i] = {k: last.get(k, len(waves)) for k in waves[i]}
    for k in waves[i]:
      last[k] = i
  resident: dict[tuple[int, int], int] = {}  # key -> index of its next use
  hits = misses = 0
  for i, keys in enumerate(waves):
    for k in keys:
      if k in resident:
        hits += count[i]
      else:
        misses += count[i]
        if len(resident) >= slots:
          victim = max((r for r in resident if r not in keys), key=resident.__getitem__)
          del resident[victim]
      resident[k] = upcoming[i][k]
  return hits / max(1, hits + misses)


def teacher_forced_decode(engine, windows: list[np.ndarray]) -> dict:
  """Decodes each window one token at a time; returns the pool counters of the decode steps."""
  p = engine.pool
  hits = misses = fetched = used = 0
  acquires: list[list[tuple[int, int]]] = []  # every acquire in order, and which are counted
  counted: list[bool] = []
  engine.forward.trace = lambda layer, ids, h: acquires.append(
      [(layer, int(e)) for e in ids[0]])
  for w in windows:
    seq = engine.session(len(w))
    seq.advance(w[:1])
    counted += [False] * (len(acquires) - len(counted))
    h0, m0, f0, u0 = p.hits, p.misses, p.prefetch_reads, p.prefetch_used
    for i in range(1, len(w)):
      seq.advance(w[i:i + 1])
    counted += [True] * (len(acquires) - len(counted))
    hits, misses = hits + p.hits - h0, misses + p.misses - m0
    fetched, used = fetched + p.prefetch_reads - f0, used + p.prefetch_used - u0
  engine.forward.trace = None
  return {"hits": hits, "misses": misses, "prefetch_reads": fetched, "prefetch_used": used,
          "acquires": acquires, "counted": counted}


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  model = FLAGS.model or default_model.ensure_default_store(lambda s: None)
  probe = lazymoe_jax.load(model, expert_slots=8)
  cfg = probe.spec
  ids = np.array(probe.tokenizer.encode(corpus.stdlib_corpus(1 << 20, held_out=True)), np.int32)
  n_win = -(-FLAGS.tokens // (FLAGS.window - 1))
  windows = [ids[i * FLAGS.window:(i + 1) * FLAGS.window] for i in range(n_win)]
  steps = sum(len(w) - 1 for w in windows)
  total = len(cfg.moe_layers) * cfg.num_experts
  print(f"{model}: {len(cfg.moe_layers)} MoE layers x {cfg.num_experts} experts = {total}, "
        f"top-{cfg.num_experts_per_tok}; {steps} teacher-forced decode steps on held-out text")
  print(f"{'policy':7s} {'prefetch':8s} " + " ".join(f"{s:>16s}" for s in FLAGS.slots))
  rows = []
  trace = None
  for prefetch in (False, True):
    for policy in FLAGS.policies:
      cells = []
      for slots in map(int, FLAGS.slots):
        engine = lazymoe_jax.load(model, expert_slots=slots, cache_policy=policy,
                                  prefetch=prefetch)
        c = teacher_forced_decode(engine, windows)
        trace = (c.pop("acquires"), c.pop("counted"))
        hit = c["hits"] / (c["hits"] + c["misses"])
        reads = (c["misses"] + c["prefetch_reads"]) / steps
        rows.append({"policy": policy, "prefetch": prefetch, "slots": slots, "hit_rate": hit,
                     "reads_per_token": reads, **c})
        cells.append(f"{hit:6.1%} {reads:4.2f}rd/t")
      print(f"{policy:7s} {str(prefetch):8s} " + " ".join(f"{c:>16s}" for c in cells),
            flush=True)
  acquires, counted = trace
  cells = []
  for slots in map(int, FLAGS.slots):
    best = oracle_hit_rate(acquires, slots, counted)
    n = sum(len(a) for a, c in zip(acquires, counted) if c)
    rows.append({"policy": "oracle", "prefetch": False, "slots": slots, "hit_rate": best,
                 "reads_per_token": (1 - best) * n / steps})
    cells.append(f"{best:6.1%} {(1 - best) * n / steps:4.2f}rd/t")
  print(f"{'oracle':7s} {'-':8s} " + " ".join(f"{c:>16s}" for c in cells), flush=True)
  print("cells: hit rate of the acquires, experts read from disk per token (misses + "
        f"prefetch reads; no cache at all reads {len(cfg.moe_layers) * cfg.num_experts_per_tok})")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
