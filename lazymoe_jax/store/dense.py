"""Dense params (everything but routed experts) as orbax checkpoints, one per part.

Written in chunks of SAVE_CHUNK_BYTES (orbax's own default is one chunk per array, and a
restore then holds the compressed chunk and its decoded copy at once: 2x the array) and
restored a group of tensors at a time (restore_part), so that loading adds at most about one
group to what stays resident (BUILD_NOTES "session 7 — Loading inside the budget").
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import orbax.checkpoint as ocp

from lazymoe_jax.errors import StoreError
from lazymoe_jax.store import format as fmt
from lazymoe_jax.store.experts import drop_file_from_page_cache

SAVE_CHUNK_BYTES = 16 << 20
RESTORE_GROUP_BYTES = 64 << 20  # tensors restored per orbax call (a larger tensor alone)


def save_part(store_dir: str, part: str, tree: dict[str, np.ndarray]) -> dict[str, dict]:
  """Writes one part; returns its tensors' {"shape", "dtype"} for the manifest."""
  save_args = {k: ocp.SaveArgs(chunk_byte_size=SAVE_CHUNK_BYTES) for k in tree}
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(_path(store_dir, part), tree, save_args=save_args)
    ckpt.wait_until_finished()
  return {k: {"shape": list(a.shape), "dtype": a.dtype.name} for k, a in tree.items()}


def _path(store_dir: str, part: str) -> str:
  return os.path.abspath(os.path.join(store_dir, fmt.DENSE_DIR, part))


def _fail(path: str, e: Exception) -> StoreError:
  return StoreError(f"dense checkpoint {path} cannot be restored ({type(e).__name__}: {e}); "
                    "re-convert the model with --overwrite.")


def part_tensors(store_dir: str, part: str) -> dict[str, dict]:
  """A part's tensors' {"shape", "dtype"} from the checkpoint's metadata (no data read): what
  a version 4 manifest does not record."""
  path = _path(store_dir, part)
  try:
    tree = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
  except Exception as e:  # orbax raises several types for missing/partial checkpoints
    raise _fail(path, e) from e
  return {k: {"shape": list(m.shape), "dtype": np.dtype(m.dtype).name} for k, m in tree.items()}


def restore_part(store_dir: str, part: str, tensors: dict[str, dict],
                 group_bytes: int = RESTORE_GROUP_BYTES) -> Iterator[dict[str, np.ndarray]]:
  """Yields a part's tensors as numpy arrays, a group of at most `group_bytes` at a time (in
  the order of `tensors`; a tensor larger than that alone), so the caller can place each group
  and drop it before the next is read. The part's files are then dropped from the page cache
  (the params live in process memory: their pages would be a second copy charged to a memory
  cgroup, as for the expert reads)."""
  path = _path(store_dir, part)
  groups: list[list[str]] = [[]]
  size = 0
  for key, t in tensors.items():
    n = int(np.prod(t["shape"])) * fmt.numpy_dtype(t["dtype"]).itemsize
    if groups[-1] and size + n > group_bytes:
      groups.append([])
      size = 0
    groups[-1].append(key)
    size += n
  ckpt = ocp.PyTreeCheckpointer()
  for keys in groups:
    try:
      got = ckpt.restore(path, args=ocp.args.PyTreeRestore(
          item={k: 0 for k in keys},
          restore_args={k: ocp.RestoreArgs(restore_type=np.ndarray) for k in keys},
          partial_restore=len(keys) < len(tensors)))
    except Exception as e:  # orbax raises several types for missing/partial checkpoints
      raise _fail(path, e) from e
    yield {k: got.pop(k) for k in keys}
    del got
  for root, _, files in os.walk(path):
    for name in files:
      drop_file_from_page_cache(os.path.join(root, name))
