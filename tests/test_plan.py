"""lazymoe_jax/plan.py: the memory planner's numbers, exactly; and the engine's use of it."""

import jax
import numpy as np
import pytest

import lazymoe_jax
from lazymoe_jax.engine import budget
from lazymoe_jax.plan import GB, MARGIN_BASE, make_plan
from tests.checkpoints import hf_config, write_checkpoint
from tests.conftest import convert_cli, token_ids

ARGS = dict(runtime_and_dense_bytes=300_000_000, kv_bytes=20_000_000, max_context=4096,
            bytes_per_expert=10_000_000, expert_f32_bytes=40_000_000, min_slots=2,
            total_experts=64)
NEED = 300_000_000 + 20_000_000 + MARGIN_BASE + 40_000_000 + 2 * 10_000_000


def test_plan_arithmetic_is_exact():
  assert make_plan(NEED / 1e9, **ARGS).slots == 2
  assert make_plan((NEED + 10_000_000) / 1e9, **ARGS).slots == 3
  assert make_plan(100.0, **ARGS).slots == 64  # never more than the model has
  with pytest.raises(lazymoe_jax.PlanError, match=f"at least {NEED / 1e9:.2f} GB"):
    make_plan((NEED - 1) / 1e9, **ARGS)


def test_plan_fields_and_description():
  plan = make_plan((NEED + 25_000_000) / 1e9, **ARGS)  # 2.5 slots' worth more: 4 slots
  assert plan.budget_bytes == NEED + 25_000_000
  assert plan.margin_bytes == MARGIN_BASE + 40_000_000
  assert (plan.slots, plan.pool_bytes) == (4, 40_000_000)
  assert (plan.runtime_and_dense_bytes, plan.kv_bytes, plan.max_context) == (
      300_000_000, 20_000_000, 4096)
  assert plan.describe() == (
      f"memory plan for {plan.budget_bytes / GB:.2f} GB: runtime + dense params 0.300 GB "
      f"(measured), KV cache 0.020 GB (4096 positions), margin {plan.margin_bytes / GB:.3f} GB, "
      "expert pool 4 slots x 10.0 MB = 0.040 GB")


def test_too_small_budget_names_every_term_and_the_fixes():
  with pytest.raises(lazymoe_jax.PlanError) as info:
    make_plan(0.1, **ARGS)
  msg = str(info.value)
  assert msg.startswith("memory budget 0.10 GB is too small for this model: it needs at least "
                        f"{NEED / GB:.2f} GB")
  for part in ("runtime + dense params 0.300 GB measured", "KV cache 0.020 GB for 4096 positions",
               "2 expert slots 0.020 GB", f"margin {(MARGIN_BASE + 40_000_000) / GB:.3f} GB",
               "--memory_budget_gb", "--expert_dtype=int8", "--kv_bits"):
    assert part in msg, part
  with pytest.raises(lazymoe_jax.PlanError):  # a budget below what is already resident
    make_plan(0.0, **ARGS)


def test_memory_budget_plans_the_pool_and_refuses_too_small(tiny_stores):
  _, store = tiny_stores["qwen2_moe"]
  cfg = hf_config("qwen2_moe")
  with pytest.raises(lazymoe_jax.PlanError, match=r"too small for this model: it needs at least "
                     r"(\d+\.\d+) GB") as info:
    lazymoe_jax.load(store, memory_budget_gb=0.01)
  need = float(info.value.args[0].split("at least ")[1].split(" GB")[0])
  k = cfg["num_experts_per_tok"]
  # (the need is measured from this process's RSS, which grows as engines load: some slack)
  smallest = lazymoe_jax.load(store, memory_budget_gb=need + 0.05)
  assert k <= smallest.pool.num_slots and smallest.plan.slots == smallest.pool.num_slots
  assert "memory plan" in smallest.plan.describe()
  ids = token_ids(20)
  resident = lazymoe_jax.load(store, expert_slots=10_000)
  np.testing.assert_array_equal(smallest.logits(ids), resident.logits(ids))
  roomy = lazymoe_jax.load(store, memory_budget_gb=need + 1.0)
  assert roomy.pool.num_slots == len(roomy.experts.layers) * cfg["num_experts"]
  with pytest.raises(lazymoe_jax.LazyMoEError, match="not both"):
    lazymoe_jax.load(store, memory_budget_gb=1.0, expert_slots=4)


