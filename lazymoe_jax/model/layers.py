"""Building blocks: norms, RoPE, linear layers, attention, SwiGLU experts.

Weights are [out, in] as Hugging Face stores them; products keep the weight as the left
operand and accumulate in float32. Legend: T = tokens, H = hidden, I = expert width.
"""

import jax
import jax.numpy as jnp

from lazymoe_jax.config import MoEConfig
from lazymoe_jax.model.encodings import Encoding

F32 = jnp.float32


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  x = x.astype(F32)
  return w.astype(F32) * (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps))


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
  """x [T, in] @ w[out, in]^T (+ b) -> [T, out] in float32, in the weight dtype's fast form."""
  y = Encoding(w.dtype.name).matmul({"": w}, x)
  return y if b is None else y + b.astype(F32)


def rope(x: jax.Array, pos: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, HF "rotate_half" convention. x [T, heads, D], pos [T]."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=F32) / d))
  freqs = pos.astype(F32)[:, None] * inv_freq[None, :]  # [T, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, None, :]  # [T, 1, D]
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * jnp.cos(emb) + rotated * jnp.sin(emb)


def attention(cfg: MoEConfig, kv, p: dict, x: jax.Array, pos: jax.Array, cache: dict,
              window: int | None) -> tuple[jax.Array, dict]:
  """Self-attention of x [T, H] at positions pos [T]; writes k, v into the cache first, then
  attends through it (so a compressed cache is what every attention reads)."""
  t = x.shape[0]
  hq, hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  qkv = linear(x, p["wqkv"], p.get("bqkv"))  # [T, (hq + 2 hk) * D]
  q, k, v = jnp.split(qkv, [hq * d, (hq + hk) * d], axis=1)
  if cfg.qk_norm == "proj":  # OLMoE: norm over the whole projection
    q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
    k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
  if cfg.clip_qkv is not None:
    q, k, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
  q, k, v = q.reshape(t, hq, d), k.reshape(t, hk, d), v.reshape(t, hk, d)
  if cfg.qk_norm == "head":  # Qwen3: norm per head
    q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
    k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
  q, k = rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta)
  cache = kv.update(cache, k, v, pos[0])
  o = kv.attend(cache, q, pos, window, d ** -0.5)  # [T, hq, D]
  return linear(o.reshape(t, hq * d), p["wo"], p.get("bo")), cache


def swiglu(enc: Encoding, w_gate_up: dict, w_down: dict, x: jax.Array) -> jax.Array:
  """One SwiGLU FFN, gate and up fused as w_gate_up [2I, H], w_down [H, I], each in encoding
  `enc` as {suffix: array}; x [T, H] -> [T, H] float32."""
  gu = enc.matmul(w_gate_up, x)  # [T, 2I]
  i = gu.shape[1] // 2
  return enc.matmul(w_down, jax.nn.silu(gu[:, :i]) * gu[:, i:])


def dense_swiglu(w_gate_up: jax.Array, w_down: jax.Array, x: jax.Array) -> jax.Array:
  """SwiGLU with plain float weights (dense MLP layers, shared experts)."""
  return swiglu(Encoding(w_gate_up.dtype.name), {"": w_gate_up}, {"": w_down}, x)
