"""Store format, conversion of sharded checkpoints, exact counters, and every bad input."""

import collections
import json
import os
import shutil
import time

import jax
import numpy as np
import psutil
import pytest
import torch
from safetensors.numpy import load_file, save_file

import lazymoe_jax
from lazymoe_jax.model import encodings
from lazymoe_jax.model.routers import softmax_topk
from lazymoe_jax.store import format as fmt
from tests.conftest import convert_cli, token_ids


@pytest.fixture(scope="module")
def mixtral(family_models):
  return family_models["mixtral"]


def _copy_hf(src, tmp_path, name="hf"):
  dst = tmp_path / name
  shutil.copytree(src, dst)
  return dst


def test_stats_count_distinct_routed_experts_exactly(family_models):
  model, _, store = family_models["qwen2_moe"]
  ids = token_ids(24, seed=5)
  # The reference routing: transformers' own router logits, top-k per token and layer.
  with torch.no_grad():
    out = model(torch.tensor(ids)[None], output_router_logits=True)
  k = model.config.num_experts_per_tok
  pairs = set()
  moe_layers = [i for i in range(model.config.num_hidden_layers) if i not in [1]]
  assert len(out.router_logits) == len(moe_layers)
  for layer, logits in zip(moe_layers, out.router_logits):
    top = torch.topk(torch.softmax(logits.float(), -1), k, dim=-1).indices
    pairs |= {(layer, int(e)) for e in top.flatten()}
  engine = lazymoe_jax.load(store, expert_slots=10_000)
  engine.logits(ids)
  s = engine.stats()
  assert s["expert_misses"] == len(pairs)
  assert s["expert_hits"] == 0  # prefill reads each (layer, expert) once for the whole prompt
  i, h = model.config.moe_intermediate_size, model.config.hidden_size
  assert s["bytes_read"] == len(pairs) * 3 * i * h * 4  # f32: gate+up [2I,H] and down [H,I]
  engine.logits(ids)  # everything is resident now: only hits
  rss_now = psutil.Process().memory_info().rss  # before stats(): the process keeps growing
  s2 = engine.stats()
  assert s2["expert_misses"] == len(pairs) and s2["bytes_read"] == s["bytes_read"]
  assert s2["expert_hits"] == len(pairs)
  # float32 K and V per layer at the cache's capacity: 24 positions round up to KV_ROUND (256,
  # also the model's max_position_embeddings)
  c = model.config
  assert s2["kv_cache_bytes"] == c.num_hidden_layers * 2 * c.num_key_value_heads * (
      c.hidden_size // c.num_attention_heads) * 256 * 4
  # the peak is about at least the resident set now (the kernel's per-thread RSS counters lag
  # by up to 64 pages each), and in bytes: not KiB (1024x less), nor beyond the machine
  assert 0.9 * rss_now <= s2["peak_rss_bytes"] <= (
      psutil.virtual_memory().total)


def test_sharded_checkpoint_gives_same_logits(mixtral, tmp_path):
  model, _, store = mixtral
  model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  assert len(list((tmp_path / "sharded").glob("*.safetensors"))) >= 2
  res = convert_cli(str(tmp_path / "sharded"), str(tmp_path / "store"))
  assert res.returncode == 0, res.stderr
  ids = token_ids(16)
  np.testing.assert_array_equal(lazymoe_jax.load(str(tmp_path / "store")).logits(ids),
                                lazymoe_jax.load(store).logits(ids))


def test_bf16_experts_round_trip(mixtral, tmp_path):
  model, hf, _ = mixtral
  res = convert_cli(hf, str(tmp_path / "store"), "--expert_dtype=bf16")
  assert res.returncode == 0, res.stderr
  engine = lazymoe_jax.load(str(tmp_path / "store"))
  manifest = fmt.read_manifest(str(tmp_path / "store"))
  assert manifest["experts"]["tensors"]["w_down"]["dtype"] == "bfloat16"
  ids = token_ids(16)
  with torch.no_grad():
    ref = model(torch.tensor(ids)[None]).logits[0].numpy()
  assert np.abs(engine.logits(ids) - ref).max() < 0.05  # bf16 rounding of expert weights only


def test_router_softmax_topk_by_hand():
  logits = np.array([[0.0, 1.0, 2.0, 3.0], [3.0, 0.0, 0.0, 1.0]], np.float32)
  ids, w = softmax_topk(logits, 2, renormalize=False)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(ids), [[3, 2], [0, 3]])
  np.testing.assert_allclose(np.asarray(w), [[p[0, 3], p[0, 2]], [p[1, 0], p[1, 3]]], rtol=1e-6)
  ids, w = softmax_topk(logits, 2, renormalize=True)
  np.testing.assert_allclose(np.asarray(w).sum(-1), [1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(w)[0], [1 / (1 + np.exp(-1)), 1 - 1 / (1 + np.exp(-1))],
                             rtol=1e-6)


# ---- bad input: each gets a clear error that names the problem and the fix -------------------

def _convert_fails(src, dst, *args):
  res = convert_cli(str(src), str(dst), *args)
  assert res.returncode != 0
  assert not os.path.exists(dst) or not os.listdir(dst) or os.path.exists(
      os.path.join(dst, fmt.MANIFEST))  # nothing half-written
  assert not [p for p in os.listdir(os.path.dirname(str(dst))) if ".partial-" in p]
  return res.stderr


def test_missing_config(mixtral, tmp_path):
  src = _copy_hf(mixtral[1], tmp_path)
  os.remove(src / "config.json")
  assert "config.json not found" in _convert_fails(src, tmp_path / "store")


def test_unsupported_model_type_lists_supported(mixtral, tmp_path):
  src = _copy_hf(mixtral[1], tmp_path)
  cfg = json.loads((src / "config.json").read_text())
  cfg["model_type"] = "llama"
  (src / "config.json").write_text(json.dumps(cfg))
  err = _convert_fails(src, tmp_path / "store")
  assert "'llama' is not supported" in err
  for family in ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe"):
    assert family in err


def test_unsupported_rope_scaling(mixtral, tmp_path):
  src = _copy_hf(mixtral[1], tmp_path)
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
  src = _copy_hf(mixtral[1], tmp_path)
  _edit_tensors(src, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
  err = _convert_fails(src, tmp_path / "store")
  assert "lacks 1 tensor" in err and "experts.3.w2.weight" in err


def test_unexpected_tensor(mixtral, tmp_path):
  src = _copy_hf(mixtral[1], tmp_path)
  _edit_tensors(src, lambda t: t.update({"model.layers.0.mystery.weight": np.zeros(3, np.float32)}))
  err = _convert_fails(src, tmp_path / "store")
  assert "does not use" in err and "mystery" in err


def test_wrong_shape(mixtral, tmp_path):
  src = _copy_hf(mixtral[1], tmp_path)
  name = "model.layers.0.self_attn.k_proj.weight"
  _edit_tensors(src, lambda t: t.update({name: np.zeros((8, 32), np.float32)}))
  err = _convert_fails(src, tmp_path / "store")
  assert name in err and "[8, 32]" in err and "[16, 32]" in err


def test_refuses_non_empty_destination_without_overwrite(mixtral, tmp_path):
  dst = tmp_path / "store"
  assert convert_cli(mixtral[1], str(dst)).returncode == 0
  before = (dst / fmt.MANIFEST).read_text()
  res = convert_cli(mixtral[1], str(dst), "--expert_dtype=bf16")
  assert res.returncode != 0 and "--overwrite" in res.stderr
  assert (dst / fmt.MANIFEST).read_text() == before  # untouched
  res = convert_cli(mixtral[1], str(dst), "--expert_dtype=bf16", "--overwrite")
  assert res.returncode == 0, res.stderr
  assert json.loads((dst / fmt.MANIFEST).read_text())["experts"]["tensors"]["w_down"][
      "dtype"] == "bfloat16"
  assert [p.name for p in tmp_path.iterdir()] == ["store"]  # no .old-/.partial- leftovers


def test_store_without_manifest_is_refused(mixtral, tmp_path):
  store = tmp_path / "store"
  shutil.copytree(mixtral[2], store)
  os.remove(store / fmt.MANIFEST)
  with pytest.raises(lazymoe_jax.StoreError, match="no manifest.json"):
    lazymoe_jax.load(str(store))
  with pytest.raises(lazymoe_jax.StoreError, match="convert"):
    lazymoe_jax.load(mixtral[1])  # an HF folder, not a store
  with pytest.raises(lazymoe_jax.StoreError, match="does not exist"):
    lazymoe_jax.load(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_expert_chunk_is_detected(mixtral, tmp_path, damage):
  store = tmp_path / "store"
  shutil.copytree(mixtral[2], store)
  chunk = fmt.chunk_path(str(store), "w_down", 1, 2)
  data = bytearray(open(chunk, "rb").read())
  if damage == "truncate":
    open(chunk, "wb").write(data[:len(data) // 2])
  elif damage == "flip":
    data[100] ^= 0x40
    open(chunk, "wb").write(data)
  else:
    os.remove(chunk)
  engine = lazymoe_jax.load(str(store), expert_slots=2)
  with pytest.raises(lazymoe_jax.StoreError, match="c/1/2/0/0") as info:
    for e in range(engine.spec.num_experts):  # read every expert of layer 1 once
      engine.pool.acquire(1, [e])
  assert "re-convert" in str(info.value)


def test_pool_smaller_than_top_k_is_refused(mixtral):
  with pytest.raises(lazymoe_jax.PlanError, match="at least 2"):
    lazymoe_jax.load(mixtral[2], expert_slots=1)


def test_bad_token_ids(mixtral):
  engine = lazymoe_jax.load(mixtral[2])
  with pytest.raises(ValueError, match="empty"):
    engine.logits([])
  with pytest.raises(ValueError, match=r"\[0, 96\)"):
    engine.logits([5, 96])
  with pytest.raises(lazymoe_jax.TokenizerMissingError, match="token ids"):
    engine.tokenizer.encode("hello")


def test_overwrite_never_deletes_a_folder_that_is_not_a_store(mixtral, tmp_path):
  dst = tmp_path / "models"
  shutil.copytree(mixtral[1], dst / "hf")
  (dst / "notes.txt").write_text("mine")
  res = convert_cli(str(dst / "hf"), str(dst), "--overwrite")
  assert res.returncode != 0 and "contains the source" in res.stderr
  res = convert_cli(mixtral[1], str(dst), "--overwrite")
  assert res.returncode != 0 and "not part of a store" in res.stderr
  assert (dst / "notes.txt").read_text() == "mine" and (dst / "hf" / "config.json").exists()


def test_symlinked_destination_and_stale_partials(mixtral, tmp_path):
  real = tmp_path / "disk" / "store"
  real.parent.mkdir()
  link = tmp_path / "store"
  link.symlink_to(real, target_is_directory=True)
  stale = tmp_path / "disk" / "store.partial-999999999"  # a killed run's leftovers
  stale.mkdir()
  res = convert_cli(mixtral[1], str(link))
  assert res.returncode == 0, res.stderr
  assert (real / fmt.MANIFEST).exists() and link.is_symlink() and not stale.exists()


def test_generation_config_eos_ids_are_used(mixtral, tmp_path):
  src = _copy_hf(mixtral[1], tmp_path)
  (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 77]}))
  assert convert_cli(str(src), str(tmp_path / "store")).returncode == 0
  engine = lazymoe_jax.load(str(tmp_path / "store"))
  assert engine.eos_ids == {2, 77}
  with pytest.raises(ValueError, match="exceeds the model's context of 256"):
    engine.generate([5, 6], 255)


@pytest.mark.parametrize("dtype,args", [("int8", []), ("int4-g32", ["--group_size=32"])])
def test_quantised_experts_end_to_end(family_models, tmp_path, dtype, args, monkeypatch):
  model, hf, store = family_models["qwen3_moe"]
  res = convert_cli(hf, str(tmp_path / "q"), f"--expert_dtype={dtype.split('-')[0]}", *args)
  assert res.returncode == 0, res.stderr
  manifest = fmt.read_manifest(str(tmp_path / "q"))
  assert manifest["experts"]["encoding"] == dtype
  assert {t["dtype"] for t in manifest["experts"]["tensors"].values()} >= {"int8"}
  # a prompt long enough for prefill's many-token products (experts get > 16 tokens), in
  # blocks of 8 rows so the loop runs; fresh compilations see the small blocks
  blocks = collections.Counter()
  by_row_blocks = encodings._by_row_blocks

  def counted(dequant, rows, cols, x):
    blocks[x.shape[0] > encodings.INT8_DEQUANT_TOKENS and rows > 8] += 1
    return by_row_blocks(dequant, rows, cols, x)
  monkeypatch.setattr(encodings, "DEQUANT_BLOCK_BYTES", 8 * 4 * model.config.hidden_size)
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
  assert rel < (0.02 if dtype == "int8" else 0.2)
  bpe = small.experts.bytes_per_expert
  i, h = model.config.moe_intermediate_size, model.config.hidden_size
  if dtype == "int8":  # int8 weights + f32 row scales
    assert bpe == 3 * i * h + 4 * (2 * i + h)
  else:  # two int4 per byte + an f16 scale per 32 inputs
    assert bpe == 3 * i * h // 2 + 2 * (2 * i * h // 32 + h * i // 32)


def test_unsupported_expert_dtype_and_group(mixtral, tmp_path):
  err = _convert_fails(mixtral[1], tmp_path / "s1", "--expert_dtype=int3")
  assert "int3" in err and "int8" in err
  err = _convert_fails(mixtral[1], tmp_path / "s2", "--expert_dtype=int4", "--group_size=128")
  assert "does not divide" in err  # mixtral test model: H=32, I=48


def test_memory_budget_plans_the_pool_and_refuses_too_small(family_models):
  model, _, store = family_models["qwen2_moe"]
  with pytest.raises(lazymoe_jax.PlanError, match=r"too small for this model: it needs at least "
                     r"(\d+\.\d+) GB") as info:
    lazymoe_jax.load(store, memory_budget_gb=0.01)
  need = float(info.value.args[0].split("at least ")[1].split(" GB")[0])
  k = model.config.num_experts_per_tok
  # (the need is measured from this process's RSS, which grows as engines load: some slack)
  smallest = lazymoe_jax.load(store, memory_budget_gb=need + 0.05)
  assert k <= smallest.pool.num_slots and smallest.plan.slots == smallest.pool.num_slots
  assert "memory plan" in smallest.plan.describe()
  ids = token_ids(20)
  resident = lazymoe_jax.load(store, expert_slots=10_000)
  np.testing.assert_array_equal(smallest.logits(ids), resident.logits(ids))
  roomy = lazymoe_jax.load(store, memory_budget_gb=need + 1.0)
  assert roomy.pool.num_slots == len(roomy.experts.layers) * model.config.num_experts
  with pytest.raises(lazymoe_jax.LazyMoEError, match="not both"):
    lazymoe_jax.load(store, memory_budget_gb=1.0, expert_slots=4)


def test_plan_arithmetic_is_exact():
  from lazymoe_jax.plan import MARGIN_BASE, make_plan  # pylint: disable=import-outside-toplevel
  args = dict(runtime_and_dense_bytes=300_000_000, kv_bytes=20_000_000, max_context=4096,
              bytes_per_expert=10_000_000, expert_f32_bytes=40_000_000, min_slots=2,
              total_experts=64)
  need = 300_000_000 + 20_000_000 + MARGIN_BASE + 40_000_000 + 2 * 10_000_000
  assert make_plan(need / 1e9, **args).slots == 2
  assert make_plan((need + 10_000_000) / 1e9, **args).slots == 3
  assert make_plan(100.0, **args).slots == 64  # never more than the model has
  with pytest.raises(lazymoe_jax.PlanError, match=f"at least {need / 1e9:.2f} GB"):
    make_plan((need - 1) / 1e9, **args)


def test_prefetch_changes_nothing_even_when_it_guesses_wrong(family_models):
  model, _, store = family_models["mixtral"]
  k = model.config.num_experts_per_tok
  prompt = token_ids(6, seed=7)
  plain = lazymoe_jax.load(store, expert_slots=2 * k, prefetch=False)
  plain.eos_ids = set()
  want = plain.generate(prompt, 20)
  assert plain.stats()["prefetch_reads"] == 0
  fetching = lazymoe_jax.load(store, expert_slots=2 * k)
  fetching.eos_ids = set()
  assert fetching.generate(prompt, 20) == want
  st = fetching.stats()
  assert st["prefetch_reads"] > 0 and 0 < st["prefetch_used"] <= st["prefetch_reads"]
  assert st["expert_misses"] < plain.stats()["expert_misses"]  # guesses that landed saved reads
  wrong = lazymoe_jax.load(store, expert_slots=2 * k)
  wrong.eos_ids = set()
  rng = np.random.default_rng(0)
  for nxt in wrong.forward.routers.values():  # the guessing routers, not the real ones
    nxt["router"] = rng.standard_normal(nxt["router"].shape).astype(np.float32)
  assert wrong.generate(prompt, 20) == want
  assert wrong.stats()["prefetch_reads"] > 0


def test_read_error_during_prefetch_is_a_clear_error(family_models, tmp_path):
  _, _, src = family_models["mixtral"]
  store = tmp_path / "store"
  shutil.copytree(src, store)
  for e in range(6):
    os.remove(fmt.chunk_path(str(store), "w_gate_up", 1, e))  # every expert of layer 1
  engine = lazymoe_jax.load(str(store), expert_slots=4)
  engine.eos_ids = set()
  with pytest.raises(lazymoe_jax.StoreError, match=r"c/1/\d/0/0 is missing"):
    engine.generate(token_ids(1), 5)


@pytest.mark.parametrize("policy", ["lru", "lfu", "layer"])
def test_every_cache_policy_gives_identical_results(family_models, policy):
  model, _, store = family_models["mixtral"]
  k = model.config.num_experts_per_tok
  prompt, ids = token_ids(6, seed=3), token_ids(20, seed=4)
  resident = lazymoe_jax.load(store, expert_slots=10_000)
  resident.eos_ids = set()
  want_tokens, want_logits = resident.generate(prompt, 16), resident.logits(ids)
  for slots in (k, k + 1, 3 * k):
    t0 = time.perf_counter()
    engine = lazymoe_jax.load(store, expert_slots=slots, cache_policy=policy)
    engine.eos_ids = set()
    assert engine.generate(prompt, 16) == want_tokens
    np.testing.assert_array_equal(engine.logits(ids), want_logits)
    st = engine.stats()
    elapsed = time.perf_counter() - t0
    # every miss waited for its read, inside this interval (a bound, not a speed test)
    assert st["cache_policy"] == policy and st["expert_misses"] > 0
    assert 0 < st["io_wait_s"] <= elapsed
    assert st["bytes_read"] == (st["expert_misses"] + st["prefetch_reads"]) * \
        engine.experts.bytes_per_expert
    assert len(engine.pool.table) <= slots
  with pytest.raises(ValueError, match="not one of lru, lfu, layer"):
    lazymoe_jax.load(store, cache_policy="fifo")


def test_layer_policy_keeps_each_layers_share(family_models):
  model, _, store = family_models["mixtral"]
  k = model.config.num_experts_per_tok
  n_layers = model.config.num_hidden_layers
  engine = lazymoe_jax.load(store, expert_slots=k * n_layers, cache_policy="layer",
                            prefetch=False)
  engine.eos_ids = set()
  engine.generate(token_ids(1, seed=9), 24)
  held = collections.Counter(layer for layer, _ in engine.pool.table)
  assert held == {layer: k for layer in range(n_layers)}  # a miss evicts within its own layer


def test_tokenizer_json_through_the_tokenizers_library(family_models, tmp_path):
  """A tokenizer.json (gpt-oss, Qwen ship these) is copied into the store and used through the
  `tokenizers` library: the engine's ids and text equal the library's own."""
  from tokenizers import (  # pylint: disable=import-outside-toplevel
      Tokenizer, decoders, models, pre_tokenizers, trainers)
  model, _, _ = family_models["gpt_oss"]
  src = tmp_path / "hf"
  model.save_pretrained(src)
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  text = ["def read_file(path): return open(path).read() # héllo wörld ✓"] * 20
  tok.train_from_iterator(text, trainers.BpeTrainer(
      vocab_size=model.config.vocab_size, special_tokens=["<unk>"], show_progress=False))
  assert 40 < tok.get_vocab_size() <= model.config.vocab_size
  tok.save(str(src / "tokenizer.json"))
  res = convert_cli(str(src), str(tmp_path / "store"))
  assert res.returncode == 0, res.stderr[-2000:]
  engine = lazymoe_jax.load(str(tmp_path / "store"), expert_slots=10_000)
  sample = "def read(path): return héllo(path) # ✓"
  ids = engine.tokenizer.encode(sample)
  assert ids == tok.encode(sample, add_special_tokens=False).ids
  assert engine.tokenizer.decode(ids) == sample
  assert len(engine.generate(ids, 4)) == 4


# ---- the pool's failure paths (found by an independent review) ----------------------------------

def _damaged_copy(src, tmp_path, chunks):
  store = tmp_path / "store"
  shutil.copytree(src, store)
  for name, row, expert in chunks:
    os.remove(fmt.chunk_path(str(store), name, row, expert))
  return str(store)


def test_a_guess_whose_read_fails_changes_nothing(family_models, tmp_path):
  """A damaged expert that was only guessed never fails a run that does not route to it; when
  it is routed to, the miss reports it."""
  store = _damaged_copy(family_models["mixtral"][2], tmp_path, [("w_down", 2, 5)])
  engine = lazymoe_jax.load(store, expert_slots=6, prefetch=False)
  pool = engine.pool
  pool.acquire(0, [0, 1])
  pool.prefetch(2, [5])
  pool.acquire(1, [0, 1])  # lands (drops) the failed guess for layer 2 if done; no error
  assert pool.acquire(2, [0, 1]) and pool.prefetch_errors == 1
  assert (2, 5) not in pool.table
  with pytest.raises(lazymoe_jax.StoreError, match=r"c/2/5/0/0 is missing"):
    pool.acquire(2, [5])


def test_a_failed_acquire_leaves_nothing_unchecked_resident(family_models, tmp_path):
  store = _damaged_copy(family_models["mixtral"][2], tmp_path, [("w_gate_up", 1, 3)])
  engine = lazymoe_jax.load(store, expert_slots=4, prefetch=False)
  with pytest.raises(lazymoe_jax.StoreError, match=r"c/1/3/0/0 is missing"):
    engine.pool.acquire(1, [2, 3])
  assert (1, 2) not in engine.pool.table and (1, 3) not in engine.pool.table
  assert engine.pool.acquire(1, [2]) and engine.pool.misses == 3  # read again, checked


def test_hits_are_pinned_before_misses_choose_victims(family_models):
  engine = lazymoe_jax.load(family_models["mixtral"][2], expert_slots=2, prefetch=False,
                            cache_policy="lru")
  engine.pool.acquire(0, [0, 1])
  engine.pool.acquire(0, [2, 0])  # the miss (2) must evict 1, not the hit (0)
  assert engine.pool.misses == 3 and engine.pool.hits == 1


def test_all_zero_expert_chunk_is_not_missing(family_models, tmp_path):
  """tensorstore writes no file for a chunk equal to the fill value: a zeroed expert is read as
  zeros (checked against the manifest's crc32), not reported missing."""
  src = _copy_hf(family_models["mixtral"][1], tmp_path)
  weights = load_file(str(src / "model.safetensors"))
  name = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
  weights[name] = np.zeros_like(weights[name])
  save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
  res = convert_cli(str(src), str(tmp_path / "store"))
  assert res.returncode == 0, res.stderr[-2000:]
  assert not os.path.exists(fmt.chunk_path(str(tmp_path / "store"), "w_down", 0, 1))
  engine = lazymoe_jax.load(str(tmp_path / "store"), expert_slots=4)
  slot = engine.pool.acquire(0, [1])[0]
  assert not engine.pool.buffers[slot]["w_down"].any()


def test_kv_cache_stays_within_max_context_and_per_sequence(family_models):
  engine = lazymoe_jax.load(family_models["mixtral"][2], max_context=150, expert_slots=100)
  ids = token_ids(140)
  full = lazymoe_jax.load(family_models["mixtral"][2], expert_slots=100).logits(ids)
  np.testing.assert_allclose(engine.logits(ids), full, atol=1e-5)
  cfg = engine.spec
  per_position = cfg.num_hidden_layers * cfg.attention.num_kv_heads * cfg.attention.head_dim * 2 * 4
  assert engine.stats()["kv_cache_bytes"] == 150 * per_position  # not the 256-token bucket
  # two sequences on one engine: each keeps its own capacity
  a = engine.stream(token_ids(100, seed=2), 45)
  next(a)
  b = list(engine.stream(token_ids(4, seed=3), 3))
  assert len(b) == 3 and len(list(a)) == 44


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


def test_store_without_tokenizer_has_a_valid_manifest(family_models):
  _, _, store = family_models["olmoe"]
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


def _read_first_chunks(store):
  """Every array's chunk (row 0, expert 1) through read_chunk, on this thread."""
  from lazymoe_jax.store import experts  # pylint: disable=import-outside-toplevel
  es = experts.ExpertStore(store, fmt.read_manifest(store))
  out = {}
  for name in es.specs:
    out[name] = np.empty(es.shapes[name], es.dtypes[name])
    experts.read_chunk(es.chunk_path(name, 0, 1), out[name], es.crc32[name][0][1])
  return out


@pytest.fixture
def fresh_mechanism(monkeypatch):
  """The read mechanism chosen again (and warnings given again) under the test's patches."""
  from lazymoe_jax.store import experts  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(experts, "_MECHANISM", None)
  monkeypatch.setattr(experts, "_WARNED", set())
  return experts


def test_reads_without_o_direct_use_f_nocache_where_fcntl_has_it(demo_store, fresh_mechanism,
                                                                 monkeypatch):
  fcntl = pytest.importorskip("fcntl")
  want = _read_first_chunks(demo_store)
  monkeypatch.setattr(fresh_mechanism, "_MECHANISM", None)  # chosen for `want`: again
  monkeypatch.delattr(os, "O_DIRECT")
  calls = []
  monkeypatch.setattr(fcntl, "F_NOCACHE", 48, raising=False)  # macOS's value; Linux has none
  monkeypatch.setattr(fcntl, "fcntl", lambda fd, cmd, arg: calls.append((cmd, arg)))
  got = _read_first_chunks(demo_store)
  assert fresh_mechanism.uncached_read_mechanism() == "f_nocache"
  assert calls == [(48, 1)] * len(want)  # one per chunk file
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])


