"""The engine: a loaded store, its sessions, generation and statistics.

  engine = lazymoe_jax.load(store_dir, ...)        # options: engine/options.py
  seq = engine.session(); seq.feed(ids)            # the step API (engine/session.py)
  engine.feed_batch(sessions, ids)                 # one decode step for several sequences
  engine.logits(ids); engine.generate(ids, n); engine.stream(ids, n, sampler); engine.stats()

The jobs live in their own modules: options.py (what `load` accepts), weights.py (dense params
from the store to the device), memory.py (heap tuning, free RAM), forward.py (the layer loop),
session.py (a sequence and its KV cache); plan.py (the memory budget) is beside this package.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from lazymoe_jax import families, kernels
from lazymoe_jax import kv as kv_lib
from lazymoe_jax import tokenizer as tokenizer_lib
from lazymoe_jax.engine import budget, memory, weights
from lazymoe_jax.engine.batch import BatchCache
from lazymoe_jax.engine.forward import Forward
from lazymoe_jax.engine.options import EngineOptions
from lazymoe_jax.engine.session import Session
from lazymoe_jax.engine.budget import MAX_PLANNED_CONTEXT, MemoryPlan, resident_bytes
from lazymoe_jax.sampling import Sampler
from lazymoe_jax.store import format as fmt
from lazymoe_jax.errors import PlanError, StoreError
from lazymoe_jax.store.experts import ExpertStore
from lazymoe_jax.store.pool import ExpertPool

DEFAULT_RAM_FRACTION = 0.5  # without expert_slots, the pool may take this much of free RAM


def enable_compilation_cache() -> str | None:
  """JAX's persistent compilation cache, so that a second run (or a prompt length seen before)
  loads its programs instead of compiling them inside the time to first token. Opt-in:
  $LAZYMOE_COMPILATION_CACHE=1 uses ~/.cache/lazymoe_jax/xla (or $XDG_CACHE_HOME's), any other
  value is the folder; unset or 0 leaves it off (it raised the resident memory the planner
  measures, BUILD_NOTES session 7 issue 16). A jax_compilation_cache_dir the user set is left
  alone. Returns the folder in use, or None."""
  where = os.environ.get("LAZYMOE_COMPILATION_CACHE", "0")
  if where == "0" or jax.config.jax_compilation_cache_dir:
    return None
  if where == "1":
    where = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                         "lazymoe_jax", "xla")
  jax.config.update("jax_compilation_cache_dir", where)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  return where


class Engine:
  """A loaded store. Build with `lazymoe_jax.load`."""

  def __init__(self, store_dir: str, options: EngineOptions = EngineOptions()):
    self.store_dir = store_dir
    self.options = options
    self.compilation_cache = enable_compilation_cache()
    self.manifest = fmt.read_manifest(store_dir)
    memory.keep_heap_warm()
    self.spec = families.spec_from_hf(self.manifest["hf_config"])
    spec = self.spec
    # DenseKV, or TurboQuantKV with bits; LatentKV for multi-head latent attention
    self.kv = kv_lib.make(options.kv_bits, options.k_bits, options.v_bits,
                          mla=spec.attention.cache_kind == "latent")
    self.kv.validate(spec)
    self.experts = ExpertStore(store_dir, self.manifest)
    _check_store_matches(store_dir, self.manifest, spec, self.experts)
    total = len(self.experts.layers) * spec.num_experts
    limit = spec.max_position_embeddings
    if options.max_context is not None and options.max_context > limit:
      raise ValueError(f"max_context={options.max_context} must be in [1, {limit}] (the "
                       "model's max_position_embeddings).")
    self.max_context = options.max_context or limit
    self.plan: MemoryPlan | None = None
    self.planned: MemoryPlan | None = None  # the plan as made before loading
    slots = options.expert_slots
    if options.memory_budget_gb is not None:
      # planned from the manifest before a byte of the dense params is read: a budget too
      # small fails here, naming the minimum (the planner CLI calls the same function)
      self.plan = budget.plan_store(
          store_dir, options.memory_budget_gb, budget.runtime_bytes(), manifest=self.manifest,
          kv_bits=options.kv_bits, k_bits=options.k_bits, v_bits=options.v_bits,
          max_context=options.max_context, dense_dtype=options.dense_dtype,
          sequences=options.parallel)
      self.max_context = self.plan.max_context
    glob, layers = weights.load(store_dir, spec, options.dense_dtype, self.manifest)
    memory.return_freed_memory()  # what the load freed goes back before the pool is made
    # without a budget, the store's embedding table is held whole where it and every expert
    # fit the share of free RAM the default pool may take: the model is then resident and a
    # row read per token is only overhead; a model larger than that keeps reading rows
    # (weights.embedding_rows), its RAM going to expert slots
    hold = self.plan is None and (
        budget.embedding_table_bytes(self.manifest) + total * self.experts.bytes_per_expert
        <= memory.available_ram() * DEFAULT_RAM_FRACTION)
    self.embed = weights.embedding_rows(store_dir, self.manifest, spec, glob, hold=hold)
    if hold:
      memory.return_freed_memory()  # the read's buffers, before the pool is sized
    self.dense_bytes = (sum(a.nbytes for a in jax.tree.leaves((glob, layers)))
                        + self.embed.held_bytes)
    if self.plan is not None:
      self.planned = self.plan
      self.plan = budget.after_load(self.plan, resident_bytes(), total,
                                    spec.num_experts_per_tok,
                                    3 * spec.moe.width * spec.hidden_size * 4)
      slots = self.plan.slots
    elif slots is None:
      fit = int(memory.available_ram() * DEFAULT_RAM_FRACTION) // self.experts.bytes_per_expert
      slots = max(spec.num_experts_per_tok, min(total, fit))
    self.pool = ExpertPool(self.experts, min(slots, total) if total else slots,
                           spec.num_experts_per_tok, options.cache_policy)
    self.forward = Forward(spec, self.kv, glob, layers, self.pool, options.prefetch, self.embed)
    self.batch = BatchCache(self)  # the stacked caches of the sequences decoding together
    self.sessions: weakref.WeakSet[Session] = weakref.WeakSet()  # every live session
    # with a plan, the KV caches (own and stacked) never hold more than this between resizes
    self.kv_limit = self.plan.kv_limit_bytes if self.plan is not None else None
    self.tokenizer = tokenizer_lib.load(store_dir, self.manifest.get("tokenizer"),
                                        spec.bos_token_id)
    self.eos_ids = set(spec.eos_token_ids) | set(
        self.manifest.get("generation", {}).get("eos_token_ids", []))
    self._kv_bytes = 0
    self._last = {"prompt_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0}

  # ---- the step API ----------------------------------------------------------------------
  def session(self, max_context: int | None = None) -> Session:
    """A sequence to feed tokens into, keeping its KV cache between calls (see Session)."""
    return Session(self, max_context)

  def feed_batch(self, sessions: Sequence[Session], token_ids: Sequence[int]) -> np.ndarray:
    """One decode step for several sequences at once: token_ids[i] goes to sessions[i] at its
    next position. The sessions' caches live stacked in `engine.batch` while they decode
    together (one attention program per layer for the whole batch; sessions join at their
    first batched step and leave with `close()` or a single-sequence `feed`). Each MoE layer
    acquires the union of the batch's experts once. Returns float32 logits
    [len(sessions), vocab]. A session that cannot take a token (closed, past its context) is
    refused before anything runs, naming its index."""
    if len(sessions) != len(token_ids) or not sessions:
      raise ValueError(f"feed_batch needs one token per session (got {len(sessions)} sessions, "
                       f"{len(token_ids)} tokens).")
    if len({id(s) for s in sessions}) != len(sessions):
      raise ValueError("feed_batch got the same session twice; a session takes one token per "
                       "step.")
    tokens = self.check_tokens(token_ids)
    bad = {i: s for i, s in enumerate(sessions)
           if s.engine is not self or s.closed or s.position + 1 > s.max_context}
    if bad:
      i, s = next(iter(bad.items()))
      why = ("belongs to another engine" if s.engine is not self else
             "is closed" if s.closed else
             f"is full (position {s.position} of its context of {s.max_context})")
      raise ValueError(f"feed_batch: session {i} {why}"
                       f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; leave it out "
                       "of the batch (close it, or start a new session).")
    for s in sessions:
      s.reserve(1)
    x, rows = self.batch.step(list(sessions), tokens)
    for s in sessions:
      s.position += 1
    self.note_kv_bytes(self.batch.slot_bytes())
    return self.forward.head_rows(x, self.batch.num_slots)[rows]

  def load_all_experts(self) -> bool:
    """Reads every expert the pool lacks, when it has a slot for each: the model is then
    resident, and decode steps run as one program (steps.decode_step,
    steps.decode_batch_step, where the native kernels serve that many rows:
    Forward.whole_step_ready) from the first request on. Returns whether the pool holds every
    expert; a pool with fewer slots is left as it is (experts are read as tokens pick them)."""
    layers = self.forward.moe_order
    if self.pool.num_slots < len(layers) * self.spec.num_experts:
      return False
    for layer in layers:
      self.pool.acquire(layer, range(self.spec.num_experts))
    return self.pool.holds_all(layers)

  # ---- whole-sequence calls --------------------------------------------------------------
  def logits(self, token_ids: Sequence[int]) -> np.ndarray:
    """Teacher-forced logits float32 [len(token_ids), vocab] with a fresh cache."""
    tokens = self.check_tokens(token_ids)
    t0 = time.perf_counter()
    seq = self.session(len(tokens))
    out = seq.feed(tokens, all_logits=True)
    self._last = {"prompt_tokens_per_s": len(tokens) / (time.perf_counter() - t0),
                  "decode_tokens_per_s": 0.0}
    return out

  def generate(self, token_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> list[int]:
    """The new tokens only; stops early only at the tokenizer's eos."""
    return list(self.stream(token_ids, max_new_tokens, Sampler(temperature, top_p, top_k, seed)))

  def stream(self, token_ids: Sequence[int], max_new_tokens: int,
             sampler: Sampler = Sampler()) -> Iterator[int]:
    """Yields new tokens one by one as they are decoded (arguments checked at the call)."""
    tokens = self.check_tokens(token_ids)
    if max_new_tokens < 0:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0.")
    if len(tokens) + max_new_tokens > self.max_context:
      whose = "planned" if self.plan else "model's"
      raise ValueError(f"prompt ({len(tokens)}) + max_new_tokens ({max_new_tokens}) exceeds the "
                       f"{whose} context of {self.max_context} positions; shorten one of them.")
    return self._stream(tokens, max_new_tokens, sampler)

  def _stream(self, tokens: np.ndarray, max_new_tokens: int, sampler: Sampler) -> Iterator[int]:
    n = len(tokens)
    self._last = {"prompt_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0}
    if max_new_tokens == 0:
      return
    seq = self.session(n + max_new_tokens)
    t0 = time.perf_counter()
    logits = seq.feed(tokens)
    t1 = time.perf_counter()
    self._last["prompt_tokens_per_s"] = n / (t1 - t0)  # includes compiling a new prompt shape
    t_steady = None  # decode speed excludes the first step, which compiles the programs
    for step in range(max_new_tokens):
      tok = sampler(logits, step)
      yield tok
      if tok in self.eos_ids or step == max_new_tokens - 1:
        break
      logits = seq.feed([tok])
      now = time.perf_counter()
      if t_steady is None:
        t_steady, first_step = now, now - t1
      self._last["decode_tokens_per_s"] = (
          step / (now - t_steady) if step else 1.0 / first_step)

  def stats(self) -> dict:
    return {
        "expert_hits": self.pool.hits,
        "expert_misses": self.pool.misses,
        "bytes_read": self.pool.bytes_read,
        "kv_cache_bytes": self._kv_bytes,
        "batch_slots": self.batch.num_slots,
        "batch_cache_bytes": self.batch.nbytes,
        "kv_bytes_held": self.kv_bytes_in_use(),  # the stack and every session's own cache
        "pool_slots": self.pool.num_slots,
        "pool_bytes": self.pool.nbytes,
        "pool_zero_copy": self.pool.zero_copy,
        "prefetch_reads": self.pool.prefetch_reads,
        "prefetch_used": self.pool.prefetch_used,
        "prefetch_errors": self.pool.prefetch_errors,
        "prefetch_cancelled": self.pool.prefetch_cancelled,
        "demand_bytes": self.pool.demand_bytes,
        "speculative_bytes": self.pool.speculative_bytes,
        "unused_speculative_bytes": self.pool.unused_bytes,
        "cache_policy": self.pool.policy,
        "kernels": kernels.mode(),
        "whole_steps": self.forward.whole_steps,
        "io_wait_s": self.pool.io_wait_s,
        "disk_busy_s": self.experts.disk_busy.seconds(),
        "dense_bytes": self.dense_bytes,  # the held embedding table included
        "embedding_held_bytes": self.embed.held_bytes,
        "expert_bytes": self.experts.bytes_per_expert,
        "peak_rss_bytes": memory.peak_rss(),
        **self._last,
    }

  # ---- the KV caches against the memory plan ----------------------------------------------
  def own_kv_bytes(self, exclude: Sequence[Session] = ()) -> int:
    """Bytes of the live sessions' own caches (those not in the batch), but `exclude`'s."""
    skip = {id(s) for s in exclude}
    return sum(self.kv.nbytes(list(s.cache)) for s in list(self.sessions)
               if s.cache is not None and id(s) not in skip)

  def kv_bytes_in_use(self) -> int:
    """Bytes of every KV cache the engine holds: the batch stack and the sessions' own."""
    return self.batch.nbytes + self.own_kv_bytes()

  def kv_fits_total(self, total: int) -> bool:
    return self.kv_limit is None or total <= self.kv_limit

  def kv_fits(self, extra: int) -> bool:
    """Whether `extra` more KV bytes fit the plan beside what is held now."""
    return self.kv_limit is None or self.kv_bytes_in_use() + extra <= self.kv_limit

  def check_kv(self, total: int, what: str) -> None:
    """PlanError unless KV caches of `total` bytes fit the plan."""
    if not self.kv_fits_total(total):
      p = self.plan
      live = sum(1 for s in list(self.sessions) if s.cache is not None or s.slot is not None)
      raise PlanError(
          f"{what} would bring the KV caches to {total / 1e6:.1f} MB, past the memory plan's "
          f"{self.kv_limit / 1e6:.1f} MB ({p.sequences} sequence(s) of {p.max_context} "
          f"positions, parallel={p.sequences}); {live} sequence(s) hold caches now. Close a "
          "session (Session.close) or load with a larger parallel (--parallel).")

  def make_kv_room(self, extra: int, what: str) -> None:
    """Makes room in the plan for a new cache of `extra` bytes beside those held: compacts
    the batch stack (free slots, a capacity beyond its members') if needed; PlanError if the
    room is still not there."""
    if self.kv_fits(extra):
      return
    self.batch.compact(extra)
    self.check_kv(self.kv_bytes_in_use() + extra, what)

  def note_kv_bytes(self, nbytes: int) -> None:
    """stats()["kv_cache_bytes"]: the bytes of the cache a session allocated last."""
    self._kv_bytes = nbytes

  def check_tokens(self, token_ids: Sequence[int]) -> np.ndarray:
    """token ids as int32, or a ValueError saying what is wrong with them."""
    tokens = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if tokens.size == 0:
      raise ValueError("token_ids is empty: give at least one token.")
    if tokens.size > self.max_context:
      raise ValueError(f"{tokens.size} tokens exceed the context of {self.max_context} "
                       "positions (max_context, or the model's max_position_embeddings): "
                       "shorten the prompt, or raise max_context up to "
                       f"{self.spec.max_position_embeddings}.")
    if tokens.min() < 0 or tokens.max() >= self.spec.vocab_size:
      raise ValueError(f"token ids must be in [0, {self.spec.vocab_size}); got "
                       f"[{tokens.min()}, {tokens.max()}].")
    return tokens.astype(np.int32)


def _check_store_matches(store_dir: str, manifest: dict, spec, experts: ExpertStore) -> None:
  """The spec parsed from the store's hf_config describes the store that was written (a later
  change of a family's parsing must not silently run an old store as another model)."""
  found = {"family": (manifest["family"], spec.family),
           "MoE layers": (list(experts.layers), list(spec.moe_layers)),
           "experts per layer": (next(iter(experts.specs.values()))["shape"][1],
                                 spec.num_experts),
           "dense parts": (list(manifest["dense"]["parts"]), fmt.dense_part_names(spec))}
  wrong = [f"{k}: store {a}, config {b}" for k, (a, b) in found.items() if a != b]
  if wrong:
    raise StoreError(f"{store_dir}: the store does not match its config.json as "
                     f"this version parses it ({'; '.join(wrong)}); re-convert the model with "
                     "--overwrite.")


def load(store_dir: str, memory_budget_gb: float | None = None, expert_slots: int | None = None,
         kv_bits: float | None = None, k_bits: float | None = None,
         v_bits: float | None = None, prefetch: bool = True,
         cache_policy: str = "lfu", max_context: int | None = None,
         dense_dtype: str | None = None, parallel: int = 1) -> Engine:
  """Opens a converted store. See `Engine` for the API.

  memory_budget_gb: plan dense params + KV cache + expert pool to fit (instead of
  expert_slots: slots of the pool shared by all layers, at least num_experts_per_tok; default
  as many as half the free RAM holds). Without a budget, a model whose experts and embedding
  table fit that half of free RAM also holds the table (else rows are read per token).
  kv_bits (or k_bits / v_bits separately): TurboQuant KV cache at 1-4 bits per coordinate (2.5 and 3.5 too); None keeps a float32 cache. prefetch: in
  decode, start reading the experts the next layers' routers predict while this layer's
  experts run. cache_policy: which pool slot a miss refills, "lru", "lfu" or "layer"
  (store/pool.py). max_context: positions a sequence may reach (prompt + new tokens); default
  the model's max_position_embeddings (with a memory budget: at most 4096, the KV cache is
  planned for it). dense_dtype: re-encode the dense matrices read every token (attention,
  dense and shared MLPs, output head) at load: "bfloat16" or "int8" (per output row scales).
  parallel: sequences decoded together (feed_batch; the server's --parallel): the memory
  plan holds that many KV caches of max_context positions (engine/budget.py), and with a
  budget the engine keeps its caches within them: a cache beyond them is a PlanError.
  """
  return Engine(store_dir, EngineOptions(
      memory_budget_gb=memory_budget_gb, expert_slots=expert_slots, kv_bits=kv_bits,
      k_bits=k_bits, v_bits=v_bits, prefetch=prefetch, cache_policy=cache_policy,
      max_context=max_context, dense_dtype=dense_dtype, parallel=parallel))
