"""lazymoe_jax/store/pool.py: the expert slot pool. Its policies choose exactly the victims they
promise; prefetch never changes results, even when it guesses wrong; read errors are reported
by the miss that needs the expert and leave nothing unchecked resident.

The pools are built directly on a tiny torch-free store (3 layers of 6 experts, top-2) where
the test is about the pool; through the engine where it is about results."""

import collections
import gc
import os
import shutil
import time
import weakref

import numpy as np
import pytest

import lazymoe_jax
from lazymoe_jax import kernels
from lazymoe_jax.engine.prefetch import PrefetchPolicy, ranked_union
from lazymoe_jax.store import format as fmt
from lazymoe_jax.store.experts import Cancelled, ExpertStore
from lazymoe_jax.store.pool import ExpertPool
from tests.checkpoints import hf_config
from tests.conftest import token_ids

K = hf_config("mixtral")["num_experts_per_tok"]  # 2
N_LAYERS = hf_config("mixtral")["num_hidden_layers"]  # 3
N_EXPERTS = hf_config("mixtral")["num_local_experts"]  # 6


@pytest.fixture(scope="module")
def store(tiny_stores):
  return tiny_stores["mixtral"][1]


def _pool(store, slots, policy="lru"):
  return ExpertPool(ExpertStore(store, fmt.read_manifest(store)), slots, K, policy)


def _damaged_copy(src, tmp_path, chunks):
  store = tmp_path / "store"
  shutil.copytree(src, store)
  for name, row, expert in chunks:
    os.remove(fmt.chunk_path(str(store), name, row, expert))
  return str(store)


# ---- policies, exactly ----------------------------------------------------------------------

def test_lru_evicts_the_least_recently_used(store):
  pool = _pool(store, 3, "lru")
  pool.acquire(0, [0, 1])
  pool.acquire(0, [2])
  pool.acquire(0, [0])  # 1 is now the least recently used
  pool.acquire(0, [3])
  assert set(pool.table) == {(0, 0), (0, 2), (0, 3)}
  assert (pool.hits, pool.misses) == (1, 4)
  assert pool.bytes_read == 4 * pool.store.bytes_per_expert


def test_lfu_evicts_the_least_used_then_the_oldest(store):
  pool = _pool(store, 3, "lfu")
  for experts in ([0, 1], [0, 1], [2], [0], [3]):  # uses: 0 x3, 1 x2, 2 x1 -> 2 goes
    pool.acquire(0, experts)
  assert set(pool.table) == {(0, 0), (0, 1), (0, 3)}
  pool.acquire(0, [4])  # 3 (one use) goes, not 1 (two)
  assert set(pool.table) == {(0, 0), (0, 1), (0, 4)}


def test_layer_policy_evicts_within_a_layer_at_its_quota(store):
  pool = _pool(store, 3 * 2, "layer")  # a quota of 2 slots per layer
  assert pool.quota == 2
  pool.acquire(0, [0, 1])
  pool.acquire(1, [0, 1])
  pool.acquire(2, [0, 1])
  pool.acquire(0, [2])  # layer 0 holds its quota: it evicts its own (0, 0), not layer 1's
  assert set(pool.table) == {(0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1)}


def test_hits_are_pinned_before_misses_choose_victims(store):
  pool = _pool(store, 2, "lru")
  pool.acquire(0, [0, 1])
  pool.acquire(0, [2, 0])  # the miss (2) must evict 1, not the hit (0)
  assert pool.misses == 3 and pool.hits == 1
  assert set(pool.table) == {(0, 0), (0, 2)}


def test_bad_pool_settings_are_refused(store):
  with pytest.raises(ValueError, match="not one of lru, lfu, layer"):
    _pool(store, 4, "fifo")
  with pytest.raises(lazymoe_jax.PlanError, match="at least 2"):
    _pool(store, 1)
  pool = _pool(store, 2)
  with pytest.raises(lazymoe_jax.PlanError, match="3 experts requested at once but the pool "
                     "has 2 slots"):
    pool.acquire(0, [0, 1, 2])


def test_pool_smaller_than_top_k_is_refused(store):
  with pytest.raises(lazymoe_jax.PlanError, match="at least 2"):
    lazymoe_jax.load(store, expert_slots=1)


# ---- results never depend on the pool ---------------------------------------------------------

