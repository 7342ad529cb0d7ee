"""LazyMoE-JAX: huge Mixture-of-Experts LLMs on CPU, experts streamed from SSD.

    engine = lazymoe_jax.load(store_dir, expert_slots=N)
    engine.logits(ids); engine.generate(ids, max_new_tokens); engine.stats()
    seq = engine.session(); seq.feed(ids) -> logits of the last position
"""

from lazymoe_jax import tokenizer
from lazymoe_jax.engine import Engine, Session, load
from lazymoe_jax.errors import (CheckpointError, LazyMoEError, PlanError, StoreError,
                                TokenizerMissingError, UnsupportedModelError)

__all__ = ["Engine", "Session", "load", "LazyMoEError", "CheckpointError", "PlanError", "StoreError",
           "TokenizerMissingError", "UnsupportedModelError"]
