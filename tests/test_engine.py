"""The engine's public step API (engine/): sessions and their caches, batched decode, options,
token checks. On torch-free tiny stores (tests/checkpoints.py)."""

import jax
import numpy as np
import pytest

import lazymoe_jax
from lazymoe_jax import kernels
from lazymoe_jax.engine import forward
from tests.conftest import convert_cli, token_ids


@pytest.fixture(scope="module")
def mixtral(tiny_stores):
  return tiny_stores["mixtral"][1]


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])  # dense / sinks+window / latent
def test_feed_prompt_then_tokens_equals_logits_of_the_whole(tiny_stores, family):
  store = tiny_stores[family][1]
  engine = lazymoe_jax.load(store, expert_slots=4)
  ids = token_ids(24, seed=5)
  full = engine.logits(ids)
  seq = engine.session()  # no max_context: the cache is made at the first feed, grown as needed
  rows = [seq.feed(ids[:7], all_logits=True)]
  for t in ids[7:]:
    rows.append(seq.feed([t])[None])
  np.testing.assert_allclose(np.concatenate(rows), full, atol=1e-5, rtol=0)
  assert seq.position == 24
  assert seq.cache.capacity == 256  # the first feed rounds up to KV_ROUND: the whole context
  assert seq.kv_cache_bytes == engine.kv.nbytes(list(seq.cache))
  last = engine.session(24)
  np.testing.assert_allclose(last.feed(ids), full[-1], atol=1e-5, rtol=0)


def test_advance_is_feed_without_the_head(mixtral):
  engine = lazymoe_jax.load(mixtral, expert_slots=4)
  ids = token_ids(12, seed=6)
  a, b = engine.session(), engine.session()
  a.advance(ids[:8])
  b.feed(ids[:8])
  np.testing.assert_array_equal(a.feed(ids[8:]), b.feed(ids[8:]))


def test_session_refuses_past_its_context(mixtral):
  engine = lazymoe_jax.load(mixtral, expert_slots=4, max_context=32)
  seq = engine.session(10)
  seq.feed(token_ids(10))
  with pytest.raises(ValueError, match="exceeds this sequence's context of 10"):
    seq.feed([5])
  with pytest.raises(ValueError, match=r"max_context=64 must be in \[1, 32\]"):
    engine.session(64)


def test_feed_batch_equals_each_sequence_alone(mixtral):
  """Four sequences at different positions, one step together: each gets the logits it gets
  alone, and the batch reads each expert it needs once per layer."""
  engine = lazymoe_jax.load(mixtral, expert_slots=1000, prefetch=False)
  prompts = [token_ids(n, seed=s) for n, s in ((5, 1), (9, 2), (3, 3), (12, 4))]
  nxt = [7, 11, 13, 17]
  alone = []
  for p, t in zip(prompts, nxt):
    seq = engine.session()
    seq.feed(p)
    alone.append(seq.feed([t]))
  seqs = [engine.session() for _ in prompts]
  for s, p in zip(seqs, prompts):
    s.feed(p)
  before = engine.stats()
  got = engine.feed_batch(seqs, nxt)
  after = engine.stats()
  np.testing.assert_allclose(got, np.stack(alone), atol=1e-5, rtol=0)
  assert [s.position for s in seqs] == [len(p) + 1 for p in prompts]
  acquires = (after["expert_hits"] + after["expert_misses"] -
              before["expert_hits"] - before["expert_misses"])
  spec = engine.spec
  assert acquires <= len(spec.moe_layers) * min(4 * spec.num_experts_per_tok, spec.num_experts)
  # and it goes on: a second step for two of them
  seqs[0].feed([3])
  again = engine.feed_batch(seqs[1:3], [5, 6])
  assert again.shape == (2, spec.vocab_size)
  with pytest.raises(ValueError, match="same session twice"):
    engine.feed_batch([seqs[0], seqs[0]], [1, 2])
  with pytest.raises(ValueError, match="one token per session"):
    engine.feed_batch(seqs, [1])


