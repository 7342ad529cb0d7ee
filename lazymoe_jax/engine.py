"""The engine: dense params in memory, routed experts through the slot pool, decode/prefill loop.

Per layer: a jitted attention+router program, then on the host the expert ids are mapped to
pool slots (misses read from disk), then a jitted expert program. Prefill groups the prompt's
tokens by expert so that each selected expert is read once per layer for the whole prompt, in
waves when the pool is smaller than the set of experts the prompt needs.
"""

from __future__ import annotations

import ctypes
import resource
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lazymoe_jax import tokenizer as tokenizer_lib
from lazymoe_jax.config import DENSE_MLP, MoEConfig
from lazymoe_jax.errors import LazyMoEError, PlanError
from lazymoe_jax import kv as kv_lib
from lazymoe_jax.model import layers, steps
from lazymoe_jax.model.encodings import Encoding
from lazymoe_jax.plan import MemoryPlan, make_plan, resident_bytes
from lazymoe_jax.sampling import Sampler
from lazymoe_jax.store import dense as dense_store
from lazymoe_jax.store import format as fmt
from lazymoe_jax.store.experts import ExpertStore
from lazymoe_jax.store.pool import ExpertPool

KV_ROUND = 256  # cache capacity granularity: few distinct shapes, few compilations
MAX_PLANNED_CONTEXT = 4096  # with a memory budget, the KV cache is planned for this many
DEFAULT_RAM_FRACTION = 0.5  # without expert_slots, the pool may take this much of free RAM
PREFETCH_DEPTH = 3  # MoE layers ahead whose experts decode prefetches (BUILD_NOTES: measured)


HEAD_ROWS = 256  # logits() applies the output head to this many rows at a time


class KVCache(list):
  """The per-layer cache pytrees of one sequence, and how many positions they hold."""

  capacity: int = 0