def test_plan_holds_the_kv_caches_of_parallel_sequences():
  plan = make_plan((NEED + 3 * 20_000_000) / 1e9, **ARGS, sequences=4)  # 4 caches, 2 slots
  assert (plan.slots, plan.sequences, plan.kv_bytes) == (2, 4, 80_000_000)
  assert "KV cache 0.080 GB (4 sequences x 4096 positions)" in plan.describe()
  with pytest.raises(lazymoe_jax.PlanError) as info:  # room for 2 caches, 4 asked for
    make_plan((NEED + 20_000_000) / 1e9, **ARGS, sequences=4)
  msg = str(info.value)
  for part in ("KV cache 0.080 GB for 4 sequences x 4096 positions",
               "--parallel=2 fits at 4096 positions, or --max_context=2048 at --parallel=4",
               "lower --parallel or --max_context"):
    assert part in msg, (part, msg)


def test_engine_plans_parallel_kv_caches(tiny_stores):
  _, store = tiny_stores["qwen2_moe"]
  # a budget above this process's resident memory, which grows with the tests run before
  gb = round(budget.runtime_bytes() / 1e9 + 2.0, 2)
  one = lazymoe_jax.load(store, memory_budget_gb=gb, max_context=64)
  eight = lazymoe_jax.load(store, memory_budget_gb=gb, max_context=64, parallel=8)
  assert eight.plan.sequences == 8 and eight.plan.kv_bytes == 8 * one.plan.kv_bytes > 0
  with pytest.raises(ValueError, match="parallel=0 must be >= 1"):
    lazymoe_jax.load(store, parallel=0)


# ---- the KV the engine holds never passes what the plan counts --------------------------------

class _LiveKV:
  """The bytes of the jax arrays alive now that were not alive at the start: the runtime's own
  count (jax.live_arrays). Sampled after each call of the engine's per-layer cache functions
  (the moments a resize holds a new layer beside the old ones), and on demand; keeps the peak."""

  def __init__(self, monkeypatch):
    from lazymoe_jax.engine import batch, forward  # pylint: disable=import-outside-toplevel
    self.start = jax.live_arrays()  # kept alive: their ids stay theirs
    self.ids = {id(a) for a in self.start}
    self.peak = 0
    for mod, names in ((batch, ("_copy_slot", "_put_slot", "_take_slot", "empty_layer")),
                       (forward, ("_into", "empty_layer"))):
      for name in names:
        monkeypatch.setattr(mod, name, self._sampled(getattr(mod, name)))

  def _sampled(self, fn):
    def call(*args, **kwargs):
      out = fn(*args, **kwargs)
      self.sample()
      return out
    return call

  def sample(self) -> int:
    now = sum(a.nbytes for a in jax.live_arrays() if id(a) not in self.ids)
    self.peak = max(self.peak, now)
    return now


# dense caches at N = 1, 3, 5, 8; TurboQuant (fixed-size parts per layer) and latent caches
@pytest.mark.parametrize("family,kv_bits,n", [("mixtral", None, 1), ("mixtral", None, 3),
                                              ("mixtral", None, 5), ("mixtral", None, 8),
                                              ("mixtral", 4, 3), ("deepseek_v3", None, 3)])
