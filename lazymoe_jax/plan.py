"""Memory planning: fit dense params + KV cache + expert pool + working margin in a budget.

The plan is made after the dense params are loaded, from the process's measured resident
memory (the jax runtime and the dense params, as they really are), the KV cache for the
planned context computed from its shapes (nothing allocated), and a working margin for the
largest temporary of the expert programs (one expert upcast to float32) plus 256 MiB for
compiling and running the programs (measured, see MARGIN_BASE).
Whatever remains is expert slots; fewer than num_experts_per_tok is a clear error naming the
minimum budget.
"""

from __future__ import annotations

import dataclasses

import psutil

from lazymoe_jax.errors import PlanError

# What the process grows by after the plan is made: compiling and running the programs (anon
# memory) and the library code pages the compiler touches the first time (file pages, charged
# to a memory cgroup like everything else), sized from the cgroup benchmarks
# (BUILD_NOTES "Measurements moved out of the code").
MARGIN_BASE = 256 << 20
GB = 1e9


def resident_bytes() -> int:
  """Current resident set size of this process (not the peak); psutil, so it works beyond
  Linux's /proc."""
  return psutil.Process().memory_info().rss


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  budget_bytes: int
  runtime_and_dense_bytes: int  # measured RSS after loading the dense params
  kv_bytes: int  # KV caches of `sequences` sequences at max_context positions
  max_context: int
  margin_bytes: int
  bytes_per_expert: int
  slots: int
  sequences: int = 1  # sequences decoding together (the server's --parallel)

  @property
  def pool_bytes(self) -> int:
    return self.slots * self.bytes_per_expert

  def describe(self) -> str:
    return (f"memory plan for {self.budget_bytes / GB:.2f} GB: runtime + dense params "
            f"{self.runtime_and_dense_bytes / GB:.3f} GB (measured), KV cache "
            f"{self.kv_bytes / GB:.3f} GB ({_positions(self.sequences, self.max_context)}), "
            f"margin "
            f"{self.margin_bytes / GB:.3f} GB, expert pool {self.slots} slots x "
            f"{self.bytes_per_expert / 1e6:.1f} MB = {self.pool_bytes / GB:.3f} GB")


def _positions(sequences: int, max_context: int) -> str:
  return (f"{max_context} positions" if sequences == 1 else
          f"{sequences} sequences x {max_context} positions")


def make_plan(budget_gb: float, runtime_and_dense_bytes: int, kv_bytes: int, max_context: int,
              bytes_per_expert: int, expert_f32_bytes: int, min_slots: int,
              total_experts: int, sequences: int = 1) -> MemoryPlan:
  """kv_bytes: one sequence's KV cache at max_context positions; `sequences` of them are
  planned (the server's --parallel). A budget that cannot hold them names the largest
  --parallel and the largest --max_context that fit."""
  budget = int(budget_gb * GB)
  margin = MARGIN_BASE + expert_f32_bytes
  kv_total = sequences * kv_bytes
  free = budget - runtime_and_dense_bytes - kv_total - margin
  slots = min(total_experts, max(free, 0) // bytes_per_expert)
  if slots < min_slots:
    need = runtime_and_dense_bytes + kv_total + margin + min_slots * bytes_per_expert
    room = budget - runtime_and_dense_bytes - margin - min_slots * bytes_per_expert  # for KV
    fits = ""
    if sequences > 1 and kv_bytes and room >= kv_bytes:
      fits = (f" At this budget --parallel={room // kv_bytes} fits at {max_context} positions, "
              f"or --max_context={room * max_context // kv_total} at --parallel={sequences}.")
    raise PlanError(
        f"memory budget {budget_gb:.2f} GB is too small for this model: it needs at least "
        f"{need / GB:.2f} GB (runtime + dense params {runtime_and_dense_bytes / GB:.3f} GB "
        f"measured, KV cache {kv_total / GB:.3f} GB for "
        f"{_positions(sequences, max_context)}, "
        f"{min_slots} expert slots {min_slots * bytes_per_expert / GB:.3f} GB, margin "
        f"{margin / GB:.3f} GB).{fits} Raise --memory_budget_gb, or quantise the experts "
        "(--expert_dtype=int8) or the KV cache (--kv_bits)"
        f"{', or lower --parallel or --max_context' if sequences > 1 else ''}.")
  return MemoryPlan(budget, runtime_and_dense_bytes, kv_total, max_context, margin,
                    bytes_per_expert, slots, sequences)
