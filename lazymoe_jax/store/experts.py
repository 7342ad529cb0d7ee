"""Reads one routed expert of one layer from the tensorstore arrays into caller buffers."""

from __future__ import annotations

import os
import zlib

import numpy as np
import tensorstore as ts

from lazymoe_jax.errors import StoreError
from lazymoe_jax.model import encodings
from lazymoe_jax.store import format as fmt


def _drop_from_page_cache(path: str) -> None:
  """The pool is the expert cache: do not let the OS page cache keep a second, unbounded copy
  (it would be charged to the memory budget and make "fits in N GB" untrue)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return  # a missing chunk is reported by the checksum just after
  try:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
  finally:
    os.close(fd)


class ExpertStore:
  """Handles to the expert arrays; knows shapes and bytes without reading any data."""

  def __init__(self, store_dir: str, manifest: dict):
    self.store_dir = store_dir
    ex = manifest["experts"]
    self.layers: list[int] = list(ex["layers"])  # model layer index of each array row
    self.row = {layer: r for r, layer in enumerate(self.layers)}
    self.encoding = encodings.get(ex["encoding"])
    self.specs = ex["tensors"]  # array name -> {path, shape, dtype, tensor, suffix}
    self.crc32 = {name: ex["crc32"][name] for name in self.specs}
    self.dtypes = {n: fmt.numpy_dtype(s["dtype"]) for n, s in self.specs.items()}
    self.shapes = {n: tuple(s["shape"][2:]) for n, s in self.specs.items()}
    self.nbytes = {n: int(np.prod(self.shapes[n])) * self.dtypes[n].itemsize for n in self.specs}
    self.bytes_per_expert = sum(self.nbytes.values())

    self.arrays = {}
    for name, spec in self.specs.items():
      path = os.path.join(store_dir, spec["path"])
      try:
        arr = ts.open(fmt.zarr3_spec(path), open=True, read=True).result()
      except Exception as e:  # tensorstore raises ValueError subclasses with its own text
        raise StoreError(f"expert array {path} cannot be opened ({e}); the store is incomplete "
                         "or damaged: re-convert with --overwrite.") from e
      if tuple(arr.shape) != tuple(spec["shape"]):
        raise StoreError(f"expert array {path} has shape {arr.shape}, manifest says "
                         f"{spec['shape']}; re-convert with --overwrite.")
      self.arrays[name] = arr

  def as_tree(self, arrays: dict) -> dict[str, dict]:
    """{array name: a} -> {tensor: {suffix: a}}, the form the expert kernels take."""
    tree: dict[str, dict] = {}
    for name, a in arrays.items():
      tree.setdefault(self.specs[name]["tensor"], {})[self.specs[name]["suffix"]] = a
    return tree

  def read_into(self, layer: int, expert: int, buffers: dict[str, np.ndarray]) -> int:
    """Reads expert `expert` of model layer `layer` into `buffers`; returns bytes read."""
    return self.finish_read(self.start_read(layer, expert, buffers))

  def start_read(self, layer: int, expert: int, buffers: dict[str, np.ndarray]) -> tuple:
    """Starts reading every array of the expert into `buffers` (tensorstore reads them
    concurrently, on its own threads); returns a handle for finish_read."""
    row = self.row[layer]
    futures = {name: ts.array(buffers[name], copy=False, write=True).write(arr[row, expert])
               for name, arr in self.arrays.items()}
    return layer, expert, futures, buffers

  def finish_read(self, handle: tuple) -> int:
    """Waits for a started read, then checks each chunk against the crc32 recorded at
    conversion; returns bytes read."""
    layer, expert, futures, buffers = handle
    row = self.row[layer]
    errors = {}
    for name, fut in futures.items():  # wait for every read before judging any of them
      try:
        fut.result()
      except Exception as e:  # pylint: disable=broad-except
        errors[name] = e
    for name in futures:
      path = fmt.chunk_path(self.store_dir, name, row, expert)
      if name in errors:
        raise StoreError(f"reading expert {expert} of layer {layer} failed at {path}: "
                         f"{errors[name]}. The store is damaged: re-convert with --overwrite."
                         ) from errors[name]
      _drop_from_page_cache(path)
      if zlib.crc32(buffers[name]) != self.crc32[name][row][expert]:
        state = "missing" if not os.path.exists(path) else "corrupt"
        raise StoreError(f"expert chunk {path} is {state} (crc32 mismatch for expert {expert} of "
                         f"layer {layer}); re-convert the model with --overwrite.")
    return self.bytes_per_expert
