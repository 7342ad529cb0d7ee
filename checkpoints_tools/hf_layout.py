"""Declarative map from Hugging Face tensor names to the store's params, per family.

Every store param is a list of HF tensors concatenated on axis 0 (so gate and up projections
fuse into one [2I, H] `w_gate_up`). Expert templates contain `{e}`.
"""

from __future__ import annotations

import numpy as np

from lazymoe_jax.config import MOE, MoEConfig

# family -> (MoE block prefix, router name, expert gate, up, down names)
MOE_NAMES = {
    "mixtral": ("block_sparse_moe", "gate.weight", "w1.weight", "w3.weight", "w2.weight"),
    "qwen2_moe": ("mlp", "gate.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
    "qwen3_moe": ("mlp", "gate.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
    "olmoe": ("mlp", "gate.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
    "gpt_oss": ("mlp", "router.weight", "", "", ""),  # experts fused: see FUSED_EXPERTS
    "deepseek_v2": ("mlp", "gate.weight", "gate_proj.weight", "up_proj.weight",
                    "down_proj.weight"),
    "deepseek_v3": ("mlp", "gate.weight", "gate_proj.weight", "up_proj.weight",
                    "down_proj.weight"),
}
# Shared experts' module name when it is not Qwen2-MoE's `shared_expert`.
SHARED_EXPERT_NAMES = {"deepseek_v2": "shared_experts", "deepseek_v3": "shared_experts"}
# The router's selection-only score bias (`router_score_bias`), under the MoE block.
ROUTER_SCORE_BIAS = "gate.e_score_correction_bias"
# Families whose checkpoints hold every expert of a layer in one tensor, [E, ...] (gpt-oss):
# store tensor -> HF name under `model.layers.{layer}.mlp.experts.`. Float weights are
# [E, in, out] (transposed against the store's [out, in]), gate and up interleaved on `out`
# (column 2j gate j, 2j+1 up j); MXFP4 releases publish `{name}_blocks` [E, out, in/32, 16]
# and `{name}_scales` [E, out, in/32] instead, already [out, in].
FUSED_EXPERTS = {
    "gpt_oss": {"w_gate_up": "gate_up_proj", "w_down": "down_proj",
                "b_gate_up": "gate_up_proj_bias", "b_down": "down_proj_bias"},
}
INTERLEAVED = ("w_gate_up", "b_gate_up")  # in FUSED_EXPERTS: gate/up alternate on the outputs
MXFP4_BLOCK = 32
# Tensors some exporters write that carry no weights we need.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _swiglu(prefix: str, gate: str, up: str, down: str) -> dict[str, list[str]]:
  return {"w_gate_up": [prefix + gate, prefix + up], "w_down": [prefix + down]}


def globals_names(cfg: MoEConfig) -> dict[str, list[str]]:
  names = {"embed": ["model.embed_tokens.weight"], "final_norm": ["model.norm.weight"]}
  if not cfg.tie_word_embeddings:
    names["lm_head"] = ["lm_head.weight"]
  return names


def layer_names(cfg: MoEConfig, layer: int) -> dict[str, list[str]]:
  """Dense params of one layer (attention, norms, router, shared expert or dense MLP)."""
  pre = f"model.layers.{layer}."
  att = pre + "self_attn."
  names = {"attn_norm": [pre + "input_layernorm.weight"],
           "mlp_norm": [pre + "post_attention_layernorm.weight"]}
  if cfg.mla:
    names |= _latent_attention(cfg, att)
  else:
    # q, k and v fused on the rows: one product per token instead of three (0.48 -> 0.24 ms
    # for a 1024-wide bf16 layer, measured)
    names["wqkv"] = [f"{att}{hf}.weight" for hf in ("q_proj", "k_proj", "v_proj")]
    if cfg.attention_bias:
      names["bqkv"] = [f"{att}{hf}.bias" for hf in ("q_proj", "k_proj", "v_proj")]
  names["wo"] = [att + "o_proj.weight"]
  if cfg.o_proj_bias:
    names["bo"] = [att + "o_proj.bias"]
  if cfg.qk_norm != "none":
    names["q_norm"] = [att + "q_norm.weight"]
    names["k_norm"] = [att + "k_norm.weight"]
  if cfg.attention_sinks:
    names["sinks"] = [att + "sinks"]
  block, router, *_ = MOE_NAMES[cfg.model_type]
  if cfg.mlp_layer_types[layer] == MOE:
    names["router"] = [f"{pre}{block}.{router}"]
    if cfg.router_bias:
      names["router_bias"] = [f"{pre}{block}.{router.removesuffix('.weight')}.bias"]
    if cfg.router_score_bias:
      names["router_score_bias"] = [f"{pre}{block}.{ROUTER_SCORE_BIAS}"]
    if cfg.shared_expert_intermediate_size:
      shared = SHARED_EXPERT_NAMES.get(cfg.model_type, "shared_expert")
      names |= {"shared_" + k: v for k, v in _swiglu(
          f"{pre}mlp.{shared}.", "gate_proj.weight", "up_proj.weight",
          "down_proj.weight").items()}
      if cfg.shared_expert_gate:
        names["shared_gate"] = [pre + "mlp.shared_expert_gate.weight"]
  else:
    names |= _swiglu(pre + "mlp.", "gate_proj.weight", "up_proj.weight", "down_proj.weight")
  return names


def _latent_attention(cfg: MoEConfig, att: str) -> dict[str, list[str]]:
  """Multi-head latent attention's projections (DeepSeek-V2/V3), unfused: each feeds a
  different product (see layers.latent_attention)."""
  names = {"wkv_a": [att + "kv_a_proj_with_mqa.weight"],
           "kv_a_norm": [att + "kv_a_layernorm.weight"], "wkv_b": [att + "kv_b_proj.weight"]}
  if cfg.q_lora_rank:
    names |= {"wq_a": [att + "q_a_proj.weight"], "q_a_norm": [att + "q_a_layernorm.weight"],
              "wq_b": [att + "q_b_proj.weight"]}
  else:
    names["wq"] = [att + "q_proj.weight"]
  if cfg.attention_bias:  # transformers: on q_a_proj and kv_a_proj_with_mqa (and o_proj)
    names["bkv_a"] = [att + "kv_a_proj_with_mqa.bias"]
    if cfg.q_lora_rank:
      names["bq_a"] = [att + "q_a_proj.bias"]
  return names


def expert_names(cfg: MoEConfig, layer: int) -> dict[str, list[str]]:
  """Routed-expert tensors of one layer, templated on {e} (families with per-expert tensors)."""
  block, _, gate, up, down = MOE_NAMES[cfg.model_type]
  return _swiglu(f"model.layers.{layer}.{block}.experts.{{e}}.", gate, up, down)


def fused_expert_names(cfg: MoEConfig, layer: int, mxfp4: bool) -> dict[str, dict[str, str]]:
  """Families in FUSED_EXPERTS: store tensor -> {"": HF name} for float weights and biases,
  {"blocks": ..., "scales": ...} for MXFP4 weights."""
  pre = f"model.layers.{layer}.{MOE_NAMES[cfg.model_type][0]}.experts."
  out = {}
  for tensor, hf in FUSED_EXPERTS[cfg.model_type].items():
    out[tensor] = ({"blocks": f"{pre}{hf}_blocks", "scales": f"{pre}{hf}_scales"}
                   if mxfp4 and tensor.startswith("w_") else {"": pre + hf})
  return out


def fused_expert_shapes(cfg: MoEConfig) -> dict[str, dict[str, tuple[int, ...]]]:
  """Expected shapes of the tensors `fused_expert_names` gives, by store tensor and key."""
  e, h, i, b = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, MXFP4_BLOCK
  return {"w_gate_up": {"": (e, h, 2 * i), "blocks": (e, 2 * i, h // b, b // 2),
                        "scales": (e, 2 * i, h // b)},
          "w_down": {"": (e, i, h), "blocks": (e, h, i // b, b // 2), "scales": (e, h, i // b)},
          "b_gate_up": {"": (e, 2 * i)}, "b_down": {"": (e, h)}}


def deinterleave(tensor: str, a):
  """Store order (all gate rows, then all up rows) from gpt-oss' alternating rows, axis 0."""
  return a if tensor not in INTERLEAVED else np.concatenate([a[0::2], a[1::2]], axis=0)


def piece_shapes(cfg: MoEConfig) -> dict[str, list[tuple[int, ...]]]:
  """Expected shape of each HF piece, by store param name."""
  h, d = cfg.hidden_size, cfg.head_dim
  q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
  i, s, m = cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size, cfg.intermediate_size
  norm_q, norm_k = ((d,), (d,)) if cfg.qk_norm == "head" else ((q,), (kv,))
  heads, r, qr = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.q_lora_rank
  q_mla = heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
  mla = {"wq": [(q_mla, h)], "wq_a": [(qr, h)], "bq_a": [(qr,)], "q_a_norm": [(qr,)],
         "wq_b": [(q_mla, qr)], "wkv_a": [(r + cfg.qk_rope_head_dim, h)],
         "bkv_a": [(r + cfg.qk_rope_head_dim,)], "kv_a_norm": [(r,)],
         "wkv_b": [(heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), r)]}
  o_in = heads * cfg.v_head_dim if cfg.mla else q  # o_proj's input width
  return mla | {
      "embed": [(cfg.vocab_size, h)], "final_norm": [(h,)], "lm_head": [(cfg.vocab_size, h)],
      "attn_norm": [(h,)], "mlp_norm": [(h,)],
      "wqkv": [(q, h), (kv, h), (kv, h)], "wo": [(h, o_in)], "bqkv": [(q,), (kv,), (kv,)],
      "bo": [(h,)],
      "q_norm": [norm_q], "k_norm": [norm_k], "router": [(cfg.num_experts, h)],
      "router_bias": [(cfg.num_experts,)], "router_score_bias": [(cfg.num_experts,)],
      "sinks": [(cfg.num_attention_heads,)],
      "shared_w_gate_up": [(s, h), (s, h)], "shared_w_down": [(h, s)], "shared_gate": [(1, h)],
      "w_gate_up": [(m, h), (m, h)], "w_down": [(h, m)],
      "expert_w_gate_up": [(i, h), (i, h)], "expert_w_down": [(h, i)],
  }
