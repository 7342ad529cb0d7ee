"""checkpoints_tools/convert_hf.py: sharded and single-file checkpoints, expert encodings, every
bad input (a clear error naming the problem and the fix), atomic and safe destinations.

The checkpoints are torch-free (tests/checkpoints.py); FP8 checkpoints are converted in
tests/test_parity.py, against transformers' own dequantisation."""

import collections
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lazymoe_jax
from lazymoe_jax import kernels
from lazymoe_jax.model import encodings
from lazymoe_jax.store import format as fmt
from tests.checkpoints import hf_config, write_checkpoint
from tests.conftest import convert_cli, token_ids


@pytest.fixture(scope="module")
def mixtral(tiny_stores):
  return tiny_stores["mixtral"]  # (HF dir, store dir)


def _copy_hf(src, tmp_path, name="hf"):
  dst = tmp_path / name
  shutil.copytree(src, dst)
  return dst


def test_sharded_checkpoint_gives_same_logits(mixtral, tmp_path):
  """The same tensors one shard per layer (bench/make_synthetic.py's layout, with the index)."""
  _, store = mixtral
  write_checkpoint(tmp_path / "sharded", "mixtral", sharded=True)
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  assert len(list((tmp_path / "sharded").glob("*.safetensors"))) == 3 + 1  # layers + globals
  res = convert_cli(str(tmp_path / "sharded"), str(tmp_path / "store"))
  assert res.returncode == 0, res.stderr
  ids = token_ids(16)
  np.testing.assert_array_equal(lazymoe_jax.load(str(tmp_path / "store")).logits(ids),
                                lazymoe_jax.load(store).logits(ids))


def test_bf16_experts_round_trip(mixtral, tmp_path):
  """bf16 experts: only their rounding separates the logits from the f32 store's (which the
  parity tests hold to transformers' within 1e-4)."""
  hf, store = mixtral
  res = convert_cli(hf, str(tmp_path / "store"), "--expert_dtype=bf16")
  assert res.returncode == 0, res.stderr
  engine = lazymoe_jax.load(str(tmp_path / "store"))
  manifest = fmt.read_manifest(str(tmp_path / "store"))
  assert manifest["experts"]["tensors"]["w_down"]["dtype"] == "bfloat16"
  ids = token_ids(16)
  ref = lazymoe_jax.load(store).logits(ids)
  diff = np.abs(engine.logits(ids) - ref).max()
  assert 0 < diff < 0.05  # rounded (not the f32 weights read back), and by bf16 rounding only


# ---- bad input: each gets a clear error that names the problem and the fix -------------------

def _convert_fails(src, dst, *args):
  res = convert_cli(str(src), str(dst), *args)
  assert res.returncode != 0
  assert not os.path.exists(dst) or not os.listdir(dst) or os.path.exists(
      os.path.join(dst, fmt.MANIFEST))  # nothing half-written
  assert not [p for p in os.listdir(os.path.dirname(str(dst))) if ".partial-" in p]
  return res.stderr


def test_missing_config(mixtral, tmp_path):
  src = _copy_hf(mixtral[0], tmp_path)
  os.remove(src / "config.json")
  assert "config.json not found" in _convert_fails(src, tmp_path / "store")


def test_unsupported_model_type_lists_supported(mixtral, tmp_path):
  src = _copy_hf(mixtral[0], tmp_path)
  cfg = json.loads((src / "config.json").read_text())
  cfg["model_type"] = "llama"
  (src / "config.json").write_text(json.dumps(cfg))
  err = _convert_fails(src, tmp_path / "store")
  assert "'llama' is not supported" in err
  for family in ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe"):
    assert family in err


def test_unsupported_rope_scaling(mixtral, tmp_path):
  src = _copy_hf(mixtral[0], tmp_path)
  cfg = json.loads((src / "config.json").read_text())
  cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0}
  (src / "config.json").write_text(json.dumps(cfg))
  assert "rope scaling type 'longrope' is not supported" in _convert_fails(src, tmp_path / "store")


