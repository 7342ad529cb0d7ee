"""Memory planning: fit runtime + dense params + KV cache + expert pool + working margin in a
budget, from the store's manifest, before anything is read.

The plan is made before loading, from the process's measured resident memory (the jax runtime
as it really is), the dense params as they will be resident (computed from the manifest's
tensor shapes and the encodings they will have: `dense_sizes`), the KV caches (from their
shapes, nothing allocated: see below), and a working margin for the largest temporary
of the expert programs (one expert upcast to float32) plus MARGIN_BASE for compiling and
running the programs. Loading itself holds, beyond what stays, about one restore group
(`load_extra_bytes`): the budget must hold that too. Whatever remains is expert slots; fewer
than num_experts_per_tok is a clear error naming the minimum budget, raised before a byte of
the dense params is read. `plan_store` is the one function the engine and the planner CLI
(`python -m lazymoe_jax.plan`) both call.

The KV term is what the engine can hold, not a figure it may pass: for `sequences` (the
server's --parallel) caches of max_context positions it counts, per sequence, one slot of the
batch stack (max_context positions plus the scratch position padding rows write to,
engine/batch.py), and one layer of it: a cache or the stack is resized layer by layer, so a
resize holds at most one layer of each beyond the larger of before and after. A session in
prefill (its own cache, up to max_context positions) takes the room of a slot. The engine
holds its caches to the steady part (`MemoryPlan.kv_limit_bytes`): the stack takes a power of
two of slots only where that fits beside the other sessions' caches, and more sequences than
planned is a PlanError naming --parallel (engine/__init__.Engine.make_kv_room).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import psutil

from lazymoe_jax import families
from lazymoe_jax import kv as kv_lib
from lazymoe_jax.errors import PlanError
from lazymoe_jax.model import encodings
from lazymoe_jax.model.spec import ModelSpec
from lazymoe_jax.store import dense as dense_store
from lazymoe_jax.store import embedding as embedding_store
from lazymoe_jax.store import format as fmt

# What the process grows by after the plan is made: compiling and running the programs (anon
# memory) and the library code pages the compiler touches the first time (file pages, charged
# to a memory cgroup like everything else), sized from the cgroup benchmarks
# (BUILD_NOTES "Measurements moved out of the code").
MARGIN_BASE = 256 << 20
GB = 1e9
MAX_PLANNED_CONTEXT = 4096  # with a memory budget, the KV cache is planned for this many
# The dense matrices read every token that `dense_dtype` re-encodes (attention, dense and
# shared MLPs, output head; not the router, norms or embedding lookup).
DENSE_MATRICES = ("wqkv", "wo", "w_gate_up", "w_down", "shared_w_gate_up", "shared_w_down")
ROW_BLOCK = 4096  # rows re-encoded at a time: a 200k-row head in float32 would be 2.3 GB


def resident_bytes() -> int:
  """Current resident set size of this process (not the peak); psutil, so it works beyond
  Linux's /proc."""
  return psutil.Process().memory_info().rss


