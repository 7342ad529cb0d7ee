"""GLM-4.5 / 4.6 / 4.5-Air (`glm4_moe`): grouped-query attention with q/k/v biases (none on
o_proj), optional RMSNorm on q and k per head (`use_qk_norm`), RoPE on the first half of each
head (`partial_rotary_factor`, 0.5 when config.json omits it, the two-halves convention within
the rotated part); DeepSeek-V3's MoE: sigmoid router with the selection-only
`e_score_correction_bias`, group-limited top-k, weights renormalised (`norm_topk_prob`) and
scaled, `n_shared_experts` ungated shared experts, the first `first_k_dense_replace` layers
dense; multi-token-prediction layers after the last one skipped, as transformers does."""

from lazymoe_jax.errors import UnsupportedModelError
from lazymoe_jax.families import base
from lazymoe_jax.model.spec import DENSE_MLP, FULL, MOE, Moe, ModelSpec, Router


class Glm4Moe(base.Family):
  model_type = "glm4_moe"
  aliases = ("glm4moe",)
  default_rms_norm_eps = 1e-5
  shared_expert_name = "shared_experts"
  # transformers' Glm4MoeConfig defaults, for keys config.json omits
  defaults = dict(partial_rotary_factor=0.5, n_shared_experts=1, n_group=1, topk_group=1,
                  routed_scaling_factor=1.0, norm_topk_prob=True, first_k_dense_replace=1,
                  n_routed_experts=128)

  @classmethod
  def spec(cls, hf: dict) -> ModelSpec:
    d = cls.defaults
    base.require(hf, "moe_intermediate_size", "num_experts_per_tok", "intermediate_size")
    rope_dict = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if "partial_rotary_factor" not in hf and "partial_rotary_factor" not in rope_dict:
      hf = dict(hf, partial_rotary_factor=d["partial_rotary_factor"])
    n = hf["num_hidden_layers"]
    experts = int(base.get(hf, "n_routed_experts", d))
    n_group, topk_group = int(base.get(hf, "n_group", d)), int(base.get(hf, "topk_group", d))
    if experts % n_group or not 1 <= topk_group <= n_group:
      raise UnsupportedModelError(
          f"n_group={n_group}, topk_group={topk_group} with {experts} experts: the experts must "
          "split evenly into n_group groups and 1 <= topk_group <= n_group.")
    router = Router("sigmoid_group_topk", hf["num_experts_per_tok"],
                    renormalize=bool(base.get(hf, "norm_topk_prob", d)), n_group=n_group,
                    topk_group=topk_group,
                    scaling=float(base.get(hf, "routed_scaling_factor", d)), score_bias=True)
    width = hf["moe_intermediate_size"]
    first_dense = int(base.get(hf, "first_k_dense_replace", d))
    return ModelSpec(
        **cls.common(hf),
        attention=cls.gqa(hf, qkv_bias=bool(hf.get("attention_bias", False)),
                          qk_norm="head" if hf.get("use_qk_norm") else "none"),
        moe=Moe(experts, width, router,
                shared_width=width * int(base.get(hf, "n_shared_experts", d))),
        dense_width=hf["intermediate_size"],
        layers=base.layer_plan([FULL] * n, tuple(
            DENSE_MLP if i < first_dense else MOE for i in range(n)), None))

  @classmethod
  def ignored_prefixes(cls, hf: dict) -> tuple[str, ...]:
    return base.mtp_prefixes(hf)
