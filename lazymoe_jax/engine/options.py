"""The options of `lazymoe_jax.load`, as one frozen object checked once."""

from __future__ import annotations

import dataclasses
import math

from lazymoe_jax.errors import LazyMoEError
from lazymoe_jax.store.pool import POLICIES

DENSE_DTYPES = ("bfloat16", "int8")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
  """See `lazymoe_jax.load` for what each option does."""

  memory_budget_gb: float | None = None
  expert_slots: int | None = None
  kv_bits: float | None = None
  k_bits: float | None = None
  v_bits: float | None = None
  prefetch: bool = True
  cache_policy: str = "lfu"
  max_context: int | None = None
  dense_dtype: str | None = None
  parallel: int = 1

  def __post_init__(self):
    if self.memory_budget_gb is not None and self.expert_slots is not None:
      raise LazyMoEError("give memory_budget_gb or expert_slots, not both: the budget plans "
                         "the slots.")
    if self.memory_budget_gb is not None and not (math.isfinite(self.memory_budget_gb) and
                                                  self.memory_budget_gb > 0):
      raise ValueError(f"memory_budget_gb={self.memory_budget_gb} must be a positive number.")
    if self.expert_slots is not None and self.expert_slots < 1:
      raise ValueError(f"expert_slots={self.expert_slots} must be >= 1.")
    if self.cache_policy not in POLICIES:
      raise ValueError(f"cache_policy={self.cache_policy!r} is not one of "
                       f"{', '.join(POLICIES)}.")
    if self.dense_dtype is not None and self.dense_dtype not in DENSE_DTYPES:
      raise ValueError(f"dense_dtype={self.dense_dtype!r} is not one of "
                       f"{', '.join(DENSE_DTYPES)}.")
    if self.parallel < 1:
      raise ValueError(f"parallel={self.parallel} must be >= 1.")
    if self.max_context is not None and self.max_context < 1:
      raise ValueError(f"max_context={self.max_context} must be >= 1.")
