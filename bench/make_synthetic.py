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
import zlib

import ml_dtypes
import numpy as np
from absl import app, flags
from safetensors.numpy import save_file

BF16 = np.dtype(ml_dtypes.bfloat16)

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


def gpt_oss_config(layers: int, experts: int = 128, top_k: int = 4, hidden: int = 2880,
                   intermediate: int = 2880, vocab: int = 201088, heads: int = 64,
                   kv_heads: int = 8, head_dim: int = 64) -> dict:
  """config.json of a gpt-oss-shaped model with MXFP4 experts (defaults: gpt-oss-120b's)."""
  return {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": vocab,
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


class GptOssMxfp4Source:
  """A gpt-oss-shaped checkpoint made on demand, tensor by tensor, and expert by expert for the
  fused [E, ...] expert tensors: it answers the reading calls of
  checkpoints_tools.convert_hf.SafetensorsFolder (`where`, `shape`, `dtype`, `get`,
  `get_row`), so the real converter can write a store far larger than the disk could hold
  beside its HF folder (gpt-oss-120b: 61 GB of experts) in the memory of one tensor.

  Random weights, deterministic: every tensor (every expert row) draws from its own seed, so
  `get_row(k, e)` equals `get(k)[e]`; the MXFP4 blocks of expert e are a window, at a random
  offset of its own, of one random buffer (twice an expert's size) per tensor. Experts in the published MXFP4 layout:
  `mlp.experts.{gate_up,down}_proj_{blocks,scales}` [E, out, in/32, 16] uint8 / [E, out, in/32]
  uint8 (random nibbles; e8m0 scales around 2^-7, so weights have std ~0.02), bf16
  biases, attention with biases and sinks; embeddings with std `embed_std` (see the module
  docstring)."""

  def __init__(self, cfg: dict, embed_std: float = 1.0, seed: int = 0):
    self.cfg, self.embed_std, self.seed = cfg, embed_std, seed
    h, i, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    self.tensors: dict[str, tuple[tuple[int, ...], str, float]] = {}  # name -> shape, kind, std
    for layer in range(cfg["num_hidden_layers"]):
      pre = f"model.layers.{layer}."
      att, ex = pre + "self_attn.", pre + "mlp.experts."
      self.tensors |= {
          pre + "input_layernorm.weight": ((h,), "ones", 0),
          pre + "post_attention_layernorm.weight": ((h,), "ones", 0),
          att + "q_proj.weight": ((q, h), "bf16", 0.02), att + "q_proj.bias": ((q,), "bf16", 0.02),
          att + "k_proj.weight": ((kv, h), "bf16", 0.02), att + "k_proj.bias": ((kv,), "bf16", 0.02),
          att + "v_proj.weight": ((kv, h), "bf16", 0.02), att + "v_proj.bias": ((kv,), "bf16", 0.02),
          att + "o_proj.weight": ((h, q), "bf16", 0.02), att + "o_proj.bias": ((h,), "bf16", 0.02),
          att + "sinks": ((cfg["num_attention_heads"],), "bf16", 1.0),
          pre + "mlp.router.weight": ((e, h), "bf16", 0.1), pre + "mlp.router.bias": ((e,), "bf16", 0.02),
          ex + "gate_up_proj_bias": ((e, 2 * i), "bf16", 0.02),
          ex + "down_proj_bias": ((e, h), "bf16", 0.02),
          ex + "gate_up_proj_blocks": ((e, 2 * i, h // 32, 16), "blocks", 0),
          ex + "gate_up_proj_scales": ((e, 2 * i, h // 32), "scales", 0),
          ex + "down_proj_blocks": ((e, h, i // 32, 16), "blocks", 0),
          ex + "down_proj_scales": ((e, h, i // 32), "scales", 0)}
    self.tensors |= {"model.embed_tokens.weight": ((cfg["vocab_size"], h), "bf16", embed_std),
                     "model.norm.weight": ((h,), "ones", 0),
                     "lm_head.weight": ((cfg["vocab_size"], h), "bf16", 0.02)}
    self.where = {k: "synthetic" for k in self.tensors}
    self.fp8: set[str] = set()
    self.fp8_scales: set[str] = set()
    self.float_dtype = "bfloat16"
    self.src = "<synthetic gpt-oss>"
    self._base: tuple[str | None, np.ndarray | None] = (None, None)
    self._last: tuple[str | None, np.ndarray | None] = (None, None)

  def layer_names(self, layer: int | None) -> list[str]:
    """The tensors of one decoder layer (None: the embedding, final norm and head)."""
    pre = f"model.layers.{layer}."
    return [k for k in self.tensors if (k.startswith(pre) if layer is not None
                                        else not k.startswith("model.layers."))]

  def shape(self, key: str) -> tuple[int, ...]:
    return self.tensors[key][0]

  def dtype(self, key: str) -> str:
    return "U8" if self.tensors[key][1] in ("blocks", "scales") else "BF16"

  def _make(self, key: str, shape: tuple[int, ...], row: int | None) -> np.ndarray:
    _, kind, std = self.tensors[key]
    rng = np.random.default_rng((self.seed, zlib.crc32(key.encode()), 0 if row is None else row + 1))
    n = int(np.prod(shape))
    if kind == "ones":
      return np.ones(shape, BF16)
    if kind == "blocks":  # each row a window of one random buffer per tensor (fresh random
      # bytes for 61 GB take longer to make than to write)
      if self._base[0] != key:
        base_rng = np.random.default_rng((self.seed, zlib.crc32(key.encode())))
        self._base = (key, np.frombuffer(base_rng.bytes(2 * n), np.uint8))
      off = 0 if row is None else int(rng.integers(0, n))
      return self._base[1][off:off + n].reshape(shape)
    if kind == "scales":
      return rng.integers(119, 122, shape, dtype=np.uint8)  # 2^-8 .. 2^-6
    out = np.empty(n, BF16)  # in pieces: a 200k-row embedding never exists in float32 whole
    for s in range(0, n, 1 << 24):
      m = min(1 << 24, n - s)
      out[s:s + m] = rng.standard_normal(m, dtype=np.float32) * np.float32(std)
    return out.reshape(shape)

  def get(self, key: str, fp8_as_f32: bool = False) -> np.ndarray:
    del fp8_as_f32  # no FP8 here
    shape, kind, _ = self.tensors[key]
    if kind in ("blocks", "scales") or key.endswith("_proj_bias"):  # fused [E, ...]: by rows
      return np.stack([self.get_row(key, e) for e in range(shape[0])])
    return self._make(key, shape, None)

  def get_row(self, key: str, i: int) -> np.ndarray:
    return self._make(key, self.tensors[key][0][1:], i)

  def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
    """tensor[start:stop] (the converter reads the embedding by blocks of rows): the tensor
    is made once and kept until another is asked for."""
    if self._last[0] != key:
      self._last = (None, None)  # free the previous one first
      self._last = (key, self.get(key))
    return self._last[1][start:stop]


def make_gpt_oss_mxfp4(dst: str, layers: int, embed_std: float = 1.0, seed: int = 0,
                       **shape) -> str:
  """The HF folder of GptOssMxfp4Source(gpt_oss_config(layers, **shape)): one shard per layer
  (memory stays at one layer)."""
  source = GptOssMxfp4Source(gpt_oss_config(layers, **shape), embed_std, seed)
  shards = _Shards(dst, layers + 1)
  for layer in range(layers):
    shards.save(layer, {k: source.get(k) for k in source.layer_names(layer)})
  shards.save(layers, {k: source.get(k) for k in source.layer_names(None)})
  return shards.finish(source.cfg)


def main(argv) -> None:
  del argv
  print(make_synthetic(FLAGS.dst, FLAGS.layers, FLAGS.hidden, FLAGS.intermediate, FLAGS.experts,
                       FLAGS.top_k, FLAGS.vocab, FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim,
                       FLAGS.dtype, FLAGS.embed_std, FLAGS.seed))


if __name__ == "__main__":
  define_flags()
  flags.mark_flag_as_required("dst")
  app.run(main)