def _edit_tensors(src, fn):
  path = src / "model.safetensors"
  tensors = load_file(path)
  fn(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(mixtral, tmp_path):
  src = _copy_hf(mixtral[0], tmp_path)
  _edit_tensors(src, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
  err = _convert_fails(src, tmp_path / "store")
  assert "lacks 1 tensor" in err and "experts.3.w2.weight" in err


def test_unexpected_tensor(mixtral, tmp_path):
  src = _copy_hf(mixtral[0], tmp_path)
  _edit_tensors(src, lambda t: t.update({"model.layers.0.mystery.weight": np.zeros(3, np.float32)}))
  err = _convert_fails(src, tmp_path / "store")
  assert "does not use" in err and "mystery" in err


def test_wrong_shape(mixtral, tmp_path):
  src = _copy_hf(mixtral[0], tmp_path)
  name = "model.layers.0.self_attn.k_proj.weight"
  _edit_tensors(src, lambda t: t.update({name: np.zeros((8, 32), np.float32)}))
  err = _convert_fails(src, tmp_path / "store")
  assert name in err and "[8, 32]" in err and "[16, 32]" in err


def test_unsupported_expert_dtype_and_group(mixtral, tmp_path):
  err = _convert_fails(mixtral[0], tmp_path / "s1", "--expert_dtype=int3")
  assert "int3" in err and "int8" in err
  err = _convert_fails(mixtral[0], tmp_path / "s2", "--expert_dtype=int4", "--group_size=128")
  assert "does not divide" in err  # mixtral test model: H=32, I=48


# ---- destinations: atomic, never destructive -----------------------------------------------

def test_refuses_non_empty_destination_without_overwrite(mixtral, tmp_path):
  dst = tmp_path / "store"
  assert convert_cli(mixtral[0], str(dst)).returncode == 0
  before = (dst / fmt.MANIFEST).read_text()
  res = convert_cli(mixtral[0], str(dst), "--expert_dtype=bf16")
  assert res.returncode != 0 and "--overwrite" in res.stderr
  assert (dst / fmt.MANIFEST).read_text() == before  # untouched
  res = convert_cli(mixtral[0], str(dst), "--expert_dtype=bf16", "--overwrite")
  assert res.returncode == 0, res.stderr
  assert json.loads((dst / fmt.MANIFEST).read_text())["experts"]["tensors"]["w_down"][
      "dtype"] == "bfloat16"
  assert [p.name for p in tmp_path.iterdir()] == ["store"]  # no .old-/.partial- leftovers


def test_overwrite_never_deletes_a_folder_that_is_not_a_store(mixtral, tmp_path):
  dst = tmp_path / "models"
  shutil.copytree(mixtral[0], dst / "hf")
  (dst / "notes.txt").write_text("mine")
  res = convert_cli(str(dst / "hf"), str(dst), "--overwrite")
  assert res.returncode != 0 and "contains the source" in res.stderr
  res = convert_cli(mixtral[0], str(dst), "--overwrite")
  assert res.returncode != 0 and "not part of a store" in res.stderr
  assert (dst / "notes.txt").read_text() == "mine" and (dst / "hf" / "config.json").exists()


def test_symlinked_destination_and_stale_partials(mixtral, tmp_path):
  real = tmp_path / "disk" / "store"
  real.parent.mkdir()
  link = tmp_path / "store"
  link.symlink_to(real, target_is_directory=True)
  stale = tmp_path / "disk" / "store.partial-999999999"  # a killed run's leftovers
  stale.mkdir()
  res = convert_cli(mixtral[0], str(link))
  assert res.returncode == 0, res.stderr
  assert (real / fmt.MANIFEST).exists() and link.is_symlink() and not stale.exists()


# ---- what the store keeps from the checkpoint ------------------------------------------------

def test_generation_config_eos_ids_are_used(mixtral, tmp_path):
  src = _copy_hf(mixtral[0], tmp_path)
  (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 77]}))
  assert convert_cli(str(src), str(tmp_path / "store")).returncode == 0
  engine = lazymoe_jax.load(str(tmp_path / "store"))
  assert engine.eos_ids == {2, 77}
  with pytest.raises(ValueError, match="exceeds the model's context of 256"):
    engine.generate([5, 6], 255)