def _bucket(n: int, minimum: int) -> int:
  """Next power of two >= max(n, minimum): bounds the number of compiled shapes."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _available_ram() -> int:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 8 << 30


class Engine:
  """A loaded store. Build with `lazymoe_jax.load`."""

  def __init__(self, store_dir: str, expert_slots: int | None = None,
               memory_budget_gb: float | None = None, kv_bits: float | None = None,
               k_bits: float | None = None, v_bits: float | None = None,
               prefetch: bool = True, cache_policy: str = "lfu",
               max_context: int | None = None, dense_dtype: str | None = None):
    if memory_budget_gb is not None and expert_slots is not None:
      raise LazyMoEError("give memory_budget_gb or expert_slots, not both: the budget plans "
                         "the slots.")
    self.store_dir = store_dir
    self.manifest = fmt.read_manifest(store_dir)
    keep_heap_warm()
    self.cfg: MoEConfig = MoEConfig.from_dict(self.manifest["config"])
    cfg = self.cfg
    # DenseKV, or TurboQuantKV with bits; LatentKV for multi-head latent attention
    self.kv = kv_lib.make(kv_bits, k_bits, v_bits, mla=cfg.mla)
    self.kv.validate(cfg)
    self.experts = ExpertStore(store_dir, self.manifest)
    parts = dense_store.load_parts(store_dir, fmt.dense_part_names(cfg))
    if dense_dtype is not None:
      _reencode_dense(parts, cfg, dense_dtype)
    self.dense_dtype = dense_dtype
    self.globals = _to_device(parts.pop("globals"))
    self.layers = [_to_device(parts.pop(f"layer_{i:03d}")) for i in range(cfg.num_hidden_layers)]
    del parts  # the plan below measures resident memory: no host copies may linger
    _return_freed_memory()
    self.dense_bytes = sum(a.nbytes for a in jax.tree.leaves((self.globals, self.layers)))
    total = len(self.experts.layers) * cfg.num_experts
    if max_context is not None and not 0 < max_context <= cfg.max_position_embeddings:
      raise ValueError(f"max_context={max_context} must be in [1, "
                       f"{cfg.max_position_embeddings}] (the model's max_position_embeddings).")
    self.max_context = max_context or cfg.max_position_embeddings
    self.plan: MemoryPlan | None = None
    if memory_budget_gb is not None:
      self.max_context = max_context or min(cfg.max_position_embeddings, MAX_PLANNED_CONTEXT)
      kv_shapes = jax.eval_shape(lambda: self.kv.init(cfg, self.max_context))
      i, h = cfg.moe_intermediate_size, cfg.hidden_size
      self.plan = make_plan(memory_budget_gb, resident_bytes(),
                            sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(kv_shapes)),
                            self.max_context, self.experts.bytes_per_expert, 3 * i * h * 4,
                            cfg.num_experts_per_tok, total)
      expert_slots = self.plan.slots
    elif expert_slots is None:
      fit = int(_available_ram() * DEFAULT_RAM_FRACTION) // self.experts.bytes_per_expert
      expert_slots = max(cfg.num_experts_per_tok, min(total, fit))
    self.pool = ExpertPool(self.experts, min(expert_slots, total) if total else expert_slots,
                           cfg.num_experts_per_tok, cache_policy)
    # Speculative prefetch in decode: layer l applies the routers of the next `prefetch_depth`
    # MoE layers to its hidden state and starts reading their likeliest experts.
    self.prefetch = prefetch
    # guesses read per layer ahead, most likely first (half of top-k: the likeliest guesses are
    # right 82% of the time, all k 65-81%; BUILD_NOTES)
    self.prefetch_width = max(1, cfg.num_experts_per_tok // 2)
    self.prefetch_depth = PREFETCH_DEPTH
    self._moe_order = list(cfg.moe_layers)
    self._routers = {n: {k: v for k, v in self.layers[n].items()
                         if k in ("mlp_norm", "router", "router_bias", "router_score_bias")}
                     for n in self._moe_order}
    self.tokenizer = tokenizer_lib.load(store_dir, self.manifest.get("tokenizer"),
                                        cfg.bos_token_id)
    self.eos_ids = set(cfg.eos_token_ids) | set(
        self.manifest.get("generation", {}).get("eos_token_ids", []))
    self._act = layers.ExpertAct.of(cfg)  # the experts' activation, a static jit argument
    # Optional observer: trace(layer, ids [T, k], h [T, H]) after each router (benchmarks).
    self.trace: Callable[[int, np.ndarray, jax.Array], None] | None = None
    self._kv_bytes = 0
    self._last = {"prompt_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0}

  # ---- public API ------------------------------------------------------------------------------
  def session(self, max_context: int | None = None) -> "Session":
    """A sequence to feed tokens into, keeping its KV cache between calls (see Session)."""
    return Session(self, max_context)

  def feed_batch(self, sessions: Sequence["Session"], token_ids: Sequence[int]) -> np.ndarray:
    """One decode step for several sequences at once: token_ids[i] goes to sessions[i].
    Returns float32 logits [len(sessions), vocab]."""
    return np.stack([s.feed([t]) for s, t in zip(sessions, token_ids)])

  def logits(self, token_ids: Sequence[int]) -> np.ndarray:
    """Teacher-forced logits float32 [len(token_ids), vocab] with a fresh cache."""
    tokens = self._check_tokens(token_ids)
    t0 = time.perf_counter()
    out = self.session(len(tokens)).feed(tokens, all_logits=True)
    self._last = {"prompt_tokens_per_s": len(tokens) / (time.perf_counter() - t0),
                  "decode_tokens_per_s": 0.0}
    return out

  def _head_rows(self, x, n: int) -> np.ndarray:
    """Logits of the first n rows of x, the head applied in blocks of rows ([T, vocab]
    temporaries of a 200k vocabulary are gigabytes)."""
    out = np.empty((n, self.cfg.vocab_size), np.float32)
    for r in range(0, n, HEAD_ROWS):
      out[r:r + HEAD_ROWS] = np.asarray(steps.head(self.cfg, self.globals, x[r:r + HEAD_ROWS]))[
          :n - r]
    return out

  def generate(self, token_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> list[int]:
    """The new tokens only; stops early only at the tokenizer's eos."""
    return list(self.stream(token_ids, max_new_tokens, Sampler(temperature, top_p, top_k, seed)))

  def stream(self, token_ids: Sequence[int], max_new_tokens: int,
             sampler: Sampler = Sampler()) -> Iterator[int]:
    """Yields new tokens one by one as they are decoded (arguments checked at the call)."""
    tokens = self._check_tokens(token_ids)
    if max_new_tokens < 0:
      raise ValueError("max_new_tokens must be >= 0")
    limit = self.max_context
    if len(tokens) + max_new_tokens > limit:
      whose = "planned" if self.plan else "model's"
      raise ValueError(f"prompt ({len(tokens)}) + max_new_tokens ({max_new_tokens}) exceeds the "
                       f"{whose} context of {limit} positions; shorten one of them.")
    return self._stream(tokens, max_new_tokens, sampler)

  def _stream(self, tokens: np.ndarray, max_new_tokens: int, sampler: Sampler) -> Iterator[int]:
    n = len(tokens)
    seq = self.session(n + max_new_tokens)
    self._last = {"prompt_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0}
    if max_new_tokens == 0:
      return
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
        "pool_slots": self.pool.num_slots,
        "pool_bytes": self.pool.nbytes,
        "pool_zero_copy": self.pool.zero_copy,
        "prefetch_reads": self.pool.prefetch_reads,
        "prefetch_used": self.pool.prefetch_used,
        "prefetch_errors": self.pool.prefetch_errors,
        "cache_policy": self.pool.policy,
        "io_wait_s": self.pool.io_wait_s,
        "disk_busy_s": self.experts.disk_busy.seconds(),
        "dense_bytes": self.dense_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        **self._last,
    }

  # ---- internals -------------------------------------------------------------------------------
  def _layers_ahead(self, layer: int) -> list[int]:
    i = self._moe_order.index(layer)
    return self._moe_order[i + 1:i + 1 + self.prefetch_depth]

  def _check_tokens(self, token_ids: Sequence[int]) -> np.ndarray:
    tokens = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if tokens.size == 0:
      raise ValueError("token_ids is empty: give at least one token.")
    if tokens.size > self.max_context:
      raise ValueError(f"{tokens.size} tokens exceed the context of {self.max_context} "
                       "positions (max_context, or the model's max_position_embeddings).")
    if tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size:
      raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}); got "
                       f"[{tokens.min()}, {tokens.max()}].")
    return tokens.astype(np.int32)

  def _new_cache(self, needed: int) -> "KVCache":
    """A cache for `needed` positions: rounded up (few shapes, few compilations) to a
    multiple of KV_ROUND or to the bucket a prompt of that length is padded to, but never
    beyond max_context (the memory plan's)."""
    padded = max(-(-needed // KV_ROUND) * KV_ROUND, _bucket(needed, 8))
    capacity = min(padded, max(needed, self.max_context))
    cache = KVCache(self.kv.init(self.cfg, capacity))
    cache.capacity = capacity
    self._kv_bytes = self.kv.nbytes(list(cache))
    return cache

  def _forward(self, tokens: np.ndarray, start: int, cache: "KVCache"):
    """Runs tokens at positions start.. through every layer. Returns (x [Tb, H], cache)."""
    cfg = self.cfg
    n = len(tokens)
    if start + n > cache.capacity:
      raise PlanError(f"KV cache too small for {start + n} positions.")
    # pad the prompt to a bucket (few compiled shapes) if the cache has room, else exactly
    tb = 1 if n == 1 else min(_bucket(n, 8), cache.capacity - start)
    padded = np.zeros(tb, np.int32)
    padded[:n] = tokens
    pos = jnp.asarray(start + np.arange(tb, dtype=np.int32))
    x = steps.embed(cfg, self.globals, jnp.asarray(padded))
    for layer, p in enumerate(self.layers):
      window = cfg.window(layer)
      if cfg.mlp_layer_types[layer] == DENSE_MLP:
        x, cache[layer] = steps.dense_layer(cfg, self.kv, window, p, x, pos, cache[layer])
        continue
      ahead = self._layers_ahead(layer) if (n == 1 and self.prefetch) else []
      h, xn, ids, weights, cache[layer], guesses = steps.attn_router(
          cfg, self.kv, window, p, x, pos, cache[layer], tuple(self._routers[a] for a in ahead))
      ids = np.asarray(ids)[:n]  # waits for this layer's router, hence for all earlier work
      if self.trace is not None:
        self.trace(layer, ids, h[:n])
      if n == 1:
        slots = self.pool.acquire(layer, ids[0])
        x = steps.moe_decode(cfg, self.experts.encoding, p, h, xn, weights,
                             tuple(self.pool.arrays(s) for s in slots))
        for a, guess in zip(ahead, guesses):  # reads overlap compute, nearest layer first
          self.pool.prefetch(a, np.asarray(guess)[0][:self.prefetch_width])
      else:
        x = self._moe_grouped(layer, p, h, xn, ids, np.asarray(weights)[:n])
    return x, cache

  def _moe_grouped(self, layer: int, p: dict, h, xn, ids: np.ndarray, weights: np.ndarray):
    """Prefill MoE: each expert picked by any token is read once and applied to its tokens.

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
        b = _bucket(len(tok), 2)
        idx = np.zeros(b, np.int32)
        idx[:len(tok)] = tok
        w = np.zeros(b, np.float32)
        w[:len(tok)] = weights[tok, kpos]
        acc = steps.expert_scatter_add(self.experts.encoding, acc, xn, idx, w,
                                       self.pool.arrays(slot), self._act)
      acc.block_until_ready()  # the next wave may refill these slots
    return steps.moe_finish(self.cfg, p, h, xn, acc)


class Session:
  """One sequence: feed it tokens, it keeps their KV cache. Build with `engine.session()`.

    seq = engine.session(max_context=None)   # None: the engine's max_context
    seq.feed(token_ids) -> float32 logits [vocab] of the last position
    seq.feed(token_ids, all_logits=True) -> [len(token_ids), vocab]
    seq.position          positions fed so far
    seq.kv_cache_bytes    bytes its cache holds

  The cache holds `max_context` positions when given; without it the cache starts small and
  grows (doubling, up to the engine's max_context) as tokens arrive.
  """

  def __init__(self, engine: Engine, max_context: int | None = None):
    if max_context is not None and not 0 < max_context <= engine.max_context:
      raise ValueError(f"max_context={max_context} must be in [1, {engine.max_context}] (the "
                       "engine's max_context).")
    self.engine = engine
    self.max_context = max_context or engine.max_context
    self.position = 0
    self._cache = engine._new_cache(max_context) if max_context else None

  @property
  def kv_cache_bytes(self) -> int:
    return 0 if self._cache is None else self.engine.kv.nbytes(list(self._cache))

  def feed(self, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
    eng = self.engine
    tokens = eng._check_tokens(token_ids)
    end = self.position + len(tokens)
    if end > self.max_context:
      raise ValueError(f"feeding {len(tokens)} tokens at position {self.position} exceeds this "
                       f"sequence's context of {self.max_context} positions.")
    if self._cache is None or end > self._cache.capacity:
      self._grow(end)
    x, self._cache = eng._forward(tokens, self.position, self._cache)
    self.position = end
    if all_logits:
      return eng._head_rows(x, len(tokens))
    return eng._head_rows(x[len(tokens) - 1:len(tokens)], 1)[0]

  def _grow(self, needed: int) -> None:
    """A cache for at least `needed` positions (doubling), the old positions copied in."""
    cap = min(self.max_context, max(needed, 2 * (self._cache.capacity if self._cache else 0)))
    new = self.engine._new_cache(cap)
    if self._cache is not None:
      for layer, old in enumerate(self._cache):
        new[layer] = jax.tree.map(
            lambda n, o: jax.lax.dynamic_update_slice(n, o, (0,) * o.ndim), new[layer], old)
    self._cache = new


HEAP_KEEP = 64 << 20  # freed heap memory glibc keeps for reuse (see keep_heap_warm)


def keep_heap_warm() -> None:
  """Tells glibc malloc to serve blocks up to 32 MB (its ceiling) from the heap and to keep up
  to HEAP_KEEP of freed memory at the top of a heap instead of handing it back to the OS at
  every free (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD). XLA-CPU mallocs each run's temporaries; a
  temporary of megabytes freed and allocated again on every decode step otherwise comes back
  as fresh pages, faulted in again each time: measured, the 4-bit TurboQuant decode attention
  over 4096 positions took 13 ms instead of 6-9 (its decoded keys and values are 16 MB each).
  Larger temporaries are always mapped fresh (16k positions, BUILD_NOTES). Only memory a step
  really used and freed is kept, up to HEAP_KEEP per malloc arena: malloc_trim (run after
  loading) does not shrink the tops of other threads' arenas, so N threads that each free a
  large block may keep N x HEAP_KEEP (a review reproduced +335 MB with 8 threads freeing 40 MB
  each). In the engine only XLA's executing thread makes such temporaries: measured +4.3 MB
  RSS over 60 TurboQuant attention calls (+31.8 MB without this), the same memory plan, and
  the same cgroup peak in the 2 GB streaming benchmark (1746-1747 vs 1723-1737 MB). Padding
  the heap instead (M_TOP_PAD) measured 140 MB more resident at the plan and cost 5 of 67
  slots under 2 GB."""
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (fixed; 32 MB is the most glibc accepts)
    libc.mallopt(-1, HEAP_KEEP)  # M_TRIM_THRESHOLD
  except (OSError, AttributeError):
    pass  # not glibc: nothing to do


def _return_freed_memory() -> None:
  """Hands the heap's free pages back to the OS (glibc malloc_trim): restoring and re-encoding
  the dense params frees gigabytes that would otherwise stay resident, and be planned around
  (measured: 2.26 -> 2.13 GB resident after loading a gpt-oss-120b slice)."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass  # not glibc: nothing to do


def _to_device(tree: dict) -> dict:
  """jax.device_put leaf by leaf, dropping each host array as soon as it is on the device, so
  loading never holds two copies of the dense params (a 200k-vocab head is 1.2 GB). Measured
  on a gpt-oss slice: with one asynchronous device_put of every part, the copies landed after
  the plan had measured memory and took 0.94 GB the plan had given to expert slots."""
  out = {}
  for key in list(tree):
    leaf = tree.pop(key)
    # device_put is asynchronous: wait, so that the host copy is really gone and the memory
    # plan (made right after loading) measures the copies that will stay
    out[key] = _to_device(leaf) if isinstance(leaf, dict) else jax.device_put(
        leaf).block_until_ready()
    del leaf
  return out


DENSE_MATRICES = ("wqkv", "wo", "w_gate_up", "w_down", "shared_w_gate_up", "shared_w_down")
DENSE_DTYPES = ("bfloat16", "int8")


def _reencode_dense(parts: dict, cfg: MoEConfig, dtype: str) -> None:
  """In place: every matrix of DENSE_MATRICES and the output head to `dtype` (see load). A tied
  head gets its own re-encoded copy; the embedding lookup keeps the stored rows."""
  if dtype not in DENSE_DTYPES:
    raise ValueError(f"dense_dtype={dtype!r} is not one of {', '.join(DENSE_DTYPES)}.")
  enc = Encoding(dtype)

  def one(w):
    # row blocks: both encodings are per row, and a 200k-row head in float32 would be 2.3 GB
    blocks = [enc.encode(np.asarray(w[r:r + 4096], np.float32)) for r in range(0, len(w), 4096)]
    arrays = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
    return arrays[""] if dtype != "int8" else arrays
  g = parts["globals"]
  g["lm_head"] = one(g["embed"] if cfg.tie_word_embeddings else g.pop("lm_head"))
  for name, part in parts.items():
    if name != "globals":
      for key in DENSE_MATRICES:
        if key in part:
          part[key] = one(part[key])


def load(store_dir: str, memory_budget_gb: float | None = None, expert_slots: int | None = None,
         kv_bits: float | None = None, k_bits: float | None = None,
         v_bits: float | None = None, prefetch: bool = True,
         cache_policy: str = "lfu", max_context: int | None = None,
         dense_dtype: str | None = None) -> Engine:
  """Opens a converted store. See `Engine` for the API.

  kv_bits (or k_bits / v_bits separately): TurboQuant KV cache at 1-4 bits per coordinate
  (2.5 and 3.5 too); None keeps a float32 cache. prefetch: in decode, start reading the
  experts the next layer's router predicts while this layer's experts run.
  cache_policy: which pool slot a miss refills, "lru", "lfu" or "layer" (store/pool.py).
  max_context: positions a sequence may reach (prompt + new tokens); default the model's
  max_position_embeddings (with a memory budget: at most 4096, the KV cache is planned for it).
  dense_dtype: re-encode the dense matrices read every token (attention, dense and shared MLPs,
  output head; not the router, norms or embedding lookup) at load: "bfloat16" or "int8" (per
  output row scales); None keeps the store's. They bound decode speed at small batch.
  """
  return Engine(store_dir, expert_slots=expert_slots, memory_budget_gb=memory_budget_gb,
                kv_bits=kv_bits, k_bits=k_bits, v_bits=v_bits, prefetch=prefetch,
                cache_policy=cache_policy, max_context=max_context, dense_dtype=dense_dtype)