def test_kv_bytes_never_pass_the_plan_as_sequences_join_and_leave(tiny_stores, monkeypatch,
                                                                  family, kv_bits, n):
  """--parallel=N sessions of max_context positions (the server's preallocated caches) prefill
  on their own caches and join the batch one per step (the stack resized each time), one is
  fed alone (its cache moves out and back), one is closed and replaced: the KV bytes alive,
  counted by the runtime at every layer of every resize, peak exactly where the analysis puts
  them and never above the plan's KV term; one more session than planned is refused."""
  _, store = tiny_stores[family]
  context = 256
  gb = round(budget.runtime_bytes() / 1e9 + 2.0, 2)
  engine = lazymoe_jax.load(store, memory_budget_gb=gb, max_context=context, parallel=n,
                            kv_bits=kv_bits)
  kv, spec = engine.kv, engine.spec
  layers = spec.num_hidden_layers
  slot = budget.kv_layer_bytes(kv, spec, context + 1)  # one layer of a batch slot
  own = budget.kv_layer_bytes(kv, spec, context)  # one layer of a session's own cache
  if (family, kv_bits) == ("mixtral", None):  # K and V x 2 heads x 16 dims x positions x 4 B
    assert (slot, own) == (32896, 32768)
  plan = engine.plan
  # per sequence: a slot (every layer, the scratch position included) and one more layer
  assert plan.kv_bytes == (layers + 1) * n * slot
  assert plan.kv_limit_bytes == layers * n * slot
  live = _LiveKV(monkeypatch)

  def settled():  # between calls: what the runtime holds is what the engine counts
    now = live.sample()
    assert now == engine.kv_bytes_in_use() <= plan.kv_limit_bytes
    return now

  seqs = [engine.session(context) for _ in range(n)]
  for i, s in enumerate(seqs):
    s.feed(token_ids(5 + i, seed=i))
  assert settled() == layers * n * own
  for j in range(1, n + 1):
    engine.feed_batch(seqs[:j], [7] * j)
    # a power of two of slots never fits beside the other sessions' full caches: exactly j
    assert engine.batch.num_slots == j
    assert settled() == layers * (j * slot + (n - j) * own)
  # the peak: the last join's rebuild at its last layer, holding the new stack's every layer
  # (n slots), the old stack's last (n - 1 slots) and the joiner's own last layer
  assert live.peak == layers * n * slot + (n - 1) * slot + own <= plan.kv_bytes
  seqs[0].feed([3])  # fed alone: its cache moves out of the batch (and the stack shrinks)
  settled()
  engine.feed_batch(seqs, [5] * n)
  seqs[-1].close()
  seqs[-1] = engine.session(context)  # into the room of the closed one
  seqs[-1].feed([4, 5])
  engine.feed_batch(seqs, [6] * n)
  assert settled() == layers * n * slot
  assert live.peak == layers * n * slot + (n - 1) * slot + own <= plan.kv_bytes
  with pytest.raises(lazymoe_jax.PlanError, match=f"parallel={n}"):
    engine.session(context)
  for s in seqs:
    s.close()
  assert settled() == 0


def test_a_growing_cache_holds_one_layer_beyond_the_larger(tmp_path, monkeypatch):
  """A session without max_context grows its cache 256 -> 512 positions one layer at a time:
  the peak is the new cache and one old layer, within the plan (two whole caches were not)."""
  hf = write_checkpoint(tmp_path / "hf", "mixtral", max_position_embeddings=512)
  res = convert_cli(hf, str(tmp_path / "store"))
  assert res.returncode == 0, res.stderr[-3000:]
  store = str(tmp_path / "store")
  gb = round(budget.runtime_bytes() / 1e9 + 2.0, 2)
  engine = lazymoe_jax.load(store, memory_budget_gb=gb, max_context=512)
  kv, spec = engine.kv, engine.spec
  layers = spec.num_hidden_layers
  live = _LiveKV(monkeypatch)
  seq = engine.session()
  seq.feed(token_ids(250, seed=1))
  assert seq.capacity == 256 and live.sample() == layers * budget.kv_layer_bytes(kv, spec, 256)
  before = seq.feed(token_ids(10, seed=2))
  assert seq.capacity == 512
  small, large = budget.kv_layer_bytes(kv, spec, 256), budget.kv_layer_bytes(kv, spec, 512)
  assert live.peak == layers * large + small
  assert live.peak <= engine.plan.kv_bytes == (layers + 1) * budget.kv_layer_bytes(kv, spec, 513)
  whole = lazymoe_jax.load(store, expert_slots=1000, max_context=512)  # results unchanged
  ahead = whole.session(512)  # its cache made whole at once
  ahead.feed(token_ids(250, seed=1))
  np.testing.assert_allclose(ahead.feed(token_ids(10, seed=2)), before, atol=1e-5, rtol=0)
