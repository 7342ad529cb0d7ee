"""Building blocks: norms, RoPE, linear layers, attention, SwiGLU experts.

Weights are [out, in] as Hugging Face stores them; products keep the weight as the left
operand and accumulate in float32. Legend: T = tokens, H = hidden, I = expert width.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from lazymoe_jax.model.encodings import HIGHEST, Weight
from lazymoe_jax.model.spec import Activation, Attention, LatentAttention, Moe, Rope

F32 = jnp.float32


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  x = x.astype(F32)
  return w.astype(F32) * (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps))


def linear(x: jax.Array, w, b: jax.Array | None = None) -> jax.Array:
  """x [T, in] @ w[out, in]^T (+ b) -> [T, out] in float32, in the weight encoding's fast form
  (w a Weight, or a bare float array)."""
  y = Weight.of(w).matmul(x)
  return y if b is None else y + b.astype(F32)


def rope_inv_freq(r: Rope) -> np.ndarray:
  """Inverse frequencies [dim/2] (float32 numpy, a constant of the jitted programs): plain
  RoPE, or YaRN, which blends interpolated (divided by `factor`) and original frequencies
  along a linear ramp between the dimensions that turn beta_fast and beta_slow times over the
  original context (transformers `_compute_yarn_parameters`)."""
  d, base = r.dim, r.theta
  pos_freqs = base ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
  inv_freq = (1.0 / pos_freqs).astype(np.float32)
  if r.kind == "default":
    return inv_freq

  def correction_dim(rotations: float) -> float:
    orig = r.original_max_position_embeddings
    return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
  if r.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, d - 1)
  if low == high:
    high += 0.001  # as transformers: no zero-width ramp
  ramp = np.clip((np.arange(d // 2, dtype=np.float32) - np.float32(low)) /
                 np.float32(high - low), 0, 1)
  extrapolation = (1 - ramp).astype(np.float32)  # 1: keep the original frequency
  interpolated = (1.0 / (np.float32(r.factor) * pos_freqs)).astype(np.float32)
  return (interpolated * (1 - extrapolation) + inv_freq * extrapolation).astype(np.float32)


def rope(x: jax.Array, pos: jax.Array, theta: float, inv_freq: np.ndarray | None = None,
         scale: float = 1.0, interleaved: bool = False) -> jax.Array:
  """Rotary embedding, HF "rotate_half" convention. x [T, heads, D], pos [T]. `inv_freq`
  [D/2] overrides the plain frequencies of `theta`; cos and sin are multiplied by `scale`.
  interleaved (DeepSeek): pairs (x0, x1), (x2, x3), ... rotate by one frequency each; the
  result comes out de-interleaved (even channels, then odd), as transformers'
  `apply_rotary_pos_emb_interleave` returns it; q and k get the same order, so their products
  equal those of the pairs left in place (DeepSeek-V2's complex form)."""
  d = x.shape[-1]
  if interleaved:
    x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
  if inv_freq is None:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=F32) / d))
  freqs = pos.astype(F32)[:, None] * jnp.asarray(inv_freq, F32)[None, :]  # [T, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, None, :]  # [T, 1, D]
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  if scale != 1.0:
    cos, sin = cos * scale, sin * scale
  return x * cos + rotated * sin


def apply_rope(r: Rope, x: jax.Array, pos: jax.Array) -> jax.Array:
  """The spec's rotary embedding on x [T, heads, D]: the first r.dim channels rotate, the
  rest pass through unchanged (partial rotary)."""
  if r.dim == x.shape[-1]:
    return rope(x, pos, r.theta, rope_inv_freq(r), r.attention_factor, r.interleaved)
  rotated = rope(x[..., :r.dim], pos, r.theta, rope_inv_freq(r), r.attention_factor,
                 r.interleaved)
  return jnp.concatenate([rotated, x[..., r.dim:]], axis=-1)


