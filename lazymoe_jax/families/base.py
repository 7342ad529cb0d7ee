"""What every family shares: config.json parsing helpers, the usual Hugging Face tensor names,
and the per-expert checkpoint reader. A family module subclasses `Family` and overrides only
what its checkpoints do differently.

A Family knows three things:
  spec(hf)                      config.json (a dict) -> ModelSpec (model/spec.py)
  layer_names(spec, layer)      store param -> the HF tensors concatenated into it (axis 0)
  experts(spec, layer)          the reader of one MoE layer's routed experts
plus `ignored_prefixes(hf)`: checkpoint tensors the model does not use (e.g. MTP layers).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from lazymoe_jax.errors import UnsupportedModelError
from lazymoe_jax.model import encodings
from lazymoe_jax.model.spec import (DENSE_MLP, FULL, MOE, SLIDING, Attention, Layer,
                                    ModelSpec, Rope)


def require(hf: dict[str, Any], *keys: str) -> None:
  missing = [k for k in keys if k not in hf]
  if missing:
    raise UnsupportedModelError(f"config.json lacks required keys {missing}.")


def get(hf: dict[str, Any], key: str, defaults: dict[str, Any]) -> Any:
  """hf[key], or the family default when config.json omits the key (an explicit null stays)."""
  return hf[key] if key in hf else defaults[key]


def rope_parameters(hf: dict[str, Any], default_theta: float,
                    default_params: dict[str, Any] | None) -> dict[str, Any]:
  """The RoPE parameter dict as transformers standardises it (`rope_parameters`, or the older
  `rope_scaling` plus `rope_theta`, or the family's default)."""
  params = hf.get("rope_parameters")
  scaling = hf.get("rope_scaling")
  if params is None and scaling is not None:
    params = dict(scaling, rope_theta=hf.get("rope_theta", default_theta))
  if params is None and default_params is not None:
    params = dict(default_params, rope_theta=hf.get("rope_theta", default_theta))
  return params or {"rope_theta": hf.get("rope_theta", default_theta)}


def yarn_mscale(scale: float, m: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def rope(hf: dict[str, Any], head_dim: int, default_theta: float,
         default_params: dict[str, Any] | None = None, interleaved: bool = False) -> Rope:
  """RoPE over `head_dim` channels times `partial_rotary_factor`: plain, or YaRN as
  transformers computes it (`_compute_yarn_parameters`); any other scaling is refused rather
  than silently computed wrong."""
  params = rope_parameters(hf, default_theta, default_params)
  kind = params.get("rope_type", params.get("type", "default"))
  partial = float(hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)))
  dim = int(head_dim * partial)
  if not 0 < dim <= head_dim or dim % 2:
    raise UnsupportedModelError(f"partial_rotary_factor={partial} with head_dim={head_dim} gives "
                                f"{dim} rotary channels; it must be an even number in (0, "
                                f"{head_dim}].")
  theta = float(params.get("rope_theta", hf.get("rope_theta", default_theta)))
  if kind == "default":
    return Rope(theta=theta, dim=dim, interleaved=interleaved)
  if kind != "yarn":
    raise UnsupportedModelError(
        f"rope scaling type {kind!r} is not supported (supported: 'default', 'yarn'). "
        "Remove rope_scaling from config.json only if the model was trained without it.")
  # as transformers' standardize_rope_params: a top-level key wins, then the rope dict's, then
  # max_position_embeddings
  orig = int(hf.get("original_max_position_embeddings") or
             params.get("original_max_position_embeddings") or
             hf.get("max_position_embeddings", 4096))
  factor = params.get("factor")
  factor = float(factor if factor is not None else hf["max_position_embeddings"] / orig)
  attn = params.get("attention_factor")
  if attn is None:
    m, m_all = params.get("mscale"), params.get("mscale_all_dim")
    attn = (yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if (m and m_all)
            else yarn_mscale(factor))
  return Rope(theta=theta, dim=dim, kind="yarn", factor=factor,
              original_max_position_embeddings=orig,
              beta_fast=float(params.get("beta_fast") or 32.0),
              beta_slow=float(params.get("beta_slow") or 1.0),
              truncate=bool(params.get("truncate", True)), attention_factor=float(attn),
              interleaved=interleaved)


def eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
  eos = hf.get("eos_token_id")
  return () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)


def sparse_mlp_layers(hf: dict[str, Any], n: int) -> tuple[str, ...]:
  """Qwen/OLMoE rule: `mlp_only_layers` and `decoder_sparse_step` pick the dense-MLP layers."""
  only = set(hf.get("mlp_only_layers") or [])
  step = hf.get("decoder_sparse_step", 1) or 1
  return tuple(MOE if (i not in only and (i + 1) % step == 0) else DENSE_MLP for i in range(n))


