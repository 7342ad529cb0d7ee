"""The input embedding as a table on disk: the rows a call needs are read, the table is not
held (a 201,088 x 2880 bf16 table is 1.16 GB, about a seventh of an 8 GB budget); only an
engine without a memory budget whose whole model fits reads it once (read_all) and holds it.

STORE/embed/ is a tensorstore zarr3 array [vocab, hidden] in the checkpoint's float dtype,
sharded: a shard file holds SHARD_ROWS rows, read in inner chunks of CHUNK_ROWS rows (the
unit of a read, ~92 KB for gpt-oss-120b) located through the shard's index. One call reads the
rows of all its tokens at once (tensorstore issues the chunk reads together). The tensorstore
cache pool holds the shard indices and the last chunks read, bounded by CACHE_BYTES, and the
table keeps the float32 rows it returned last, up to ROW_CACHE_BYTES (a decode token's row is
then a dict lookup: a read through tensorstore costs ~0.4-0.9 ms even from the page cache,
measured in BUILD_NOTES "session 11"); the memory plan counts both, HELD_BYTES, as dense memory
(plan.dense_sizes).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorstore as ts

from lazymoe_jax.errors import StoreError
from lazymoe_jax.store import format as fmt

EMBED_DIR = "embed"
SHARD_ROWS = 1024  # rows per shard file (197 files for a 201,088-row vocabulary)
CHUNK_ROWS = 16  # rows per read inside a shard: one row alone made writing 3x slower
CACHE_BYTES = 8 << 20  # tensorstore cache pool: shard indices and recently read chunks
ROW_CACHE_BYTES = 4 << 20  # the rows last returned, float32 (EmbeddingTable.rows)
HELD_BYTES = CACHE_BYTES + ROW_CACHE_BYTES  # what reading rows holds in memory


def zarr3_spec(path: str, shape=None, dtype: str | None = None) -> dict[str, Any]:
  spec: dict[str, Any] = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
  if shape is not None:
    raw = [{"name": "bytes", "configuration": {"endian": "little"}}]
    spec["metadata"] = {
        "shape": list(shape), "data_type": dtype, "fill_value": 0,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [SHARD_ROWS,
                                                                            shape[1]]}},
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [CHUNK_ROWS, shape[1]], "codecs": raw,
            "index_codecs": raw + [{"name": "crc32c"}], "index_location": "end"}}],
    }
  return spec


def write(store_dir: str, blocks: Iterator[np.ndarray], shape: tuple[int, int],
          dtype: str) -> dict[str, Any]:
  """Writes the table from `blocks` (consecutive row blocks, each a multiple of SHARD_ROWS
  rows but the last: whole shards, so no shard is rewritten); returns its manifest entry."""
  arr = ts.open(zarr3_spec(os.path.join(store_dir, EMBED_DIR), shape, dtype),
                create=True).result()
  row = 0
  for block in blocks:
    if row % SHARD_ROWS:
      raise ValueError(f"embedding blocks must be multiples of {SHARD_ROWS} rows but the last.")
    arr[row:row + len(block)].write(np.ascontiguousarray(block)).result()
    row += len(block)
  if row != shape[0]:
    raise ValueError(f"embedding blocks gave {row} rows of {shape[0]}.")
  return {"path": EMBED_DIR, "shape": list(shape), "dtype": dtype}


class EmbeddingTable:
  """Rows of the store's embedding table by token id, read on demand."""

  def __init__(self, store_dir: str, entry: dict[str, Any]):
    path = os.path.join(store_dir, entry["path"])
    try:
      self.array = ts.open(zarr3_spec(path), open=True, read=True, context=ts.Context(
          {"cache_pool": {"total_bytes_limit": CACHE_BYTES}})).result()
    except Exception as e:  # tensorstore raises ValueError subclasses with its own text
      raise StoreError(f"embedding table {path} cannot be opened ({e}); the store is incomplete "
                       "or damaged: re-convert with --overwrite.") from e
    if list(self.array.shape) != list(entry["shape"]):
      raise StoreError(f"embedding table {path} has shape {self.array.shape}, the manifest says "
                       f"{entry['shape']}; re-convert with --overwrite.")
    self.dtype = fmt.numpy_dtype(entry["dtype"])
    self.row_bytes = int(entry["shape"][1]) * self.dtype.itemsize
    # token id -> float32 row, least recently returned first
    self._recent: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._recent_max = max(1, ROW_CACHE_BYTES // (int(entry["shape"][1]) * 4))

  def read_all(self) -> np.ndarray:
    """The whole table [vocab, hidden] in its own dtype (for an engine that holds it:
    engine/weights.embedding_rows)."""
    try:
      return np.asarray(self.array.read().result())
    except Exception as e:  # pylint: disable=broad-except
      raise StoreError(f"reading the embedding table failed ({e}); the store is damaged: "
                       "re-convert with --overwrite.") from e

  def rows(self, ids: np.ndarray) -> np.ndarray:
    """float32 [len(ids), hidden]: the rows of `ids` (repeats allowed), read in one call."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    uniq, inverse = np.unique(ids, return_inverse=True)
    recent = self._recent
    uniq_ids = [int(i) for i in uniq]
    missing = [i for i in uniq_ids if i not in recent]
    got: dict[int, np.ndarray] = {}
    if missing:
      try:
        block = self.array[np.asarray(missing, np.int64)].read().result()
      except Exception as e:  # pylint: disable=broad-except
        raise StoreError(f"reading embedding rows failed ({e}); the store is damaged: "
                         "re-convert with --overwrite.") from e
      got = dict(zip(missing, block.astype(np.float32)))
    out = np.stack([recent[i] if i in recent else got[i] for i in uniq_ids])
    # kept: at most _recent_max of the rows just returned, each its own copy (a view would
    # keep the whole block read above alive, past ROW_CACHE_BYTES)
    for i in uniq_ids[-self._recent_max:]:
      if i in recent:
        recent.move_to_end(i)
      else:
        recent[i] = got[i].copy()
    while len(recent) > self._recent_max:
      recent.popitem(last=False)
    return out[inverse]
