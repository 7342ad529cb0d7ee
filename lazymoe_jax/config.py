"""Frozen model configs, one per architecture family, built from Hugging Face config.json.

Every family fills the same normalised fields (names as in HF config.json where HF has them);
what differs between families is explicit data (`qk_norm`, `shared_expert_intermediate_size`,
per-layer `layer_types` and `mlp_layer_types`), never a check on the model's name.
Configs are hashable so jitted functions can take them as static arguments.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from lazymoe_jax.errors import UnsupportedModelError

FULL = "full_attention"
SLIDING = "sliding_attention"
MOE = "moe"
DENSE_MLP = "dense"


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Normalised decoder-only MoE config (shared by every family)."""

  model_type: str
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  moe_intermediate_size: int  # routed expert FFN width
  num_experts: int
  num_experts_per_tok: int
  norm_topk_prob: bool
  rms_norm_eps: float
  rope_theta: float
  max_position_embeddings: int
  tie_word_embeddings: bool = False
  intermediate_size: int = 0  # dense-MLP width, for layers in `mlp_layer_types` == "dense"
  shared_expert_intermediate_size: int = 0  # 0: no shared expert
  attention_bias: bool = False  # bias on q, k, v projections
  o_proj_bias: bool = False
  qk_norm: str = "none"  # "none" | "head" (RMSNorm over head_dim) | "proj" (over the projection)
  clip_qkv: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] = ()  # FULL or SLIDING per layer
  mlp_layer_types: tuple[str, ...] = ()  # MOE or DENSE_MLP per layer
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  # RoPE: "default" or "yarn" (its parameters, with the attention factor already resolved)
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_original_max_position_embeddings: int = 0
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  rope_truncate: bool = True
  rope_attention_factor: float = 1.0  # cos and sin are multiplied by it
  attention_sinks: bool = False  # a learned per-head logit joins each softmax's denominator
  router_type: str = "softmax_topk"  # or "topk_softmax": top-k of the logits, softmax over k
  router_bias: bool = False
  expert_act: str = "silu"  # or "clamped_swiglu" (gpt-oss): see model/layers.py
  expert_bias: bool = False  # bias on the experts' gate_up and down products
  swiglu_alpha: float = 1.702  # clamped_swiglu only
  swiglu_limit: float = 7.0
  # Multi-head latent attention (DeepSeek-V2/V3), on when kv_lora_rank > 0: q (through a rank
  # `q_lora_rank` bottleneck when > 0) splits per head into qk_nope_head_dim + qk_rope_head_dim;
  # keys and values come from one compressed latent [kv_lora_rank] per token plus one roped key
  # [qk_rope_head_dim] shared by all heads (`head_dim` is then qk_rope_head_dim, the RoPE width).
  q_lora_rank: int = 0
  kv_lora_rank: int = 0
  qk_nope_head_dim: int = 0
  qk_rope_head_dim: int = 0
  v_head_dim: int = 0
  latent_norm_eps: float = 1e-6  # the q_a / kv_a RMSNorms (transformers builds them with 1e-6)
  attention_scale: float | None = None  # softmax scale; None: head_dim ** -0.5
  rope_interleave: bool = False  # RoPE on (even, odd) pairs instead of the two halves
  # Router variants (see model/routers.py): "sigmoid_group_topk" (DeepSeek-V3),
  # "softmax_group_topk" (DeepSeek-V2 group_limited_greedy); experts in `n_group` groups of
  # which `topk_group` are eligible; `router_score_bias` adds a learned per-expert bias to the
  # scores for the choice only; the final weights are multiplied by routed_scaling_factor.
  n_group: int = 1
  topk_group: int = 1
  router_score_bias: bool = False
  routed_scaling_factor: float = 1.0
  shared_expert_gate: bool = True  # Qwen2-MoE's sigmoid gate on the shared expert

  family: ClassVar[str] = ""
  # Defaults that transformers uses when config.json omits the key.
  default_rms_norm_eps: ClassVar[float] = 1e-6
  default_rope_theta: ClassVar[float] = 10000.0
  default_rope_parameters: ClassVar[dict[str, Any] | None] = None  # when config.json has none

  # ---- derived -----------------------------------------------------------------------------
  @property
  def moe_layers(self) -> tuple[int, ...]:
    return tuple(i for i, t in enumerate(self.mlp_layer_types) if t == MOE)

  @property
  def mla(self) -> bool:
    return self.kv_lora_rank > 0

  def window(self, layer: int) -> int | None:
    return self.sliding_window if self.layer_types[layer] == SLIDING else None

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "MoEConfig":
    """Inverse of `to_dict` (used for the manifest)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}
    return family_class(d["model_type"])(**kw)

  # ---- shared parsing ------------------------------------------------------------------------
  @classmethod
  def _common(cls, hf: dict[str, Any]) -> dict[str, Any]:
    """Fields every family reads the same way. Unknown keys are ignored."""
    _require(hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
      raise UnsupportedModelError(
          f"hidden_act={act!r} is not supported; only SwiGLU experts (silu) are implemented.")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    eos = hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
    return dict(
        model_type=cls.family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", cls.default_rms_norm_eps)),
        **_rope(hf, cls.default_rope_theta, cls.default_rope_parameters),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos,
    )


# Some keys have two spellings in the wild (transformers 5 writes `num_local_experts` for
# Qwen3-MoE, published configs say `num_experts`); copy the other spelling in before parsing.
KEY_ALIASES = (("num_experts", "num_local_experts"),)


def _with_aliases(hf: dict[str, Any]) -> dict[str, Any]:
  hf = dict(hf)
  for a, b in KEY_ALIASES:
    if a in hf and b not in hf:
      hf[b] = hf[a]
    elif b in hf and a not in hf:
      hf[a] = hf[b]
  return hf


def _require(hf: dict[str, Any], *keys: str) -> None:
  missing = [k for k in keys if k not in hf]
  if missing:
    raise UnsupportedModelError(f"config.json lacks required keys {missing}.")


def _rope_parameters(hf: dict[str, Any], default_theta: float,
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


def _yarn_mscale(scale: float, m: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def _rope(hf: dict[str, Any], default_theta: float,
          default_params: dict[str, Any] | None) -> dict[str, Any]:
  """RoPE fields: plain, or YaRN as transformers computes it (`_compute_yarn_parameters`);
  any other scaling is refused rather than silently computed wrong."""
  params = _rope_parameters(hf, default_theta, default_params)
  kind = params.get("rope_type", params.get("type", "default"))
  if float(hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))) != 1.0:
    raise UnsupportedModelError("partial_rotary_factor != 1 is not supported.")
  out: dict[str, Any] = {
      "rope_theta": float(params.get("rope_theta", hf.get("rope_theta", default_theta)))}
  if kind == "default":
    return out
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
    attn = (_yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if (m and m_all)
            else _yarn_mscale(factor))
  return out | dict(rope_type="yarn", rope_factor=factor,
                    rope_original_max_position_embeddings=orig,
                    rope_beta_fast=float(params.get("beta_fast") or 32.0),
                    rope_beta_slow=float(params.get("beta_slow") or 1.0),
                    rope_truncate=bool(params.get("truncate", True)),
                    rope_attention_factor=float(attn))


def _sparse_layer_types(hf: dict[str, Any], n: int) -> tuple[str, ...]:
  """Qwen/OLMoE rule: `mlp_only_layers` and `decoder_sparse_step` pick the dense-MLP layers."""
  only = set(hf.get("mlp_only_layers") or [])
  step = hf.get("decoder_sparse_step", 1) or 1
  return tuple(MOE if (i not in only and (i + 1) % step == 0) else DENSE_MLP for i in range(n))


@dataclasses.dataclass(frozen=True)
class MixtralConfig(MoEConfig):
  """Mixtral: softmax top-k renormalised; one sliding window for all layers when set."""

  family: ClassVar[str] = "mixtral"
  default_rms_norm_eps: ClassVar[float] = 1e-5
  default_rope_theta: ClassVar[float] = 1e6

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "MixtralConfig":
    c = cls._common(hf)
    _require(hf, "intermediate_size", "num_local_experts", "num_experts_per_tok")
    n = hf["num_hidden_layers"]
    window = hf.get("sliding_window")
    return cls(**c, moe_intermediate_size=hf["intermediate_size"],
               num_experts=hf["num_local_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
               norm_topk_prob=True, sliding_window=window,
               layer_types=(SLIDING if window else FULL,) * n, mlp_layer_types=(MOE,) * n)


@dataclasses.dataclass(frozen=True)
class Qwen2MoeConfig(MoEConfig):
  """Qwen2-MoE: qkv bias, shared expert behind a sigmoid gate, `norm_topk_prob`."""

  family: ClassVar[str] = "qwen2_moe"

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "Qwen2MoeConfig":
    c = cls._common(hf)
    _require(hf, "moe_intermediate_size", "num_experts", "num_experts_per_tok")
    n = hf["num_hidden_layers"]
    use_sw = bool(hf.get("use_sliding_window", False))
    layer_types = hf.get("layer_types") or [
        SLIDING if (use_sw and (i + 1) % 2 and i < hf.get("max_window_layers", 28)) else FULL
        for i in range(n)]
    return cls(**c, moe_intermediate_size=hf["moe_intermediate_size"],
               num_experts=hf["num_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
               norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
               intermediate_size=hf.get("intermediate_size", 0),
               shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 0),
               attention_bias=bool(hf.get("qkv_bias", True)),
               sliding_window=hf.get("sliding_window") if use_sw else None,
               layer_types=tuple(layer_types), mlp_layer_types=_sparse_layer_types(hf, n))


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig(MoEConfig):
  """Qwen3-MoE: RMSNorm on q and k per head, `norm_topk_prob`, no shared expert."""

  family: ClassVar[str] = "qwen3_moe"

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "Qwen3MoeConfig":
    c = cls._common(hf)
    _require(hf, "moe_intermediate_size", "num_experts", "num_experts_per_tok")
    n = hf["num_hidden_layers"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    bias = bool(hf.get("attention_bias", False))
    return cls(**c, moe_intermediate_size=hf["moe_intermediate_size"],
               num_experts=hf["num_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
               norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
               intermediate_size=hf.get("intermediate_size", 0),
               attention_bias=bias, o_proj_bias=bias, qk_norm="head", sliding_window=window,
               layer_types=(SLIDING if window else FULL,) * n,
               mlp_layer_types=_sparse_layer_types(hf, n))


@dataclasses.dataclass(frozen=True)
class OlmoeConfig(MoEConfig):
  """OLMoE: RMSNorm on the whole q and k projections, optional `clip_qkv`."""

  family: ClassVar[str] = "olmoe"
  default_rms_norm_eps: ClassVar[float] = 1e-5

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "OlmoeConfig":
    c = cls._common(hf)
    _require(hf, "intermediate_size", "num_experts", "num_experts_per_tok")
    n = hf["num_hidden_layers"]
    bias = bool(hf.get("attention_bias", False))
    return cls(**c, moe_intermediate_size=hf["intermediate_size"],
               num_experts=hf["num_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
               norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
               attention_bias=bias, o_proj_bias=bias, qk_norm="proj", clip_qkv=hf.get("clip_qkv"),
               layer_types=(FULL,) * n, mlp_layer_types=(MOE,) * n)


@dataclasses.dataclass(frozen=True)
class GptOssConfig(MoEConfig):
  """gpt-oss: attention sinks, alternating sliding/full attention, YaRN RoPE, biases on every
  projection, router top-k on biased logits then softmax over the k, clamped SwiGLU experts."""

  family: ClassVar[str] = "gpt_oss"
  default_rms_norm_eps: ClassVar[float] = 1e-5
  default_rope_theta: ClassVar[float] = 150000.0
  # what transformers' GptOssConfig assumes when config.json names no rope scaling
  default_rope_parameters: ClassVar[dict[str, Any] | None] = {
      "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
      "truncate": False, "original_max_position_embeddings": 4096}

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "GptOssConfig":
    c = cls._common(hf)
    _require(hf, "intermediate_size", "num_local_experts", "num_experts_per_tok")
    n = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types") or [
        SLIDING if (i + 1) % 2 else FULL for i in range(n)]
    bias = bool(hf.get("attention_bias", True))
    window = hf.get("sliding_window", 128)
    return cls(**c, moe_intermediate_size=hf["intermediate_size"],
               num_experts=hf["num_local_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
               norm_topk_prob=False, attention_bias=bias, o_proj_bias=bias,
               sliding_window=window,
               layer_types=tuple(t if window else FULL for t in layer_types),
               mlp_layer_types=(MOE,) * n, attention_sinks=True, router_type="topk_softmax",
               router_bias=True, expert_act="clamped_swiglu", expert_bias=True,
               swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
               swiglu_limit=float(hf.get("swiglu_limit", 7.0)))


@dataclasses.dataclass(frozen=True)
class DeepseekV3Config(MoEConfig):
  """DeepSeek-V3: multi-head latent attention (q LoRA, compressed KV latent, shared roped key,
  interleaved RoPE), the first `first_k_dense_replace` layers dense, shared experts without a
  gate, sigmoid router with a selection-only score bias, group-limited top-k (group score = sum
  of its two best experts), weights renormalised (`norm_topk_prob`) and scaled."""

  family: ClassVar[str] = "deepseek_v3"
  # transformers' DeepseekV3Config defaults, for keys config.json omits
  defaults: ClassVar[dict[str, Any]] = dict(
      q_lora_rank=1536, first_k_dense_replace=3, n_shared_experts=1, routed_scaling_factor=2.5,
      n_group=8, topk_group=4, norm_topk_prob=True, rope_interleave=True)

  @classmethod
  def _router(cls, hf: dict[str, Any]) -> dict[str, Any]:
    return dict(router_type="sigmoid_group_topk", router_score_bias=True,
                norm_topk_prob=bool(_get(hf, "norm_topk_prob", cls.defaults)))

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "MoEConfig":
    c = cls._common(hf)
    d = cls.defaults
    _require(hf, "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
             "moe_intermediate_size", "num_experts_per_tok", "intermediate_size")
    if hf.get("mlp_bias"):
      raise UnsupportedModelError("mlp_bias=True is not supported (no published DeepSeek model "
                                  "uses it); the dense MLPs and shared experts have no bias here.")
    n = hf["num_hidden_layers"]
    experts = hf.get("n_routed_experts") or hf.get("num_local_experts") or hf.get("num_experts")
    if not experts:
      raise UnsupportedModelError("config.json lacks n_routed_experts.")
    n_group = int(_get(hf, "n_group", d) or 1)
    topk_group = int(_get(hf, "topk_group", d) or 1)
    if experts % n_group or not 1 <= topk_group <= n_group:
      raise UnsupportedModelError(
          f"n_group={n_group}, topk_group={topk_group} with {experts} experts: the experts must "
          "split evenly into n_group groups and 1 <= topk_group <= n_group.")
    first_dense = int(_get(hf, "first_k_dense_replace", d) or 0)
    rope_dim, nope = hf["qk_rope_head_dim"], hf["qk_nope_head_dim"]
    # softmax scale: transformers' yarn_apply_mscale (YaRN with mscale_all_dim squares it in)
    scale = (nope + rope_dim) ** -0.5
    params = _rope_parameters(hf, cls.default_rope_theta, cls.default_rope_parameters)
    if c.get("rope_type", "default") != "default" and params.get("mscale_all_dim"):
      scale *= _yarn_mscale(c["rope_factor"], params["mscale_all_dim"]) ** 2
    moe_width = hf["moe_intermediate_size"]
    c |= dict(head_dim=rope_dim, num_key_value_heads=c["num_attention_heads"])
    return cls(**c, moe_intermediate_size=moe_width, num_experts=experts,
               num_experts_per_tok=hf["num_experts_per_tok"],
               intermediate_size=hf["intermediate_size"],
               shared_expert_intermediate_size=moe_width * int(
                   _get(hf, "n_shared_experts", d) or 0),
               shared_expert_gate=False,
               attention_bias=bool(hf.get("attention_bias", False)),
               o_proj_bias=bool(hf.get("attention_bias", False)),
               layer_types=(FULL,) * n,
               mlp_layer_types=tuple(DENSE_MLP if i < first_dense else MOE for i in range(n)),
               q_lora_rank=int(_get(hf, "q_lora_rank", d) or 0),
               kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=nope,
               qk_rope_head_dim=rope_dim, v_head_dim=hf["v_head_dim"], attention_scale=scale,
               rope_interleave=bool(_get(hf, "rope_interleave", d)),
               n_group=n_group, topk_group=topk_group,
               routed_scaling_factor=float(_get(hf, "routed_scaling_factor", d)),
               **cls._router(hf))


@dataclasses.dataclass(frozen=True)
class DeepseekV2Config(DeepseekV3Config):
  """DeepSeek-V2: V3's attention and layer plan; softmax router, `topk_method` "greedy" (plain
  top-k) or "group_limited_greedy" (group score = its best expert, others zeroed), weights
  scaled but never renormalised (transformers' DeepseekV2 ignores `norm_topk_prob`). Its RoPE
  rotates (even, odd) pairs as complex numbers: the interleaved layout."""

  family: ClassVar[str] = "deepseek_v2"
  defaults: ClassVar[dict[str, Any]] = dict(
      q_lora_rank=1536, first_k_dense_replace=0, n_shared_experts=2, routed_scaling_factor=1.0,
      n_group=None, topk_group=None, norm_topk_prob=False, rope_interleave=True)

  @classmethod
  def _router(cls, hf: dict[str, Any]) -> dict[str, Any]:
    method = hf.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
      raise UnsupportedModelError(
          f"topk_method={method!r} is not supported for deepseek_v2 (supported: 'greedy', "
          "'group_limited_greedy', as transformers implements).")
    return dict(norm_topk_prob=False, router_type=(
        "softmax_topk" if method == "greedy" else "softmax_group_topk"))


def _get(hf: dict[str, Any], key: str, defaults: dict[str, Any]) -> Any:
  """hf[key], or the family default when config.json omits the key (an explicit null stays)."""
  return hf[key] if key in hf else defaults[key]


FAMILIES: dict[str, type[MoEConfig]] = {
    c.family: c for c in (MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig, OlmoeConfig,
                          GptOssConfig, DeepseekV3Config, DeepseekV2Config)}
ALIASES: dict[str, str] = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gptoss": "gpt_oss",
                           "deepseekv3": "deepseek_v3", "deepseekv2": "deepseek_v2"}


def family_class(model_type: str) -> type[MoEConfig]:
  name = ALIASES.get(model_type, model_type)
  if name not in FAMILIES:
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}.")
  return FAMILIES[name]


def from_hf(hf: dict[str, Any]) -> MoEConfig:
  """Builds the family config from a parsed HF config.json."""
  if "model_type" not in hf:
    raise UnsupportedModelError(
        "config.json has no model_type; supported: " + ", ".join(sorted(FAMILIES)) + ".")
  cfg = family_class(hf["model_type"]).from_hf(_with_aliases(hf))
  if not cfg.moe_layers:
    raise UnsupportedModelError("this config has no MoE layer (every layer is a dense MLP); "
                                "LazyMoE-JAX serves Mixture-of-Experts models only.")
  if cfg.num_experts_per_tok > cfg.num_experts or cfg.num_experts < 1:
    raise UnsupportedModelError(
        f"num_experts_per_tok={cfg.num_experts_per_tok} with num_experts={cfg.num_experts}.")
  return cfg
