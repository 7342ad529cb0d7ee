"""Routers: pure functions (logits[T, E], spec) -> (ids int32[T, k], weights f32[T, k])."""

import jax
import jax.numpy as jnp

from lazymoe_jax.model.spec import Router


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


def _group_mask(choice: jax.Array, n_group: int, topk_group: int,
                group_score: str) -> jax.Array:
  """bool [T, E]: experts whose group is among the `topk_group` best of `n_group` equal groups,
  a group scored by its best expert ("max") or the sum of its best two ("top2_sum")."""
  t, e = choice.shape
  grouped = choice.reshape(t, n_group, e // n_group)
  if group_score == "max":
    scores = jnp.max(grouped, axis=-1)
  else:
    scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
  _, best = jax.lax.top_k(scores, topk_group)  # [T, topk_group]
  keep = jnp.any(best[:, :, None] == jnp.arange(n_group)[None, None, :], axis=1)  # [T, G]
  return jnp.repeat(keep, e // n_group, axis=1)


def sigmoid_group_topk(logits: jax.Array, k: int, renormalize: bool, n_group: int,
                       topk_group: int, score_bias: jax.Array | None) -> tuple[jax.Array,
                                                                              jax.Array]:
  """DeepSeek-V3: sigmoid scores; experts chosen on scores + score_bias (the learned
  `e_score_correction_bias`), only within the topk_group best groups (group score = sum of its
  two best biased scores); weights are the unbiased scores, renormalised (sum + 1e-20) when
  asked."""
  scores = jax.nn.sigmoid(logits.astype(jnp.float32))
  choice = scores if score_bias is None else scores + score_bias.astype(jnp.float32)
  if n_group > 1:
    choice = jnp.where(_group_mask(choice, n_group, topk_group, "top2_sum"), choice, -jnp.inf)
  _, ids = jax.lax.top_k(choice, k)
  weights = jnp.take_along_axis(scores, ids, axis=-1)
  if renormalize:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  return ids.astype(jnp.int32), weights


def softmax_group_topk(logits: jax.Array, k: int, n_group: int,
                       topk_group: int) -> tuple[jax.Array, jax.Array]:
  """DeepSeek-V2 "group_limited_greedy": softmax scores, experts outside the topk_group best
  groups (group score = its best expert) set to 0, then the k largest with their scores."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  probs = jnp.where(_group_mask(probs, n_group, topk_group, "max"), probs, 0.0)
  weights, ids = jax.lax.top_k(probs, k)
  return ids.astype(jnp.int32), weights


def route(r: Router, logits: jax.Array,
          score_bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The router `r.kind` names; weights times `r.scaling`. score_bias [E]: the
  selection-only bias of "sigmoid_group_topk" (`Router.score_bias`)."""
  k = r.top_k
  if r.kind == "softmax_topk":
    ids, weights = softmax_topk(logits, k, r.renormalize)
  elif r.kind == "topk_softmax":
    ids, weights = topk_softmax(logits, k)
  elif r.kind == "sigmoid_group_topk":
    ids, weights = sigmoid_group_topk(logits, k, r.renormalize, r.n_group, r.topk_group,
                                      score_bias)
  elif r.kind == "softmax_group_topk":
    ids, weights = softmax_group_topk(logits, k, r.n_group, r.topk_group)
  else:
    raise ValueError(f"unknown router kind {r.kind!r}")
  if r.scaling != 1.0:
    weights = weights * r.scaling
  return ids, weights
