"""Tiny random Hugging Face models of every family, saved with save_pretrained (the reference)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Each family with the settings that exercise its own code paths.
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=48, num_local_experts=6, num_experts_per_tok=2,
                     sliding_window=7)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(moe_intermediate_size=24, intermediate_size=40, num_experts=8,
                       num_experts_per_tok=3, shared_expert_intermediate_size=36,
                       norm_topk_prob=False, mlp_only_layers=[1], qkv_bias=True)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(moe_intermediate_size=32, intermediate_size=40, num_experts=8,
                       num_experts_per_tok=2, norm_topk_prob=True, head_dim=16)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                   norm_topk_prob=False, clip_qkv=3.0)),
    # window 8 < the 20-token tests; YaRN with factor 4 over an original context of 64;
    # swiglu_limit 1 so the clamps bite at these activation sizes (7 would never clamp)
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
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
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
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
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16,
                         qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                         intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
                         num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4,
                         topk_group=2, first_k_dense_replace=1, n_shared_experts=2,
                         routed_scaling_factor=1.5, attention_bias=True,
                         attn_implementation="eager")),
    # partial rotary (half of each head), qk-norm, q/k/v biases; DeepSeek-V3's router with 4
    # groups of which 2 are eligible, scaling 2.5; layer 0 dense, one shared expert
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(intermediate_size=64, moe_intermediate_size=16, head_dim=16,
                      partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True,
                      n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                      first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5,
                      norm_topk_prob=True, num_nextn_predict_layers=0)),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
  """A tiny model with every parameter random (norm weights near 1, biases non-zero)."""
  cfg_cls, model_cls, extra = FAMILIES[family]
  cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra, **overrides})
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "embed_tokens" in name:
        p.normal_(0.0, 1.0)  # std-1 embeddings: varied routing, as trained models have
      elif p.ndim == 1 and "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif "sinks" in name:
        p.normal_(0.0, 1.0)  # attention sinks: comparable to the attention logits
      elif "router" in name:
        p.normal_(0.0, 0.3)  # gpt-oss router weight and bias
      elif p.ndim == 1:
        p.normal_(0.0, 0.1)
      elif "gate" in name and "proj" not in name:
        p.normal_(0.0, 0.3)  # routers: decisive, so ties between experts are unlikely
      else:
        p.normal_(0.0, 0.08)
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):  # DeepSeek-V3: zeros at init, not in a
        b.normal_(0.0, 0.2)  # trained model; large enough to change which experts win
  return model


def convert_cli(src: str, dst: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "checkpoints_tools.convert_hf", f"--src={src}",
                         f"--dst={dst}", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)


class _FamilyModels(dict):
  """family -> (HF model, HF dir, store dir), each made and converted (through the CLI) on
  first use, so a run selecting a few families converts only those."""

  def __init__(self, tmp_path_factory):
    super().__init__()
    self.tmp = tmp_path_factory

  def __missing__(self, family):
    base = self.tmp.mktemp(family)
    model = make_hf_model(family)
    model.save_pretrained(base / "hf")
    res = convert_cli(str(base / "hf"), str(base / "store"))
    assert res.returncode == 0, res.stderr[-3000:]
    self[family] = (model, str(base / "hf"), str(base / "store"))
    return self[family]


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
  """family -> (HF model, HF dir, store dir), converted once per session through the CLI."""
  return _FamilyModels(tmp_path_factory)


def token_ids(n: int, vocab: int = 96, seed: int = 1) -> np.ndarray:
  return np.random.RandomState(seed).randint(3, vocab, n)


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory):
  """The shipped demo checkpoint converted once per session."""
  from checkpoints_tools import convert_hf, default_model  # pylint: disable=import-outside-toplevel
  store = str(tmp_path_factory.mktemp("demo") / "store")
  convert_hf.convert(default_model.DEMO_DIR, store, log=lambda s: None)
  return store
