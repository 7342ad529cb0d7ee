"""The dense params (everything but routed experts): restored from the store a group of tensors
at a time, optionally re-encoded, placed on the device and dropped from the host before the
next group is read; and the embedding rows' source.

Version 5 stores keep the embedding as a table read by rows (store/embedding.py) and the output
head in its compute encoding (`manifest["head"]`); version 4 stores restore the embedding whole
and re-encode the head at load as before.
"""

from __future__ import annotations

import jax
import numpy as np

from lazymoe_jax.engine.budget import (DENSE_MATRICES, ROW_BLOCK, dense_tensors, head_encoding,
                                       reencodes_head)
from lazymoe_jax.model import encodings, steps
from lazymoe_jax.model.spec import ModelSpec
from lazymoe_jax.store import dense as dense_store
from lazymoe_jax.store import embedding as embedding_store
from lazymoe_jax.store import format as fmt


def load(store_dir: str, spec: ModelSpec, dense_dtype: str | None,
         manifest: dict | None = None) -> tuple[dict, list[dict]]:
  """(globals, [layer params]) on the device; matrices as Weights of their encoding. Each part
  is restored a group of tensors at a time (store/dense.py restore_part); each group is
  re-encoded and put on the device, its host arrays dropped, before the next is read, so the
  load's peak is what stays resident plus about one group."""
  manifest = manifest or fmt.read_manifest(store_dir)
  tables = dense_tensors(store_dir, manifest)
  enc = encodings.get(dense_dtype) if dense_dtype is not None else None
  head_enc = head_encoding(manifest, tables)
  reencode_head = reencodes_head(manifest, tables, dense_dtype)
  out = {part: load_part(store_dir, part, tables[part], spec, enc, reencode_head)
         for part in fmt.dense_part_names(spec)}
  glob = out.pop("globals")
  if "head" in manifest and not isinstance(head_enc, encodings.Float):
    # the head's arrays lm_head, lm_head_<suffix> as one Weight of its stored encoding
    arrays = {s: glob.pop(fmt.array_name("lm_head", s)) for s in head_enc.arrays(1, spec.hidden_size)}
    glob["lm_head"] = encodings.Weight(head_enc, arrays)
  return glob, [out.pop(f"layer_{i:03d}") for i in range(spec.num_hidden_layers)]


def load_part(store_dir: str, part: str, table: dict, spec: ModelSpec,
              enc: encodings.Encoding | None, reencode_head: bool = False) -> dict:
  """One part's params on the device, restored a group at a time (see `load`)."""
  placed: dict = {}
  for group in dense_store.restore_part(store_dir, part, table):
    for key in list(group):
      w = group.pop(key)
      if enc is not None and part != "globals" and key in DENSE_MATRICES:
        w = encode(enc, w)
      elif part == "globals" and key in ("lm_head", "embed") and reencode_head:
        if key == "embed" and spec.tie_word_embeddings:  # v4, tied: the head gets its copy
          placed["lm_head"] = to_device({"": encode(enc, w)})[""]
        elif key == "lm_head":
          w = encode(enc, w)
      placed[key] = to_device({key: w})[key]
      del w
  return placed


def encode(enc: encodings.Encoding, w: np.ndarray) -> encodings.Weight:
  """w [rows, cols] to `enc` by blocks of rows (a float32 copy of the whole would be 2x-8x w)."""
  blocks = [enc.encode(np.asarray(w[r:r + ROW_BLOCK], np.float32))
            for r in range(0, len(w), ROW_BLOCK)]
  return encodings.Weight(enc, {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]})


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


class ResidentRows:
  """Embedding rows taken from a table in memory: a version 4 store's embedding, a tied head
  kept in the embedding's own dtype (the same numbers; the table is the head, counted once, as
  the head), or a version 5 store's table read whole (an engine without a memory budget)."""

  def __init__(self, table: jax.Array, read_whole: bool = False):
    self.table = table
    # bytes beyond the dense params: a table read whole (the others are dense params)
    self.held_bytes = table.nbytes if read_whole else 0

  def __call__(self, ids: np.ndarray) -> jax.Array:
    return steps.embed(self.table, np.asarray(ids, np.int32))  # [T, H] float32


class StoredRows:
  """Embedding rows read from the store's table per call (the table is never held)."""

  def __init__(self, table: embedding_store.EmbeddingTable):
    self.table = table
    self.held_bytes = 0  # its row caches are the plan's (embedding_store.HELD_BYTES)

  def __call__(self, ids: np.ndarray) -> np.ndarray:
    return self.table.rows(ids)  # [T, H] float32 (host; the jitted programs take it as is)


def embedding_rows(store_dir: str, manifest: dict, spec: ModelSpec, glob: dict, hold: bool):
  """Where embedding rows come from: a version 4 store's resident embedding; else the head,
  where it is tied and resident in the table's own dtype; else the store's table (version 5):
  held whole when `hold` (the engine's choice: no memory budget, and the model fits; a lookup
  is then a take, where a read through tensorstore costs ~0.3-0.5 ms a decode token,
  BUILD_NOTES "session 14"), else read per call."""
  if "embed" in glob:
    return ResidentRows(glob["embed"])
  entry = manifest["embedding"]
  head = glob["lm_head"]
  if (spec.tie_word_embeddings and not isinstance(head, encodings.Weight)
      and head.dtype == fmt.numpy_dtype(entry["dtype"])):
    return ResidentRows(head)
  table = embedding_store.EmbeddingTable(store_dir, entry)
  if hold:
    return ResidentRows(jax.device_put(table.read_all()).block_until_ready(), read_whole=True)
  return StoredRows(table)