def runtime_bytes() -> int:
  """The runtime's resident bytes, measured the same way by the engine and the planner CLI:
  after the CPU client exists and has run one op (its threads and first allocations), before
  any param is read."""
  jax.numpy.zeros(1).block_until_ready()
  return resident_bytes()


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  budget_bytes: int
  runtime_and_dense_bytes: int  # runtime (measured RSS before loading) + dense (resident)
  kv_bytes: int  # KV of `sequences` sequences: a slot of max_context + 1 positions and a layer each
  max_context: int
  margin_bytes: int
  bytes_per_expert: int
  slots: int
  load_extra_bytes: int = 0  # held during loading only, beyond what stays
  dense_bytes: int = 0  # the dense part of runtime_and_dense_bytes (0: not known apart)
  sequences: int = 1  # sequences decoding together (the server's --parallel)
  kv_layer_bytes: int = 0  # one sequence's largest layer at max_context + 1 (part of kv_bytes)

  @property
  def kv_resize_bytes(self) -> int:
    """The part of kv_bytes held only while a cache or the batch stack is resized (one layer
    of every sequence's slot)."""
    return self.sequences * self.kv_layer_bytes

  @property
  def kv_limit_bytes(self) -> int:
    """The KV bytes the engine's caches may hold between resizes (engine.make_kv_room)."""
    return self.kv_bytes - self.kv_resize_bytes

  @property
  def kv_sequence_bytes(self) -> int:
    """One sequence's slot: its cache at max_context positions plus the scratch position."""
    return self.kv_limit_bytes // self.sequences

  @property
  def pool_bytes(self) -> int:
    return self.slots * self.bytes_per_expert

  @property
  def runtime_bytes(self) -> int:
    return self.runtime_and_dense_bytes - self.dense_bytes

  def describe(self) -> str:
    split = (f"runtime {self.runtime_bytes / GB:.3f} GB (measured) + dense params "
             f"{self.dense_bytes / GB:.3f} GB" if self.dense_bytes else
             f"runtime + dense params {self.runtime_and_dense_bytes / GB:.3f} GB (measured)")
    resize = (f", + {self.kv_resize_bytes / GB:.3f} GB to resize one layer at a time"
              if self.kv_layer_bytes else "")
    return (f"memory plan for {self.budget_bytes / GB:.2f} GB: {split}, KV cache "
            f"{self.kv_bytes / GB:.3f} GB ({_positions(self.sequences, self.max_context)}"
            f"{' + 1 scratch each' if self.kv_layer_bytes else ''}{resize}), margin "
            f"{self.margin_bytes / GB:.3f} GB, expert pool {self.slots} slots x "
            f"{self.bytes_per_expert / 1e6:.1f} MB = {self.pool_bytes / GB:.3f} GB")

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "pool_bytes": self.pool_bytes,
            "runtime_bytes": self.runtime_bytes, "kv_resize_bytes": self.kv_resize_bytes,
            "kv_limit_bytes": self.kv_limit_bytes}


def _positions(sequences: int, max_context: int) -> str:
  return (f"{max_context} positions" if sequences == 1 else
          f"{sequences} sequences x {max_context} positions")