@pytest.mark.parametrize("dtype,args", [("int8", []), ("int4-g32", ["--group_size=32"])])
def test_quantised_experts_end_to_end(tiny_stores, tmp_path, dtype, args, monkeypatch):
  hf, store = tiny_stores["qwen3_moe"]
  cfg = hf_config("qwen3_moe")
  res = convert_cli(hf, str(tmp_path / "q"), f"--expert_dtype={dtype.split('-')[0]}", *args)
  assert res.returncode == 0, res.stderr
  manifest = fmt.read_manifest(str(tmp_path / "q"))
  assert manifest["experts"]["encoding"] == dtype
  assert {t["dtype"] for t in manifest["experts"]["tensors"].values()} >= {"int8"}
  # a prompt long enough for prefill's many-token products (experts get > 16 tokens), in
  # blocks of 8 rows so the loop runs; fresh compilations see the small blocks. The native
  # kernels take up to kernels.NATIVE_MAX_TOKENS rows: limited here to 16, so that the XLA
  # products past it run on both paths
  for kind in ("int8", "int4"):
    monkeypatch.setitem(kernels.NATIVE_MAX_TOKENS, kind, 16)
  blocks = collections.Counter()
  by_row_blocks = encodings._by_row_blocks

  def counted(dequant, rows, cols, x):
    blocks[x.shape[0] > encodings.INT8_DEQUANT_TOKENS and rows > 8] += 1
    return by_row_blocks(dequant, rows, cols, x)
  monkeypatch.setattr(encodings, "DEQUANT_BLOCK_BYTES", 8 * 4 * cfg["hidden_size"])
  monkeypatch.setattr(encodings, "_by_row_blocks", counted)
  jax.clear_caches()
  try:
    ids = token_ids(200)
    full = lazymoe_jax.load(store).logits(ids)
    small = lazymoe_jax.load(str(tmp_path / "q"), expert_slots=2)
    big = lazymoe_jax.load(str(tmp_path / "q"), expert_slots=10_000)
    q = small.logits(ids)
    np.testing.assert_array_equal(q, big.logits(ids))  # pool size never changes results
  finally:
    jax.clear_caches()  # later tests compile with the real block size
  assert blocks[True] > 0  # the blocked many-token products ran
  rel = np.abs(q - full).max() / np.abs(full).max()
  print(f"{dtype}: max logit error relative to the f32 store {rel:.2e}")
  assert 0 < rel < (0.02 if dtype == "int8" else 0.2)  # quantised, within the bound
  bpe = small.experts.bytes_per_expert
  i, h = cfg["moe_intermediate_size"], cfg["hidden_size"]
  if dtype == "int8":  # int8 weights + f32 row scales
    assert bpe == 3 * i * h + 4 * (2 * i + h)
  else:  # two int4 per byte + an f16 scale per 32 inputs
    assert bpe == 3 * i * h // 2 + 2 * (2 * i * h // 32 + h * i // 32)


def test_tokenizer_json_through_the_tokenizers_library(tmp_path):
  """A tokenizer.json (gpt-oss, Qwen ship these) is copied into the store and used through the
  `tokenizers` library: the engine's ids and text equal the library's own."""
  from tokenizers import (  # pylint: disable=import-outside-toplevel
      Tokenizer, decoders, models, pre_tokenizers, trainers)
  src = write_checkpoint(tmp_path / "hf", "gpt_oss")
  vocab = hf_config("gpt_oss")["vocab_size"]
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  text = ["def read_file(path): return open(path).read() # héllo wörld ✓"] * 20
  tok.train_from_iterator(text, trainers.BpeTrainer(
      vocab_size=vocab, special_tokens=["<unk>"], show_progress=False))
  assert 40 < tok.get_vocab_size() <= vocab
  tok.save(os.path.join(src, "tokenizer.json"))
  res = convert_cli(src, str(tmp_path / "store"))
  assert res.returncode == 0, res.stderr[-2000:]
  engine = lazymoe_jax.load(str(tmp_path / "store"), expert_slots=10_000)
  sample = "def read(path): return héllo(path) # ✓"
  ids = engine.tokenizer.encode(sample)
  assert ids == tok.encode(sample, add_special_tokens=False).ids
  assert engine.tokenizer.decode(ids) == sample
  engine.eos_ids = set()  # random weights may well pick eos first
  assert len(engine.generate(ids, 4)) == 4
