"""The layer loop: tokens through every layer, experts through the slot pool.

Per layer: a jitted attention+router program, then on the host the expert ids are mapped to
pool slots (misses read from disk), then a jitted expert program. Prefill groups the prompt's
tokens by expert so that each selected expert is read once per layer for the whole prompt, in
waves when the pool is smaller than the set of experts the prompt needs. Batched decode (one
token of each of N sequences) runs attention once per layer over the sequences' stacked
caches (engine/batch.py) and the experts grouped, like prefill: each expert the batch picks is
read once per layer.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lazymoe_jax.errors import PlanError
from lazymoe_jax.model import steps
from lazymoe_jax.model.spec import DENSE_MLP, ModelSpec
from lazymoe_jax.store.pool import ExpertPool

HEAD_ROWS = 256  # the output head is applied to this many rows at a time
PREFETCH_DEPTH = 3  # MoE layers ahead whose experts decode prefetches (BUILD_NOTES "Lookahead prefetch")
KV_ROUND = 256  # cache capacity granularity: few distinct shapes, few compilations


class KVCache(list):
  """The per-layer cache pytrees of one sequence, and how many positions they hold."""

  capacity: int = 0


def bucket(n: int, minimum: int) -> int:
  """Next power of two >= max(n, minimum): bounds the number of compiled shapes."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def capacity_for(needed: int, limit: int) -> int:
  """The cache capacity for `needed` positions: a multiple of KV_ROUND or the bucket a prompt
  of that length is padded to, but never beyond `limit` (max_context)."""
  padded = max(-(-needed // KV_ROUND) * KV_ROUND, bucket(needed, 8))
  return min(padded, max(needed, limit))


class Forward:
  """The model as it runs: spec, KV cache kind, dense params on the device, the expert pool."""

  def __init__(self, spec: ModelSpec, kv, glob: dict, layers: list[dict], pool: ExpertPool,
               prefetch: bool):
    self.spec = spec
    self.kv = kv
    self.globals = glob
    self.layers = layers
    self.pool = pool
    # Speculative prefetch in decode: layer l applies the routers of the next `prefetch_depth`
    # MoE layers to its hidden state and starts reading their likeliest `prefetch_width`
    # experts (half of top-k: BUILD_NOTES "Lookahead prefetch").
    self.prefetch = prefetch
    self.prefetch_width = max(1, spec.num_experts_per_tok // 2)
    self.prefetch_depth = PREFETCH_DEPTH
    self.moe_order = list(spec.moe_layers)
    self.routers = {n: {k: v for k, v in layers[n].items()
                        if k in ("mlp_norm", "router", "router_bias", "router_score_bias")}
                    for n in self.moe_order}
    # Optional observer: trace(layer, ids [T, k], h [T, H]) after each router (benchmarks).
    self.trace: Callable[[int, np.ndarray, jax.Array], None] | None = None

  # ---- caches ------------------------------------------------------------------------------
  def new_cache(self, needed: int, limit: int) -> KVCache:
    """A cache for `needed` positions: rounded up (few shapes, few compilations) to a
    multiple of KV_ROUND or to the bucket a prompt of that length is padded to, but never
    beyond `limit` (max_context)."""
    cache = KVCache(self.kv.init(self.spec, capacity_for(needed, limit)))
    cache.capacity = capacity_for(needed, limit)
    return cache

  # ---- one sequence ------------------------------------------------------------------------
  def run(self, tokens: np.ndarray, start: int, cache: KVCache):
    """Runs tokens at positions start.. through every layer. Returns (x [Tb, H], cache)."""
    spec = self.spec
    n = len(tokens)
    if start + n > cache.capacity:
      raise PlanError(f"KV cache too small for {start + n} positions.")
    # pad the prompt to a bucket (few compiled shapes) if the cache has room, else exactly
    tb = 1 if n == 1 else min(bucket(n, 8), cache.capacity - start)
    padded = np.zeros(tb, np.int32)
    padded[:n] = tokens
    pos = jnp.asarray(start + np.arange(tb, dtype=np.int32))
    x = steps.embed(spec, self.globals, jnp.asarray(padded))
    for layer, p in enumerate(self.layers):
      window = spec.layers[layer].window
      if spec.layers[layer].mlp == DENSE_MLP:
        x, cache[layer] = steps.dense_layer(spec, self.kv, window, p, x, pos, cache[layer])
        continue
      ahead = self._layers_ahead(layer) if (n == 1 and self.prefetch) else []
      h, xn, ids, weights, cache[layer], guesses = steps.attn_router(
          spec, self.kv, window, p, x, pos, cache[layer], tuple(self.routers[a] for a in ahead))
      ids = np.asarray(ids)[:n]  # waits for this layer's router, hence for all earlier work
      if self.trace is not None:
        self.trace(layer, ids, h[:n])
      if n == 1:
        slots = self.pool.acquire(layer, ids[0])
        x = steps.moe_decode(spec, p, h, xn, weights,
                             tuple(self.pool.arrays(s) for s in slots))
        self._prefetch(ahead, guesses)
      else:
        x = self._moe_grouped(layer, p, h, xn, ids, np.asarray(weights)[:n])
    return x, cache

  # ---- several sequences, one token each -----------------------------------------------------
  def run_batch(self, tokens: np.ndarray, positions: np.ndarray, rows: np.ndarray,
                stack: list) -> tuple[jax.Array, list]:
    """One decode step of the sequences stacked in `stack` (per layer, their caches with a
    leading slot axis: engine/batch.py): tokens[r] at positions[r] for every slot r. Attention
    runs once per layer over all slots, each at its own position; the router once over the
    batch; each expert the live `rows` pick is acquired once and applied to its tokens.
    Padding slots (not in rows) are never routed and their outputs are meaningless.
    Returns (x [slots, H], stack)."""
    spec = self.spec
    pos = jnp.asarray(positions)
    x = steps.embed(spec, self.globals, jnp.asarray(tokens))
    for layer, p in enumerate(self.layers):
      window = spec.layers[layer].window
      h, xn, stack[layer] = steps.attention_batch(spec, self.kv, window, p, x, pos, stack[layer])
      if spec.layers[layer].mlp == DENSE_MLP:
        x = steps.dense_mlp(spec, p, h, xn)
        continue
      ahead = self._layers_ahead(layer) if self.prefetch else []
      ids, weights, guesses = steps.route_block(spec, p, h, xn,
                                                tuple(self.routers[a] for a in ahead))
      ids = np.asarray(ids)[rows]
      if self.trace is not None:
        self.trace(layer, ids, h[rows])
      x = self._moe_grouped(layer, p, h, xn, ids, np.asarray(weights)[rows], rows)
      self._prefetch(ahead, [np.asarray(g)[rows] for g in guesses])
    return x, stack

  # ---- shared pieces -----------------------------------------------------------------------
  def head_rows(self, x: jax.Array, n: int) -> np.ndarray:
    """float32 logits of the first n rows of x, the head applied in blocks of rows ([T, vocab]
    temporaries of a 200k vocabulary are gigabytes)."""
    out = np.empty((n, self.spec.vocab_size), np.float32)
    for r in range(0, n, HEAD_ROWS):
      out[r:r + HEAD_ROWS] = np.asarray(
          steps.head(self.spec, self.globals, x[r:r + HEAD_ROWS]))[:n - r]
    return out

  def _layers_ahead(self, layer: int) -> list[int]:
    i = self.moe_order.index(layer)
    return self.moe_order[i + 1:i + 1 + self.prefetch_depth]

  def _prefetch(self, ahead: list[int], guesses) -> None:
    """Starts reading the likeliest guessed experts of each layer ahead, nearest layer first
    (the reads overlap this layer's expert compute); a batch's guesses are merged by rank."""
    for a, guess in zip(ahead, guesses):
      g = np.asarray(guess)[:, :self.prefetch_width]  # [N, width]
      self.pool.prefetch(a, list(dict.fromkeys(g.T.reshape(-1).tolist())))

  def _moe_grouped(self, layer: int, p: dict, h, xn, ids: np.ndarray, weights: np.ndarray,
                   rows: np.ndarray | None = None):
    """Each expert picked by any token is read once and applied to its tokens: ids, weights
    [n, k] of the rows of xn `rows` (None: the first n).

    Experts are applied in ascending id order whatever the pool size, so results are
    bit-identical between a minimal pool and an all-resident one.
    """
    experts = np.unique(ids)
    acc = jnp.zeros(xn.shape, jnp.float32)
    for w0 in range(0, len(experts), self.pool.num_slots):
      wave = experts[w0:w0 + self.pool.num_slots]
      slots = self.pool.acquire(layer, wave)
      for e, slot in zip(wave, slots):
        tok, kpos = np.nonzero(ids == e)
        b = bucket(len(tok), 2)
        idx = np.zeros(b, np.int32)
        idx[:len(tok)] = tok if rows is None else rows[tok]
        w = np.zeros(b, np.float32)
        w[:len(tok)] = weights[tok, kpos]
        acc = steps.expert_scatter_add(self.spec, acc, xn, idx, w, self.pool.arrays(slot))
      acc.block_until_ready()  # the next wave may refill these slots
    return steps.moe_finish(self.spec, p, h, xn, acc)
