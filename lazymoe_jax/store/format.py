"""Store layout constants, manifest I/O and the tensorstore specs (shared by writer and reader)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from lazymoe_jax.model.spec import ModelSpec
from lazymoe_jax.errors import StoreError

FORMAT = "lazymoe-store"
VERSION = 4  # 2: expert encodings (arrays per tensor); 3: fused wqkv; 4: family + hf_config
MANIFEST = "manifest.json"
DENSE_DIR = "dense"
EXPERTS_DIR = "experts"
# Routed-expert tensors, [out, in] as the kernels want them: gate and up fused on the rows.
# Each is stored as the arrays of its encoding (model/encodings.py), e.g. w_down, w_down_scale.


def expert_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
  """Logical routed-expert weights, [out, in]."""
  i, h = spec.moe.width, spec.hidden_size
  return {"w_gate_up": (2 * i, h), "w_down": (h, i)}


def array_name(tensor: str, suffix: str) -> str:
  return f"{tensor}_{suffix}" if suffix else tensor


def expert_bias_shapes(spec: ModelSpec) -> dict[str, tuple[int]]:
  """Routed-expert biases (gpt-oss), kept float32 whatever the weights' encoding: they are
  (2I + H) / (3 I H) of an expert's bytes."""
  if not spec.moe.expert_bias:
    return {}
  return {"b_gate_up": (2 * spec.moe.width,), "b_down": (spec.hidden_size,)}


def expert_arrays(spec: ModelSpec, encoding) -> dict[str, tuple[str, str, tuple, str, str]]:
  """Array name -> (tensor, suffix, shape of one expert, dtype, the tensor's encoding name) for
  an expert encoding (biases stay float32)."""
  out = {}
  for tensor, (rows, cols) in expert_shapes(spec).items():
    for suffix, (shape, dtype) in encoding.arrays(rows, cols).items():
      out[array_name(tensor, suffix)] = (tensor, suffix, shape, dtype, encoding.name)
  for tensor, shape in expert_bias_shapes(spec).items():
    out[tensor] = (tensor, "", shape, "float32", "float32")
  return out


def dense_part_names(spec: ModelSpec) -> list[str]:
  return ["globals"] + [f"layer_{i:03d}" for i in range(spec.num_hidden_layers)]


def zarr3_spec(path: str, shape=None, dtype: str | None = None) -> dict[str, Any]:
  """One chunk = one expert of one layer; "bytes" codec only, so a chunk file is raw data."""
  spec: dict[str, Any] = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
  if shape is not None:
    spec["metadata"] = {
        "shape": list(shape), "data_type": dtype,
        "chunk_grid": {"name": "regular",
                       "configuration": {"chunk_shape": [1, 1, *shape[2:]]}},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "fill_value": 0,
    }
  return spec


def chunk_path(store_dir: str, name: str, row: int, expert: int, ndim: int = 4) -> str:
  """The file of chunk (row, expert) of an expert array of rank ndim (zarr3 default keys)."""
  return os.path.join(store_dir, EXPERTS_DIR, name, "c", str(row), str(expert),
                      *["0"] * (ndim - 2))


def numpy_dtype(name: str) -> np.dtype:
  import ml_dtypes  # pylint: disable=import-outside-toplevel  (ships with jax)
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def write_manifest(store_dir: str, manifest: dict[str, Any]) -> None:
  """Atomic: a reader sees either no manifest or the whole one."""
  tmp = os.path.join(store_dir, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(store_dir, MANIFEST))


def read_manifest(store_dir: str) -> dict[str, Any]:
  """Reads and validates manifest.json, with errors that say what to do."""
  if not os.path.isdir(store_dir):
    raise StoreError(f"store {store_dir!r} does not exist; convert a Hugging Face model with "
                     "`python -m checkpoints_tools.convert_hf --src=HF_DIR --dst=STORE_DIR`.")
  path = os.path.join(store_dir, MANIFEST)
  if not os.path.exists(path):
    hint = (" It looks like a Hugging Face model folder: convert it first with "
            "`python -m checkpoints_tools.convert_hf`." if os.path.exists(
                os.path.join(store_dir, "config.json")) else
            " The conversion was interrupted or this is not a store: re-run convert_hf with "
            "--overwrite.")
    raise StoreError(f"{store_dir!r} has no {MANIFEST}, so it is not a complete store.{hint}")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise StoreError(f"{path} is unreadable ({e}); re-convert the model with --overwrite.") from e
  if manifest.get("format") != FORMAT:
    raise StoreError(f"{path} is not a {FORMAT} manifest.")
  if manifest.get("version") != VERSION:
    raise StoreError(f"{path} has format version {manifest.get('version')}, this engine reads "
                     f"version {VERSION}; re-convert the model.")
  return manifest