@pytest.mark.parametrize("policy", ["lru", "lfu", "layer"])
def test_every_cache_policy_gives_identical_results(store, policy):
  prompt, ids = token_ids(6, seed=3), token_ids(20, seed=4)
  resident = lazymoe_jax.load(store, expert_slots=10_000, prefetch=False)
  resident.eos_ids = set()
  want_tokens, want_logits = resident.generate(prompt, 16), resident.logits(ids)
  used = len(resident.pool.table)  # every (layer, expert) the run routes to, read once each
  assert resident.stats()["expert_misses"] == used
  for slots in (K, K + 1, 3 * K):
    t0 = time.perf_counter()
    engine = lazymoe_jax.load(store, expert_slots=slots, cache_policy=policy)
    engine.eos_ids = set()
    assert engine.generate(prompt, 16) == want_tokens
    np.testing.assert_array_equal(engine.logits(ids), want_logits)
    st = engine.stats()
    elapsed = time.perf_counter() - t0
    # every miss waited for its read, inside this interval (a bound, not a speed test)
    assert st["cache_policy"] == policy
    # every expert used was read at least once: by its miss or by a guess it then used
    assert st["expert_misses"] + st["prefetch_used"] >= used
    assert 0 < st["io_wait_s"] <= elapsed
    # demand reads whole experts; a guess read whole unless cancelled as unneeded mid-way
    assert st["demand_bytes"] == st["expert_misses"] * engine.experts.bytes_per_expert
    assert st["bytes_read"] == st["demand_bytes"] + st["speculative_bytes"]
    assert st["speculative_bytes"] <= st["prefetch_reads"] * engine.experts.bytes_per_expert
    assert st["unused_speculative_bytes"] <= st["speculative_bytes"]
    assert len(engine.pool.table) <= slots
  with pytest.raises(ValueError, match="not one of lru, lfu, layer"):
    lazymoe_jax.load(store, cache_policy="fifo")


def test_layer_policy_keeps_each_layers_share(store):
  engine = lazymoe_jax.load(store, expert_slots=K * N_LAYERS, cache_policy="layer",
                            prefetch=False)
  engine.eos_ids = set()
  engine.generate(token_ids(1, seed=9), 24)
  held = collections.Counter(layer for layer, _ in engine.pool.table)
  assert held == {layer: K for layer in range(N_LAYERS)}  # a miss evicts within its own layer


def test_prefetch_changes_nothing_even_when_it_guesses_wrong(store):
  prompt = token_ids(6, seed=7)
  plain = lazymoe_jax.load(store, expert_slots=2 * K, prefetch=False)
  plain.eos_ids = set()
  want = plain.generate(prompt, 20)
  assert plain.stats()["prefetch_reads"] == 0
  fetching = lazymoe_jax.load(store, expert_slots=2 * K)
  fetching.eos_ids = set()
  assert fetching.generate(prompt, 20) == want
  st = fetching.stats()
  assert st["prefetch_reads"] > 0 and 0 < st["prefetch_used"] <= st["prefetch_reads"]
  assert st["expert_misses"] < plain.stats()["expert_misses"]  # guesses that landed saved reads
  wrong = lazymoe_jax.load(store, expert_slots=2 * K)
  wrong.eos_ids = set()
  rng = np.random.default_rng(0)
  for nxt in wrong.forward.routers.values():  # the guessing routers, not the real ones
    nxt["router"] = rng.standard_normal(nxt["router"].shape).astype(np.float32)
  assert wrong.generate(prompt, 20) == want
  # the default policy measures these guesses as mostly unused and reads none of them ...
  assert wrong.stats()["prefetch_reads"] == 0
  policy = wrong.forward.policy
  assert all(row["used_rate"] < policy.threshold_for(row["kind"]) or row["made"] < policy.min_samples
             for row in policy.table())
  # ... and one that reads every guess still changes nothing
  wrong.forward.policy = PrefetchPolicy(threshold=0.0, min_samples=0)
  assert wrong.generate(prompt, 20) == want
  assert wrong.stats()["prefetch_reads"] > 0


# ---- read errors ------------------------------------------------------------------------------

def test_read_error_during_prefetch_is_a_clear_error(store, tmp_path):
  damaged = _damaged_copy(store, tmp_path, [("w_gate_up", 1, e) for e in range(N_EXPERTS)])
  engine = lazymoe_jax.load(damaged, expert_slots=4)  # every expert of layer 1 is gone
  engine.eos_ids = set()
  with pytest.raises(lazymoe_jax.StoreError, match=r"c/1/\d/0/0 is missing"):
    engine.generate(token_ids(1), 5)