def attention(spec: Attention | LatentAttention, kv, p: dict, x: jax.Array, pos: jax.Array,
              cache: dict, window: int | None, batched: bool = False) -> tuple[jax.Array, dict]:
  """Self-attention of x [T, H] at positions pos [T], the kind the spec names; writes k, v
  into the cache first, then attends through it (so a compressed cache is what every
  attention reads).

  batched: row t of x is the next token of sequence t, and cache is the stack of those
  sequences' caches (a leading sequence axis on every leaf, engine/batch.py): the projections
  run over all rows at once, the cache write and the attention once per row through jax.vmap
  of the cache's own update / attend, each at its own position (see cache_attend)."""
  if isinstance(spec, LatentAttention):
    return latent_attention(spec, kv, p, x, pos, cache, window, batched)
  return gqa_attention(spec, kv, p, x, pos, cache, window, batched)


def cache_attend(kv, cache: dict, q: jax.Array, k: jax.Array, v: jax.Array | None,
                 pos: jax.Array, window: int | None, scale: float, batched: bool,
                 **attend_kw) -> tuple[jax.Array, dict]:
  """Writes k, v [T, K, D] at positions pos [T] and attends q [T, H, D] through the cache.

  One sequence: pos are consecutive, written from pos[0]. batched: one token per sequence,
  cache stacked [N, ...]; the same update and attend, vmapped over the sequences, so any KV
  kind (and any attention kernel written against the kv interface that supports vmap) serves
  a batch, each row masked by its own position."""
  if not batched:
    cache = kv.update(cache, k, v, pos[0])
    return kv.attend(cache, q, pos, window, scale, **attend_kw), cache

  def one(c, q1, k1, v1, p1):  # one sequence: q1 [H, D], k1 / v1 [K, D], p1 []
    c = kv.update(c, k1[None], None if v1 is None else v1[None], p1)
    return kv.attend(c, q1[None], p1[None], window, scale, **attend_kw)[0], c
  if v is None:
    return jax.vmap(lambda c, q1, k1, p1: one(c, q1, k1, None, p1))(cache, q, k, pos)
  return jax.vmap(one)(cache, q, k, v, pos)


def gqa_attention(a: Attention, kv, p: dict, x: jax.Array, pos: jax.Array, cache: dict,
                  window: int | None, batched: bool = False) -> tuple[jax.Array, dict]:
  """Grouped-query attention (model/spec.py Attention)."""
  t = x.shape[0]
  hq, hk, d = a.num_heads, a.num_kv_heads, a.head_dim
  qkv = linear(x, p["wqkv"], p.get("bqkv"))  # [T, (hq + 2 hk) * D]
  q, k, v = jnp.split(qkv, [hq * d, (hq + hk) * d], axis=1)
  if a.qk_norm == "proj":  # OLMoE: norm over the whole projection
    q = rms_norm(q, p["q_norm"], a.norm_eps)
    k = rms_norm(k, p["k_norm"], a.norm_eps)
  if a.clip_qkv is not None:
    q, k, v = (jnp.clip(z, -a.clip_qkv, a.clip_qkv) for z in (q, k, v))
  q, k, v = q.reshape(t, hq, d), k.reshape(t, hk, d), v.reshape(t, hk, d)
  if a.qk_norm == "head":  # Qwen3: norm per head
    q = rms_norm(q, p["q_norm"], a.norm_eps)
    k = rms_norm(k, p["k_norm"], a.norm_eps)
  q, k = apply_rope(a.rope, q, pos), apply_rope(a.rope, k, pos)
  sinks = p["sinks"] if a.sinks else None  # [hq]
  scale = d ** -0.5 if a.scale is None else a.scale
  o, cache = cache_attend(kv, cache, q, k, v, pos, window, scale, batched,
                          sinks=sinks)  # [T, hq, D]
  return linear(o.reshape(t, hq * d), p["wo"], p.get("bo")), cache


