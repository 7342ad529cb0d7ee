"""Dense params (everything but routed experts) as orbax checkpoints, one per part."""

from __future__ import annotations

import os

import numpy as np
import orbax.checkpoint as ocp

from lazymoe_jax.errors import StoreError
from lazymoe_jax.store import format as fmt
from lazymoe_jax.store.experts import drop_file_from_page_cache


def save_part(store_dir: str, part: str, tree: dict[str, np.ndarray]) -> None:
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.abspath(os.path.join(store_dir, fmt.DENSE_DIR, part)), tree)
    ckpt.wait_until_finished()


def load_parts(store_dir: str, parts: list[str]) -> dict[str, dict[str, np.ndarray]]:
  out = {}
  with ocp.StandardCheckpointer() as ckpt:
    for part in parts:
      path = os.path.abspath(os.path.join(store_dir, fmt.DENSE_DIR, part))
      try:
        out[part] = ckpt.restore(path)
      except Exception as e:  # orbax raises several types for missing/partial checkpoints
        raise StoreError(f"dense checkpoint {path} cannot be restored ({type(e).__name__}: {e}); "
                         "re-convert the model with --overwrite.") from e
      _drop_from_page_cache(path)
  return out


def _drop_from_page_cache(folder: str) -> None:
  """The dense params now live in process memory: their file pages would be a second copy
  charged to a memory cgroup (the expert reads drop theirs too, see store/experts.py)."""
  for root, _, files in os.walk(folder):
    for name in files:
      drop_file_from_page_cache(os.path.join(root, name))
