"""The stacked KV cache of the sequences that decode together (continuous batching).

Per layer, the caches of the batch's sequences are one pytree whose leaves carry a leading
slot axis, so one jitted attention program per layer serves the whole batch
(steps.attention_batch: the projections over all rows, the cache write and the attention
vmapped over the slots, each row at its own position). Sequences take a slot when they join
a batched step and give it back when they leave: `Session.close()`, or a single-sequence
`Session.feed`, which moves the cache back out (prefill runs on a session's own cache, then
the session joins).

Slots no sequence feeds this step run a padding row whose key and value go to a scratch
position one past the capacity, which no query ever sees (every query position is below the
capacity), so no KV kind needs a write mask. Joining copies the session's own cache into a
free slot, layer by layer, freeing each of its layers once copied.

The slot count and the capacity change by a rebuild, one layer at a time: the new layer is
made, the members (and the sessions joining) copied in, and the old layer and the joiners'
own layers freed before the next. A rebuild therefore holds one layer of the stack beyond the
larger of before and after, never two stacks. The slot count is a power of two (few compiled
shapes as sequences join and leave) where that fits the memory plan beside the other
sessions' caches (engine.make_kv_room), else exactly the members: with a plan, the stack and
the sessions' own caches never hold more than `MemoryPlan.kv_limit_bytes`.

Every shape a stack can take under the engine's plan (`BatchCache.shapes`: the slot counts
`_slot_count` gives for 1..parallel members, at every capacity `capacity_for` gives) is known
before serving, so the server's warm-up compiles their programs (`BatchCache.warm`) from the
same functions the stack is sized with.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import numpy as np

from lazymoe_jax.engine.forward import KVCache, bucket, capacity_for, empty_layer

if TYPE_CHECKING:
  from lazymoe_jax.engine import Engine
  from lazymoe_jax.engine.session import Session


def _corner(d, s, src_slot, dst_slot):
  """d with s's slot (or s itself, src_slot None) written over the leading corner both shapes
  share (the positions of the smaller capacity), at dst_slot (or over d, dst_slot None)."""
  if src_slot is None:
    s = s[None]
    src_slot = 0
  sizes = tuple(min(a, b) for a, b in zip(d.shape[dst_slot is not None:], s.shape[1:]))
  piece = jax.lax.dynamic_slice(s, (src_slot,) + (0,) * (s.ndim - 1), (1,) + sizes)
  if dst_slot is None:
    return jax.lax.dynamic_update_slice(d, piece[0].astype(d.dtype), (0,) * d.ndim)
  return jax.lax.dynamic_update_slice(d, piece.astype(d.dtype), (dst_slot,) + (0,) * (d.ndim - 1))


@functools.partial(jax.jit, donate_argnames=("dst",))
def _copy_slot(dst, src, src_slot, dst_slot):
  """dst[dst_slot] = src[src_slot] (one layer's stacked caches, leading corners)."""
  return jax.tree.map(lambda d, s: _corner(d, s, src_slot, dst_slot), dst, src)


@functools.partial(jax.jit, donate_argnames=("dst",))
def _put_slot(dst, src, dst_slot):
  """dst[dst_slot] = src (a session's own cache layer into a slot)."""
  return jax.tree.map(lambda d, s: _corner(d, s, None, dst_slot), dst, src)


@functools.partial(jax.jit, donate_argnames=("dst",))
def _take_slot(dst, src, src_slot):
  """dst = src[src_slot] (a slot out into an own cache layer)."""
  return jax.tree.map(lambda d, s: _corner(d, s, src_slot, None), dst, src)


def session_capacities(max_context: int) -> list[int]:
  """Every capacity a session's cache can have (capacity_for of 1..max_context), ascending;
  a stack's capacity is its largest member's."""
  caps, n = [], 1
  while n <= max_context:
    caps.append(capacity_for(n, max_context))
    n = caps[-1] + 1
  return caps


class _OneLayerAtATime:
  """A stand-in for a stack's list of layers that makes each layer empty when read and drops
  it when written: run_batch over it compiles and runs a stack's programs holding one layer."""

  def __init__(self, make, layers: int):
    self.make, self.layers = make, layers

  def __len__(self):
    return self.layers

  def __getitem__(self, layer):
    return self.make()

  def __setitem__(self, layer, value):
    del layer, value


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
  def step(self, sessions: list["Session"], tokens):
    """One decode step: tokens[i] into sessions[i] (already reserved, checked). Sessions not
    yet in the batch join first. Returns (x [slots, H], rows: the slot of each session)."""
    joining = [s for s in sessions if s.slot is None]
    self._fit(joining)
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
    own (sized to its capacity). If the plan has no room for that cache beside the stack, the
    stack is rebuilt without the session's slot as its cache moves out."""
    own = None
    if keep:
      cap = capacity_for(session.capacity, self.engine.max_context)
      need = self.engine.forward.cache_bytes(cap)
      rest = [s for s in self.members if s is not session]
      if rest and not self.engine.kv_fits(need):
        slots = self._slots_for(rest, need)
        self.engine.check_kv(self.engine.forward.cache_bytes(self._capacity(rest) + 1, slots) +
                             self.engine.own_kv_bytes(exclude=rest) + need,
                             "the cache of a sequence leaving the batch")
        own = self._rebuild(rest, slots, out=session)
      else:
        own = KVCache()
        for layer in range(len(self.layers)):
          own.append(_take_slot(empty_layer(self.engine.kv, self.engine.spec, cap, None),
                                self.layers[layer], session.slot))
          jax.block_until_ready(own[-1])
          if not rest:  # the stack goes: free it layer by layer as the cache moves out
            self.layers[layer] = None
        own.capacity = cap
    if session.slot is not None:
      self.owners[session.slot] = None
      session.slot = None
    if not self.members:  # nobody left: give the memory back
      self.layers, self.capacity, self.owners = None, 0, []
    return own

  def compact(self, extra: int = 0) -> None:
    """Rebuilds the stack to its members alone (no free slots beyond what fits beside
    `extra` more bytes, the capacity of its largest member): the room a new cache needs."""
    members = self.members
    if not members:
      return
    slots = self._slots_for(members, extra)
    if slots < self.num_slots or self._capacity(members) < self.capacity:
      self._rebuild(members, slots)

  # ---- the stack's shape -----------------------------------------------------------------------
  def _capacity(self, members: list["Session"]) -> int:
    return max(s.capacity for s in members)

  def _slots_for(self, members: list["Session"], extra: int = 0) -> int:
    """bucket(len(members)) slots if a stack of them fits the plan beside the caches outside
    it and `extra` more bytes; else exactly len(members)."""
    m = len(members)
    if bucket(m, 1) == m:
      return m
    return self._slot_count(m, self._capacity(members),
                            self.engine.own_kv_bytes(exclude=members) + extra)

  def _slot_count(self, m: int, capacity: int, outside: int) -> int:
    """The slots of a stack of m members at `capacity` beside `outside` bytes of other KV
    caches: bucket(m) if that fits the plan, else m (the rule of _slots_for and shapes)."""
    slots = bucket(m, 1)
    if slots > m and not self.engine.kv_fits_total(
        self.engine.forward.cache_bytes(capacity + 1, slots) + outside):
      slots = m
    return slots

  # ---- the shapes before serving ---------------------------------------------------------------
  def shapes(self, parallel: int) -> list[tuple[int, int]]:
    """(slots, capacity) of every stack that up to `parallel` sequences can make under the
    engine's plan, ascending. For each member count m and each session capacity (the stack's
    is its largest member's), the slot count `_slot_count` gives with no other cache, and with
    the other `parallel` - m sequences' caches at their largest (the most that can sit outside
    the stack, or beside a cache being made or moved out: between them every count the rule
    can give). A stack keeping its slots as members leave has a count a rebuild gave. Shapes
    that do not fit the plan even alone are left out: `_fit` refuses them."""
    fwd, eng = self.engine.forward, self.engine
    caps = session_capacities(eng.max_context)
    out = set()
    for m in range(1, parallel + 1):
      for outside in (0, fwd.cache_bytes(caps[-1], parallel - m)):
        for cap in caps:
          slots = self._slot_count(m, cap, outside)
          if eng.kv_fits_total(fwd.cache_bytes(cap + 1, slots)):
            out.add((slots, cap))
    return sorted(out)

  def warm(self, parallel: int, rng: np.random.RandomState) -> list[tuple[int, int]]:
    """Compiles the programs of batched decode at every shape of `shapes(parallel)`: one
    step of run_batch with min(slots, parallel) live rows (the expert program at every token
    bucket a row count can give, run with zero weights), the head over the slots, a stack's
    empty layer, and a session's own cache of each capacity up to the stack's put into a slot
    (a join). Holds one layer of a stack at a time, except where the pool holds every expert
    and the step is one program (Forward.whole_step_ready): that program takes the whole
    stack, which the plan holds at that shape (one stack at a time, plus a layer), and only
    it is compiled for that shape. Needs an empty batch (before serving).
    Returns the shapes."""
    if self.layers is not None:
      raise RuntimeError("BatchCache.warm needs an empty batch (no sequence in it).")
    eng = self.engine
    fwd, kv, spec = eng.forward, eng.kv, eng.spec
    caps = session_capacities(eng.max_context)
    shapes = self.shapes(parallel)
    for slots, cap in shapes:
      live = min(slots, parallel)
      if fwd.whole_step_ready(slots):  # one program over the whole stack (a stack of the plan)
        stack = [empty_layer(kv, spec, cap + 1, slots) for _ in range(spec.num_hidden_layers)]
      else:
        stack = _OneLayerAtATime(lambda s=slots, c=cap: empty_layer(kv, spec, c + 1, s),
                                 spec.num_hidden_layers)
      tok = rng.randint(0, spec.vocab_size, slots).astype(np.int32)
      pos = np.full(slots, cap, np.int32)  # as BatchCache.step: padding rows at the scratch
      pos[:live] = rng.randint(0, cap, live)
      # the stack run_batch returns is `stack` itself: only x is kept, and the stack is
      # freed before the next shape's is made
      x = fwd.run_batch(tok, pos, np.arange(live, dtype=np.int32), stack, every_bucket=True)[0]
      del stack
      fwd.head_rows(x, slots)
      layer = empty_layer(kv, spec, cap + 1, slots)
      for own in caps:
        if own <= cap:
          layer = _put_slot(layer, empty_layer(kv, spec, own, None), 0)
      jax.block_until_ready(layer)
      del layer
    return shapes

  def _fit(self, joining: list["Session"]) -> None:
    """Makes the stack hold its members and `joining`: joiners go into free slots when the
    stack's slot count stays within [members, bucket(members)] and its capacity holds them;
    otherwise the stack is rebuilt (`_slots_for`). Refused (PlanError) before anything moves
    when even exactly the members' slots would pass the plan."""
    members = self.members + joining
    capacity = self._capacity(members)
    m = len(members)
    if self.layers is not None and m <= self.num_slots <= bucket(m, 1) and \
        capacity <= self.capacity:
      for s in joining:
        self._join(s)
      return
    slots = self._slots_for(members)
    outside = self.engine.own_kv_bytes(exclude=members)
    self.engine.check_kv(self.engine.forward.cache_bytes(capacity + 1, slots) + outside,
                         f"a batch of {m} sequences")
    self._rebuild(members, slots)

  def _join(self, session: "Session") -> None:
    """Copies the session's own cache into a free slot, freeing each layer once copied."""
    slot = self.owners.index(None)
    own = session.cache
    for layer in range(len(self.layers)):
      self.layers[layer] = _put_slot(self.layers[layer], own[layer], slot)
      jax.block_until_ready(self.layers[layer])
      own[layer] = None
    self.owners[slot] = session
    session.slot = slot
    session.cache = None

  def _rebuild(self, members: list["Session"], slots: int,
               out: "Session | None" = None) -> KVCache | None:
    """A new stack of `slots` slots at the members' largest capacity, the members in slots
    0.. in order (those in the stack copied from their slots, joiners from their own caches),
    built layer by layer (module doc); `out`, a member leaving with its cache, gets it moved
    into a cache of its own in the same pass. Returns that cache (or None)."""
    fwd, kv, spec = self.engine.forward, self.engine.kv, self.engine.spec
    capacity = self._capacity(members)
    old = self.layers
    own = None
    if out is not None:
      own = KVCache()
      own.capacity = capacity_for(out.capacity, self.engine.max_context)
    new = []
    for layer in range(spec.num_hidden_layers):
      stack = empty_layer(kv, spec, capacity + 1, slots)  # + the scratch position
      for dst, s in enumerate(members):
        if s.slot is not None:
          stack = _copy_slot(stack, old[layer], s.slot, dst)
        else:
          stack = _put_slot(stack, s.cache[layer], dst)
      if own is not None:
        own.append(_take_slot(empty_layer(kv, spec, own.capacity, None), old[layer], out.slot))
      jax.block_until_ready(stack)
      new.append(stack)
      if old is not None:  # this layer of the old stack and of the joiners' caches is done
        old[layer] = None
      for s in members:
        if s.slot is None:
          s.cache[layer] = None
    if out is not None:
      out.slot = None
    self.layers, self.capacity = new, capacity
    self.owners = list(members) + [None] * (slots - len(members))
    for i, s in enumerate(members):
      s.slot = i
      s.cache = None
    return own
