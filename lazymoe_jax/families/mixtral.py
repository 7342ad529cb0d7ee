"""Mixtral: softmax top-k renormalised; one sliding window for all layers when set."""

from lazymoe_jax.families import base
from lazymoe_jax.model.spec import FULL, MOE, SLIDING, Moe, ModelSpec, Router


class Mixtral(base.Family):
  model_type = "mixtral"
  default_rms_norm_eps = 1e-5
  default_rope_theta = 1e6
  moe_block = "block_sparse_moe"
  expert_projections = ("w1", "w3", "w2")

  @classmethod
  def spec(cls, hf: dict) -> ModelSpec:
    base.require(hf, "intermediate_size", "num_local_experts", "num_experts_per_tok")
    n = hf["num_hidden_layers"]
    window = hf.get("sliding_window")
    router = Router("softmax_topk", hf["num_experts_per_tok"], renormalize=True)
    return ModelSpec(**cls.common(hf), attention=cls.gqa(hf),
                     moe=Moe(hf["num_local_experts"], hf["intermediate_size"], router),
                     layers=base.layer_plan([SLIDING if window else FULL] * n, (MOE,) * n,
                                            window))
