"""The stacked KV cache of the sequences that decode together (continuous batching).

Per layer, the caches of the batch's sequences are one pytree whose leaves carry a leading
slot axis, so one jitted attention program per layer serves the whole batch
(steps.attention_batch: the projections over all rows, the cache write and the attention
vmapped over the slots, each row at its own position). Sequences take a slot when they join
a batched step and give it back when they leave: `Session.close()`, or a single-sequence
`Session.feed`, which moves the cache back out (prefill runs on a session's own cache, then
the session joins).

The slot count is a power of two (few compiled shapes as sequences join and leave); slots no
sequence feeds this step run a padding row whose key and value go to a scratch position one
past the capacity, which no query ever sees (every query position is below the capacity), so
no KV kind needs a write mask. Joining copies the session's own cache into its slot; changing
the slot count or the capacity copies every member into a new stack (compacted).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from lazymoe_jax.engine.forward import KVCache, bucket

if TYPE_CHECKING:
  from lazymoe_jax.engine import Engine
  from lazymoe_jax.engine.session import Session


@functools.partial(jax.jit, donate_argnames=("dst",))
def _copy_slot(dst, src, src_slot, dst_slot):
  """dst[dst_slot] = src[src_slot] over the leading corner both shapes share (the positions
  of the smaller capacity), for every leaf of one layer's stacked cache."""
  def leaf(d, s):
    sizes = tuple(min(a, b) for a, b in zip(d.shape[1:], s.shape[1:]))
    piece = jax.lax.dynamic_slice(s, (src_slot,) + (0,) * (s.ndim - 1), (1,) + sizes)
    return jax.lax.dynamic_update_slice(d, piece.astype(d.dtype), (dst_slot,) + (0,) * (d.ndim - 1))
  return jax.tree.map(leaf, dst, src)


class BatchCache:
  """The slots of the engine's batched decode. Owned by the engine (`engine.batch`)."""

  def __init__(self, engine: "Engine"):
    self.engine = engine
    self.layers: list | None = None  # per layer: the stacked cache pytree [slots, ...]
    self.capacity = 0  # positions a slot holds (plus the scratch position)
    self.owners: list["Session | None"] = []

  @property
  def num_slots(self) -> int:
    return len(self.owners)

  @property
  def members(self) -> list["Session"]:
    return [s for s in self.owners if s is not None]

  @property
  def nbytes(self) -> int:
    return 0 if self.layers is None else self.engine.kv.nbytes(self.layers)

  def slot_bytes(self) -> int:
    return self.nbytes // max(self.num_slots, 1)

  # ---- joining and leaving -------------------------------------------------------------------
  def step(self, sessions: list["Session"], tokens: np.ndarray):
    """One decode step: tokens[i] into sessions[i] (already reserved, checked). Sessions not
    yet in the batch join first. Returns (x [slots, H], rows: the slot of each session)."""
    joining = [s for s in sessions if s.slot is None]
    self._fit(self.members + joining)
    for s in joining:
      self._join(s)
    n = self.num_slots
    rows = np.array([s.slot for s in sessions], np.int32)
    tok = np.zeros(n, np.int32)
    pos = np.full(n, self.capacity, np.int32)  # padding rows write to the scratch position
    tok[rows] = tokens
    pos[rows] = [s.position for s in sessions]
    x, self.layers = self.engine.forward.run_batch(tok, pos, rows, self.layers)
    return x, rows

  def leave(self, session: "Session", keep: bool) -> KVCache | None:
    """Frees the session's slot; with keep, returns its cache moved out into a cache of its
    own (sized to its capacity)."""
    slot = session.slot
    own = None
    if keep:
      own = self.engine.forward.new_cache(session.capacity, self.engine.max_context)
      for layer, c in enumerate(own):
        one = jax.tree.map(lambda a: a[None], c)
        own[layer] = jax.tree.map(lambda a: a[0], _copy_slot(one, self.layers[layer], slot, 0))
    self.owners[slot] = None
    session.slot = None
    if not self.members:  # nobody left: give the memory back
      self.layers, self.capacity, self.owners = None, 0, []
    return own

  def _join(self, session: "Session") -> None:
    slot = self.owners.index(None)
    own = session.cache
    if own is not None:
      for layer, c in enumerate(own):
        self.layers[layer] = _copy_slot(self.layers[layer], jax.tree.map(lambda a: a[None], c),
                                        0, slot)
    self.owners[slot] = session
    session.slot = slot
    session.cache = None

  def _fit(self, members: list["Session"]) -> None:
    """Makes the stack hold `members` (a power of two of slots, the largest capacity): a new
    stack, members copied in compacted, when the slot count or a capacity changes."""
    slots = bucket(len(members), 1)
    capacity = max(s.capacity for s in members)
    if self.layers is not None and slots == self.num_slots and capacity <= self.capacity:
      return
    capacity = max(capacity, self.capacity) if slots == self.num_slots else capacity
    old, old_owners = self.layers, self.owners
    kv, spec = self.engine.kv, self.engine.spec
    base = kv.init(spec, capacity + 1)  # + the scratch position
    self.layers = [jax.tree.map(lambda a: jnp.repeat(a[None], slots, axis=0), c) for c in base]
    del base
    self.capacity = capacity
    self.owners = [None] * slots
    at = 0
    for src, s in enumerate(old_owners):
      if s is None:
        continue
      for layer in range(len(self.layers)):
        self.layers[layer] = _copy_slot(self.layers[layer], old[layer], src, at)
      self.owners[at] = s
      s.slot = at
      at += 1
    del old