def test_a_guess_whose_read_fails_changes_nothing(store, tmp_path):
  """A damaged expert that was only guessed never fails a run that does not route to it; when
  it is routed to, the miss reports it."""
  pool = _pool(_damaged_copy(store, tmp_path, [("w_down", 2, 5)]), 6)
  pool.acquire(0, [0, 1])
  pool.prefetch(2, [5])
  pool.drain()  # the guess's read fails and is dropped (not cancelled first: acquire(2) would)
  assert pool.prefetch_errors == 1
  pool.acquire(1, [0, 1])
  assert pool.acquire(2, [0, 1]) and pool.prefetch_errors == 1
  assert (2, 5) not in pool.table
  with pytest.raises(lazymoe_jax.StoreError, match=r"c/2/5/0/0 is missing"):
    pool.acquire(2, [5])


def test_a_failed_acquire_leaves_nothing_unchecked_resident(store, tmp_path):
  pool = _pool(_damaged_copy(store, tmp_path, [("w_gate_up", 1, 3)]), 4)
  with pytest.raises(lazymoe_jax.StoreError, match=r"c/1/3/0/0 is missing"):
    pool.acquire(1, [2, 3])
  assert (1, 2) not in pool.table and (1, 3) not in pool.table
  assert pool.acquire(1, [2]) and pool.misses == 3  # read again, checked


# ---- decode's fast paths (BUILD_NOTES "Per-layer overhead") -----------------------------------

def test_all_hit_acquire_keeps_the_same_books(store):
  """acquire's all-hit path counts hits, uses, recency and used guesses as the general path."""
  pool = _pool(store, 4, "lfu")
  pool.acquire(0, [0, 1])
  pool.prefetch(1, [2])
  pool.acquire(0, [1, 0, 1])  # all hits (the guess for layer 1 lands here)
  assert (pool.hits, pool.misses) == (3, 2)
  assert pool.uses[(0, 0)] == 2 and pool.uses[(0, 1)] == 3
  assert list(pool.lru)[-2:] == [pool.table[(0, 0)], pool.table[(0, 1)]]  # most recent last
  assert pool.in_use == {pool.table[(0, 0)], pool.table[(0, 1)]}
  assert pool.acquire(1, [2]) == [pool.table[(1, 2)]]  # the landed guess, all hits
  assert (pool.prefetch_used, pool.prefetched, pool.hits) == (1, set(), 4)


def test_holds_layer_follows_the_table(store):
  pool = _pool(store, N_EXPERTS + 1, "lru")
  pool.acquire(0, range(N_EXPERTS - 1))
  assert not pool.holds_layer(0)
  pool.acquire(0, [N_EXPERTS - 1])
  assert pool.holds_layer(0) and not pool.holds_layer(1)
  pool.acquire(1, [0, 1])  # the second evicts layer 0's least recently used expert
  assert not pool.holds_layer(0)
  assert pool.held == collections.Counter(layer for layer, _ in pool.table)


def test_guesses_are_skipped_for_layers_held_whole_without_changing_results(store):
  """With every expert resident the routers program computes no guesses; logits and tokens
  are bit-identical to a minimal pool that guesses and prefetches."""
  prompt, ids = token_ids(6, seed=11), token_ids(12, seed=12)
  small = lazymoe_jax.load(store, expert_slots=2 * K)  # too few to hold a layer whole
  small.forward.policy = PrefetchPolicy(threshold=0.0, min_samples=0)  # reads every guess
  small.eos_ids = set()
  want_tokens, want_logits = small.generate(prompt, 12), small.logits(ids)
  assert small.stats()["prefetch_reads"] > 0
  resident = lazymoe_jax.load(store, expert_slots=N_LAYERS * N_EXPERTS)
  for layer in range(N_LAYERS):
    resident.pool.acquire(layer, range(N_EXPERTS))
  assert all(resident.forward._layers_ahead(layer) == [] for layer in range(N_LAYERS))
  assert small.forward._layers_ahead(0) == [1, 2]
  resident.eos_ids = set()
  assert resident.generate(prompt, 12) == want_tokens
  np.testing.assert_array_equal(resident.logits(ids), want_logits)
  assert resident.stats()["prefetch_reads"] == 0
  # with the native kernels the resident engine decodes each token in one program
  # (steps.decode_step), and still bit for bit as the minimal pool
  assert (resident.forward.whole_steps > 0) == (kernels.mode() == "native")
  assert small.stats()["whole_steps"] == 0
  seq = resident.session()
  seq.feed(prompt)
  hits, steps = resident.pool.hits, resident.stats()["whole_steps"]
  seq.feed([3])  # one token, all hits: k per MoE layer, counted as the layer loop does
  assert resident.pool.hits - hits == N_LAYERS * K
  assert resident.stats()["whole_steps"] - steps == (kernels.mode() == "native")

