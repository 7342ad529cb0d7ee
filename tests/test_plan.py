"""lazymoe_jax/plan.py: the memory planner's numbers, exactly; and the engine's use of it."""

import numpy as np
import pytest

import lazymoe_jax
from lazymoe_jax.engine import budget
from lazymoe_jax.plan import GB, MARGIN_BASE, make_plan
from tests.checkpoints import hf_config
from tests.conftest import token_ids

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
