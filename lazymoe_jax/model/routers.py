"""Routers: pure functions (logits[T, E], cfg) -> (ids int32[T, k], weights f32[T, k])."""

import jax
import jax.numpy as jnp

from lazymoe_jax.config import MoEConfig


def softmax_topk(logits: jax.Array, k: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
  """Softmax over all experts, keep the k largest, optionally renormalise them to sum 1.

  Mixtral always renormalises; Qwen2/3-MoE and OLMoE do so when `norm_topk_prob`.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, ids = jax.lax.top_k(probs, k)
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return ids.astype(jnp.int32), weights


def topk_softmax(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The k largest logits, then a softmax over those k only (gpt-oss)."""
  top, ids = jax.lax.top_k(logits.astype(jnp.float32), k)
  return ids.astype(jnp.int32), jax.nn.softmax(top, axis=-1)


def route(cfg: MoEConfig, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The router `cfg.router_type` names."""
  if cfg.router_type == "softmax_topk":
    return softmax_topk(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
  if cfg.router_type == "topk_softmax":
    return topk_softmax(logits, cfg.num_experts_per_tok)
  raise ValueError(f"unknown router_type {cfg.router_type!r}")