# ---- prefetch that pays for itself: demand first, the confidence rule, prefill order ------------

def test_a_guess_waits_behind_demand_reads_and_can_be_cancelled(store):
  experts = ExpertStore(store, fmt.read_manifest(store))
  bufs = lambda: {n: np.zeros(s, experts.dtypes[n]) for n, s in experts.shapes.items()}  # noqa: E731
  experts.gate.demand_start()  # a demand read in flight
  guess = experts.start_read(1, 3, bufs(), speculative=True)
  time.sleep(0.3)
  assert not experts.read_done(guess) and experts.bytes_done(guess) == 0  # it waits its turn
  experts.gate.demand_stop()
  assert experts.finish_read(guess) == experts.bytes_per_expert
  assert experts.bytes_done(guess) == experts.bytes_per_expert
  experts.gate.demand_start()
  guess = experts.start_read(1, 4, bufs(), speculative=True)
  experts.cancel(guess)
  with pytest.raises(Cancelled):
    experts.finish_read(guess)
  assert experts.bytes_done(guess) == 0
  experts.gate.demand_stop()
  # a demand read never waits: it goes while the gate is held
  experts.gate.demand_start()
  assert experts.read_into(1, 5, bufs()) == experts.bytes_per_expert
  experts.gate.demand_stop()
  assert experts.gate.demand_in_flight == 0


def test_a_cancelled_or_failed_read_keeps_nothing_of_its_caller_alive(store, tmp_path):
  """finish_read raising (a cancelled guess, a damaged chunk) makes no reference cycle: its
  caller's frame, and what that holds (in the engine: the decode step's activations and the
  batch's KV stack), is freed on return, not at the next garbage collection. The futures'
  own exceptions re-raised there made one, and kept 135 MB of KV stack past the server's
  warm-up (BUILD_NOTES "The server's memory beyond its plan")."""
  damaged = _damaged_copy(store, tmp_path, [("w_down", 2, 5)])
  for path, layer, expert, cancel, error in ((store, 1, 4, True, Cancelled),
                                             (damaged, 2, 5, False, lazymoe_jax.StoreError)):
    experts = ExpertStore(path, fmt.read_manifest(path))
    bufs = {n: np.zeros(s, experts.dtypes[n]) for n, s in experts.shapes.items()}
    held = []

    def caller():
      alive = np.zeros(4)  # what the caller's frame holds  # noqa: B023
      held.append(weakref.ref(alive))  # noqa: B023
      if cancel:  # noqa: B023
        experts.gate.demand_start()  # noqa: B023  (holds the guess back: cancelled unstarted)
      handle = experts.start_read(layer, expert, bufs, speculative=True)  # noqa: B023
      if cancel:  # noqa: B023
        experts.cancel(handle)  # noqa: B023
      try:
        experts.finish_read(handle)  # noqa: B023
      except error:  # noqa: B023
        return True
      finally:
        if cancel:  # noqa: B023
          experts.gate.demand_stop()  # noqa: B023
      return False

    gc.disable()
    try:
      assert caller()
      assert held[0]() is None, f"{error.__name__}: the caller's frame outlived the call"
    finally:
      gc.enable()


def test_an_unneeded_guess_in_flight_is_cancelled_when_its_layer_routes(store):
  pool = _pool(store, 6)
  pool.acquire(0, [0, 1])
  pool.store.gate.demand_start()  # holds the guesses back
  pool.prefetch(1, [4, 5])
  pool.acquire(1, [0, 1])  # 4 and 5 were not needed: cancelled, never resident
  pool.store.gate.demand_stop()
  assert pool.prefetch_cancelled == 2 and pool.prefetch_reads == 2
  assert pool.speculative_bytes == pool.unused_bytes == 0
  assert (1, 4) not in pool.table and (1, 5) not in pool.table
  assert pool.demand_bytes == 4 * pool.store.bytes_per_expert == pool.bytes_read
  pool.prefetch(2, [3])  # a needed guess lands and is counted used
  pool.acquire(2, [3, 0])
  assert pool.prefetch_used == 1 and pool.speculative_bytes == pool.store.bytes_per_expert
  assert pool.unused_bytes == 0


