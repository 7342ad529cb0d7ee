"""A fixed pool of preallocated expert slots shared by all layers, with a choice of eviction.

Each slot owns one page-aligned numpy buffer per expert tensor, allocated (and touched) once.
A miss reads the expert from disk straight into the victim slot's buffers. The jax array
handed to the jitted expert programs is `jax.device_put` of that buffer, which on CPU aliases
aligned numpy memory (checked at start-up and reported in `stats()["pool_zero_copy"]`), so a
refill is the disk read and nothing else. Callers must not refill a slot while a dispatched
computation may still read it: the engine synchronises on the router ids (which depend on
every earlier expert computation) or on the accumulator between prefill waves.

Eviction policies (`policy=`, lfu by default), compared on the demo model's traces and on a
9 GB model streamed under a 2 GB cgroup cap in BUILD_NOTES.md (lfu read the fewest experts):
  lru    least recently used slot, whatever its layer;
  lfu    least often used (layer, expert) over the whole run, ties by recency;
  layer  per-layer quotas: every MoE layer is visited once per decoded token, so each gets an
         equal share of the slots and a miss evicts the least recently used slot of its own
         layer (or of a layer above its share); within a layer it is LRU.
All misses of one acquire are read concurrently (tensorstore's threads), then checked.
"""

from __future__ import annotations

import collections
import mmap
import time
from collections.abc import Sequence

import jax
import numpy as np

from lazymoe_jax.errors import PlanError, StoreError
from lazymoe_jax.model.encodings import Weight
from lazymoe_jax.store.experts import Cancelled, ExpertStore

ALIGN = 4096
POLICIES = ("lru", "lfu", "layer")


