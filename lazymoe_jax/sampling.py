"""Token samplers: a frozen settings object and one jitted function (logits, key) -> id."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Sampler:
  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0
  top_k: int = 0  # 0: all
  seed: int = 0

  def __post_init__(self):
    # isfinite first: every comparison with nan is False, so `nan < 0` would let it through
    if not math.isfinite(self.temperature) or self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be a finite number >= 0 (0: "
                       "greedy).")
    if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
      raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1: keep every token).")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0: keep every token).")

  def __call__(self, logits: np.ndarray, step: int) -> int:
    """logits [V] float32 -> token id. Keys are fold_in(seed, step): reproducible per step."""
    if self.temperature == 0.0:
      return int(np.argmax(logits))
    key = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)
    return int(_sample(jnp.asarray(logits), key, self.temperature, self.top_p, self.top_k))


@functools.partial(jax.jit, static_argnames=("top_k",))
def _sample(logits, key, temperature, top_p, top_k):
  logits = logits.astype(jnp.float32) / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][-1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  order = jnp.argsort(-logits)
  probs = jax.nn.softmax(logits[order])
  # keep the smallest prefix whose mass reaches top_p (always the first token)
  keep = (jnp.cumsum(probs) - probs) < top_p
  masked = jnp.where(keep, logits[order], -jnp.inf)
  return order[jax.random.categorical(key, masked)]
