"""Typed model specs: what a family declares and the model math and KV caches read.

A family (lazymoe_jax/families/) parses config.json into one `ModelSpec`, built from the parts
below. Each part names one variant of one mechanism (an attention kind, a RoPE, a router, an
expert activation) with exactly the parameters that variant has; per-layer kinds (sliding or
full attention, dense or MoE MLP) are the `layers` tuple. Specs are frozen and hashable, so
jitted programs take them as static arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

FULL = "full_attention"
SLIDING = "sliding_attention"
MOE = "moe"
DENSE_MLP = "dense"


@dataclasses.dataclass(frozen=True)
class Rope:
  """Rotary embedding over the first `dim` channels of each head (partial rotary when `dim` is
  less than the head's width; the rest pass through). kind "default", or "yarn" with its
  parameters (attention_factor already resolved: cos and sin are multiplied by it).
  interleaved: (even, odd) channel pairs rotate together (DeepSeek) instead of the two halves."""

  theta: float
  dim: int
  kind: Literal["default", "yarn"] = "default"
  factor: float = 1.0
  original_max_position_embeddings: int = 0
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  truncate: bool = True
  attention_factor: float = 1.0
  interleaved: bool = False


@dataclasses.dataclass(frozen=True)
class Attention:
  """Grouped-query attention: q/k/v projections fused as `wqkv`, RoPE, a KV cache per layer.

  qk_norm: "none", "head" (RMSNorm over each head, Qwen3) or "proj" (over the whole q and k
  projections, OLMoE). sinks: a learned logit per head in each softmax denominator (gpt-oss).
  scale: the softmax scale, None for head_dim ** -0.5."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope: Rope
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: Literal["none", "head", "proj"] = "none"
  norm_eps: float = 1e-6
  clip_qkv: float | None = None
  sinks: bool = False
  scale: float | None = None

  cache_kind = "heads"  # per-head keys and values (kv/dense.py, kv/turboquant.py)


@dataclasses.dataclass(frozen=True)
class LatentAttention:
  """Multi-head latent attention (DeepSeek-V2/V3): q through an optional rank-`q_lora_rank`
  bottleneck; keys and values from one latent [kv_lora_rank] per token plus one roped key
  [qk_rope_head_dim] shared by all heads, which is what the cache keeps (kv/latent.py)."""

  num_heads: int
  q_lora_rank: int
  kv_lora_rank: int
  qk_nope_head_dim: int
  qk_rope_head_dim: int
  v_head_dim: int
  rope: Rope
  scale: float
  bias: bool = False  # on q_a_proj and kv_a_proj_with_mqa, and o_proj
  latent_norm_eps: float = 1e-6

  cache_kind = "latent"


@dataclasses.dataclass(frozen=True)
class Router:
  """How a token picks its experts (model/routers.py has one function per kind):
  "softmax_topk" (Mixtral, Qwen, OLMoE; `renormalize` the k weights), "topk_softmax" (gpt-oss),
  "sigmoid_group_topk" (DeepSeek-V3, GLM-4.5: experts in `n_group` groups of which `topk_group`
  are eligible, a selection-only score bias), "softmax_group_topk" (DeepSeek-V2). The final
  weights are multiplied by `scaling`. bias: the router product has a bias (gpt-oss);
  score_bias: the learned `e_score_correction_bias`."""

  kind: Literal["softmax_topk", "topk_softmax", "sigmoid_group_topk", "softmax_group_topk"]
  top_k: int
  renormalize: bool = False
  n_group: int = 1
  topk_group: int = 1
  scaling: float = 1.0
  bias: bool = False
  score_bias: bool = False


@dataclasses.dataclass(frozen=True)
class Activation:
  """The gated activation between an expert's two products. "silu": silu(gate) * up.
  "clamped_swiglu" (gpt-oss): gate clamped above at `limit`, up to [-limit, limit], then
  (up + 1) * gate * sigmoid(alpha * gate)."""

  kind: Literal["silu", "clamped_swiglu"] = "silu"
  alpha: float = 1.702
  limit: float = 7.0


@dataclasses.dataclass(frozen=True)
class Moe:
  """The MoE block: routed experts of width `width` (gate and up fused as [2 width, H], down
  [H, width]), optional biases on both products (gpt-oss), and an optional always-on shared
  expert of width `shared_width`, behind a sigmoid gate when `shared_gate` (Qwen2-MoE)."""

  num_experts: int
  width: int
  router: Router
  act: Activation = Activation()
  expert_bias: bool = False
  shared_width: int = 0
  shared_gate: bool = False


@dataclasses.dataclass(frozen=True)
class Layer:
  """One decoder layer: its attention kind (a sliding `window`, or full) and its MLP kind."""

  attention: str = FULL
  mlp: str = MOE
  window: int | None = None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A decoder-only MoE model as the engine runs it."""

  family: str
  vocab_size: int
  hidden_size: int
  norm_eps: float
  attention: Attention | LatentAttention
  moe: Moe
  layers: tuple[Layer, ...]
  max_position_embeddings: int
  dense_width: int = 0  # the dense-MLP layers' width
  tie_word_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()

  # ---- what most callers ask --------------------------------------------------------------
  @property
  def num_hidden_layers(self) -> int:
    return len(self.layers)

  @property
  def moe_layers(self) -> tuple[int, ...]:
    return tuple(i for i, layer in enumerate(self.layers) if layer.mlp == MOE)

  @property
  def num_experts(self) -> int:
    return self.moe.num_experts

  @property
  def num_experts_per_tok(self) -> int:
    return self.moe.router.top_k

  @property
  def moe_intermediate_size(self) -> int:
    return self.moe.width


def cache_spec(num_kv_heads: int, head_dim: int, num_layers: int = 1,
               num_heads: int | None = None) -> ModelSpec:
  """The smallest ModelSpec a KV cache can be built for (the caches' own tests and benchmarks):
  only the attention's heads and the layer count mean anything."""
  attention = Attention(num_heads or num_kv_heads, num_kv_heads, head_dim, Rope(1e4, head_dim))
  return ModelSpec("cache", 1, num_kv_heads * head_dim, 1e-6, attention,
                   Moe(1, 1, Router("softmax_topk", 1)), (Layer(),) * num_layers, 1 << 20)