def test_batched_greedy_decode_equals_generate(mixtral):
  engine = lazymoe_jax.load(mixtral, expert_slots=4)
  engine.eos_ids = set()
  prompts = [token_ids(n, seed=s).tolist() for n, s in ((6, 7), (4, 8), (9, 9))]
  want = [engine.generate(p, 10) for p in prompts]
  seqs = [engine.session() for _ in prompts]
  toks = [int(np.argmax(s.feed(p))) for s, p in zip(seqs, prompts)]
  out = [[t] for t in toks]
  for _ in range(9):
    logits = engine.feed_batch(seqs, toks)
    toks = [int(np.argmax(row)) for row in logits]
    for o, t in zip(out, toks):
      o.append(t)
  assert out == want


@pytest.mark.parametrize("family,expert_dtype", [
    ("mixtral", None), ("mixtral", "int8"), ("gpt_oss", "int4"), ("gpt_oss", "mxfp4"),
    ("deepseek_v3", None), ("qwen2_moe", "int8")])  # biases, sinks; latent, dense layer; shared
def test_a_resident_batch_decodes_in_one_program_bit_for_bit(tiny_stores, tmp_path, family,
                                                             expert_dtype):
  """Every expert resident: a batched decode step runs as one program
  (steps.decode_batch_step, native kernels) and gives the layer loop's logits bit for bit,
  with a padding slot (3 sequences in 4 slots) and the acquires counted as the loop counts
  them."""
  store = tiny_stores[family][1]
  if expert_dtype is not None:
    store = str(tmp_path / "store")
    res = convert_cli(tiny_stores[family][0], store, f"--expert_dtype={expert_dtype}")
    assert res.returncode == 0, res.stderr[-2000:]
  engine = lazymoe_jax.load(store, prefetch=False)
  assert engine.load_all_experts()
  prompts = [token_ids(n, seed=s) for n, s in ((5, 1), (9, 2), (3, 3))]
  steps = [token_ids(4, seed=20 + i) for i in range(4)]

  def decode(whole_step):
    engine.forward.whole_step = whole_step
    seqs = [engine.session() for _ in prompts]
    for s, p in zip(seqs, prompts):
      s.feed(p)
    hits, whole = engine.pool.hits, engine.stats()["whole_steps"]
    out = [engine.feed_batch(seqs, step[:3]) for step in steps]
    assert engine.batch.num_slots == 4
    for s in seqs:
      s.close()
    return np.stack(out), engine.pool.hits - hits, engine.stats()["whole_steps"] - whole

  small = lazymoe_jax.load(store, expert_slots=engine.spec.num_experts)  # one layer's worth
  assert not small.load_all_experts() and small.stats()["expert_misses"] == 0  # nothing read
  loop, loop_hits, loop_whole = decode(False)
  one, one_hits, one_whole = decode(True)
  assert loop_whole == 0
  assert one_whole == (4 * 3 if kernels.mode() == "native" else 0)
  np.testing.assert_array_equal(one, loop)
  assert one_hits == loop_hits and engine.stats()["expert_misses"] == \
      len(engine.spec.moe_layers) * engine.spec.num_experts  # read once, by load_all_experts


@pytest.mark.parametrize("family,expert_dtype", [
    ("mixtral", None), ("mixtral", "int8"), ("gpt_oss", "int4"), ("gpt_oss", "mxfp4"),
    ("deepseek_v3", None), ("qwen2_moe", "int8")])