def test_policy_reads_only_kinds_of_guess_measured_above_the_threshold():
  policy = PrefetchPolicy(threshold=0.5, min_samples=4)
  for layer in range(4):  # rank 0 always right, rank 1 right once in four
    assert policy.choose(layer, "decode", 1, [(7, 0), (8, 1)]) == []  # unmeasured: not read
    policy.observe(layer, [7] + ([8] if layer == 0 else []))
  assert policy.rate("decode", 1, 0) == 1.0 and policy.rate("decode", 1, 1) == 0.25
  assert policy.rate("decode", 2, 0) is None and policy.rate("prefill", 1, 0) is None
  assert policy.choose(9, "decode", 1, [(3, 0), (2, 1)]) == [3]
  assert policy.choose(9, "decode", 2, [(3, 0)]) == []  # another distance: measured apart
  policy.observe(9, [2])  # the rank-0 guess was wrong this time: 4 of 5
  assert policy.rate("decode", 1, 0) == 0.8 and policy.rate("decode", 1, 1) == 0.4
  assert [(r["distance"], r["rank"], r["made"], r["read"]) for r in policy.table()] == [
      (1, 0, 5, 1), (1, 1, 5, 0), (2, 0, 1, 0)]
  with pytest.raises(ValueError, match="threshold=1.5 must be in"):
    PrefetchPolicy(threshold=1.5)


def test_ranked_union_orders_by_rank_then_row_each_expert_once():
  rows = np.array([[5, 1, 2], [1, 5, 3], [4, 2, 0]])
  assert ranked_union(rows) == [(5, 0), (1, 0), (4, 0), (2, 1), (3, 2), (0, 2)]


@pytest.mark.parametrize("prefetch", [False, True])
def test_prefill_reads_each_expert_once_in_disk_order(store, prefetch):
  engine = lazymoe_jax.load(store, expert_slots=N_LAYERS * N_EXPERTS, prefetch=prefetch)
  engine.forward.policy = PrefetchPolicy(threshold=0.0, min_samples=0)  # read every guess
  reads = []
  start = engine.experts.start_read
  engine.experts.start_read = lambda layer, e, bufs, speculative=False: (
      reads.append((layer, e, speculative)), start(layer, e, bufs, speculative))[1]
  engine.logits(token_ids(16, seed=5))
  keys = [(layer, e) for layer, e, _ in reads]
  assert len(keys) == len(set(keys))  # each (layer, expert) read once, demand or guessed
  for layer in range(N_LAYERS):
    for spec in (False, True):  # a layer's misses, and its guesses, each in expert order
      got = [e for l, e, s in reads if l == layer and s == spec]
      assert got == sorted(got)
  assert any(s for _, _, s in reads) == (prefetch and N_LAYERS > 1)
  used = {key for key in engine.pool.table}
  assert {(l, e) for l, e, s in reads if not s} <= used


def test_policy_thresholds_per_kind_of_guess():
  """The default reads a decode guess only at a measured use rate of 0.75, a prefill guess at
  0.5 (engine/prefetch.THRESHOLDS); a rate of 0.6 is read for prefill and not for decode."""
  policy = PrefetchPolicy(min_samples=5)
  assert policy.threshold_for("decode") == 0.75 and policy.threshold_for("prefill") == 0.5
  for layer in range(5):  # used 3 times in 5, for both kinds
    policy.choose(layer, "decode", 1, [(4, 0)])
    policy.choose(layer + 100, "prefill", 1, [(4, 0)])
    policy.observe(layer, [4] if layer < 3 else [5])
    policy.observe(layer + 100, [4] if layer < 3 else [5])
  assert policy.rate("decode", 1, 0) == policy.rate("prefill", 1, 0) == 0.6
  assert policy.choose(9, "decode", 1, [(4, 0)]) == []
  assert policy.choose(109, "prefill", 1, [(4, 0)]) == [4]
  with pytest.raises(ValueError, match="threshold=-0.1 must be in"):
    PrefetchPolicy(threshold={"decode": -0.1, "prefill": 0.5})
