"""A fixed pool of preallocated expert slots shared by all layers, with LRU eviction.

Each slot owns one page-aligned numpy buffer per expert tensor, allocated (and touched) once.
A miss reads the expert from disk straight into the victim slot's buffers. The jax array
handed to the jitted expert programs is `jax.device_put` of that buffer, which on CPU aliases
aligned numpy memory (checked at start-up and reported in `stats()["pool_zero_copy"]`), so a
refill is the disk read and nothing else. Callers must not refill a slot while a dispatched
computation may still read it: the engine synchronises on the router ids (which depend on
every earlier expert computation) or on the accumulator between prefill waves.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import jax
import numpy as np

from lazymoe_jax.errors import PlanError
from lazymoe_jax.store.experts import ExpertStore

ALIGN = 4096


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  raw = np.empty(nbytes + ALIGN, np.uint8)
  off = (-raw.ctypes.data) % ALIGN
  return raw[off:off + nbytes].view(dtype).reshape(shape)


class ExpertPool:
  """`acquire(layer, experts) -> slots`; `arrays(slot) -> {tensor: {suffix: array}}`."""

  def __init__(self, store: ExpertStore, num_slots: int, min_slots: int):
    if num_slots < min_slots:
      raise PlanError(f"expert_slots={num_slots} is too small: one token needs "
                      f"num_experts_per_tok={min_slots} experts resident at once; use at least "
                      f"{min_slots}.")
    self.store = store
    self.num_slots = num_slots
    self.buffers: list[dict[str, np.ndarray]] = []
    for _ in range(num_slots):
      bufs = {n: aligned_empty(store.shapes[n], store.dtypes[n]) for n in store.specs}
      for b in bufs.values():
        b.view(np.uint8).fill(0)  # touch now: page faults here, not in the decode loop
      self.buffers.append(bufs)
    self._arrays = [self._wrap(b) for b in self.buffers]
    first = self.buffers[0]["w_gate_up"]
    self.zero_copy = self._arrays[0]["w_gate_up"][""].unsafe_buffer_pointer() == first.ctypes.data
    self.owner: list[tuple[int, int] | None] = [None] * num_slots
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

  def _wrap(self, bufs: dict[str, np.ndarray]) -> dict[str, dict[str, jax.Array]]:
    return self.store.as_tree({n: jax.device_put(b) for n, b in bufs.items()})

  @property
  def nbytes(self) -> int:
    return self.num_slots * self.store.bytes_per_expert

  def arrays(self, slot: int) -> dict[str, dict[str, jax.Array]]:
    """The slot's expert as {tensor: {suffix: array}} (see model/encodings.py)."""
    return self._arrays[slot]

  def _evict(self, slot: int) -> None:
    """Empties a slot (if the read that refills it fails, it holds nothing valid)."""
    if self.owner[slot] is not None:
      del self.table[self.owner[slot]]
      self.prefetched.discard(self.owner[slot])
    self.owner[slot] = None

  def _install(self, slot: int, key: tuple[int, int]) -> None:
    if not self.zero_copy:
      self._arrays[slot] = self._wrap(self.buffers[slot])
    self.owner[slot] = key
    self.table[key] = slot

  def prefetch(self, layer: int, experts: Sequence[int]) -> None:
    """Starts reading experts predicted for `layer` (asynchronously, tensorstore's threads)
    into least-recently-used slots, never into one the last acquire handed out. A wrong guess
    costs only bandwidth and a slot; it never changes results."""
    for e in experts:
      key = (layer, int(e))
      if key in self.table or key in self.pending:
        continue
      busy = self.in_use | {slot for slot, _ in self.pending.values()}
      slot = next((s for s in self.lru if s not in busy), None)
      if slot is None:
        return
      self._evict(slot)
      self.pending[key] = (slot, self.store.start_read(layer, key[1], self.buffers[slot]))
      self.prefetch_reads += 1

  def _land_prefetches(self) -> None:
    """Waits for the prefetch reads in flight; they become resident, least recently used
    first (a wrong guess is the next victim)."""
    while self.pending:
      key, (slot, handle) = next(iter(self.pending.items()))
      del self.pending[key]
      self.bytes_read += self.store.finish_read(handle)
      self._install(slot, key)
      self.prefetched.add(key)
      self.lru.move_to_end(slot, last=False)

  def acquire(self, layer: int, experts: Sequence[int]) -> list[int]:
    """Makes every expert of `experts` resident for `layer` at once; returns their slots."""
    experts = [int(e) for e in experts]
    if len(set(experts)) > self.num_slots:
      raise PlanError(f"{len(set(experts))} experts requested at once but the pool has "
                      f"{self.num_slots} slots.")
    self._land_prefetches()
    pinned: set[int] = set()
    slots = []
    for e in experts:
      key = (layer, e)
      slot = self.table.get(key)
      if slot is not None:
        self.hits += 1
        if key in self.prefetched:
          self.prefetched.discard(key)
          self.prefetch_used += 1
      else:
        slot = next(s for s in self.lru if s not in pinned)  # least recently used, unpinned
        self._evict(slot)
        self.bytes_read += self.store.read_into(layer, e, self.buffers[slot])
        self._install(slot, key)
        self.misses += 1
      self.lru.move_to_end(slot)
      pinned.add(slot)
      slots.append(slot)
    self.in_use = pinned
    return slots