def test_reads_without_o_direct_nor_f_nocache_are_buffered_with_one_warning(
    demo_store, fresh_mechanism, monkeypatch):
  import fcntl  # pylint: disable=import-outside-toplevel
  want = _read_first_chunks(demo_store)
  monkeypatch.setattr(fresh_mechanism, "_MECHANISM", None)  # chosen for `want`: again
  monkeypatch.delattr(os, "O_DIRECT")
  monkeypatch.delattr(fcntl, "F_NOCACHE", raising=False)
  monkeypatch.delattr(os, "posix_fadvise")
  with pytest.warns(RuntimeWarning, match="page cache.*Linux") as record:
    got = _read_first_chunks(demo_store)
    fresh_mechanism.drop_file_from_page_cache(os.path.join(demo_store, fmt.MANIFEST))
  assert len(record) == 1  # once per process, not per read
  assert fresh_mechanism.uncached_read_mechanism() == "buffered"
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])


def test_drop_from_page_cache_is_a_no_op_without_posix_fadvise(tmp_path, fresh_mechanism,
                                                              monkeypatch):
  monkeypatch.delattr(os, "posix_fadvise")
  (tmp_path / "f").write_bytes(b"x" * 100)
  with pytest.warns(RuntimeWarning, match="posix_fadvise is not available"):
    fresh_mechanism.drop_file_from_page_cache(str(tmp_path / "f"))
  assert (tmp_path / "f").read_bytes() == b"x" * 100