def _round_up(n: int) -> int:
  return -(-n // ALIGN) * ALIGN


def slot_arena(num_slots: int, shapes: dict, dtypes: dict) -> tuple[mmap.mmap, list[dict]]:
  """Every slot's buffers carved out of one private anonymous mapping, each page-aligned
  (as O_DIRECT reads and zero-copy device_put need): exactly the touched pages are resident,
  whatever state the heap is in after the dense params were restored and freed."""
  sizes = {n: _round_up(int(np.prod(shapes[n])) * np.dtype(dtypes[n]).itemsize) for n in shapes}
  per_slot = sum(sizes.values())
  arena = mmap.mmap(-1, max(per_slot * num_slots, ALIGN),
                    flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
  slots, off = [], 0
  for _ in range(num_slots):
    bufs = {}
    for n in shapes:
      count = int(np.prod(shapes[n]))
      bufs[n] = np.frombuffer(arena, dtypes[n], count, off).reshape(shapes[n])
      off += sizes[n]
    slots.append(bufs)
  return arena, slots


def slot_offsets(shapes: dict, dtypes: dict) -> tuple[int, dict[str, int]]:
  """(bytes from one slot to the next, {array name: byte offset inside a slot}) of
  slot_arena's layout."""
  off, offsets = 0, {}
  for n in shapes:
    offsets[n] = off
    off += _round_up(int(np.prod(shapes[n])) * np.dtype(dtypes[n]).itemsize)
  return off, offsets


class ExpertPool:
  """`acquire(layer, experts) -> slots`; `arrays(slot) -> {tensor: {suffix: array}}`."""

  def __init__(self, store: ExpertStore, num_slots: int, min_slots: int, policy: str = "lfu"):
    if policy not in POLICIES:
      raise ValueError(f"cache_policy={policy!r} is not one of {', '.join(POLICIES)}.")
    if num_slots < min_slots:
      raise PlanError(f"expert_slots={num_slots} is too small: one token needs "
                      f"num_experts_per_tok={min_slots} experts resident at once; use at least "
                      f"{min_slots}.")
    self.store = store
    self.num_slots = num_slots
    self._arena, self.buffers = slot_arena(num_slots, store.shapes, store.dtypes)
    for bufs in self.buffers:
      for b in bufs.values():
        b.view(np.uint8).fill(0)  # touch now: page faults here, not in the decode loop
    self._arrays = [self._wrap(b) for b in self.buffers]
    self._layout = None  # layout(), computed once
    self._arena_array = None  # the whole arena as one device array (arena_array)
    first = self.buffers[0]["w_gate_up"]
    self.zero_copy = (self._arrays[0]["w_gate_up"].arrays[""].unsafe_buffer_pointer() ==
                      first.ctypes.data)
    self._arena_array = self._alias_arena()  # made now: an alias, no memory of its own
    self.owner: list[tuple[int, int] | None] = [None] * num_slots
    self.version = 0  # counts changes of the table (slot_table's callers keep theirs until then)
    self.table: dict[tuple[int, int], int] = {}
    self.lru: collections.OrderedDict[int, None] = collections.OrderedDict(
        (s, None) for s in range(num_slots))  # least recently used first
    self.hits = 0
    self.misses = 0
    self.bytes_read = 0
    self.in_use: set[int] = set()  # slots of the last acquire: a dispatched program may read them
    self.pending: dict[tuple[int, int], tuple[int, tuple]] = {}  # prefetch reads in flight
    self.prefetched: set[tuple[int, int]] = set()  # landed by prefetch, not yet acquired
    self.prefetch_reads = 0
    self.prefetch_used = 0
    self.policy = policy
    self.uses: collections.Counter[tuple[int, int]] = collections.Counter()  # for lfu
    self.quota = max(1, num_slots // max(1, len(store.layers)))  # for layer
    self.io_wait_s = 0.0  # time blocked on reads (misses and landing prefetches)
    self.prefetch_errors = 0  # guesses whose read failed (dropped; see _land_prefetches)
    self.num_experts = store.num_experts  # per layer
    self.held: collections.Counter[int] = collections.Counter()  # layer -> keys in the table
    # bytes from the disk: demand reads (misses) and speculative ones (guesses, including the
    # part read of a guess cancelled as unneeded); of the latter, those never used
    self.demand_bytes = 0
    self.speculative_bytes = 0
    self.unused_bytes = 0
    self.prefetch_cancelled = 0

  def _wrap(self, bufs: dict[str, np.ndarray]) -> dict[str, Weight]:
    return self.store.as_tree({n: jax.device_put(b) for n, b in bufs.items()})

  @property
  def nbytes(self) -> int:
    return self.num_slots * self.store.bytes_per_expert

  def arrays(self, slot: int) -> dict[str, Weight]:
    """The slot's expert as {tensor: Weight} (see model/encodings.py)."""
    return self._arrays[slot]

  def arena_array(self) -> jax.Array | None:
    """Every slot as one uint8 [bytes] device array aliasing the arena (no copy), for the
    programs that pick slots on the device (kernels.moe_ffn_pooled); None where device_put
    would copy it (its own memory: never on CPU, where aligned host memory is aliased)."""
    return self._arena_array

  def _alias_arena(self) -> jax.Array | None:
    if not self.zero_copy:  # the slots' own device_put copied: so would this, the whole pool
      return None
    host = np.frombuffer(self._arena, np.uint8)
    a = jax.device_put(host)
    return a if a.unsafe_buffer_pointer() == host.ctypes.data else None

  def layout(self) -> tuple[int, int, tuple[int, ...]]:
    """(expert width, slot bytes, byte offsets inside a slot of w_gate_up, its scale, w_down,
    its scale, b_gate_up, b_down; -1 where absent): where kernels.moe_ffn_pooled finds a slot's
    arrays. The width is the store's own (w_gate_up's rows / 2), so the kernel's extents follow
    what the slots hold."""
    if self._layout is not None:
      return self._layout
    per_slot, offsets = slot_offsets(self.store.shapes, self.store.dtypes)
    names = {(self.store.specs[n]["tensor"], self.store.specs[n]["suffix"]): n for n in offsets}
    keys = (("w_gate_up", ""), ("w_gate_up", "scale"), ("w_down", ""), ("w_down", "scale"),
            ("b_gate_up", ""), ("b_down", ""))
    for key in keys[4:]:
      if key in names and np.dtype(self.store.dtypes[names[key]]) != np.float32:
        raise StoreError(f"expert bias {names[key]} is {self.store.dtypes[names[key]]}, the "
                         "kernels read float32: re-convert the store with this version.")
    width = int(self.store.shapes[names[keys[0]]][0]) // 2
    self._layout = width, per_slot, tuple(offsets[names[k]] if k in names else -1 for k in keys)
    return self._layout

  def holds_all(self, layers: Sequence[int]) -> bool:
    """Every expert of every layer of `layers` is resident and no read is in flight: nothing
    can be evicted or refilled while only these layers are acquired."""
    return not self.pending and all(self.holds_layer(l) for l in layers)

  def slot_table(self, layers: Sequence[int]) -> np.ndarray:
    """int32 [len(layers), experts]: the slot of each expert of each layer (-1: not held)."""
    table = np.full((len(layers), self.num_experts), -1, np.int32)
    for i, layer in enumerate(layers):
      for e in range(self.num_experts):
        table[i, e] = self.table.get((layer, e), -1)
    return table

  def count_hits(self, n: int) -> None:
    """n acquires that a program made on the device from slot_table (all hits; holds_all)."""
    self.hits += n

  def holds_layer(self, layer: int) -> bool:
    """Every expert of `layer` is resident (a guess for it could only hit)."""
    return self.held[layer] >= self.num_experts

  def _map(self, slot: int, key: tuple[int, int]) -> None:
    self.version += 1
    if key not in self.table:
      self.held[key[0]] += 1
    self.owner[slot] = key
    self.table[key] = slot

  def _evict(self, slot: int) -> None:
    """Empties a slot (if the read that refills it fails, it holds nothing valid)."""
    key = self.owner[slot]
    self.version += 1
    if key is not None:
      del self.table[key]
      self.held[key[0]] -= 1
      self.prefetched.discard(key)
    self.owner[slot] = None

  def _install(self, slot: int, key: tuple[int, int]) -> None:
    if not self.zero_copy:
      self._arrays[slot] = self._wrap(self.buffers[slot])
    self._map(slot, key)

  def _victim(self, layer: int, busy: set[int]) -> int | None:
    """The slot a miss of `layer` refills under the policy, never one in `busy`."""
    free = [s for s in self.lru if s not in busy]  # least recently used first
    if not free:
      return None
    empty = next((s for s in free if self.owner[s] is None), None)
    if empty is not None:
      return empty
    if self.policy == "lfu":
      rank = {s: i for i, s in enumerate(free)}
      return min(free, key=lambda s: (self.uses[self.owner[s]], rank[s]))
    if self.policy == "layer":
      held = collections.Counter(self.owner[s][0] for s in self.table.values())
      own = [s for s in free if self.owner[s][0] == layer]
      if held[layer] >= self.quota and own:
        return own[0]
      over = [s for s in free if held[self.owner[s][0]] > self.quota]
      if over:
        return over[0]
    return free[0]

  def prefetch(self, layer: int, experts: Sequence[int]) -> None:
    """Starts reading experts predicted for `layer` (asynchronously, on the prefetch threads)
    into the policy's victims, never into a slot the last acquire handed out or one holding a
    prefetch that still awaits its layer. A wrong guess costs only bandwidth and a slot; it
    never changes results."""
    for e in experts:
      key = (layer, int(e))
      if key in self.table or key in self.pending:
        continue
      slot = self._victim(layer, self.in_use | self._reserved())
      if slot is None:
        return
      self._evict(slot)
      self.pending[key] = (slot, self.store.start_read(layer, key[1], self.buffers[slot],
                                                       speculative=True))
      self.prefetch_reads += 1

  def _land_prefetches(self, wait) -> None:
    """Waits for the prefetch reads in flight whose key passes wait(key), and lands any other
    that is done; they become resident, least recently used first. The others stay in
    flight, their slots reserved. A guess whose read fails is dropped (its slot left empty):
    it was never asked for, and if it is, the miss reads it again and reports the error then."""
    t0 = time.perf_counter()
    try:
      for key, (slot, handle) in list(self.pending.items()):
        if not wait(key) and not self.store.read_done(handle):
          continue
        try:
          self.store.finish_read(handle)
        except Cancelled:
          del self.pending[key]
          done = self.store.bytes_done(handle)
          self.bytes_read += done
          self.speculative_bytes += done
          self.unused_bytes += done
          self.prefetch_cancelled += 1
          continue
        except StoreError:
          del self.pending[key]
          self.prefetch_errors += 1
          continue
        self.bytes_read += self.store.bytes_per_expert
        self.speculative_bytes += self.store.bytes_per_expert
        del self.pending[key]  # only now: an interrupted wait leaves the slot reserved
        self._install(slot, key)
        self.prefetched.add(key)
        self.lru.move_to_end(slot, last=False)
    finally:
      self.io_wait_s += time.perf_counter() - t0

  def _reserved(self) -> set[int]:
    """Slots no miss or prefetch may take: reads in flight, and landed prefetches whose layer
    has not been acquired yet."""
    return ({slot for slot, _ in self.pending.values()} |
            {self.table[key] for key in self.prefetched if key in self.table})

  def drain(self) -> None:
    """Waits for every read in flight (before the pool's buffers may be reused or freed)."""
    self._land_prefetches(lambda key: True)

  def guesses(self, layer: int) -> set[int]:
    """The experts guessed for `layer` that still await it: landed, or read in flight."""
    return ({e for l, e in self.prefetched if l == layer} |
            {e for l, e in self.pending if l == layer})

  def acquire(self, layer: int, experts: Sequence[int], later: Sequence[int] = ()) -> list[int]:
    """Makes every expert of `experts` resident for `layer` at once; returns their slots.

    `later`: experts of the same layer that a later acquire of the same step needs (the next
    waves of a grouped MoE step, engine/forward.py). Guesses for them are kept: not
    cancelled, still in flight or landed, their slots still reserved, and counted used or
    unused only when their own acquire comes. Every other guess for `layer` is settled now:
    one in flight is cancelled, one landed that this call does not use is counted unused."""
    experts = [int(e) for e in experts]
    keep = {int(e) for e in later} - set(experts)
    if self.pending:
      wanted = set(experts) | keep
      for key, (_, handle) in self.pending.items():
        if key[0] == layer and key[1] not in wanted:
          self.store.cancel(handle)  # an unneeded guess stops at its next piece
      # wait for this layer's reads, except the guesses of later waves (they may go on)
      self._land_prefetches(lambda key: key[0] == layer and key[1] not in keep)
    hit = [self.table.get((layer, e)) for e in experts]
    if None not in hit:
      return self._all_hits(layer, experts, hit, keep)
    if len(set(experts)) > self.num_slots:
      raise PlanError(f"{len(set(experts))} experts requested at once but the pool has "
                      f"{self.num_slots} slots.")
    # pin every hit first, so a miss never evicts an expert this same call asks for
    pinned = {self.table[(layer, e)] for e in experts if (layer, e) in self.table}
    slots, reads = [], []
    try:
      for e in experts:
        key = (layer, e)
        slot = self.table.get(key)
        if slot is not None:
          if not any(r[1] == key for r in reads):
            self.hits += 1
          if key in self.prefetched:
            self.prefetched.discard(key)
            self.prefetch_used += 1
        else:  # start every miss's read before waiting for any of them
          slot = self._victim(layer, pinned | self._reserved())
          if slot is None:  # every other slot awaits a guess: release those of other layers
            self._release(lambda key: key[0] != layer or key[1] not in keep)
            slot = self._victim(layer, pinned | self._reserved())
          if slot is None:  # and then this layer's later waves' too
            self._release(lambda key: True)
            slot = self._victim(layer, pinned | self._reserved())
          self._evict(slot)
          self._map(slot, key)  # reserved: a repeat of e in `experts` maps here
          reads.append((slot, key, None))  # listed first: if start_read raises, the slot is freed
          reads[-1] = (slot, key, self.store.start_read(layer, e, self.buffers[slot]))
          self.misses += 1
        self.uses[key] += 1
        self.lru.move_to_end(slot)
        pinned.add(slot)
        slots.append(slot)
      t0 = time.perf_counter()
      try:
        for slot, key, handle in reads:
          n = self.store.finish_read(handle)
          self.bytes_read += n
          self.demand_bytes += n
          self._install(slot, key)
      finally:
        self.io_wait_s += time.perf_counter() - t0
    except BaseException:
      # nothing unchecked stays resident, and no reader thread still writes into a free slot
      for slot, key, handle in reads:
        if handle is not None:
          self.store.wait_quietly(handle)
        self._evict(slot)
      raise
    self.in_use = pinned
    self._forget_guesses(layer, keep)
    return slots

  def _all_hits(self, layer: int, experts: list[int], slots: list[int],
                keep: set[int]) -> list[int]:
    """acquire when every expert is resident (decode's common case; the same bookkeeping as
    the general path, without its per-expert branches: it runs once per layer and token)."""
    for e, slot in zip(experts, slots):
      self.uses[(layer, e)] += 1
      self.lru.move_to_end(slot)
    self.hits += len(experts)
    if self.prefetched:
      used = self.prefetched & {(layer, e) for e in experts}
      self.prefetch_used += len(used)
      self.prefetched -= used  # used, not counted unused below
      self._forget_guesses(layer, keep)
    self.in_use = set(slots)
    return slots

  def _forget_guesses(self, layer: int, keep: set[int]) -> None:
    """This layer's unused guesses lose their protection (they stay resident, first victims),
    except those `keep` names (a later wave of the same step uses them)."""
    if self.prefetched:
      self._drop_landed(lambda key: key[0] == layer and key[1] not in keep)

  def _drop_landed(self, which) -> None:
    """Landed guesses for which(key) are no longer awaited: counted unused (bytes read for
    nothing so far; resident, they may still hit later, then counted as hits)."""
    dropped = {key for key in self.prefetched if which(key)}
    self.unused_bytes += len(dropped) * self.store.bytes_per_expert
    self.prefetched -= dropped

  def _release(self, which) -> None:
    """The guesses for which(key) give their slots up: those in flight are cancelled and
    waited for, those landed are no longer awaited (counted unused)."""
    for key, (_, handle) in self.pending.items():
      if which(key):
        self.store.cancel(handle)
    self._land_prefetches(which)
    self._drop_landed(which)