def test_pooled_waves_equal_expert_by_expert(tiny_stores, tmp_path, family, expert_dtype,
                                            monkeypatch):
  """A wave of grouped experts in one native call (steps.experts_pooled_add) gives what one
  program per expert gives, bit for bit: a 40-token prompt and a batched step, through a
  minimal pool (many waves, reads) and a resident one (one wave), the layer loop throughout;
  also with the calls split to one expert each (forward.POOLED_CALL_BYTES)."""
  from lazymoe_jax.model import steps  # pylint: disable=import-outside-toplevel
  store = tiny_stores[family][1]
  if expert_dtype is not None:
    store = str(tmp_path / "store")
    res = convert_cli(tiny_stores[family][0], store, f"--expert_dtype={expert_dtype}")
    assert res.returncode == 0, res.stderr[-2000:]
  prompt = token_ids(40, seed=3)
  prompts = [token_ids(n, seed=s) for n, s in ((5, 1), (9, 2), (3, 3))]
  got = {}
  calls = steps.experts_pooled_add._cache_size()  # pylint: disable=protected-access
  fewest = lazymoe_jax.load(store).spec.num_experts_per_tok  # the smallest pool allowed
  for slots in (fewest, 1000, "split"):
    if slots == "split":
      monkeypatch.setattr(forward, "POOLED_CALL_BYTES", 1)
    engine = lazymoe_jax.load(store, prefetch=False, expert_slots=1000 if slots == "split"
                              else slots)
    engine.forward.whole_step = False
    for pooled in (False, True):
      engine.forward.pooled_waves = pooled
      seqs = [engine.session() for _ in prompts]
      for q, p in zip(seqs, prompts):
        q.feed(p)
      got[slots, pooled] = (engine.logits(prompt), engine.feed_batch(seqs, [7, 8, 9]))
      for q in seqs:
        q.close()
  want = got[1000, False]
  for key, (logits, batch) in got.items():
    np.testing.assert_array_equal(logits, want[0], err_msg=str(key))
    np.testing.assert_array_equal(batch, want[1], err_msg=str(key))
  assert (steps.experts_pooled_add._cache_size() > calls) == (kernels.mode() == "native")


def test_warm_holds_one_stack_at_a_time_when_resident(mixtral, monkeypatch):
  """BatchCache.warm with every expert resident runs the one-program step over a whole stack
  of each shape; live device memory never holds more than the largest stack and one layer
  (beside what was live before): each stack is freed before the next is made."""
  from lazymoe_jax.engine import batch as batch_lib  # pylint: disable=import-outside-toplevel
  engine = lazymoe_jax.load(mixtral, prefetch=False, max_context=256)
  assert engine.load_all_experts()
  live = lambda: sum(a.nbytes for a in jax.live_arrays())  # noqa: E731
  base, peak = live(), [0]
  make = batch_lib.empty_layer

  def empty_layer(*args):  # each new layer: the live bytes above the base, before and after
    peak[0] = max(peak[0], live() - base)
    out = make(*args)
    peak[0] = max(peak[0], live() - base)
    return out
  monkeypatch.setattr(batch_lib, "empty_layer", empty_layer)
  shapes = engine.batch.warm(4, np.random.RandomState(0))
  assert len(shapes) == 3  # 1, 2 and 4 slots of 256 positions
  fwd = engine.forward
  largest = max(fwd.cache_bytes(c + 1, s) for s, c in shapes)
  layer = max(fwd.cache_bytes(c + 1, s) for s, c in shapes) // engine.spec.num_hidden_layers
  assert peak[0] <= largest + layer, (peak[0], largest, layer)
  assert live() - base <= layer  # and nothing of a stack is left


# dense / TurboQuant / sinks + window / latent caches
@pytest.mark.parametrize("family,kv_bits", [("mixtral", None), ("mixtral", 4), ("gpt_oss", None),
                                            ("deepseek_v3", None)])
