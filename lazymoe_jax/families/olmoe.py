"""OLMoE: RMSNorm on the whole q and k projections, optional `clip_qkv`, softmax top-k."""

from lazymoe_jax.families import base
from lazymoe_jax.model.spec import FULL, MOE, Moe, ModelSpec, Router


class Olmoe(base.Family):
  model_type = "olmoe"
  default_rms_norm_eps = 1e-5

  @classmethod
  def spec(cls, hf: dict) -> ModelSpec:
    base.require(hf, "intermediate_size", "num_experts", "num_experts_per_tok")
    n = hf["num_hidden_layers"]
    bias = bool(hf.get("attention_bias", False))
    router = Router("softmax_topk", hf["num_experts_per_tok"],
                    renormalize=bool(hf.get("norm_topk_prob", False)))
    return ModelSpec(**cls.common(hf),
                     attention=cls.gqa(hf, qkv_bias=bias, o_bias=bias, qk_norm="proj",
                                       clip_qkv=hf.get("clip_qkv")),
                     moe=Moe(hf["num_experts"], hf["intermediate_size"], router),
                     layers=base.layer_plan([FULL] * n, (MOE,) * n, None))