def make_plan(budget_gb: float, runtime_and_dense_bytes: int, kv_bytes: int, max_context: int,
              bytes_per_expert: int, expert_f32_bytes: int, min_slots: int,
              total_experts: int, load_extra_bytes: int = 0,
              dense_bytes: int = 0, sequences: int = 1, kv_layer_bytes: int = 0) -> MemoryPlan:
  """The arithmetic: slots = (budget - runtime and dense - KV - margin) // bytes_per_expert,
  at most total_experts; the budget must also hold the load's extra. kv_bytes is one
  sequence's slot (plan_store: its cache at max_context + 1 positions) and kv_layer_bytes its
  largest layer (the resize's room); `sequences` of both are planned (the server's
  --parallel), and a budget that cannot hold them names the largest --parallel and
  --max_context that fit."""
  budget = int(budget_gb * GB)
  margin = MARGIN_BASE + expert_f32_bytes
  one_kv = kv_bytes + kv_layer_bytes
  kv_bytes = sequences * one_kv
  free = budget - runtime_and_dense_bytes - kv_bytes - margin
  slots = min(total_experts, max(free, 0) // bytes_per_expert)
  steady = runtime_and_dense_bytes + kv_bytes + margin + min_slots * bytes_per_expert
  loading = runtime_and_dense_bytes + load_extra_bytes
  if slots < min_slots or budget < loading:
    need = max(steady, loading)
    load = (f", loading {loading / GB:.3f} GB at its peak (the dense params placed so far and "
            "the restore group being placed)" if loading > steady else "")
    room = budget - runtime_and_dense_bytes - margin - min_slots * bytes_per_expert  # for KV
    fits = ""
    if sequences > 1 and one_kv and room >= one_kv:
      fits = (f" At this budget --parallel={room // one_kv} fits at {max_context} positions, "
              f"or --max_context={room * max_context // kv_bytes} at --parallel={sequences}.")
    raise PlanError(
        f"memory budget {budget_gb:.2f} GB is too small for this model: it needs at least "
        f"{need / GB:.2f} GB (runtime + dense params {runtime_and_dense_bytes / GB:.3f} GB "
        f"measured, KV cache {kv_bytes / GB:.3f} GB for {_positions(sequences, max_context)}, "
        f"{min_slots} expert slots {min_slots * bytes_per_expert / GB:.3f} GB, margin "
        f"{margin / GB:.3f} GB{load}).{fits} Raise --memory_budget_gb, or quantise the experts "
        "(--expert_dtype=int8) or the KV cache (--kv_bits)"
        f"{', or lower --parallel or --max_context' if sequences > 1 else ''}.")
  return MemoryPlan(budget, runtime_and_dense_bytes, kv_bytes, max_context, margin,
                    bytes_per_expert, slots, load_extra_bytes, dense_bytes, sequences,
                    kv_layer_bytes)


# ---- sizes from the manifest ---------------------------------------------------------------
def dense_tensors(store_dir: str, manifest: dict) -> dict[str, dict[str, dict]]:
  """part -> tensor -> {"shape", "dtype"} as stored: from the manifest (version 5), else from
  the checkpoints' metadata (no data read)."""
  if "tensors" in manifest["dense"]:
    return manifest["dense"]["tensors"]
  return {p: dense_store.part_tensors(store_dir, p) for p in manifest["dense"]["parts"]}


def head_encoding(manifest: dict, tables: dict) -> encodings.Encoding:
  """The stored head's encoding (version 4: its float dtype, or the embedding's when tied)."""
  if "head" in manifest:
    return encodings.get(manifest["head"]["encoding"])
  g = tables["globals"]
  return encodings.get(g.get("lm_head", g["embed"])["dtype"])


def reencodes_head(manifest: dict, tables: dict, dense_dtype: str | None) -> bool:
  """dense_dtype re-encodes the head only where it is stored as floats (a head stored int8 at
  conversion is kept as it is)."""
  return dense_dtype is not None and isinstance(head_encoding(manifest, tables), encodings.Float)


def _nbytes(t: dict) -> int:
  return int(np.prod(t["shape"])) * fmt.numpy_dtype(t["dtype"]).itemsize


def _encoded_nbytes(enc: encodings.Encoding, t: dict) -> int:
  rows, cols = t["shape"]
  return sum(int(np.prod(shape)) * fmt.numpy_dtype(dtype).itemsize
             for shape, dtype in enc.arrays(rows, cols).values())


def stored_rows_read(manifest: dict, spec: ModelSpec, tables: dict,
                     dense_dtype: str | None) -> bool:
  """Whether embedding rows are read from the store's table (engine/weights.embedding_rows):
  a version 5 store, unless the head is tied and resident in the table's own dtype."""
  if "embedding" not in manifest:
    return False
  head = head_encoding(manifest, tables)
  resident_float = (isinstance(head, encodings.Float) and
                    not reencodes_head(manifest, tables, dense_dtype))
  return not (spec.tie_word_embeddings and resident_float and
              head.name == manifest["embedding"]["dtype"])


def dense_sizes(store_dir: str, manifest: dict, spec: ModelSpec,
                dense_dtype: str | None) -> tuple[int, int]:
  """(resident bytes, load extra bytes) of the dense params as engine/weights.load will hold
  them: each tensor in the encoding it will have; plus the embedding rows' tensorstore cache
  where rows are read from the store. The load extra is how far the load's peak goes beyond
  the final resident bytes: parts are placed in order, and placing a group holds what is
  resident so far, the group as restored and, for its largest tensor, what re-encoding holds
  (a float32 block of rows, the encoded copy) and its device copy; version 4 stores'
  whole-array chunks make orbax hold each array twice while restoring it; plus two chunks."""
  tables = dense_tensors(store_dir, manifest)
  enc = encodings.get(dense_dtype) if dense_dtype is not None else None
  head_re = reencodes_head(manifest, tables, dense_dtype)
  resident = embedding_store.HELD_BYTES if stored_rows_read(manifest, spec, tables,
                                                             dense_dtype) else 0
  peak = 0  # the most held at once: what is resident so far + the group being placed
  chunked = "tensors" in manifest["dense"]  # version 5: written in SAVE_CHUNK_BYTES chunks
  for part, table in tables.items():  # in the order weights.load restores them
    before, group, group_extra = resident, 0, 0
    for key, t in table.items():
      n = _nbytes(t)
      if group and group + n > dense_store.RESTORE_GROUP_BYTES:
        peak = max(peak, before + group + group_extra)
        before, group, group_extra = resident, 0, 0
      group += n
      reenc = enc is not None and (
          (part != "globals" and key in DENSE_MATRICES) or
          (part == "globals" and head_re and (key == "lm_head" or (
              key == "embed" and spec.tie_word_embeddings))))
      if part == "globals" and key == "embed" and head_re and spec.tie_word_embeddings:
        resident += n + _encoded_nbytes(enc, t)  # v4 tied: the table and the head's copy
      else:
        resident += _encoded_nbytes(enc, t) if reenc else n
      held = _encoded_nbytes(enc, t) if reenc else n  # its device copy, before the host's goes
      if reenc:
        held += ROW_BLOCK * t["shape"][1] * 4
      if not chunked:
        held += n
      group_extra = max(group_extra, held)
    peak = max(peak, before + group + group_extra)
  return resident, max(0, peak - resident) + 2 * dense_store.SAVE_CHUNK_BYTES


def embedding_table_bytes(manifest: dict) -> int:
  """Bytes of a version 5 store's embedding table on disk (0 where there is none)."""
  entry = manifest.get("embedding")
  if not entry:
    return 0
  return int(np.prod(entry["shape"])) * fmt.numpy_dtype(entry["dtype"]).itemsize


def bytes_per_expert(manifest: dict) -> int:
  """One expert's bytes, all its arrays (store/experts.py counts the same from the same specs)."""
  return sum(int(np.prod(s["shape"][2:])) * fmt.numpy_dtype(s["dtype"]).itemsize
             for s in manifest["experts"]["tensors"].values())


def planned_context(spec: ModelSpec, max_context: int | None) -> int:
  limit = spec.max_position_embeddings
  if max_context is not None and not 0 < max_context <= limit:
    raise ValueError(f"max_context={max_context} must be in [1, {limit}] (the model's "
                     "max_position_embeddings).")
  return max_context or min(limit, MAX_PLANNED_CONTEXT)


def kv_bytes(kv, spec: ModelSpec, context: int) -> int:
  """One sequence's cache at `context` positions, every layer (from the shapes only)."""
  shapes = jax.eval_shape(lambda: kv.init(spec, context))
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes))


