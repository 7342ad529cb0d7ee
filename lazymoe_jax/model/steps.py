"""The jitted programs the engine runs, cut at the router boundary.

A decode or prefill pass over one layer is: `attn_router` (or `dense_layer` for layers
without experts) -> host maps expert ids to pool slots, reading misses from disk ->
`moe_decode` (one token, its k experts fused) or `expert_scatter_add` per expert then
`moe_finish` (prefill, tokens grouped by expert). The same compiled program serves every
layer of the same shape: layer indices are never static arguments.
"""

import functools

import jax
import jax.numpy as jnp

from lazymoe_jax.config import MoEConfig
from lazymoe_jax.model import layers
from lazymoe_jax.model.encodings import Encoding
from lazymoe_jax.model.routers import route


@functools.partial(jax.jit, static_argnames=("cfg",))
def embed(cfg: MoEConfig, g: dict, ids: jax.Array) -> jax.Array:
  del cfg
  return jnp.take(g["embed"], ids, axis=0).astype(jnp.float32)  # [T, H]


@functools.partial(jax.jit, static_argnames=("cfg",))
def head(cfg: MoEConfig, g: dict, x: jax.Array) -> jax.Array:
  w = g["lm_head"] if "lm_head" in g else g["embed"]  # tied: the embedding (or its re-encoding)
  return layers.linear(layers.rms_norm(x, g["final_norm"], cfg.rms_norm_eps), w)  # [T, V]


def _attention_residual(cfg, kv, window, p, x, pos, cache):
  a, cache = layers.attention(cfg, kv, p, layers.rms_norm(x, p["attn_norm"], cfg.rms_norm_eps),
                              pos, cache, window)
  h = x + a
  return h, layers.rms_norm(h, p["mlp_norm"], cfg.rms_norm_eps), cache


@functools.partial(jax.jit, static_argnames=("cfg", "kv", "window"), donate_argnames=("cache",))
def attn_router(cfg: MoEConfig, kv, window: int | None, p: dict, x: jax.Array, pos: jax.Array,
                cache: dict, ahead: tuple = ()):
  """Attention + residual + norm + router. Returns h, xn [T, H], ids/weights [T, k], cache, and
  the guesses: the routers of the next MoE layers (`ahead`, each its mlp_norm and router)
  applied to h, what a prefetcher can know before this layer's experts run."""
  h, xn, cache = _attention_residual(cfg, kv, window, p, x, pos, cache)
  ids, weights = route(cfg, layers.linear(xn, p["router"], p.get("router_bias")),
                       p.get("router_score_bias"))
  guess = tuple(route(cfg, layers.linear(layers.rms_norm(h, nxt["mlp_norm"], cfg.rms_norm_eps),
                                         nxt["router"], nxt.get("router_bias")),
                      nxt.get("router_score_bias"))[0] for nxt in ahead)
  return h, xn, ids, weights, cache, guess


@functools.partial(jax.jit, static_argnames=("cfg", "kv", "window"), donate_argnames=("cache",))
def dense_layer(cfg: MoEConfig, kv, window: int | None, p: dict, x: jax.Array, pos: jax.Array,
                cache: dict):
  """A whole layer whose MLP is dense (Qwen `mlp_only_layers`)."""
  h, xn, cache = _attention_residual(cfg, kv, window, p, x, pos, cache)
  return h + layers.dense_swiglu(p["w_gate_up"], p["w_down"], xn), cache


def _shared(cfg: MoEConfig, p: dict, xn: jax.Array) -> jax.Array:
  if not cfg.shared_expert_intermediate_size:
    return jnp.zeros_like(xn)
  out = layers.dense_swiglu(p["shared_w_gate_up"], p["shared_w_down"], xn)
  if not cfg.shared_expert_gate:  # DeepSeek: shared experts always count in full
    return out
  return jax.nn.sigmoid(layers.linear(xn, p["shared_gate"])) * out  # gate [T, 1]


@functools.partial(jax.jit, static_argnames=("cfg", "enc"))
def moe_decode(cfg: MoEConfig, enc: Encoding, p: dict, h: jax.Array, xn: jax.Array,
               weights: jax.Array, slots: tuple) -> jax.Array:
  """One token: slots[j] = {tensor: {suffix: array}} of its j-th expert; weights [1, k]."""
  routed = jnp.zeros_like(xn)
  for j, ex in enumerate(slots):
    # A barrier per expert: otherwise XLA shares the broadcast activation between the experts'
    # products and materialises it, measured 8.0 ms for 2 experts vs 1.2 ms for one.
    xj, ex = jax.lax.optimization_barrier((xn, ex))
    routed = routed + weights[:, j:j + 1] * layers.expert_ffn(enc, layers.ExpertAct.of(cfg), ex,
                                                              xj)
  return h + (routed + _shared(cfg, p, xn))


@functools.partial(jax.jit, static_argnames=("enc", "act"), donate_argnames=("acc",))
def expert_scatter_add(enc: Encoding, acc: jax.Array, xn: jax.Array, idx: jax.Array,
                       w: jax.Array, ex: dict, act: layers.ExpertAct = layers.SILU) -> jax.Array:
  """acc[idx] += w * expert(xn[idx]). idx, w [B] are padded with weight 0 to a bucket size."""
  y = layers.expert_ffn(enc, act, ex, jnp.take(xn, idx, axis=0))
  return acc.at[idx].add(y * w[:, None])


@functools.partial(jax.jit, static_argnames=("cfg",))
def moe_finish(cfg: MoEConfig, p: dict, h: jax.Array, xn: jax.Array, routed: jax.Array):
  return h + (routed + _shared(cfg, p, xn))
