"""The dense params (everything but routed experts): restored from the store, optionally
re-encoded, placed on the device one leaf at a time."""

from __future__ import annotations

import jax
import numpy as np

from lazymoe_jax.model import encodings
from lazymoe_jax.model.spec import ModelSpec
from lazymoe_jax.store import dense as dense_store
from lazymoe_jax.store import format as fmt

# The dense matrices read every token that `dense_dtype` re-encodes (attention, dense and
# shared MLPs, output head; not the router, norms or embedding lookup).
DENSE_MATRICES = ("wqkv", "wo", "w_gate_up", "w_down", "shared_w_gate_up", "shared_w_down")
ROW_BLOCK = 4096  # rows re-encoded at a time: a 200k-row head in float32 would be 2.3 GB


def load(store_dir: str, spec: ModelSpec, dense_dtype: str | None) -> tuple[dict, list[dict]]:
  """(globals, [layer params]) on the device; matrices as Weights of their encoding."""
  parts = dense_store.load_parts(store_dir, fmt.dense_part_names(spec))
  if dense_dtype is not None:
    reencode(parts, spec, encodings.get(dense_dtype))
  glob = to_device(parts.pop("globals"))
  layers = [to_device(parts.pop(f"layer_{i:03d}")) for i in range(spec.num_hidden_layers)]
  return glob, layers


def reencode(parts: dict, spec: ModelSpec, enc: encodings.Encoding) -> None:
  """In place: every matrix of DENSE_MATRICES and the output head to `enc`, as Weights. A tied
  head gets its own re-encoded copy; the embedding lookup keeps the stored rows."""
  def one(w):
    blocks = [enc.encode(np.asarray(w[r:r + ROW_BLOCK], np.float32))
              for r in range(0, len(w), ROW_BLOCK)]
    return encodings.Weight(enc, {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]})
  g = parts["globals"]
  g["lm_head"] = one(g["embed"] if spec.tie_word_embeddings else g.pop("lm_head"))
  for name, part in parts.items():
    if name != "globals":
      for key in DENSE_MATRICES:
        if key in part:
          part[key] = one(part[key])


def to_device(tree: dict) -> dict:
  """jax.device_put leaf by leaf, dropping each host array as soon as it is on the device, so
  loading never holds two copies of the dense params. device_put is asynchronous: each copy is
  waited for, so that the memory plan (made right after loading) measures the copies that
  stay (BUILD_NOTES "Memory accounting fixes")."""
  out = {}
  for key in list(tree):
    leaf = tree.pop(key)
    if isinstance(leaf, dict):
      out[key] = to_device(leaf)
    elif isinstance(leaf, encodings.Weight):
      out[key] = encodings.Weight(leaf.encoding, to_device(dict(leaf.arrays)))
    else:
      out[key] = jax.device_put(leaf).block_until_ready()
    del leaf
  return out
