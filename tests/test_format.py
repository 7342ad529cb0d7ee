"""lazymoe_jax/store/format.py: the manifest. Every damaged or inconsistent key is refused with
an error naming it and the fix (re-convert), at read and at load."""

import json
import os
import shutil

import pytest

import lazymoe_jax
from lazymoe_jax.store import format as fmt


def _del(*keys):
  def damage(m):
    for k in keys[:-1]:
      m = m[k]
    del m[keys[-1]]
  return damage


def _set(value, *keys):
  def damage(m):
    for k in keys[:-1]:
      m = m[k]
    m[keys[-1]] = value
  return damage


def _first_tensor(m):
  return next(iter(m["experts"]["tensors"]))


def _check_damaged(demo_store, tmp_path, damage, key):
  with open(os.path.join(demo_store, fmt.MANIFEST)) as f:
    manifest = json.load(f)
  fmt.validate_manifest(manifest)  # the undamaged one passes
  damage(manifest)
  store = tmp_path / "store"
  store.mkdir()
  (store / fmt.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(lazymoe_jax.StoreError) as e:
    fmt.read_manifest(str(store))
  assert key in str(e.value) and "re-convert" in str(e.value), str(e.value)


@pytest.mark.parametrize("damage, key", [
    (_del("family"), "family is missing"), (_set([], "family"), "family is list"),
    (_del("hf_config"), "hf_config is missing"), (_del("dense"), "dense is missing"),
    (_del("dense", "parts"), "dense.parts is missing"),
    (_set("globals", "dense", "parts"), "dense.parts is str"),
    (_set([1], "dense", "parts"), "dense.parts holds non-strings"),
    (_del("experts"), "experts is missing"),
    (_del("experts", "layers"), "experts.layers is missing"),
    (_set(["0"], "experts", "layers"), "experts.layers holds non-integers"),
    (_del("experts", "encoding"), "experts.encoding is missing"),
    (_set(8, "experts", "encoding"), "experts.encoding is int"),
    (_del("experts", "tensors"), "experts.tensors is missing"),
    (_set({}, "experts", "tensors"), "experts.tensors is empty"),
    (_del("experts", "crc32"), "experts.crc32 is missing"),
    (_del("tokenizer"), "tokenizer is missing"),
    (_set({"file": "tokenizer.model"}, "tokenizer"), "tokenizer.kind is missing"),
    (_set(True, "tokenizer", "file"), "tokenizer.file is bool"),
    (_set({"eos_token_ids": [2.5]}, "generation"), "generation.eos_token_ids holds non-int"),
])
def test_damaged_manifest_names_the_key(demo_store, tmp_path, damage, key):
  _check_damaged(demo_store, tmp_path, damage, key)


@pytest.mark.parametrize("field", ["path", "shape", "dtype", "tensor", "suffix", "encoding"])
def test_damaged_manifest_names_the_tensor_key(demo_store, tmp_path, field):
  _check_damaged(demo_store, tmp_path, lambda m: m["experts"]["tensors"][_first_tensor(m)].pop(
      field), f"experts.tensors.w_gate_up.{field} is missing")


@pytest.mark.parametrize("damage, key", [
    (lambda m: m["experts"]["tensors"]["w_down"].update(shape=[3, 8, 256, 256]),
     "experts.tensors.w_down.shape is [3, 8, 256, 256]: need [layers (4)"),
    (lambda m: m["experts"]["crc32"].pop("w_down"), "experts.crc32.w_down is missing"),
    (lambda m: m["experts"]["crc32"]["w_down"][1].pop(), "experts.crc32.w_down is not 4 rows "
     "of 8 checksums"),
    (lambda m: m["experts"]["crc32"]["w_down"][1].__setitem__(0, "x"),
     "experts.crc32.w_down holds non-integers")])
def test_inconsistent_expert_tables_are_refused(demo_store, tmp_path, damage, key):
  _check_damaged(demo_store, tmp_path, damage, key)


def test_store_without_tokenizer_has_a_valid_manifest(tiny_stores):
  _, store = tiny_stores["olmoe"]  # a checkpoint with no tokenizer files
  assert fmt.read_manifest(store)["tokenizer"] is None


def test_damaged_manifest_is_refused_at_load(demo_store, tmp_path):
  store = str(tmp_path / "store")
  shutil.copytree(demo_store, store)
  with open(os.path.join(store, fmt.MANIFEST)) as f:
    manifest = json.load(f)
  del manifest["experts"]["tensors"]["w_down"]["dtype"]
  fmt.write_manifest(store, manifest)
  with pytest.raises(lazymoe_jax.StoreError, match="experts.tensors.w_down.dtype is missing"):
    lazymoe_jax.load(store)


def test_store_without_manifest_is_refused(tiny_stores, tmp_path):
  hf, src = tiny_stores["mixtral"]
  store = tmp_path / "store"
  shutil.copytree(src, store)
  os.remove(store / fmt.MANIFEST)
  with pytest.raises(lazymoe_jax.StoreError, match="no manifest.json"):
    lazymoe_jax.load(str(store))
  with pytest.raises(lazymoe_jax.StoreError, match="convert"):
    lazymoe_jax.load(hf)  # an HF folder, not a store
  with pytest.raises(lazymoe_jax.StoreError, match="does not exist"):
    lazymoe_jax.load(str(tmp_path / "nowhere"))
