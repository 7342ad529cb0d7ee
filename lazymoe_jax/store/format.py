"""Store layout constants, manifest I/O and the tensorstore specs (shared by writer and reader)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from lazymoe_jax.model.spec import ModelSpec
from lazymoe_jax.errors import StoreError

FORMAT = "lazymoe-store"
# 2: expert encodings (arrays per tensor); 3: fused wqkv; 4: family + hf_config; 5: the
# embedding as a table read by rows (store/embedding.py), the output head in its compute
# encoding ("head"), every dense tensor's shape and dtype ("dense.tensors": the memory plan is
# made from them before loading)
VERSION = 5
# Version 4 stores still load: embedding and head restored whole, the head re-encoded at load
# as before (BUILD_NOTES "session 7 — Loading inside the budget").
READABLE_VERSIONS = (4, 5)
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
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise StoreError(f"{path} is not a {FORMAT} manifest; give a store folder written by "
                     "`python -m checkpoints_tools.convert_hf`.")
  if manifest.get("version") not in READABLE_VERSIONS:
    raise StoreError(f"{path} has format version {manifest.get('version')}, this engine reads "
                     f"versions {list(READABLE_VERSIONS)}; re-convert the model.")
  validate_manifest(manifest, path)
  return manifest


# Python types of the manifest's JSON values (bool is an int to isinstance: refused apart)
_INT, _STR, _DICT, _LIST = (int,), (str,), (dict,), (list,)


def validate_manifest(manifest: dict[str, Any], path: str = MANIFEST) -> None:
  """Checks the keys the engine reads and their types, and that the expert tables agree in
  size, so that a damaged or foreign manifest is a StoreError naming the key, not a KeyError
  deep in loading.

  Args:
    manifest: the parsed manifest.json.
    path: its path, for the messages.
  """

  def fail(key: str, problem: str):
    raise StoreError(f"{path}: {key} {problem}; the manifest is damaged or from another "
                     "version: re-convert the model with --overwrite.")

  def get(d: dict, key: str, types: tuple, where: str):
    if key not in d:
      fail(f"{where}{key}", "is missing")
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, types):
      fail(f"{where}{key}", f"is {type(value).__name__} {json.dumps(value)[:40]}, not "
           f"{'/'.join(t.__name__ for t in types)}")
    return value

  def ints(values, key: str):
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
      fail(key, "holds non-integers")

  get(manifest, "family", _STR, "")
  get(manifest, "hf_config", _DICT, "")
  dense = get(manifest, "dense", _DICT, "")
  parts = get(dense, "parts", _LIST, "dense.")
  if not all(isinstance(p, str) for p in parts):
    fail("dense.parts", "holds non-strings")
  ex = get(manifest, "experts", _DICT, "")
  layers = get(ex, "layers", _LIST, "experts.")
  ints(layers, "experts.layers")
  get(ex, "encoding", _STR, "experts.")
  tensors = get(ex, "tensors", _DICT, "experts.")
  if not tensors:
    fail("experts.tensors", "is empty")
  crc32 = get(ex, "crc32", _DICT, "experts.")
  for name, spec in tensors.items():
    where = f"experts.tensors.{name}."
    if not isinstance(spec, dict):
      fail(where[:-1], f"is {type(spec).__name__}, not dict")
    for key in ("path", "dtype", "tensor", "suffix", "encoding"):
      get(spec, key, _STR, where)
    shape = get(spec, "shape", _LIST, where)
    ints(shape, where + "shape")
    if len(shape) < 3 or shape[0] != len(layers):
      fail(where + "shape", f"is {shape}: need [layers ({len(layers)}), experts, ...]")
    sums = get(crc32, name, _LIST, "experts.crc32.")
    if len(sums) != shape[0] or not all(isinstance(r, list) and len(r) == shape[1]
                                        for r in sums):
      fail(f"experts.crc32.{name}", f"is not {shape[0]} rows of {shape[1]} checksums")
    for row in sums:
      ints(row, f"experts.crc32.{name}")
  if manifest.get("version", VERSION) >= 5:
    tables = get(dense, "tensors", _DICT, "dense.")
    if sorted(tables) != sorted(parts):
      fail("dense.tensors", f"names parts {sorted(tables)[:3]}..., not dense.parts")
    for part, table in tables.items():
      if not isinstance(table, dict):
        fail(f"dense.tensors.{part}", f"is {type(table).__name__}, not dict")
      for key, entry in table.items():
        where = f"dense.tensors.{part}.{key}."
        if not isinstance(entry, dict):
          fail(where[:-1], f"is {type(entry).__name__}, not dict")
        ints(get(entry, "shape", _LIST, where), where + "shape")
        get(entry, "dtype", _STR, where)
    emb = get(manifest, "embedding", _DICT, "")
    get(emb, "path", _STR, "embedding.")
    get(emb, "dtype", _STR, "embedding.")
    shape = get(emb, "shape", _LIST, "embedding.")
    ints(shape, "embedding.shape")
    if len(shape) != 2:
      fail("embedding.shape", f"is {shape}, not [vocab, hidden]")
    get(get(manifest, "head", _DICT, ""), "encoding", _STR, "head.")
  if "tokenizer" not in manifest:
    fail("tokenizer", "is missing (null for a store without tokenizer)")
  if manifest["tokenizer"] is not None:  # null: converted without tokenizer files
    tok = get(manifest, "tokenizer", _DICT, "")
    get(tok, "kind", _STR, "tokenizer.")
    get(tok, "file", _STR, "tokenizer.")
  if "generation" in manifest:  # optional: older stores have none
    gen = get(manifest, "generation", _DICT, "")
    if "eos_token_ids" in gen:
      ints(get(gen, "eos_token_ids", _LIST, "generation."), "generation.eos_token_ids")
