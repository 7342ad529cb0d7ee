"""Qwen2-MoE (qkv bias, a shared expert behind a sigmoid gate) and Qwen3-MoE (RMSNorm on q and
k per head, no shared expert); both route softmax top-k, renormalised when `norm_topk_prob`,
with dense-MLP layers where `mlp_only_layers` / `decoder_sparse_step` say."""

from lazymoe_jax.families import base
from lazymoe_jax.model.spec import FULL, SLIDING, Moe, ModelSpec, Router


def _moe(hf: dict, **kw) -> Moe:
  base.require(hf, "moe_intermediate_size", "num_experts", "num_experts_per_tok")
  router = Router("softmax_topk", hf["num_experts_per_tok"],
                  renormalize=bool(hf.get("norm_topk_prob", False)))
  return Moe(hf["num_experts"], hf["moe_intermediate_size"], router, **kw)


class Qwen2Moe(base.Family):
  model_type = "qwen2_moe"
  aliases = ("qwen2moe",)

  @classmethod
  def spec(cls, hf: dict) -> ModelSpec:
    n = hf["num_hidden_layers"]
    use_sw = bool(hf.get("use_sliding_window", False))
    kinds = hf.get("layer_types") or [
        SLIDING if (use_sw and (i + 1) % 2 and i < hf.get("max_window_layers", 28)) else FULL
        for i in range(n)]
    shared = hf.get("shared_expert_intermediate_size", 0)
    return ModelSpec(**cls.common(hf), attention=cls.gqa(hf, qkv_bias=bool(hf.get("qkv_bias",
                                                                                  True))),
                     moe=_moe(hf, shared_width=shared, shared_gate=bool(shared)),
                     dense_width=hf.get("intermediate_size", 0),
                     layers=base.layer_plan(kinds, base.sparse_mlp_layers(hf, n),
                                            hf.get("sliding_window") if use_sw else None))


class Qwen3Moe(base.Family):
  model_type = "qwen3_moe"
  aliases = ("qwen3moe",)

  @classmethod
  def spec(cls, hf: dict) -> ModelSpec:
    n = hf["num_hidden_layers"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    bias = bool(hf.get("attention_bias", False))
    return ModelSpec(**cls.common(hf),
                     attention=cls.gqa(hf, qkv_bias=bias, o_bias=bias, qk_norm="head"),
                     moe=_moe(hf), dense_width=hf.get("intermediate_size", 0),
                     layers=base.layer_plan([SLIDING if window else FULL] * n,
                                            base.sparse_mlp_layers(hf, n), window))