def kv_layer_bytes(kv, spec: ModelSpec, context: int) -> int:
  """One sequence's largest layer cache at `context` positions (from the shapes only)."""
  shapes = jax.eval_shape(lambda: kv.init(spec, context))
  return max(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(layer)) for layer in shapes)


def plan_store(store_dir: str, budget_gb: float, runtime_bytes: int, *,
               manifest: dict | None = None, kv_bits: float | None = None,
               k_bits: float | None = None, v_bits: float | None = None,
               max_context: int | None = None, dense_dtype: str | None = None,
               sequences: int = 1) -> MemoryPlan:
  """The memory plan of `store_dir` in `budget_gb` for these options, given the runtime's
  resident bytes (measured by the caller before loading: `resident_bytes()`). Reads the
  manifest (and, for version 4 stores, the dense checkpoints' metadata), never the weights."""
  manifest = manifest or fmt.read_manifest(store_dir)
  spec = families.spec_from_hf(manifest["hf_config"])
  kv = kv_lib.make(kv_bits, k_bits, v_bits, mla=spec.attention.cache_kind == "latent")
  kv.validate(spec)
  context = planned_context(spec, max_context)
  dense, extra = dense_sizes(store_dir, manifest, spec, dense_dtype)
  total = len(manifest["experts"]["layers"]) * spec.num_experts
  # a batch slot: the context + the scratch position (engine/batch.py); and its largest layer
  return make_plan(budget_gb, runtime_bytes + dense, kv_bytes(kv, spec, context + 1), context,
                   bytes_per_expert(manifest), 3 * spec.moe.width * spec.hidden_size * 4,
                   spec.num_experts_per_tok, total, load_extra_bytes=extra, dense_bytes=dense,
                   sequences=sequences, kv_layer_bytes=kv_layer_bytes(kv, spec, context + 1))


def after_load(plan: MemoryPlan, measured: int, total_experts: int,
               min_slots: int, expert_f32_bytes: int) -> MemoryPlan:
  """The plan checked against the resident bytes measured once the dense params are loaded:
  kept when they are within it, else made again from the measured figure (fewer slots), so
  that the pool never takes memory the load did not give back."""
  if measured <= plan.runtime_and_dense_bytes:
    return plan
  return make_plan(plan.budget_bytes / GB, measured, plan.kv_sequence_bytes,
                   plan.max_context, plan.bytes_per_expert, expert_f32_bytes, min_slots,
                   total_experts, plan.load_extra_bytes,
                   plan.dense_bytes + measured - plan.runtime_and_dense_bytes, plan.sequences,
                   plan.kv_layer_bytes)