def test_guess_distance_counts_the_layers_held_whole(store):
  """A layer the pool holds whole gets no guesses, and the next layer's guesses keep their true
  distance: layer 0 guesses layer 2 at distance 2 (not 1, as if layer 1 were not there)."""
  steps = 12  # generate from a one-token prompt: 12 single-token feeds, each guessing ahead
  engine = lazymoe_jax.load(store, expert_slots=N_EXPERTS + 4)  # layers 0 and 2 never whole
  for _ in range(1000):  # lfu: layer 1's experts are used far more than any other expert
    engine.pool.acquire(1, range(N_EXPERTS))
  engine.eos_ids = set()
  tokens = engine.generate([5], steps)
  assert [engine.pool.holds_layer(layer) for layer in range(N_LAYERS)] == [False, True, False]
  # every feed: layer 0 guesses layer 2 (distance 2), layer 1 guesses layer 2 (distance 1),
  # K ranks each; none for layer 1 (held whole) nor beyond the last layer
  assert {(r["kind"], r["distance"], r["rank"]): r["made"]
          for r in engine.forward.policy.table()} == {
              ("decode", d, rank): steps for d in (1, 2) for rank in range(K)}
  plain = lazymoe_jax.load(store, expert_slots=1000, prefetch=False)
  plain.eos_ids = set()
  assert plain.generate([5], steps) == tokens


# ---- guesses across the waves of one layer ------------------------------------------------------

def test_a_later_waves_guess_is_kept_not_cancelled(store):
  """acquire(..., later=) keeps the guesses a later wave of the same step needs: in flight, not
  cancelled; an unneeded guess of the layer is still cancelled."""
  pool = _pool(store, 4)
  bpe = pool.store.bytes_per_expert
  pool.store.gate.demand_start()  # holds the guesses back
  pool.prefetch(0, [5, 3])
  pool.acquire(0, [0, 1], later=[5])  # the first wave; 5 is for the second, 3 for none
  assert (0, 5) in pool.pending and (0, 3) not in pool.pending
  assert pool.guesses(0) == {5}
  pool.store.gate.demand_stop()
  pool.acquire(0, [2, 5])  # the second wave: 5 lands and is used
  assert (pool.prefetch_reads, pool.prefetch_cancelled, pool.prefetch_used) == (2, 1, 1)
  assert (pool.hits, pool.misses) == (1, 3)
  assert (pool.demand_bytes, pool.speculative_bytes, pool.unused_bytes) == (3 * bpe, bpe, 0)
  assert pool.guesses(0) == set()


def test_multi_wave_prefill_keeps_the_guesses_its_later_waves_use(store):
  """A pool of 3 slots and a prompt whose every layer needs 4 experts: two waves per layer.
  Layer 0's guesses 5 (needed, second wave) and 3 (not needed) have landed. The first wave
  keeps 5's slot (it is one expert shorter for it), gives 3's up (unused); the second wave
  uses 5: one read saved, each expert read once, the books exact; logits unchanged."""
  prompt = token_ids(3, seed=0)
  resident = lazymoe_jax.load(store, expert_slots=1000, prefetch=False)
  routed = {}
  resident.forward.trace = lambda layer, ids, h: routed.setdefault(
      layer, sorted(set(ids.reshape(-1).tolist())))
  want = resident.logits(prompt)
  # the precondition of the counts below: this prompt routes each layer to 4 experts
  assert routed == {0: [0, 1, 2, 5], 1: [1, 2, 4, 5], 2: [0, 2, 4, 5]}
  engine = lazymoe_jax.load(store, expert_slots=3, prefetch=False)  # only the guesses below
  pool, bpe = engine.pool, engine.experts.bytes_per_expert
  pool.prefetch(0, [5, 3])
  pool.drain()
  assert pool.speculative_bytes == 2 * bpe and pool.guesses(0) == {5, 3}
  np.testing.assert_array_equal(engine.logits(prompt), want)
  # layer 0: waves [0, 1] (5 kept) and [2, 5] (5 a hit); layers 1, 2: [a, b, c] and [d]
  assert (pool.hits, pool.misses, pool.prefetch_used) == (1, 3 + 4 + 4, 1)
  assert pool.demand_bytes == 11 * bpe and pool.unused_bytes == bpe  # 3 only
  assert pool.bytes_read == pool.demand_bytes + pool.speculative_bytes == 13 * bpe