def test_feed_batch_equals_per_sequence_feed_as_sequences_join_and_leave(tiny_stores, family,
                                                                          kv_bits):
  """Sequences decode in batches while others join (their prefilled caches move into slots)
  and leave (close; a single-sequence feed moves the cache back out): every row equals what
  the same sequence gets fed alone, token by token."""
  engine = lazymoe_jax.load(tiny_stores[family][1], expert_slots=1000, kv_bits=kv_bits)
  prompts = [token_ids(n, seed=s) for n, s in ((5, 1), (9, 2), (3, 3), (12, 4), (7, 5))]
  steps = [token_ids(6, seed=10 + i) for i in range(len(prompts))]
  want = []
  for p, nxt in zip(prompts, steps):
    seq = engine.session()
    seq.feed(p)
    want.append([seq.feed([t]) for t in nxt])
  seqs = [engine.session() for _ in prompts]
  for s, p in zip(seqs, prompts):
    s.feed(p)
  done = [0] * len(prompts)

  def batch_step(members):
    got = engine.feed_batch([seqs[i] for i in members], [steps[i][done[i]] for i in members])
    for i, row in zip(members, got):
      np.testing.assert_allclose(row, want[i][done[i]], atol=1e-5, rtol=0,
                                 err_msg=f"sequence {i}, step {done[i]}")
      done[i] += 1

  batch_step([0, 1, 2])  # three join: 4 slots
  assert engine.batch.num_slots == 4 and engine.batch.members == seqs[:3]
  batch_step([1, 0, 2, 3])  # a fourth joins; order of the call is free
  batch_step([0, 1, 2, 3, 4])  # a fifth: the stack grows to 8 slots, members copied over
  assert engine.batch.num_slots == 8
  seqs[2].close()  # leaves: its slot is free
  assert seqs[2].slot is None and seqs[2] not in engine.batch.members
  np.testing.assert_allclose(seqs[1].feed([steps[1][done[1]]]), want[1][done[1]], atol=1e-5,
                             rtol=0)  # out of the batch: its cache moved back out, alone
  done[1] += 1
  assert seqs[1].slot is None and seqs[1].cache is not None
  batch_step([0, 3])  # three members left (4 idle this step) of 8 slots: compacted to 4
  assert engine.batch.num_slots == 4 and seqs[4] in engine.batch.members
  batch_step([4, 1, 3])  # the one fed alone joins again
  for s in seqs:
    s.close()
  assert engine.batch.num_slots == 0 and engine.batch.nbytes == 0  # all memory given back


def test_close_and_a_full_session_fail_alone(mixtral):
  engine = lazymoe_jax.load(mixtral, expert_slots=1000, prefetch=False)
  a, b, c = engine.session(8), engine.session(), engine.session()
  for s in (a, b, c):
    s.feed(token_ids(7, seed=3))
  engine.feed_batch([a, b, c], [4, 5, 6])
  assert a.position == 8 and a.kv_cache_bytes == engine.batch.slot_bytes() > 0
  with pytest.raises(ValueError, match=r"session 0 is full \(position 8 of its context of 8\)"):
    engine.feed_batch([a, b, c], [4, 5, 6])
  assert (b.position, c.position) == (8, 8)  # refused before anything ran
  alone = engine.session()
  alone.feed(token_ids(7, seed=3))
  alone.feed([5])
  np.testing.assert_allclose(engine.feed_batch([b, c], [9, 9])[0], alone.feed([9]), atol=1e-5,
                             rtol=0)
  c.close()
  c.close()  # twice: harmless
  with pytest.raises(ValueError, match="session 1 is closed"):
    engine.feed_batch([b, c], [1, 2])
  with pytest.raises(ValueError, match="was closed"):
    c.feed([1])
  assert c.kv_cache_bytes == 0 and b in engine.batch.members and c not in engine.batch.members


def test_options_are_checked_once(mixtral):
  with pytest.raises(lazymoe_jax.LazyMoEError, match="not both"):
    lazymoe_jax.load(mixtral, memory_budget_gb=4, expert_slots=4)
  with pytest.raises(ValueError, match="cache_policy='mru'"):
    lazymoe_jax.load(mixtral, cache_policy="mru")
  with pytest.raises(ValueError, match="dense_dtype='int3'"):
    lazymoe_jax.load(mixtral, dense_dtype="int3")
  with pytest.raises(ValueError, match="memory_budget_gb=nan"):
    lazymoe_jax.load(mixtral, memory_budget_gb=float("nan"))