def latent_attention(a: LatentAttention, kv, p: dict, x: jax.Array, pos: jax.Array,
                     cache: dict, window: int | None, batched: bool = False
                     ) -> tuple[jax.Array, dict]:
  """Multi-head latent attention (DeepSeek-V2/V3) through a LatentKV cache (kv/latent.py).

  q = wq x, or wq_b rms_norm(wq_a x) with a q LoRA; per head [nope | rope]. wkv_a x = [latent
  c (R), shared key k_r (Dr)]; c is normed, k_r and q's rope part roped. The cache keeps [c,
  k_r] per position. wkv_b [H * (Dn + Dv), R] holds per head W_uk [Dn, R] then W_uv [Dv, R]:
  the query's nope part is taken into the latent space (W_uk^T q_nope), the attention returns
  weighted latents, W_uv maps them to the head's values. Legend: R = kv_lora_rank,
  Dn / Dr = qk_nope / qk_rope_head_dim, Dv = v_head_dim.
  """
  t = x.shape[0]
  h, dn, dr = a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim
  r, dv = a.kv_lora_rank, a.v_head_dim
  if a.q_lora_rank:
    q_a = rms_norm(linear(x, p["wq_a"], p.get("bq_a")), p["q_a_norm"], a.latent_norm_eps)
    q = linear(q_a, p["wq_b"])
  else:
    q = linear(x, p["wq"])
  q = q.reshape(t, h, dn + dr)
  ckv = linear(x, p["wkv_a"], p.get("bkv_a"))  # [T, R + Dr]
  c = rms_norm(ckv[:, :r], p["kv_a_norm"], a.latent_norm_eps)
  q_r, k_r = apply_rope(a.rope, q[..., dn:], pos), apply_rope(a.rope, ckv[:, None, r:], pos)
  wkv_b = p["wkv_b"].astype(F32).reshape(h, dn + dv, r)
  # HIGHEST: wkv_b may be an upcast 16-bit weight (encodings.Float.matmul says why)
  q_c = jnp.einsum("thn,hnr->thr", q[..., :dn], wkv_b[:, :dn], precision=HIGHEST)  # [T, H, R]
  o_c, cache = cache_attend(kv, cache, jnp.concatenate([q_c, q_r], axis=-1),
                            jnp.concatenate([c[:, None, :], k_r], axis=-1), None, pos, window,
                            a.scale, batched, value_dim=r)  # [T, H, R]
  o = jnp.einsum("thr,hvr->thv", o_c, wkv_b[:, dn:], precision=HIGHEST)  # [T, H, Dv]
  return linear(o.reshape(t, h * dv), p["wo"], p.get("bo")), cache


def activate(act: Activation, gate: jax.Array, up: jax.Array) -> jax.Array:
  """The gated activation between an expert's two products (model/spec.py Activation)."""
  if act.kind == "silu":
    return jax.nn.silu(gate) * up
  if act.kind == "clamped_swiglu":
    gate = jnp.minimum(gate, act.limit)
    up = jnp.clip(up, -act.limit, act.limit)
    return (up + 1.0) * (gate * jax.nn.sigmoid(gate * act.alpha))
  raise ValueError(f"unknown expert activation {act.kind!r}")


SILU = Activation()


def swiglu(w_gate_up, w_down, x: jax.Array, act: Activation = SILU,
           b_gate_up: jax.Array | None = None, b_down: jax.Array | None = None) -> jax.Array:
  """One gated FFN, gate and up fused as w_gate_up [2I, H] (gate rows first), w_down [H, I]
  (Weights or float arrays), optional biases [2I], [H]; x [T, H] -> [T, H] float32."""
  gu = linear(x, w_gate_up, b_gate_up)  # [T, 2I]
  i = gu.shape[1] // 2
  return linear(activate(act, gu[:, :i], gu[:, i:]), w_down, b_down)


def expert_ffn(act: Activation, ex: dict, x: jax.Array) -> jax.Array:
  """A routed expert as the pool holds it: ex = {tensor: Weight}; biases optional."""
  b_gu, b_dn = ex.get("b_gate_up"), ex.get("b_down")
  return swiglu(ex["w_gate_up"], ex["w_down"], x, act,
                None if b_gu is None else b_gu.arrays[""],
                None if b_dn is None else b_dn.arrays[""])
