"""DeepSeek-V3 and V2: multi-head latent attention (q LoRA, a compressed KV latent, one roped
key shared by all heads, interleaved RoPE), the first `first_k_dense_replace` layers dense,
shared experts without a gate, group-limited routers, multi-token-prediction layers skipped.

V3: sigmoid router with a selection-only score bias, group score = sum of its two best experts,
weights renormalised (`norm_topk_prob`) and scaled. V2: softmax router, `topk_method` "greedy"
(plain top-k) or "group_limited_greedy" (group score = its best expert), weights scaled but
never renormalised (transformers' DeepseekV2 ignores `norm_topk_prob`). Block-scaled FP8
weights (V3's release) are dequantised by the converter's safetensors reader."""

from __future__ import annotations

from typing import Any

from lazymoe_jax.errors import UnsupportedModelError
from lazymoe_jax.families import base
from lazymoe_jax.model.spec import (DENSE_MLP, FULL, MOE, LatentAttention, Moe, ModelSpec,
                                    Router)


class DeepseekV3(base.Family):
  model_type = "deepseek_v3"
  aliases = ("deepseekv3",)
  shared_expert_name = "shared_experts"
  # transformers' DeepseekV3Config defaults, for keys config.json omits
  defaults: dict[str, Any] = dict(
      q_lora_rank=1536, first_k_dense_replace=3, n_shared_experts=1, routed_scaling_factor=2.5,
      n_group=8, topk_group=4, norm_topk_prob=True, rope_interleave=True)

  @classmethod
  def router(cls, hf: dict, k: int, n_group: int, topk_group: int, scaling: float) -> Router:
    return Router("sigmoid_group_topk", k, renormalize=bool(base.get(hf, "norm_topk_prob",
                                                                      cls.defaults)),
                  n_group=n_group, topk_group=topk_group, scaling=scaling, score_bias=True)

  @classmethod
  def spec(cls, hf: dict) -> ModelSpec:
    d = cls.defaults
    base.require(hf, "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "moe_intermediate_size", "num_experts_per_tok", "intermediate_size")
    if hf.get("mlp_bias"):
      raise UnsupportedModelError("mlp_bias=True is not supported (no published DeepSeek model "
                                  "uses it); the dense MLPs and shared experts have no bias here.")
    n = hf["num_hidden_layers"]
    experts = hf.get("n_routed_experts") or hf.get("num_local_experts") or hf.get("num_experts")
    if not experts:
      raise UnsupportedModelError("config.json lacks n_routed_experts.")
    n_group = int(base.get(hf, "n_group", d) or 1)
    topk_group = int(base.get(hf, "topk_group", d) or 1)
    if experts % n_group or not 1 <= topk_group <= n_group:
      raise UnsupportedModelError(
          f"n_group={n_group}, topk_group={topk_group} with {experts} experts: the experts must "
          "split evenly into n_group groups and 1 <= topk_group <= n_group.")
    first_dense = int(base.get(hf, "first_k_dense_replace", d) or 0)
    rope_dim, nope = hf["qk_rope_head_dim"], hf["qk_nope_head_dim"]
    rope = base.rope(hf, rope_dim, cls.default_rope_theta, cls.default_rope_parameters,
                     interleaved=bool(base.get(hf, "rope_interleave", d)))
    # softmax scale: transformers' yarn_apply_mscale (YaRN with mscale_all_dim squares it in)
    scale = (nope + rope_dim) ** -0.5
    params = base.rope_parameters(hf, cls.default_rope_theta, cls.default_rope_parameters)
    if rope.kind != "default" and params.get("mscale_all_dim"):
      scale *= base.yarn_mscale(rope.factor, params["mscale_all_dim"]) ** 2
    attention = LatentAttention(
        num_heads=hf["num_attention_heads"], q_lora_rank=int(base.get(hf, "q_lora_rank", d) or 0),
        kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim,
        v_head_dim=hf["v_head_dim"], rope=rope, scale=scale,
        bias=bool(hf.get("attention_bias", False)))
    width = hf["moe_intermediate_size"]
    router = cls.router(hf, hf["num_experts_per_tok"], n_group, topk_group,
                        float(base.get(hf, "routed_scaling_factor", d)))
    moe = Moe(experts, width, router,
              shared_width=width * int(base.get(hf, "n_shared_experts", d) or 0))
    return ModelSpec(**cls.common(hf), attention=attention, moe=moe,
                     dense_width=hf["intermediate_size"],
                     layers=base.layer_plan([FULL] * n, tuple(
                         DENSE_MLP if i < first_dense else MOE for i in range(n)), None))

  @classmethod
  def attention_names(cls, spec: ModelSpec, att: str) -> dict[str, list[str]]:
    """MLA's projections, unfused: each feeds a different product (layers.latent_attention)."""
    a = spec.attention
    names = {"wkv_a": [att + "kv_a_proj_with_mqa.weight"],
             "kv_a_norm": [att + "kv_a_layernorm.weight"], "wkv_b": [att + "kv_b_proj.weight"],
             "wo": [att + "o_proj.weight"]}
    if a.q_lora_rank:
      names |= {"wq_a": [att + "q_a_proj.weight"], "q_a_norm": [att + "q_a_layernorm.weight"],
                "wq_b": [att + "q_b_proj.weight"]}
    else:
      names["wq"] = [att + "q_proj.weight"]
    if a.bias:  # transformers: on q_a_proj, kv_a_proj_with_mqa and o_proj
      names["bkv_a"] = [att + "kv_a_proj_with_mqa.bias"]
      names["bo"] = [att + "o_proj.bias"]
      if a.q_lora_rank:
        names["bq_a"] = [att + "q_a_proj.bias"]
    return names

  @classmethod
  def param_shapes(cls, spec: ModelSpec) -> dict[str, list[tuple[int, ...]]]:
    a, h = spec.attention, spec.hidden_size
    heads, r, qr = a.num_heads, a.kv_lora_rank, a.q_lora_rank
    q = heads * (a.qk_nope_head_dim + a.qk_rope_head_dim)
    return super().param_shapes(spec) | {
        "wq": [(q, h)], "wq_a": [(qr, h)], "bq_a": [(qr,)], "q_a_norm": [(qr,)],
        "wq_b": [(q, qr)], "wkv_a": [(r + a.qk_rope_head_dim, h)],
        "bkv_a": [(r + a.qk_rope_head_dim,)], "kv_a_norm": [(r,)],
        "wkv_b": [(heads * (a.qk_nope_head_dim + a.v_head_dim), r)],
        "wo": [(h, heads * a.v_head_dim)], "bo": [(h,)]}

  @classmethod
  def ignored_prefixes(cls, hf: dict) -> tuple[str, ...]:
    return base.mtp_prefixes(hf)


class DeepseekV2(DeepseekV3):
  model_type = "deepseek_v2"
  aliases = ("deepseekv2",)
  defaults: dict[str, Any] = dict(
      q_lora_rank=1536, first_k_dense_replace=0, n_shared_experts=2, routed_scaling_factor=1.0,
      n_group=None, topk_group=None, norm_topk_prob=False, rope_interleave=True)

  @classmethod
  def router(cls, hf: dict, k: int, n_group: int, topk_group: int, scaling: float) -> Router:
    method = hf.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
      raise UnsupportedModelError(
          f"topk_method={method!r} is not supported for deepseek_v2 (supported: 'greedy', "
          "'group_limited_greedy', as transformers implements).")
    kind = "softmax_topk" if method == "greedy" else "softmax_group_topk"
    return Router(kind, k, n_group=n_group, topk_group=topk_group, scaling=scaling)