def test_a_store_that_no_longer_matches_its_config_is_refused(mixtral, tmp_path):
  import json  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  store = tmp_path / "store"
  shutil.copytree(mixtral, store)
  manifest = json.loads((store / "manifest.json").read_text())
  manifest["hf_config"]["num_local_experts"] += 2  # as if the family parsed it differently now
  (store / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(lazymoe_jax.StoreError, match="experts per layer: store 6, config 8"):
    lazymoe_jax.load(str(store))


def test_layer_types_of_the_wrong_length_are_refused():
  from lazymoe_jax import families  # pylint: disable=import-outside-toplevel
  hf = {"model_type": "qwen2_moe", "vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 4,
        "num_attention_heads": 2, "moe_intermediate_size": 4, "num_experts": 4,
        "num_experts_per_tok": 2, "layer_types": ["full_attention"] * 2}
  with pytest.raises(lazymoe_jax.UnsupportedModelError, match="num_hidden_layers is 4"):
    families.spec_from_hf(hf)


def test_kv_cache_bytes_follow_the_sessions(mixtral):
  engine = lazymoe_jax.load(mixtral, expert_slots=4)
  seq = engine.session()
  seq.feed(token_ids(5))
  assert engine.stats()["kv_cache_bytes"] == seq.kv_cache_bytes > 0
  seq.feed(token_ids(20))  # grows
  assert engine.stats()["kv_cache_bytes"] == seq.kv_cache_bytes
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])  # dense and latent caches
def test_a_grown_cache_keeps_the_old_positions_bit_exact(tiny_stores, family, monkeypatch):
  """With capacities rounded to 8 (not KV_ROUND), a session fed 8 tokens then one at a time
  grows 8 -> 16 -> 32: each grown cache holds the old one's positions bit-exact, zeros past
  them, and the logits equal those of a session allocated at 32 from the start."""
  monkeypatch.setattr(forward, "KV_ROUND", 8)
  engine = lazymoe_jax.load(tiny_stores[family][1], expert_slots=1000)
  ids = token_ids(32, seed=11)
  seq = engine.session()
  rows = [seq.feed(ids[:8], all_logits=True)]
  capacities = [seq.cache.capacity]
  for t in ids[8:]:
    old, old_position = seq.cache, seq.position
    old_arrays = [jax.tree.map(np.asarray, layer) for layer in old]
    rows.append(seq.feed([t])[None])
    if seq.cache.capacity == old.capacity:
      continue
    capacities.append(seq.cache.capacity)
    for before, after in zip(old_arrays, seq.cache):
      for name, a in before.items():
        b = np.asarray(after[name])
        grew = [i for i, (m, n) in enumerate(zip(a.shape, b.shape)) if m != n]
        assert len(grew) == 1 and a.ndim == b.ndim  # the position axis only
        axis = grew[0]
        assert (a.shape[axis], b.shape[axis]) == (old.capacity, seq.cache.capacity)
        np.testing.assert_array_equal(np.take(b, range(old_position), axis),
                                      np.take(a, range(old_position), axis))
        assert not np.take(b, range(old_position + 1, seq.cache.capacity), axis).any()
  assert capacities == [8, 16, 32]
  assert seq.kv_cache_bytes == engine.kv.nbytes(list(seq.cache))
  fixed = engine.session(32)
  assert fixed.cache.capacity == 32
  np.testing.assert_allclose(np.concatenate(rows), fixed.feed(ids, all_logits=True),
                             atol=1e-5, rtol=0)


def test_bad_token_ids(mixtral):
  engine = lazymoe_jax.load(mixtral)
  with pytest.raises(ValueError, match="empty"):
    engine.logits([])
  with pytest.raises(ValueError, match=r"\[0, 96\)"):
    engine.logits([5, 96])
  with pytest.raises(lazymoe_jax.TokenizerMissingError, match="token ids"):
    engine.tokenizer.encode("hello")


def test_kv_cache_stays_within_max_context_and_per_sequence(mixtral):
  engine = lazymoe_jax.load(mixtral, max_context=150, expert_slots=100)
  ids = token_ids(140)
  full = lazymoe_jax.load(mixtral, expert_slots=100).logits(ids)
  np.testing.assert_allclose(engine.logits(ids), full, atol=1e-5)
  cfg = engine.spec
  per_position = cfg.num_hidden_layers * cfg.attention.num_kv_heads * cfg.attention.head_dim * 2 * 4
  assert engine.stats()["kv_cache_bytes"] == 150 * per_position  # not the 256-token bucket
  # two sequences on one engine: each keeps its own capacity
  a = engine.stream(token_ids(100, seed=2), 45)
  next(a)
  b = list(engine.stream(token_ids(4, seed=3), 3))
  assert len(b) == 3 and len(list(a)) == 44


def test_deepseek_refuses_kv_bits(tiny_stores):
  _, store = tiny_stores["deepseek_v3"]
  with pytest.raises(ValueError, match="multi-head latent attention"):
    lazymoe_jax.load(store, kv_bits=4)
