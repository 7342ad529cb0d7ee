"""The layer loop: tokens through every layer, experts through the slot pool.

Per layer: a jitted attention+router program, then on the host the expert ids are mapped to
pool slots (misses read from disk), then a jitted expert program. Prefill groups the prompt's
tokens by expert so that each selected expert is read once per layer for the whole prompt, in
waves when the pool is smaller than the set of experts the prompt needs. Batched decode (one
token of each of N sequences) runs attention once per layer over the sequences' stacked
caches (engine/batch.py) and the experts grouped, like prefill: each expert the batch picks is
read once per layer. Once the pool holds every expert, a decode step runs through all layers
as one program instead (steps.decode_step for one sequence, steps.decode_batch_step for a
batch: the slots are looked up on the device), with no host round trip per layer, bit for bit
as the layer loop; the layer loop stays the path whenever the pool may miss.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lazymoe_jax import kernels
from lazymoe_jax.engine import budget
from lazymoe_jax.engine.prefetch import PrefetchPolicy, ranked_union
from lazymoe_jax.errors import PlanError
from lazymoe_jax.model import steps
from lazymoe_jax.model.spec import DENSE_MLP, ModelSpec
from lazymoe_jax.store.pool import ExpertPool

HEAD_ROWS = 256  # the output head is applied to this many rows at a time
PREFETCH_DEPTH = 3  # MoE layers ahead whose experts decode prefetches (BUILD_NOTES "Lookahead prefetch")
KV_ROUND = 256  # cache capacity granularity: few distinct shapes, few compilations
# working memory of one native call over grouped experts (Forward._pooled_calls): about what
# one per-expert program over 512 padded rows of a Mixtral-sized expert takes
POOLED_CALL_BYTES = 64 << 20


class KVCache(list):
  """The per-layer cache pytrees of one sequence, and how many positions they hold."""

  capacity: int = 0


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def empty_layer(kv, spec: ModelSpec, capacity: int, slots: int | None):
  """One layer's empty cache at `capacity` positions as kv.init makes it (every layer's is
  the same), with a leading axis of `slots` unless None. Only this layer is allocated."""
  layer = kv.init(spec, capacity)[0]
  if slots is None:
    return layer
  return jax.tree.map(lambda a: jnp.broadcast_to(a[None], (slots,) + a.shape), layer)


@functools.partial(jax.jit, donate_argnums=(0,))
def _into(dst, src):
  """dst with src written over its leading corner (a cache layer into a larger one)."""
  return jax.tree.map(lambda d, a: jax.lax.dynamic_update_slice(d, a, (0,) * a.ndim), dst, src)


def bucket(n: int, minimum: int) -> int:
  """Next power of two >= max(n, minimum): bounds the number of compiled shapes."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def capacity_for(needed: int, limit: int) -> int:
  """The cache capacity for `needed` positions: a multiple of KV_ROUND or the bucket a prompt
  of that length is padded to, but never beyond `limit` (max_context)."""
  padded = max(-(-needed // KV_ROUND) * KV_ROUND, bucket(needed, 8))
  return min(padded, max(needed, limit))


def waves(experts: list[int], guessed: set[int], slots: int):
  """Splits a layer's experts (ascending) into waves a pool of `slots` holds at once, keeping
  the slots of the guesses (`guessed`: resident or in flight) that later waves use: yields
  (wave, later), `later` being the guesses still ahead that the wave's acquire must keep. A
  wave is the longest run such that its experts and the guesses beyond it fit in the slots
  (a guess inside the wave takes no extra slot); when the guesses alone fill the pool, the
  wave is one expert and the furthest guess gives its slot up."""
  i = 0
  while i < len(experts):
    ahead = [e for e in experts[i:] if e in guessed]
    j, held = i, len(ahead)
    while j < len(experts) and (experts[j] in guessed or held < slots):
      held += experts[j] not in guessed
      j += 1
    j = max(j, i + 1)
    wave = experts[i:j]
    yield wave, [e for e in ahead if e > wave[-1]][:slots - len(wave)]
    i = j


class Forward:
  """The model as it runs: spec, KV cache kind, dense params on the device, the expert pool."""

  def __init__(self, spec: ModelSpec, kv, glob: dict, layers: list[dict], pool: ExpertPool,
               prefetch: bool, embed: Callable[[np.ndarray], jax.Array]):
    self.spec = spec
    # token ids [T] -> rows [T, H] float32 (engine/weights.py: read from the store's table, or
    # taken from a resident one)
    self.embed = embed
    self.kv = kv
    self.globals = glob
    self.layers = layers
    self.pool = pool
    # Speculative prefetch: layer l applies the routers of the next `prefetch_depth` MoE
    # layers (in prefill: the next one) to its hidden state, guessing their top
    # `prefetch_width` experts; `policy` reads those whose kind of guess is measured to be used
    # often enough (engine/prefetch.py; BUILD_NOTES "Lookahead prefetch", "Prefetch that pays
    # for itself").
    self.prefetch = prefetch
    self.prefetch_width = spec.num_experts_per_tok
    self.prefetch_depth = PREFETCH_DEPTH
    self.policy = PrefetchPolicy()
    self.moe_order = list(spec.moe_layers)
    self.routers = {n: {k: v for k, v in layers[n].items()
                        if k in ("mlp_norm", "router", "router_bias", "router_score_bias")}
                    for n in self.moe_order}
    self.shared = {n: steps.shared_params(layers[n]) for n in self.moe_order}
    self.moe_index = {n: i for i, n in enumerate(self.moe_order)}
    # Optional observer: trace(layer, ids [T, k], h [T, H]) after each router (benchmarks).
    self.trace: Callable[[int, np.ndarray, jax.Array], None] | None = None
    self._cache_bytes: dict[int, int] = {}  # capacity -> one sequence's cache bytes
    # the whole decode step in one program (steps.decode_step) once the pool holds every
    # expert: the pool's slot table, rebuilt when the pool's version moves
    self.whole_step = True
    self.whole_steps = 0  # decode tokens that ran as one program (stats()["whole_steps"])
    # a run of a wave's experts that the native kernels serve goes as one call
    # (steps.experts_pooled_add) instead of one program per expert: the same sums, bit for bit
    self.pooled_waves = True
    self._slot_table: tuple[int, np.ndarray] | None = None

  # ---- caches ------------------------------------------------------------------------------
  def new_cache(self, needed: int, limit: int) -> KVCache:
    """A cache for `needed` positions: rounded up (few shapes, few compilations) to a
    multiple of KV_ROUND or to the bucket a prompt of that length is padded to, but never
    beyond `limit` (max_context)."""
    cache = KVCache(self.kv.init(self.spec, capacity_for(needed, limit)))
    cache.capacity = capacity_for(needed, limit)
    return cache

  def grow_cache(self, cache: KVCache, needed: int, limit: int) -> KVCache:
    """`cache` moved into a cache for `needed` positions (capacity_for), layer by layer: each
    new layer is made, the old one copied in and freed before the next, so growing holds one
    layer beyond the two caches' larger (the memory plan counts one layer per sequence for
    it). `cache`'s entries are emptied."""
    capacity = capacity_for(needed, limit)
    new = KVCache()
    for layer, old in enumerate(cache):
      new.append(_into(empty_layer(self.kv, self.spec, capacity, None), old))
      jax.block_until_ready(new[-1])
      cache[layer] = old = None
    new.capacity = capacity
    return new

  def cache_bytes(self, capacity: int, slots: int = 1) -> int:
    """Bytes of `slots` caches of `capacity` positions (from the shapes, nothing allocated)."""
    if capacity not in self._cache_bytes:  # budget.kv_bytes, memoised: called per join/step
      self._cache_bytes[capacity] = budget.kv_bytes(self.kv, self.spec, capacity)
    return slots * self._cache_bytes[capacity]

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
    pos = start + np.arange(tb, dtype=np.int32)  # host arrays: the programs take them as is
    x = self.embed(padded)
    if n == 1 and self.whole_step_ready():
      x, caches = steps.decode_step(spec, self.kv, self.expert_encoding,
                                    self.pool.layout(), tuple(self.layers), self._slot_table[1],
                                    self.pool.arena_array(), x, pos, tuple(cache))
      cache[:] = caches
      self.whole_steps += 1
      self.pool.count_hits(len(self.moe_order) * spec.num_experts_per_tok)
      return x, cache
    for layer, p in enumerate(self.layers):
      window = spec.layers[layer].window
      if spec.layers[layer].mlp == DENSE_MLP:
        x, cache[layer] = steps.dense_layer(spec, self.kv, window, p, x, pos, cache[layer])
        continue
      ahead = self._layers_ahead(layer)[:1 if n > 1 else None]  # a prompt guesses one ahead
      h, xn, routed, weights, cache[layer] = steps.attn_router(
          spec, self.kv, window, p, x, pos, cache[layer], tuple(self.routers[a] for a in ahead))
      # the one host round trip of a layer: waits for its router, hence for all earlier work
      routed = np.asarray(routed)  # [1 + len(ahead), Tb, k]: ids, then the guesses
      ids = routed[0, :n]
      if self.trace is not None:
        self.trace(layer, ids, h[:n])
      if self.prefetch:
        self.policy.observe(layer, ids.reshape(-1))
      if n == 1:
        slots = self.pool.acquire(layer, ids[0])
        x = steps.moe_decode(spec, self.shared[layer], h, xn, weights,
                             tuple(self.pool.arrays(s) for s in slots))
        self._prefetch(layer, ahead, routed[1:], n, "decode")
      else:  # the next layer's guesses are read while this layer's experts compute
        x = self._moe_grouped(layer, h, xn, ids, np.asarray(weights)[:n],
                              lambda: self._prefetch(layer, ahead, routed[1:], n, "prefill"))
    return x, cache

  # ---- several sequences, one token each -----------------------------------------------------
  def run_batch(self, tokens: np.ndarray, positions: np.ndarray, rows: np.ndarray,
                stack: list, every_bucket: bool = False) -> tuple[jax.Array, list]:
    """One decode step of the sequences stacked in `stack` (per layer, their caches with a
    leading slot axis: engine/batch.py): tokens[r] at positions[r] for every slot r. Attention
    runs once per layer over all slots, each at its own position; the router once over the
    batch; each expert the live `rows` pick is acquired once and applied to its tokens.
    Padding slots (not in rows) are never routed and their outputs are meaningless.
    every_bucket (warm-up, BatchCache.warm): each MoE layer also runs its expert program at
    every token bucket len(rows) rows can give one expert, with zero weights.
    When every expert is resident (whole_step_ready) and `stack` is a list of every layer's
    stack, the step runs as one program instead (steps.decode_batch_step: the same results,
    bit for bit; no acquires, the hits counted as the layer loop would count them;
    every_bucket has nothing to compile there). Returns (x [slots, H], stack)."""
    spec = self.spec
    pos = np.asarray(positions, np.int32)  # host arrays: the programs take them as is
    x = self.embed(np.asarray(tokens, np.int32))
    if isinstance(stack, list) and self.whole_step_ready(len(tokens)):
      live = np.zeros(len(tokens), bool)
      live[rows] = True
      x, layers, experts = steps.decode_batch_step(
          spec, self.kv, self.expert_encoding, self.pool.layout(),
          tuple(self.layers), self._slot_table[1], self.pool.arena_array(), x, pos, live,
          tuple(stack))
      stack[:] = layers
      self.whole_steps += len(rows)
      self.pool.count_hits(int(np.asarray(experts).sum()))  # what run's acquires would count
      return x, stack
    for layer, p in enumerate(self.layers):
      window = spec.layers[layer].window
      h, xn, stack[layer] = steps.attention_batch(spec, self.kv, window, p, x, pos, stack[layer])
      if spec.layers[layer].mlp == DENSE_MLP:
        x = steps.dense_mlp(spec, p, h, xn)
        continue
      ahead = self._layers_ahead(layer)
      routed, weights = steps.route_block(spec, p, h, xn, tuple(self.routers[a] for a in ahead))
      routed = np.asarray(routed)[:, rows]  # the live rows' ids, then their guesses
      ids = routed[0]
      if self.trace is not None:
        self.trace(layer, ids, h[rows])
      if self.prefetch:
        self.policy.observe(layer, ids.reshape(-1))
      x = self._moe_grouped(layer, h, xn, ids, np.asarray(weights)[rows], rows=rows,
                            every_bucket=every_bucket)
      self._prefetch(layer, ahead, routed[1:], len(rows), "batch")
    return x, stack

  # ---- shared pieces -----------------------------------------------------------------------
  @property
  def expert_encoding(self) -> str:
    """The experts' encoding name (every pool slot holds the same one)."""
    return self.pool.arrays(0)["w_gate_up"].encoding.name

  def whole_step_ready(self, rows: int = 1) -> bool:
    """Whether a decode step of `rows` tokens (one per sequence) can run as one program
    (steps.decode_step, steps.decode_batch_step): every expert resident (nothing to read,
    nothing to prefetch), the native expert kernels for that many tokens, the arena aliased
    as one device array, and no observer of the routers (self.trace). Keeps the copy of the
    pool's slot table current."""
    if not (self.whole_step and self.trace is None and self.moe_order
            and self.pool.holds_all(self.moe_order)):
      return False
    enc = self.expert_encoding
    if not kernels.native_for(enc, rows) or self.pool.arena_array() is None:
      return False
    if self._slot_table is None or self._slot_table[0] != self.pool.version:
      # kept on the host (a few KB, copied in with each call): the device holds no state of it
      self._slot_table = (self.pool.version, self.pool.slot_table(self.moe_order))
    return True

  def head_rows(self, x: jax.Array, n: int) -> np.ndarray:
    """float32 logits of the first n rows of x, the head applied in blocks of rows ([T, vocab]
    temporaries of a 200k vocabulary are gigabytes)."""
    if n == x.shape[0] <= HEAD_ROWS:  # one block, as it is (a slice is a dispatch of its own);
      return np.array(steps.head(self.spec, self.globals, x))  # a writable host copy
    out = np.empty((n, self.spec.vocab_size), np.float32)
    for r in range(0, n, HEAD_ROWS):
      out[r:r + HEAD_ROWS] = np.asarray(
          steps.head(self.spec, self.globals, x[r:r + HEAD_ROWS]))[:n - r]
    return out

  def _pooled_calls(self, run: list, counts: np.ndarray) -> list[list]:
    """A run of (expert, slot) split, in order, into calls whose working memory stays
    within POOLED_CALL_BYTES, so that a long prompt's transients stay near the per-expert
    programs'; one expert a call at least. Per token an expert runs over, the kernel holds
    (expert_ffn.cc) its gathered input and output rows and its hidden row in float32, plus the
    prepared (quantised) forms of input and hidden: counted as 4 x (3 H + 2 I) bytes."""
    per_token = 4 * (3 * self.spec.hidden_size + 2 * self.spec.moe.width)
    calls, size = [[]], 0
    for e, slot in run:
      need = int(counts[e]) * per_token
      if calls[-1] and size + need > POOLED_CALL_BYTES:
        calls.append([])
        size = 0
      calls[-1].append((e, slot))
      size += need
    return calls

  def _layers_ahead(self, layer: int) -> list[int]:
    """The MoE layers whose experts a decode step at `layer` guesses and prefetches: the next
    `prefetch_depth`, less those the pool holds whole (a guess could only hit there; without
    any, the router program computes no guesses at all)."""
    if not self.prefetch:
      return []
    i = self.moe_index[layer]
    return [a for a in self.moe_order[i + 1:i + 1 + self.prefetch_depth]
            if not self.pool.holds_layer(a)]

  def _prefetch(self, layer: int, ahead: list[int], guesses, n: int, kind: str) -> None:
    """Starts reading the guessed experts of each layer ahead that the policy chooses,
    nearest layer first (the reads overlap this layer's expert compute, behind any demand
    read); the guesses of several rows (a prompt, a batch) are merged by rank. A prompt's are
    read in expert order, which is their order on disk. A guess's distance is how many MoE
    layers ahead of `layer` its layer is, counting the layers skipped for being held whole
    (`_layers_ahead`), so the policy measures each distance apart."""
    here = self.moe_index[layer]
    for a, guess in zip(ahead, guesses):
      distance = self.moe_index[a] - here
      rows = np.asarray(guess)[:n, :self.prefetch_width]  # [n, width]
      chosen = self.policy.choose(a, kind, distance, ranked_union(rows))
      self.pool.prefetch(a, sorted(chosen) if kind == "prefill" else chosen)

  def _moe_grouped(self, layer: int, h, xn, ids: np.ndarray, weights: np.ndarray,
                   after_first_wave: Callable[[], None] | None = None,
                   rows: np.ndarray | None = None, every_bucket: bool = False):
    """Each expert picked by any token is read once and applied to its tokens: ids, weights
    [n, k] of the rows of xn `rows` (None: the first n). The misses of a wave are read in
    ascending expert order (their order on disk), all in flight at once. `after_first_wave`
    runs once the first wave is resident, before its compute (prefill starts the next layer's
    guessed reads there). When the experts need more than one wave, the guesses already
    made for this layer that a later wave uses keep their slots until that wave (`waves`):
    each is read once, and counted used, not unused.

    Experts are applied in ascending id order whatever the pool size, so results are
    bit-identical between a minimal pool and an all-resident one. Consecutive experts of a
    wave that the native kernels take (by their token count) run in one call
    (steps.experts_pooled_add, split by POOLED_CALL_BYTES), the others one program each.

    every_bucket (warm-up): where an expert may get more rows than the native kernels take
    (or without the pooled call), after the first wave the expert program also runs at each
    token bucket up to bucket(len(ids)) (all the rows on one expert) that the wave did not
    use, with zero weights over the wave's first slot, so each is compiled.
    """
    experts = [int(e) for e in np.unique(ids)]
    acc = jnp.zeros(xn.shape, jnp.float32)
    many = len(experts) > self.pool.num_slots
    used = set()  # the token buckets run
    guessed = self.pool.guesses(layer) & set(experts) if many else set()
    enc = self.expert_encoding
    counts = np.bincount(ids.reshape(-1), minlength=self.spec.num_experts)
    pooled = self.pooled_waves and self.pool.arena_array() is not None
    if pooled:  # each row's picks in ascending expert order, the order the experts add in
      order = np.argsort(ids, axis=1, kind="stable")
      ids_up = np.take_along_axis(ids, order, axis=1)
      w_up = np.take_along_axis(np.asarray(weights, np.float32), order, axis=1)
      at = np.arange(len(ids)) if rows is None else rows  # the rows of xn they are
    for i, (wave, later) in enumerate(waves(experts, guessed, self.pool.num_slots)):
      slots = self.pool.acquire(layer, wave, later)
      if i == 0 and after_first_wave is not None:
        after_first_wave()
      # runs of the wave's experts in order: those the native kernels take (by their token
      # count) in one call, the others one program each; every row's picks add in ascending
      # expert order either way
      for native, run in itertools.groupby(
          zip(wave, slots), lambda es: pooled and kernels.native_for(enc, int(counts[es[0]]))):
        run = list(run)
        if native:  # no padding to token buckets, one program a call
          for part in self._pooled_calls(run, counts):
            slot_of = np.full(self.spec.num_experts, -1, np.int32)
            for e, slot in part:
              slot_of[e] = slot
            sl = np.full((xn.shape[0], ids.shape[1]), -1, np.int32)
            wt = np.zeros((xn.shape[0], ids.shape[1]), np.float32)
            sl[at], wt[at] = slot_of[ids_up], w_up
            acc = steps.experts_pooled_add(self.spec, enc, self.pool.layout(), acc, xn, sl,
                                           wt, self.pool.arena_array())
          continue
        for e, slot in run:
          tok, kpos = np.nonzero(ids == e)
          b = bucket(len(tok), 2)
          idx = np.zeros(b, np.int32)
          idx[:len(tok)] = tok if rows is None else rows[tok]
          w = np.zeros(b, np.float32)
          w[:len(tok)] = weights[tok, kpos]
          acc = steps.expert_scatter_add(self.spec, acc, xn, idx, w, self.pool.arrays(slot))
          used.add(b)
      if every_bucket and i == 0 and not (pooled and kernels.native_for(enc, len(ids))):
        # (a wave runs expert by expert only where an expert may get more rows than the
        # native kernels take, or without the pooled call)
        b = 2
        while b <= bucket(len(ids), 2):
          if b not in used:
            acc = steps.expert_scatter_add(self.spec, acc, xn, np.zeros(b, np.int32),
                                           np.zeros(b, np.float32), self.pool.arrays(slots[0]))
          b *= 2
      acc.block_until_ready()  # the next wave may refill these slots
    return steps.moe_finish(self.spec, self.shared[layer], h, xn, acc)
