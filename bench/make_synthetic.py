r"""Writes a synthetic Mixtral-layout MoE in Hugging Face format, one shard per layer.

  python -m bench.make_synthetic --dst=/tmp/synth [--layers=8 --hidden=1024 --intermediate=2816
      --experts=16 --top_k=2 --vocab=32000 --dtype=bfloat16]

Memory stays at one layer: each layer is generated and written as its own safetensors shard,
with model.safetensors.index.json naming them. Random weights; embeddings with std
--embed_std (1.0 by default: with the usual 0.02 everywhere the residual stream is nearly the
same for every token and routing collapses, which flatters any expert cache).
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
from absl import app, flags
from safetensors.numpy import save_file

def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_string("dst", None, "Output folder.")
  flags.DEFINE_integer("layers", 8, "Decoder layers.")
  flags.DEFINE_integer("hidden", 1024, "Hidden size.")
  flags.DEFINE_integer("intermediate", 2816, "Expert FFN width.")
  flags.DEFINE_integer("experts", 16, "Experts per layer.")
  flags.DEFINE_integer("top_k", 2, "Experts per token.")
  flags.DEFINE_integer("vocab", 32000, "Vocabulary size.")
  flags.DEFINE_integer("heads", 16, "Query heads.")
  flags.DEFINE_integer("kv_heads", 4, "Key/value heads.")
  flags.DEFINE_integer("head_dim", 64, "Head dimension.")
  flags.DEFINE_string("dtype", "bfloat16", "bfloat16 or float32.")
  flags.DEFINE_float("embed_std", 1.0, "Embedding init std (routing diversity, see above).")
  flags.DEFINE_integer("seed", 0, "Seed.")


FLAGS = flags.FLAGS


class _Shards:
  """One safetensors shard per `save`, then the index naming them and config.json."""

  def __init__(self, dst: str, n_shards: int):
    os.makedirs(dst, exist_ok=True)
    self.dst, self.n, self.weight_map = dst, n_shards, {}

  def save(self, i: int, tensors: dict) -> None:
    name = f"model-{i + 1:05d}-of-{self.n:05d}.safetensors"
    save_file(tensors, os.path.join(self.dst, name), metadata={"format": "pt"})
    self.weight_map.update({k: name for k in tensors})

  def finish(self, cfg: dict) -> str:
    with open(os.path.join(self.dst, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {}, "weight_map": self.weight_map}, f, indent=1)
    with open(os.path.join(self.dst, "config.json"), "w") as f:
      json.dump(cfg, f, indent=2)
    return self.dst


def make_synthetic(dst: str, layers: int, hidden: int, intermediate: int, experts: int,
                   top_k: int, vocab: int, heads: int, kv_heads: int, head_dim: int,
                   dtype: str = "bfloat16", embed_std: float = 1.0, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  npd = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)

  def w(*shape, std=0.02):
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(npd)

  shards = _Shards(dst, layers + 1)

  q, kv = heads * head_dim, kv_heads * head_dim
  for layer in range(layers):
    pre = f"model.layers.{layer}."
    t = {pre + "input_layernorm.weight": np.ones(hidden, npd),
         pre + "post_attention_layernorm.weight": np.ones(hidden, npd),
         pre + "self_attn.q_proj.weight": w(q, hidden), pre + "self_attn.k_proj.weight": w(kv, hidden),
         pre + "self_attn.v_proj.weight": w(kv, hidden), pre + "self_attn.o_proj.weight": w(hidden, q),
         pre + "block_sparse_moe.gate.weight": w(experts, hidden, std=0.1)}
    for e in range(experts):
      ex = f"{pre}block_sparse_moe.experts.{e}."
      t[ex + "w1.weight"] = w(intermediate, hidden)
      t[ex + "w3.weight"] = w(intermediate, hidden)
      t[ex + "w2.weight"] = w(hidden, intermediate)
    shards.save(layer, t)
  shards.save(layers, {"model.embed_tokens.weight": w(vocab, hidden, std=embed_std),
                "model.norm.weight": np.ones(hidden, npd), "lm_head.weight": w(vocab, hidden)})
  cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab,
         "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
         "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
         "num_local_experts": experts, "num_experts_per_tok": top_k, "hidden_act": "silu",
         "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
         "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
         "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1,
         "eos_token_id": 2, "dtype": dtype}
  return shards.finish(cfg)


def make_gpt_oss_mxfp4(dst: str, layers: int, experts: int = 128, top_k: int = 4,
                       hidden: int = 2880, intermediate: int = 2880, vocab: int = 201088,
                       heads: int = 64, kv_heads: int = 8, head_dim: int = 64,
                       embed_std: float = 1.0, seed: int = 0) -> str:
  """A gpt-oss-shaped model (defaults: gpt-oss-120b's layer shapes) with its experts in the
  published MXFP4 layout: `mlp.experts.{gate_up,down}_proj_{blocks,scales}` [E, out, in/32, 16]
  uint8 / [E, out, in/32] uint8 (random nibbles; e8m0 scales around 2^-7, so weights have
  std ~0.02), f32 biases, attention with biases and sinks; alternating sliding (128) / full
  attention, YaRN as released. One shard per layer; memory stays at one layer."""
  rng = np.random.default_rng(seed)
  bf16 = np.dtype(ml_dtypes.bfloat16)

  def w(*shape, std=0.02):
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(bf16)

  def mxfp4(e, rows, cols):
    blocks = rng.integers(0, 256, (e, rows, cols // 32, 16), dtype=np.uint8)
    scales = rng.integers(119, 122, (e, rows, cols // 32), dtype=np.uint8)  # 2^-8 .. 2^-6
    return blocks, scales

  shards = _Shards(dst, layers + 1)

  q, kv = heads * head_dim, kv_heads * head_dim
  for layer in range(layers):
    pre = f"model.layers.{layer}."
    att, ex = pre + "self_attn.", pre + "mlp.experts."
    t = {pre + "input_layernorm.weight": np.ones(hidden, bf16),
         pre + "post_attention_layernorm.weight": np.ones(hidden, bf16),
         att + "q_proj.weight": w(q, hidden), att + "q_proj.bias": w(q),
         att + "k_proj.weight": w(kv, hidden), att + "k_proj.bias": w(kv),
         att + "v_proj.weight": w(kv, hidden), att + "v_proj.bias": w(kv),
         att + "o_proj.weight": w(hidden, q), att + "o_proj.bias": w(hidden),
         att + "sinks": w(heads, std=1.0),
         pre + "mlp.router.weight": w(experts, hidden, std=0.1), pre + "mlp.router.bias": w(experts),
         ex + "gate_up_proj_bias": w(experts, 2 * intermediate),
         ex + "down_proj_bias": w(experts, hidden)}
    t[ex + "gate_up_proj_blocks"], t[ex + "gate_up_proj_scales"] = mxfp4(experts, 2 * intermediate,
                                                                        hidden)
    t[ex + "down_proj_blocks"], t[ex + "down_proj_scales"] = mxfp4(experts, hidden, intermediate)
    shards.save(layer, t)
  shards.save(layers, {"model.embed_tokens.weight": w(vocab, hidden, std=embed_std),
                "model.norm.weight": np.ones(hidden, bf16), "lm_head.weight": w(vocab, hidden)})
  cfg = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": vocab,
         "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
         "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
         "num_local_experts": experts, "num_experts_per_tok": top_k, "hidden_act": "silu",
         "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                         for i in range(layers)],
         "sliding_window": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
         "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                          "beta_slow": 1.0, "truncate": False,
                          "original_max_position_embeddings": 4096},
         "rope_theta": 150000.0, "attention_bias": True, "swiglu_limit": 7.0,
         "tie_word_embeddings": False, "eos_token_id": 200002, "pad_token_id": 199999,
         "quantization_config": {"quant_method": "mxfp4"}, "dtype": "bfloat16"}
  return shards.finish(cfg)


def main(argv) -> None:
  del argv
  print(make_synthetic(FLAGS.dst, FLAGS.layers, FLAGS.hidden, FLAGS.intermediate, FLAGS.experts,
                       FLAGS.top_k, FLAGS.vocab, FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim,
                       FLAGS.dtype, FLAGS.embed_std, FLAGS.seed))


if __name__ == "__main__":
  define_flags()
  flags.mark_flag_as_required("dst")
  app.run(main)
