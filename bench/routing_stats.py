r"""Routing facts of a model on held-out text, for the cache and prefetch design.

  python -m bench.routing_stats [--model=STORE] [--windows=16] [--seq_len=256] [--json=out.json]

Per MoE layer: expert usage (share of picks per expert), its entropy (bits; uniform = log2 E),
the top expert's share, temporal reuse (share of a token's experts the previous token also
used), the mean entropy within one window (how much a stretch of text concentrates on few
experts), and next-layer prediction (share of layer l+1's experts that layer l+1's router picks
when applied to layer l's post-attention hidden state, i.e. what a prefetcher could know while
layer l's experts run). Also the held-out perplexity of the same windows.
Default model: the shipped demo; default text: the held-out split of the stdlib corpus.
Chance levels for top-k of E experts: reuse and prediction k/E.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
from absl import app, flags, logging

import lazymoe_jax
from checkpoints_tools import corpus, default_model
from lazymoe_jax.model import layers
from lazymoe_jax.model.routers import route

def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_string("model", None, "Store folder (default: the shipped demo model).")
  flags.DEFINE_integer("windows", 16, "Held-out windows.")
  flags.DEFINE_integer("seq_len", 256, "Tokens per window.")
  flags.DEFINE_string("json", None, "Write the table as JSON here too.")
  flags.DEFINE_string("tokenizer_store", None, "Store whose tokenizer encodes the text (for "
                      "models without one, e.g. random-weight baselines of the same shape).")


FLAGS = flags.FLAGS


def routing_stats(engine, windows: list[np.ndarray]) -> dict:
  cfg = engine.spec
  k, e = cfg.num_experts_per_tok, cfg.num_experts
  traces: dict[int, list] = {}
  engine.forward.trace = lambda layer, ids, h: traces.setdefault(layer, []).append((ids, np.asarray(h)))
  nll, count = 0.0, 0
  for w in windows:
    logits = engine.logits(w)
    logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    nll -= float(np.sum(np.asarray(logp)[np.arange(len(w) - 1), w[1:]]))
    count += len(w) - 1
  engine.forward.trace = None
  moe = list(cfg.moe_layers)
  rows = []
  for li, layer in enumerate(moe):
    ids = np.concatenate([t[0] for t in traces[layer]])  # [N, k]
    usage = np.bincount(ids.reshape(-1), minlength=e) / ids.size
    nz = usage[usage > 0]
    reuse = [len(set(a) & set(b)) / k for ids_w, _ in traces[layer]
             for a, b in zip(ids_w[1:], ids_w[:-1])]
    window_entropy = []  # how concentrated routing is within one window of text
    for ids_w, _ in traces[layer]:
      u = np.bincount(ids_w.reshape(-1), minlength=e) / ids_w.size
      u = u[u > 0]
      window_entropy.append(float(-(u * np.log2(u)).sum()))
    row = {"layer": layer, "usage": [round(float(u), 4) for u in usage],
           "window_entropy_bits": round(float(np.mean(window_entropy)), 3),
           "entropy_bits": round(float(-(nz * np.log2(nz)).sum()), 3),
           "max_entropy_bits": round(math.log2(e), 3), "top_share": round(float(usage.max()), 4),
           "prev_token_reuse": round(float(np.mean(reuse)), 4)}
    if li + 1 < len(moe):
      nxt = moe[li + 1]
      p = engine.forward.layers[nxt]
      hits = []
      for (_, h), (ids_next, _) in zip(traces[layer], traces[nxt]):
        xn = layers.rms_norm(h, p["mlp_norm"], cfg.norm_eps)
        guess = np.asarray(route(cfg.moe.router, layers.linear(xn, p["router"]))[0])
        hits += [len(set(a) & set(b)) / k for a, b in zip(guess, ids_next)]
      row["next_layer_prediction"] = round(float(np.mean(hits)), 4)
    rows.append(row)
  return {"tokens": count + len(windows), "held_out_ppl": math.exp(nll / count), "layers": rows}


def held_out_windows(tokenizer, n: int, seq_len: int) -> list[np.ndarray]:
  ids = np.array(tokenizer.encode(corpus.stdlib_corpus(n * seq_len * 8, held_out=True)))
  if len(ids) < n * seq_len:
    raise ValueError(f"held-out text has {len(ids)} tokens, fewer than {n} x {seq_len}.")
  return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]


def markdown(result: dict) -> str:
  lines = ["| layer | entropy (bits, max) | per-window entropy | top expert share | "
           "prev-token reuse | next-layer prediction | usage per expert |",
           "|---|---|---|---|---|---|---|"]
  for r in result["layers"]:
    pred = r.get("next_layer_prediction")
    lines.append(f"| {r['layer']} | {r['entropy_bits']} ({r['max_entropy_bits']}) | "
                 f"{r['window_entropy_bits']} | {r['top_share']:.1%} | {r['prev_token_reuse']:.1%} | "
                 f"{'–' if pred is None else f'{pred:.1%}'} | "
                 f"{' '.join(f'{u:.2f}' for u in r['usage'])} |")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  store = FLAGS.model or default_model.ensure_default_store()
  engine = lazymoe_jax.load(store)
  tok = (lazymoe_jax.load(FLAGS.tokenizer_store, expert_slots=1 << 30).tokenizer
         if FLAGS.tokenizer_store else engine.tokenizer)
  result = routing_stats(engine, held_out_windows(tok, FLAGS.windows, FLAGS.seq_len))
  print(f"{result['tokens']} held-out tokens, perplexity {result['held_out_ppl']:.3f}")
  print(markdown(result))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
