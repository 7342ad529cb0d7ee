"""Tiny random Hugging Face checkpoints written without torch: config.json plus safetensors
(numpy), tensor names and shapes as Hugging Face writes them for each family.

The configs are those of tests/conftest.py's transformers-built models (the same settings,
so a family's code paths are exercised the same way); the tensors are random with the same
scheme as conftest.make_hf_model (embeddings std 1, norms near 1, decisive routers). Which
tensors a family's checkpoint holds is what checkpoints_tools/convert_hf.py validates against
(the parity tests check that list against transformers' own save_pretrained). Shards are
written with bench/make_synthetic.py's writer.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from bench.make_synthetic import _Shards
from checkpoints_tools import convert_hf
from lazymoe_jax import families

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# family -> (architecture, settings that exercise its own code paths); see conftest.FAMILIES
CONFIGS = {
    "mixtral": ("MixtralForCausalLM",
                dict(intermediate_size=48, num_local_experts=6, num_experts_per_tok=2,
                     sliding_window=7)),
    "qwen2_moe": ("Qwen2MoeForCausalLM",
                  dict(moe_intermediate_size=24, intermediate_size=40, num_experts=8,
                       num_experts_per_tok=3, shared_expert_intermediate_size=36,
                       norm_topk_prob=False, mlp_only_layers=[1], qkv_bias=True)),
    "qwen3_moe": ("Qwen3MoeForCausalLM",
                  dict(moe_intermediate_size=32, intermediate_size=40, num_experts=8,
                       num_experts_per_tok=2, norm_topk_prob=True, head_dim=16)),
    "olmoe": ("OlmoeForCausalLM",
              dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                   norm_topk_prob=False, clip_qkv=3.0)),
    # window 8 < the 20-token tests; YaRN with factor 4 over an original context of 64;
    # swiglu_limit 1 so the clamps bite at these activation sizes (7 would never clamp)
    "gpt_oss": ("GptOssForCausalLM",
                dict(hidden_size=64, num_hidden_layers=4, head_dim=16, intermediate_size=32,
                     num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"] * 2,
                     rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0,
                                      "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                      "original_max_position_embeddings": 64,
                                      "truncate": False},
                     swiglu_limit=1.0, attention_bias=True, attn_implementation="eager")),
    # MLA with a q LoRA, v_head_dim != qk_nope_head_dim, interleaved RoPE with YaRN (mscale !=
    # mscale_all_dim: both the cos/sin factor and the softmax scale move); 8 experts in 4 groups,
    # 2 groups eligible, top-3, layer 0 dense, one shared expert, scaling 2.5
    "deepseek_v3": ("DeepseekV3ForCausalLM",
                    dict(num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=12,
                         qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                         intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
                         num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1,
                         n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                         rope_interleave=True,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                          "factor": 4.0, "mscale": 0.8, "mscale_all_dim": 1.0,
                                          "beta_fast": 32.0, "beta_slow": 1.0,
                                          "original_max_position_embeddings": 64},
                         attn_implementation="eager")),
    # MLA without q LoRA, biases on kv_a / o_proj, complex-pair RoPE; softmax router
    # group_limited_greedy (4 groups, 2 eligible, top-3: with the group score a group's best
    # expert, the limit can only bite when k > topk_group), two shared experts, scaling 1.5
    "deepseek_v2": ("DeepseekV2ForCausalLM",
                    dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16,
                         qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                         intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
                         num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4,
                         topk_group=2, first_k_dense_replace=1, n_shared_experts=2,
                         routed_scaling_factor=1.5, attention_bias=True,
                         attn_implementation="eager")),
    # partial rotary (half of each head), qk-norm, q/k/v biases; DeepSeek-V3's router with 4
    # groups of which 2 are eligible, scaling 2.5; layer 0 dense, one shared expert
    "glm4_moe": ("Glm4MoeForCausalLM",
                 dict(intermediate_size=64, moe_intermediate_size=16, head_dim=16,
                      partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True,
                      n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                      first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5,
                      norm_topk_prob=True, num_nextn_predict_layers=0)),
}


def hf_config(family: str, **overrides) -> dict:
  """config.json of the tiny `family` model (the keys conftest gives transformers)."""
  arch, extra = CONFIGS[family]
  cfg = {"architectures": [arch], "model_type": family, "hidden_act": "silu",
         **COMMON, **extra, **overrides}
  cfg.pop("attn_implementation", None)  # a transformers runtime setting, not a config key
  return cfg


class _NoTensors:
  """What an expert reader asks of a checkpoint folder before there is one: no tensors (so
  gpt-oss expects its float expert layout, not MXFP4)."""
  where: dict = {}


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape, for a checkpoint with config.json `cfg`."""
  family, spec = families.of_config(cfg), families.spec_from_hf(cfg)
  shapes = family.param_shapes(spec)
  out: dict[str, tuple[int, ...]] = {}
  for _, dense, experts in convert_hf._plan(family, spec):  # pylint: disable=protected-access
    for param, names in dense.items():
      out |= dict(zip(names, shapes[param]))
    if experts is not None:
      out |= experts.expected_in(_NoTensors())
  return out


def random_tensor(rng: np.random.Generator, name: str, shape) -> np.ndarray:
  """conftest.make_hf_model's scheme, by tensor name."""
  if "embed_tokens" in name:
    std, mean = 1.0, 0.0  # std-1 embeddings: varied routing, as trained models have
  elif len(shape) == 1 and "norm" in name:
    std, mean = 0.1, 1.0
  elif "sinks" in name:
    std, mean = 1.0, 0.0
  elif "router" in name or name.endswith("e_score_correction_bias"):
    std, mean = (0.2 if "correction" in name else 0.3), 0.0
  elif len(shape) == 1:
    std, mean = 0.1, 0.0
  elif "gate" in name and "proj" not in name:
    std, mean = 0.3, 0.0  # routers: decisive, so ties between experts are unlikely
  else:
    std, mean = 0.08, 0.0
  return (mean + std * rng.standard_normal(shape)).astype(np.float32)


def random_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {name: random_tensor(rng, name, shape) for name, shape in sorted(tensor_shapes(cfg).items())}


def write_checkpoint(dst, family: str = "mixtral", seed: int = 0, sharded: bool = False,
                     tensors: dict[str, np.ndarray] | None = None, **overrides) -> str:
  """A tiny random `family` checkpoint in folder dst: config.json and model.safetensors (or,
  `sharded`, one shard per layer plus the index, as bench/make_synthetic.py writes them).
  `overrides`: config.json keys. Returns dst."""
  dst = str(dst)
  cfg = hf_config(family, **overrides)
  tensors = random_tensors(cfg, seed) if tensors is None else tensors
  if not sharded:
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
      json.dump(cfg, f, indent=2)
    return dst
  n = cfg["num_hidden_layers"]
  shards = _Shards(dst, n + 1)
  for layer in range(n):
    pre = f"model.layers.{layer}."
    shards.save(layer, {k: v for k, v in tensors.items() if k.startswith(pre)})
  shards.save(n, {k: v for k, v in tensors.items() if not k.startswith("model.layers.")})
  return shards.finish(cfg)
