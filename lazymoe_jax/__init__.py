"""LazyMoE-JAX: huge Mixture-of-Experts LLMs on CPU, experts streamed from SSD.

    engine = lazymoe_jax.load(store_dir, expert_slots=N)
    engine.logits(ids); engine.generate(ids, max_new_tokens); engine.stats()
"""

from lazymoe_jax import tokenizer
from lazymoe_jax.engine import Engine, load
from lazymoe_jax.errors import (CheckpointError, LazyMoEError, PlanError, StoreError,
                                TokenizerMissingError, UnsupportedModelError)

__all__ = ["Engine", "load", "LazyMoEError", "CheckpointError", "PlanError", "StoreError",
           "TokenizerMissingError", "UnsupportedModelError"]