def layer_plan(attention: list[str] | tuple[str, ...], mlp: tuple[str, ...],
               window: int | None) -> tuple[Layer, ...]:
  """Per-layer specs from per-layer attention kinds (FULL / SLIDING) and MLP kinds."""
  if len(attention) != len(mlp):
    raise UnsupportedModelError(
        f"config.json describes {len(attention)} layers' attention (layer_types) but "
        f"num_hidden_layers is {len(mlp)}; fix layer_types to one entry per layer.")
  return tuple(Layer(attention=a, mlp=m, window=window if a == SLIDING else None)
               for a, m in zip(attention, mlp))


def mtp_prefixes(hf: dict[str, Any]) -> tuple[str, ...]:
  """Multi-token-prediction layers some releases ship after the last decoder layer
  (`num_nextn_predict_layers`, DeepSeek-V3, GLM-4.5): unused, as transformers ignores them."""
  n = hf["num_hidden_layers"]
  return tuple(f"model.layers.{i}." for i in range(n, n + int(hf.get(
      "num_nextn_predict_layers") or 0)))


class PerExpertTensors:
  """Routed experts stored one tensor per expert and projection (Mixtral, Qwen, OLMoE,
  DeepSeek, GLM): store tensor -> HF name templates on {e}, concatenated on axis 0 (gate and
  up fuse into w_gate_up)."""

  def __init__(self, spec: ModelSpec, templates: dict[str, list[str]]):
    self.spec = spec
    self.templates = templates

  def expected_in(self, folder) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for validation."""
    del folder
    h, i = self.spec.hidden_size, self.spec.moe.width
    shapes = {"w_gate_up": [(i, h), (i, h)], "w_down": [(h, i)]}
    out = {}
    for tensor, templates in self.templates.items():
      for e in range(self.spec.num_experts):
        out |= dict(zip((t.format(e=e) for t in templates), shapes[tensor]))
    return out

  def source_name(self, folder) -> str:
    """An expert weight's HF name (its dtype is the source dtype)."""
    del folder
    return self.templates["w_gate_up"][0].format(e=0)

  def source_encoding(self, folder) -> str | None:
    """The checkpoint's own expert encoding when it is not a plain float dtype (None)."""
    del folder
    return None

  def read(self, folder, e: int, enc: encodings.Encoding) -> dict[str, dict[str, np.ndarray]]:
    """Expert e as {tensor: {suffix: array}} in encoding `enc`."""
    out = {}
    for tensor, templates in self.templates.items():
      pieces = [folder.get(t.format(e=e), fp8_as_f32=True) for t in templates]
      out[tensor] = enc.encode(np.concatenate(pieces, axis=0) if len(pieces) > 1 else pieces[0])
    return out


