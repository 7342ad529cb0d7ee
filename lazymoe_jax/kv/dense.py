"""Dense float KV cache: one {"k", "v"} pytree per layer, fixed capacity, updated in place.

Keys are held transposed, [kv_heads, head_dim, S], so decode scores are one einsum that
reduces over a long minor axis (the fast form on XLA-CPU, BUILD_NOTES "Foundation").
Legend: T = new tokens, S = cache capacity, K = kv heads, G = query heads per kv head, D = head dim.
Every KV cache class has this interface: init / update / attend / nbytes (see kv/__init__.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lazymoe_jax import kernels
from lazymoe_jax.model.spec import ModelSpec

QUERY_BLOCK = 128  # long prompts attend in blocks of queries: scores stay [K, G, 128, S]


def causal_softmax(scores: jax.Array, q_pos: jax.Array, window: int | None,
                   sinks: jax.Array | None = None) -> jax.Array:
  """Softmax over key positions of scores [K, G, T, S], masked causally (and to the window).

  sinks [K*G] (gpt-oss): one more logit per head in each denominator, attached to no value,
  so a head may attend to nothing."""
  k_pos = jnp.arange(scores.shape[-1])[None, :]
  visible = k_pos <= q_pos[:, None]  # [T, S]
  if window is not None:
    visible &= k_pos > q_pos[:, None] - window
  scores = jnp.where(visible[None, None], scores, -jnp.inf)
  if sinks is None:
    return jax.nn.softmax(scores, axis=-1)
  sink = sinks.astype(jnp.float32).reshape(scores.shape[0], scores.shape[1], 1, 1)
  m = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
  e = jnp.exp(scores - m)
  return e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - m))


def blocked(attend_fn, q: jax.Array, q_pos: jax.Array) -> jax.Array:
  """Runs attend_fn(q, q_pos) over blocks of QUERY_BLOCK queries when the prompt is long."""
  t, hq, d = q.shape
  if t > QUERY_BLOCK and t % QUERY_BLOCK == 0:
    nb = t // QUERY_BLOCK
    out = jax.lax.map(lambda a: attend_fn(a[0], a[1]),
                      (q.reshape(nb, QUERY_BLOCK, hq, d), q_pos.reshape(nb, QUERY_BLOCK)))
    return out.reshape(t, hq, -1)  # -1: the output width may differ from q's (LatentKV)
  return attend_fn(q, q_pos)


def to_rows(q: jax.Array, kv_heads: int) -> jax.Array:
  """q [T, K*G, D] -> [K, G*T, D]: the tokens join the query heads of their KV head as rows of
  one batched product; an einsum that keeps T as its own axis ("tkgd,kds->kgts") is several
  times slower (BUILD_NOTES "Measurements moved out of the code")."""
  t, hq, d = q.shape
  return q.reshape(t, kv_heads, hq // kv_heads, d).transpose(1, 2, 0, 3).reshape(kv_heads, -1, d)


def from_rows(out: jax.Array, t: int) -> jax.Array:
  """[K, G*T, D] -> [T, K*G, D] (inverse of to_rows)."""
  k, gt, d = out.shape
  return out.reshape(k, gt // t, t, d).transpose(2, 0, 1, 3).reshape(t, -1, d)


@dataclasses.dataclass(frozen=True)
class DenseKV:
  """float32 keys and values."""

  dtype: str = "float32"

  def validate(self, spec: ModelSpec) -> None:
    if spec.attention.cache_kind != "heads":
      raise ValueError("multi-head latent attention caches latents: use LatentKV "
                       "(kv.make(..., mla=True)), not DenseKV.")

  def init(self, spec: ModelSpec, capacity: int) -> list[dict[str, jax.Array]]:
    self.validate(spec)
    a = spec.attention
    k_shape = (a.num_kv_heads, a.head_dim, capacity)
    v_shape = (a.num_kv_heads, capacity, a.head_dim)
    return [{"k": jnp.zeros(k_shape, self.dtype), "v": jnp.zeros(v_shape, self.dtype)}
            for _ in range(spec.num_hidden_layers)]

  @staticmethod
  def nbytes(cache: list) -> int:
    return sum(a.nbytes for a in jax.tree.leaves(cache))

  def update(self, cache: dict, k: jax.Array, v: jax.Array, start: jax.Array) -> dict:
    """Writes k, v [T, K, D] at positions start..start+T-1 (caller guarantees they fit)."""
    k_t = jnp.transpose(k, (1, 2, 0)).astype(cache["k"].dtype)  # [K, D, T]
    v_t = jnp.transpose(v, (1, 0, 2)).astype(cache["v"].dtype)  # [K, T, D]
    return {"k": jax.lax.dynamic_update_slice(cache["k"], k_t, (0, 0, start)),
            "v": jax.lax.dynamic_update_slice(cache["v"], v_t, (0, start, 0))}

  def attend(self, cache: dict, q: jax.Array, q_pos: jax.Array, window: int | None,
             scale: float, sinks: jax.Array | None = None) -> jax.Array:
    """Attention of q [T, K*G, D] over the cache -> [T, K*G, D] (sinks: see causal_softmax).

    Decode (up to kernels.ATTN_MAX_TOKENS tokens) of a float32 cache takes the native kernel
    (the same function; other dtypes stay on this XLA form)."""
    kv_heads = cache["k"].shape[0]
    if (kernels.attention_native(q.shape[0]) and cache["k"].dtype == jnp.float32
        and cache["v"].dtype == jnp.float32):
      return kernels.attend_dense(cache["k"], cache["v"], q, q_pos, window, scale, sinks)

    def one(q, q_pos):
      t, hq, d = q.shape
      g = hq // kv_heads
      scores = jnp.einsum("kmd,kds->kms", to_rows(q, kv_heads), cache["k"].astype(jnp.float32))
      probs = causal_softmax(scores.reshape(kv_heads, g, t, -1) * scale, q_pos, window, sinks)
      out = jnp.einsum("kms,ksd->kmd", probs.reshape(kv_heads, g * t, -1),
                       cache["v"].astype(jnp.float32))
      return from_rows(out, t)
    return blocked(one, q, q_pos)
