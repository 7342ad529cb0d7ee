"""A sequence fed token by token (or chunk by chunk), keeping its KV cache between calls."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from lazymoe_jax.engine.forward import KVCache, capacity_for

if TYPE_CHECKING:
  from lazymoe_jax.engine import Engine


class Session:
  """One sequence: feed it tokens, it keeps their KV cache. Build with `engine.session()`.

    seq = engine.session(max_context=None)   # None: the engine's max_context
    seq.feed(token_ids) -> float32 logits [vocab] of the last position
    seq.feed(token_ids, all_logits=True) -> [len(token_ids), vocab]
    seq.advance(token_ids)                 the same without the output head (no logits)
    seq.position          positions fed so far
    seq.kv_cache_bytes    bytes its cache holds
    seq.close()           frees its cache (and its slot in the batch); feeding it again is an
                          error

  With `max_context` the cache is allocated for that many positions at once; without it the
  cache starts at the first feed's size and doubles as tokens arrive, up to the engine's
  max_context (each capacity is a compiled shape: doubling keeps them few), moved into the
  larger cache one layer at a time. With a memory plan, a cache that would take the KV caches
  past the plan (more sequences than `parallel`) is a PlanError (engine.make_kv_room).
  """

  def __init__(self, engine: "Engine", max_context: int | None = None):
    if max_context is not None and not 0 < max_context <= engine.max_context:
      raise ValueError(f"max_context={max_context} must be in [1, {engine.max_context}] (the "
                       "engine's max_context).")
    self.engine = engine
    self.max_context = max_context or engine.max_context
    self.position = 0
    self.slot: int | None = None  # its slot in engine.batch while it decodes in batches
    self.closed = False
    self._capacity = 0  # positions its cache holds (in its slot: the slot's share)
    self.cache: KVCache | None = None
    if max_context:
      # capacities are rounded up (few compiled shapes), within the engine's max_context
      cap = capacity_for(max_context, engine.max_context)
      engine.make_kv_room(engine.forward.cache_bytes(cap), f"a session of {cap} positions")
      self.cache = engine.forward.new_cache(max_context, engine.max_context)
    engine.sessions.add(self)
    if self.cache is not None:
      self._capacity = self.cache.capacity
      engine.note_kv_bytes(self.kv_cache_bytes)

  @property
  def capacity(self) -> int:
    """Positions its cache holds now (it grows as tokens arrive, up to max_context)."""
    return self._capacity

  @property
  def kv_cache_bytes(self) -> int:
    if self.slot is not None:
      return self.engine.batch.slot_bytes()
    return 0 if self.cache is None else self.engine.kv.nbytes(list(self.cache))

  def close(self) -> None:
    """Frees the cache now (in a batch: the slot, for the next sequence to take). Closing
    twice is harmless; feeding a closed session is a ValueError."""
    if self.slot is not None:
      self.engine.batch.leave(self, keep=False)
    self.cache = None
    self._capacity = 0
    self.closed = True

  def feed(self, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
    """Runs the tokens at the next positions; returns the logits of the last one (or all)."""
    x, n = self._run(token_ids)
    if all_logits:
      return self.engine.forward.head_rows(x, n)
    return self.engine.forward.head_rows(x if x.shape[0] == 1 else x[n - 1:n], 1)[0]

  def advance(self, token_ids: Sequence[int]):
    """Runs the tokens into the cache without the output head (a prompt chunk whose logits
    nobody reads); returns the final hidden states [>= len(token_ids), H] (not waited for)."""
    return self._run(token_ids)[0]

  def _run(self, token_ids: Sequence[int]):
    tokens = self.engine.check_tokens(token_ids)
    self.reserve(len(tokens))
    if self.slot is not None:  # out of the batch: the single-sequence programs run on its own
      self.cache = self.engine.batch.leave(self, keep=True)
    x, self.cache = self.engine.forward.run(tokens, self.position, self.cache)
    self.position += len(tokens)
    return x, len(tokens)

  def reserve(self, n: int) -> None:
    """Makes room for n more positions (growing the cache), or refuses past max_context."""
    if self.closed:
      raise ValueError("this session was closed (its cache is freed): start a new one with "
                       "engine.session().")
    end = self.position + n
    if end > self.max_context:
      raise ValueError(f"feeding {n} tokens at position {self.position} exceeds this "
                       f"sequence's context of {self.max_context} positions.")
    if end > self._capacity:
      self._grow(end)

  def _grow(self, needed: int) -> None:
    """A cache for at least `needed` positions (doubling), the old positions copied in. In a
    batch slot only the capacity is raised: the batch makes its stack hold it before the step."""
    cap = min(self.max_context, max(needed, 2 * self._capacity))
    if self.slot is not None:
      self._capacity = capacity_for(cap, self.engine.max_context)
      return
    fwd, limit = self.engine.forward, self.engine.max_context
    old = 0 if self.cache is None else self.engine.kv.nbytes(list(self.cache))
    self.engine.make_kv_room(fwd.cache_bytes(capacity_for(cap, limit)) - old,
                             f"a session growing to {capacity_for(cap, limit)} positions")
    # every cache array grows along its position axis only
    self.cache = (fwd.new_cache(cap, limit) if self.cache is None else
                  fwd.grow_cache(self.cache, cap, limit))
    self._capacity = self.cache.capacity
    self.engine.note_kv_bytes(self.kv_cache_bytes)
