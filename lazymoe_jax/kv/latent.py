"""Latent KV cache for multi-head latent attention (DeepSeek-V2/V3): per position only the
compressed latent c [R] (after kv_a_layernorm) and the roped key k_r [Dr] shared by all heads,
one array {"k": [1, R + Dr, S]} per layer, transposed as DenseKV's keys.

The attention reads it with kv_b_proj absorbed into the query (model/layers.py): a head's key
for position s is W_uk c_s (nope part) and k_r,s (rope part), so q_nope . W_uk c_s = (W_uk^T
q_nope) . c_s, and its value W_uv c_s comes out of the attention as W_uv (sum_s p_s c_s).
That makes MLA a one-KV-head attention with keys [c, k_r] (R + Dr) and values c (R): nothing is
expanded per head or per position. Legend as dense.py; R = kv_lora_rank, Dr = qk_rope_head_dim.
Interface as every KV cache (kv/__init__.py); `update` takes the latent key as k, v unused.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lazymoe_jax import kernels
from lazymoe_jax.model.spec import ModelSpec
from lazymoe_jax.kv.dense import blocked, causal_softmax, from_rows, to_rows


@dataclasses.dataclass(frozen=True)
class LatentKV:
  """float32 latents and rope keys."""

  dtype: str = "float32"

  def validate(self, spec: ModelSpec) -> None:
    if spec.attention.cache_kind != "latent":
      raise ValueError("LatentKV serves multi-head latent attention models (kv_lora_rank > 0) "
                       "only; use DenseKV.")

  def init(self, spec: ModelSpec, capacity: int) -> list[dict[str, jax.Array]]:
    self.validate(spec)
    shape = (1, spec.attention.kv_lora_rank + spec.attention.qk_rope_head_dim, capacity)
    return [{"k": jnp.zeros(shape, self.dtype)} for _ in range(spec.num_hidden_layers)]

  @staticmethod
  def nbytes(cache: list) -> int:
    return sum(a.nbytes for a in jax.tree.leaves(cache))

  def update(self, cache: dict, k: jax.Array, v: jax.Array | None, start: jax.Array) -> dict:
    """Writes the latent keys k [T, 1, R + Dr] ([c, k_r]) at positions start.. (v: None)."""
    del v
    k_t = jnp.transpose(k, (1, 2, 0)).astype(cache["k"].dtype)  # [1, R + Dr, T]
    return {"k": jax.lax.dynamic_update_slice(cache["k"], k_t, (0, 0, start))}

  def attend(self, cache: dict, q: jax.Array, q_pos: jax.Array, window: int | None,
             scale: float, sinks: jax.Array | None = None, value_dim: int | None = None
             ) -> jax.Array:
    """q [T, H, R + Dr] (absorbed nope part, then rope part) -> [T, H, R]: the attention-
    weighted latents. value_dim: R (the leading rows of the cached key that are the value)."""
    if value_dim is None:
      raise ValueError("LatentKV.attend needs value_dim (kv_lora_rank): the cached rows that "
                       "are the value.")
    if kernels.attention_native(q.shape[0]) and cache["k"].dtype == jnp.float32:
      return kernels.attend_latent(cache["k"], q, q_pos, window, scale, value_dim, sinks)
    keys = cache["k"].astype(jnp.float32)  # [1, R + Dr, S]
    values = keys[:, :value_dim, :]  # [1, R, S]

    def one(q, q_pos):
      t, hq, _ = q.shape
      scores = jnp.einsum("kmd,kds->kms", to_rows(q, 1), keys)  # [1, H*T, S]
      probs = causal_softmax(scores.reshape(1, hq, t, -1) * scale, q_pos, window, sinks)
      out = jnp.einsum("kms,kds->kmd", probs.reshape(1, hq * t, -1), values)  # [1, H*T, R]
      return from_rows(out, t)
    return blocked(one, q, q_pos)