class Family:
  """A model family: config.json parsing and checkpoint layout. Subclasses set `model_type`
  and override `spec`, and the names below where their checkpoints differ."""

  model_type: ClassVar[str] = ""
  aliases: ClassVar[tuple[str, ...]] = ()
  # transformers' defaults for keys config.json may omit
  default_rms_norm_eps: ClassVar[float] = 1e-6
  default_rope_theta: ClassVar[float] = 10000.0
  default_rope_parameters: ClassVar[dict[str, Any] | None] = None
  # Hugging Face names under model.layers.N.
  moe_block: ClassVar[str] = "mlp"
  router_name: ClassVar[str] = "gate"
  expert_projections: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
  shared_expert_name: ClassVar[str] = "shared_expert"

  # ---- config.json -> spec ------------------------------------------------------------------
  @classmethod
  def spec(cls, hf: dict[str, Any]) -> ModelSpec:
    raise NotImplementedError

  @classmethod
  def common(cls, hf: dict[str, Any]) -> dict[str, Any]:
    """ModelSpec fields every family reads the same way. Unknown keys are ignored."""
    require(hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
      raise UnsupportedModelError(
          f"hidden_act={act!r} is not supported; only SwiGLU experts (silu) are implemented.")
    return dict(family=cls.model_type, vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"], norm_eps=cls.norm_eps(hf),
                max_position_embeddings=hf.get("max_position_embeddings", 4096),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids(hf))

  @classmethod
  def norm_eps(cls, hf: dict[str, Any]) -> float:
    return float(hf.get("rms_norm_eps", cls.default_rms_norm_eps))

  @classmethod
  def gqa(cls, hf: dict[str, Any], **kw) -> Attention:
    """Grouped-query attention from the usual keys; `kw` sets the family's variant fields."""
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return Attention(num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
                     head_dim=head_dim, norm_eps=cls.norm_eps(hf),
                     rope=rope(hf, head_dim, cls.default_rope_theta, cls.default_rope_parameters),
                     **kw)

  # ---- checkpoint layout --------------------------------------------------------------------
  @classmethod
  def globals_names(cls, spec: ModelSpec) -> dict[str, list[str]]:
    names = {"embed": ["model.embed_tokens.weight"], "final_norm": ["model.norm.weight"]}
    if not spec.tie_word_embeddings:
      names["lm_head"] = ["lm_head.weight"]
    return names

  @classmethod
  def layer_names(cls, spec: ModelSpec, layer: int) -> dict[str, list[str]]:
    """Dense params of one layer (attention, norms, router, shared expert or dense MLP)."""
    pre = f"model.layers.{layer}."
    names = {"attn_norm": [pre + "input_layernorm.weight"],
             "mlp_norm": [pre + "post_attention_layernorm.weight"]}
    names |= cls.attention_names(spec, pre + "self_attn.")
    if spec.layers[layer].mlp == MOE:
      names |= cls.moe_names(spec, f"{pre}{cls.moe_block}.")
    else:
      names |= swiglu_names(pre + "mlp.", "")
    return names

  @classmethod
  def attention_names(cls, spec: ModelSpec, att: str) -> dict[str, list[str]]:
    a = spec.attention
    # q, k and v fused on the rows: one product per token instead of three
    # (BUILD_NOTES "Measurements moved out of the code")
    names = {"wqkv": [f"{att}{p}.weight" for p in ("q_proj", "k_proj", "v_proj")],
             "wo": [att + "o_proj.weight"]}
    if a.qkv_bias:
      names["bqkv"] = [f"{att}{p}.bias" for p in ("q_proj", "k_proj", "v_proj")]
    if a.o_bias:
      names["bo"] = [att + "o_proj.bias"]
    if a.qk_norm != "none":
      names["q_norm"] = [att + "q_norm.weight"]
      names["k_norm"] = [att + "k_norm.weight"]
    if a.sinks:
      names["sinks"] = [att + "sinks"]
    return names

  @classmethod
  def moe_names(cls, spec: ModelSpec, block: str) -> dict[str, list[str]]:
    """The MoE block's dense params: router (and its biases), shared expert (and its gate)."""
    router = f"{block}{cls.router_name}."
    names = {"router": [router + "weight"]}
    if spec.moe.router.bias:
      names["router_bias"] = [router + "bias"]
    if spec.moe.router.score_bias:
      names["router_score_bias"] = [router + "e_score_correction_bias"]
    if spec.moe.shared_width:
      names |= swiglu_names(f"{block}{cls.shared_expert_name}.", "shared_")
      if spec.moe.shared_gate:
        names["shared_gate"] = [block + "shared_expert_gate.weight"]
    return names

  @classmethod
  def experts(cls, spec: ModelSpec, layer: int):
    """The reader of layer `layer`'s routed experts (see PerExpertTensors)."""
    gate, up, down = cls.expert_projections
    pre = f"model.layers.{layer}.{cls.moe_block}.experts.{{e}}."
    return PerExpertTensors(spec, {"w_gate_up": [f"{pre}{gate}.weight", f"{pre}{up}.weight"],
                                   "w_down": [f"{pre}{down}.weight"]})

  @classmethod
  def ignored_prefixes(cls, hf: dict[str, Any]) -> tuple[str, ...]:
    """Checkpoint tensors under these prefixes are not part of the model."""
    del hf
    return ()

  @classmethod
  def param_shapes(cls, spec: ModelSpec) -> dict[str, list[tuple[int, ...]]]:
    """Expected shape of each HF piece, by store param name."""
    h, v = spec.hidden_size, spec.vocab_size
    s, m, e = spec.moe.shared_width, spec.dense_width, spec.num_experts
    shapes = {"embed": [(v, h)], "final_norm": [(h,)], "lm_head": [(v, h)],
              "attn_norm": [(h,)], "mlp_norm": [(h,)], "router": [(e, h)],
              "router_bias": [(e,)], "router_score_bias": [(e,)],
              "shared_w_gate_up": [(s, h), (s, h)], "shared_w_down": [(h, s)],
              "shared_gate": [(1, h)], "w_gate_up": [(m, h), (m, h)], "w_down": [(h, m)]}
    a = spec.attention
    if isinstance(a, Attention):
      d = a.head_dim
      q, kv = a.num_heads * d, a.num_kv_heads * d
      norm_q, norm_k = ((d,), (d,)) if a.qk_norm == "head" else ((q,), (kv,))
      shapes |= {"wqkv": [(q, h), (kv, h), (kv, h)], "bqkv": [(q,), (kv,), (kv,)],
                 "wo": [(h, q)], "bo": [(h,)], "q_norm": [norm_q], "k_norm": [norm_k],
                 "sinks": [(a.num_heads,)]}
    return shapes


def swiglu_names(prefix: str, store_prefix: str) -> dict[str, list[str]]:
  """A gated MLP's projections (gate and up fused on the rows) under `prefix`."""
  return {store_prefix + "w_gate_up": [prefix + "gate_proj.weight", prefix + "up_proj.weight"],
          store_prefix + "w_down": [prefix + "down_proj.weight"]}


def check_moe(spec: ModelSpec) -> ModelSpec:
  """Refuses specs the engine cannot serve (no MoE layer, k outside the experts)."""
  if not spec.moe_layers:
    raise UnsupportedModelError("this config has no MoE layer (every layer is a dense MLP); "
                                "LazyMoE-JAX serves Mixture-of-Experts models only.")
  if not 1 <= spec.num_experts_per_tok <= spec.num_experts:
    raise UnsupportedModelError(f"num_experts_per_tok={spec.num_experts_per_tok} with "
                                f"num_experts={spec.num_experts}.")
  return spec

