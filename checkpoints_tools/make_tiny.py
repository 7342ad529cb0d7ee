r"""Writes a tiny random-weight Mixtral checkpoint in Hugging Face layout, with a real tokenizer.

  python -m checkpoints_tools.make_tiny --dst=DIR

It is the default model of `python -m lazymoe_jax.generate` until the trained demo model
lands: the weights are random (its text is gibberish), but every part is real — safetensors in
the published Mixtral layout, a sentencepiece model trained on the Python standard library's
own sources — so the whole path (conversion, lazy experts, tokenizer) runs for real.
No torch: written with safetensors' numpy API.
"""

from __future__ import annotations

import io
import json
import os
import sysconfig

import numpy as np
from absl import app, flags
from safetensors.numpy import save_file

TINY_CONFIG = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
    "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
    "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_act": "silu",
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "sliding_window": None, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32",
}


def stdlib_corpus(max_bytes: int, held_out: bool = False) -> str:
  """Python sources of the interpreter's standard library, in a fixed order.

  Files whose sorted index is divisible by 10 are the held-out split.
  """
  root = sysconfig.get_paths()["stdlib"]
  paths = []
  for d, dirs, files in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "test", "tests", "idlelib"))
    paths += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
  paths.sort()
  out, size = [], 0
  for i, p in enumerate(paths):
    if (i % 10 == 0) != held_out:
      continue
    with open(p, encoding="utf-8", errors="replace") as f:
      text = f.read()
    out.append(text)
    size += len(text)
    if size >= max_bytes:
      break
  return "".join(out)


def train_tokenizer(dst: str, vocab_size: int, corpus: str) -> None:
  """Sentencepiece BPE with byte fallback and identity normalisation: decode(encode(s)) == s."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus.splitlines(keepends=True)), model_writer=model,
      vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      split_by_whitespace=False, allow_whitespace_only_pieces=True, add_dummy_prefix=False,
      user_defined_symbols=["\n", "\t"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      max_sentence_length=1 << 16, num_threads=2, minloglevel=2)
  with open(os.path.join(dst, "tokenizer.model"), "wb") as f:
    f.write(model.getvalue())


def random_mixtral_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
  """Per-expert Mixtral layout. Embeddings with std 1 so routing is not collapsed."""
  rng = np.random.default_rng(seed)
  h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  q = cfg["num_attention_heads"] * cfg["head_dim"]
  kv = cfg["num_key_value_heads"] * cfg["head_dim"]

  def w(*shape, std=0.02):
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

  t = {"model.embed_tokens.weight": w(v, h, std=1.0), "model.norm.weight": np.ones(h, np.float32),
       "lm_head.weight": w(v, h)}
  for layer in range(cfg["num_hidden_layers"]):
    pre = f"model.layers.{layer}."
    t[pre + "input_layernorm.weight"] = np.ones(h, np.float32)
    t[pre + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
    for name, shape in (("q_proj", (q, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)),
                        ("o_proj", (h, q))):
      t[f"{pre}self_attn.{name}.weight"] = w(*shape)
    t[pre + "block_sparse_moe.gate.weight"] = w(cfg["num_local_experts"], h, std=0.2)
    for e in range(cfg["num_local_experts"]):
      ex = f"{pre}block_sparse_moe.experts.{e}."
      t[ex + "w1.weight"], t[ex + "w3.weight"], t[ex + "w2.weight"] = w(i, h), w(i, h), w(h, i)
  return t


def make_tiny(dst: str, seed: int = 0) -> str:
  os.makedirs(dst, exist_ok=True)
  cfg = dict(TINY_CONFIG)
  train_tokenizer(dst, cfg["vocab_size"], stdlib_corpus(1 << 20))
  save_file(random_mixtral_weights(cfg, seed), os.path.join(dst, "model.safetensors"),
            metadata={"format": "pt"})
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
    json.dump({"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}, f, indent=2)
  return dst


FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv
  print(make_tiny(FLAGS.dst, FLAGS.seed))


if __name__ == "__main__":
  flags.DEFINE_string("dst", None, "Folder to write the Hugging Face checkpoint into.")
  flags.DEFINE_integer("seed", 0, "Weight seed.")
  flags.mark_flag_as_required("dst")
  app.run(main)
