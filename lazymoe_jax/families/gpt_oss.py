"""gpt-oss: attention sinks, alternating sliding/full attention, YaRN RoPE, biases on every
projection, router top-k on biased logits then softmax over the k, clamped SwiGLU experts with
biases. Its checkpoints hold every expert of a layer in one tensor: float weights [E, in, out]
(transposed against the store's [out, in]) with gate and up interleaved on `out` (column 2j
gate j, 2j+1 up j); MXFP4 releases publish `{name}_blocks` [E, out, in/32, 16] and
`{name}_scales` [E, out, in/32] instead, already [out, in], kept byte for byte."""

from __future__ import annotations

import numpy as np

from lazymoe_jax.families import base
from lazymoe_jax.model import encodings
from lazymoe_jax.model.spec import FULL, MOE, SLIDING, Activation, Moe, ModelSpec, Router

# store tensor -> HF name under model.layers.N.mlp.experts.
FUSED = {"w_gate_up": "gate_up_proj", "w_down": "down_proj", "b_gate_up": "gate_up_proj_bias",
         "b_down": "down_proj_bias"}
INTERLEAVED = ("w_gate_up", "b_gate_up")  # gate/up alternate on the outputs
MXFP4_BLOCK = encodings.MXFP4_BLOCK


def deinterleave(tensor: str, a: np.ndarray) -> np.ndarray:
  """Store order (all gate rows, then all up rows) from the alternating rows, axis 0."""
  return a if tensor not in INTERLEAVED else np.concatenate([a[0::2], a[1::2]], axis=0)


class FusedExperts:
  """One MoE layer's experts from the fused [E, ...] tensors, float or MXFP4."""

  def __init__(self, spec: ModelSpec, layer: int):
    self.spec = spec
    self.pre = f"model.layers.{layer}.mlp.experts."

  def _names(self, mxfp4: bool) -> dict[str, dict[str, str]]:
    return {tensor: ({"blocks": f"{self.pre}{hf}_blocks", "scales": f"{self.pre}{hf}_scales"}
                     if mxfp4 and tensor.startswith("w_") else {"": self.pre + hf})
            for tensor, hf in FUSED.items()}

  def _mxfp4(self, folder) -> bool:
    return self.pre + "gate_up_proj_blocks" in folder.where

  def expected_in(self, folder) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for validation."""
    e, h, i, b = (self.spec.num_experts, self.spec.hidden_size, self.spec.moe.width,
                  MXFP4_BLOCK)
    shapes = {"w_gate_up": {"": (e, h, 2 * i), "blocks": (e, 2 * i, h // b, b // 2),
                            "scales": (e, 2 * i, h // b)},
              "w_down": {"": (e, i, h), "blocks": (e, h, i // b, b // 2),
                         "scales": (e, h, i // b)},
              "b_gate_up": {"": (e, 2 * i)}, "b_down": {"": (e, h)}}
    return {name: shapes[tensor][key]
            for tensor, names in self._names(self._mxfp4(folder)).items()
            for key, name in names.items()}

  def source_name(self, folder) -> str:
    names = self._names(self._mxfp4(folder))["w_gate_up"]
    return names.get("blocks", names.get(""))

  def source_encoding(self, folder) -> str | None:
    return "mxfp4" if self._mxfp4(folder) else None

  def read(self, folder, e: int, enc: encodings.Encoding) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for tensor, names in self._names(self._mxfp4(folder)).items():
      if tensor.startswith("b_"):
        out[tensor] = {"": deinterleave(tensor, folder.get_row(names[""], e).astype(np.float32))}
      elif "blocks" in names:  # published [out, in] blocks: rows reordered, bytes kept
        packed = {"": deinterleave(tensor, folder.get_row(names["blocks"], e)),
                  "scale": deinterleave(tensor, folder.get_row(names["scales"], e))}
        out[tensor] = (packed if enc.name == "mxfp4" else
                       enc.encode(encodings.get("mxfp4").decode(packed)))
      else:  # [in, out] -> [out, in]
        w = folder.get_row(names[""], e).astype(np.float32).T
        out[tensor] = enc.encode(deinterleave(tensor, w))
    return out


class GptOss(base.Family):
  model_type = "gpt_oss"
  aliases = ("gptoss",)
  default_rms_norm_eps = 1e-5
  default_rope_theta = 150000.0
  # what transformers' GptOssConfig assumes when config.json names no rope scaling
  default_rope_parameters = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": 4096}
  router_name = "router"

  @classmethod
  def spec(cls, hf: dict) -> ModelSpec:
    base.require(hf, "intermediate_size", "num_local_experts", "num_experts_per_tok")
    n = hf["num_hidden_layers"]
    kinds = hf.get("layer_types") or [SLIDING if (i + 1) % 2 else FULL for i in range(n)]
    bias = bool(hf.get("attention_bias", True))
    window = hf.get("sliding_window", 128)
    act = Activation("clamped_swiglu", float(hf.get("swiglu_alpha", 1.702)),
                     float(hf.get("swiglu_limit", 7.0)))
    return ModelSpec(
        **cls.common(hf), attention=cls.gqa(hf, qkv_bias=bias, o_bias=bias, sinks=True),
        moe=Moe(hf["num_local_experts"], hf["intermediate_size"],
                Router("topk_softmax", hf["num_experts_per_tok"], bias=True), act=act,
                expert_bias=True),
        layers=base.layer_plan([k if window else FULL for k in kinds], (MOE,) * n, window))

  @classmethod
  def experts(cls, spec: ModelSpec, layer: int) -> FusedExperts:
    return FusedExperts(spec, layer)
