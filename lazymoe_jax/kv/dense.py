"""Dense float KV cache: one {"k", "v"} pytree per layer, fixed capacity, updated in place.

Keys are held transposed, [kv_heads, head_dim, S], so decode scores are one einsum that
reduces over a long minor axis (the fast form on XLA-CPU, see ARCHITECTURE.md).
Legend: T = new tokens, S = cache capacity, K = kv heads, G = query heads per kv head, D = head dim.
"""

import jax
import jax.numpy as jnp

from lazymoe_jax.config import MoEConfig


def init(cfg: MoEConfig, capacity: int, dtype=jnp.float32) -> list[dict[str, jax.Array]]:
  """One zeroed cache per layer."""
  k_shape = (cfg.num_key_value_heads, cfg.head_dim, capacity)
  v_shape = (cfg.num_key_value_heads, capacity, cfg.head_dim)
  return [{"k": jnp.zeros(k_shape, dtype), "v": jnp.zeros(v_shape, dtype)}
          for _ in range(cfg.num_hidden_layers)]


def nbytes(cache: list[dict[str, jax.Array]]) -> int:
  return sum(a.nbytes for layer in cache for a in layer.values())


def update(cache: dict[str, jax.Array], k: jax.Array, v: jax.Array, start: jax.Array):
  """Writes k, v [T, K, D] at positions start..start+T-1 (caller guarantees they fit)."""
  k_t = jnp.transpose(k, (1, 2, 0)).astype(cache["k"].dtype)  # [K, D, T]
  v_t = jnp.transpose(v, (1, 0, 2)).astype(cache["v"].dtype)  # [K, T, D]
  return {"k": jax.lax.dynamic_update_slice(cache["k"], k_t, (0, 0, start)),
          "v": jax.lax.dynamic_update_slice(cache["v"], v_t, (0, start, 0))}


QUERY_BLOCK = 128  # long prompts attend in blocks of queries: scores stay [K, G, 128, S]


def attend(cache: dict[str, jax.Array], q: jax.Array, q_pos: jax.Array, window: int | None,
           scale: float) -> jax.Array:
  """Causal (optionally sliding-window) attention of q [T, K*G, D] over the cache -> [T, K*G, D]."""
  t, hq, d = q.shape
  if t > QUERY_BLOCK and t % QUERY_BLOCK == 0:
    nb = t // QUERY_BLOCK
    out = jax.lax.map(lambda a: _attend(cache, a[0], a[1], window, scale),
                      (q.reshape(nb, QUERY_BLOCK, hq, d), q_pos.reshape(nb, QUERY_BLOCK)))
    return out.reshape(t, hq, d)
  return _attend(cache, q, q_pos, window, scale)


def _attend(cache, q, q_pos, window, scale):
  t, hq, d = q.shape
  kv_heads, _, s = cache["k"].shape
  qg = q.reshape(t, kv_heads, hq // kv_heads, d)
  scores = jnp.einsum("tkgd,kds->kgts", qg, cache["k"].astype(jnp.float32)) * scale
  k_pos = jnp.arange(s)[None, :]
  visible = k_pos <= q_pos[:, None]  # [T, S]
  if window is not None:
    visible &= k_pos > q_pos[:, None] - window
  scores = jnp.where(visible[None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("kgts,ksd->tkgd", probs, cache["v"].astype(jnp.float32))
  return out.reshape(t, hq, d)
