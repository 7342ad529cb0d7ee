"""placeholder: rewritten below"""
from lazymoe_jax.engine.budget import (GB, MARGIN_BASE, MAX_PLANNED_CONTEXT, MemoryPlan,  # noqa: F401
                                       make_plan, plan_store, resident_bytes)
