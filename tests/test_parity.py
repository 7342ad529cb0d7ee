"""Logit and greedy-generation parity with Hugging Face transformers, per family."""

import os

import numpy as np
import pytest
import torch

import lazymoe_jax
from tests.conftest import FAMILIES, token_ids

N_TOKENS = 20
TOL = 1e-4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family_models, family):
  model, _, store = family_models[family]
  ids = token_ids(N_TOKENS)
  with torch.no_grad():
    ref = model(torch.tensor(ids)[None]).logits[0].numpy()
  got = lazymoe_jax.load(store, expert_slots=model.config.num_experts_per_tok).logits(ids)
  assert got.shape == ref.shape == (N_TOKENS, model.config.vocab_size)
  diff = np.abs(got - ref).max()
  print(f"{family}: max |logit diff| = {diff:.2e}")
  assert diff <= TOL


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_generation_matches_transformers(family_models, family):
  model, _, store = family_models[family]
  prompt = token_ids(6, seed=2)
  with torch.no_grad():
    ref = model.generate(torch.tensor(prompt)[None], max_new_tokens=24, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
  engine = lazymoe_jax.load(store)
  engine.eos_ids = set()  # transformers above ran without eos, so must we
  got = engine.generate(prompt, 24)
  assert got == ref


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_minimal_pool_is_bit_identical_to_resident(family_models, family):
  model, _, store = family_models[family]
  ids = token_ids(N_TOKENS, seed=3)
  k = model.config.num_experts_per_tok
  small = lazymoe_jax.load(store, expert_slots=k)
  big = lazymoe_jax.load(store, expert_slots=10_000)
  assert small.stats()["pool_slots"] == k
  assert big.stats()["pool_slots"] == len(small.experts.layers) * small.cfg.num_experts
  np.testing.assert_array_equal(small.logits(ids), big.logits(ids))
  small.eos_ids = big.eos_ids = set()
  assert small.generate(ids[:5], 12) == big.generate(ids[:5], 12)
  assert small.stats()["expert_misses"] > big.stats()["expert_misses"]


def test_long_prompt_attends_in_query_blocks(family_models):
  model, _, store = family_models["qwen3_moe"]
  ids = token_ids(200, seed=4)  # padded to 256 = 2 blocks of 128 queries
  with torch.no_grad():
    ref = model(torch.tensor(ids)[None]).logits[0].numpy()
  assert np.abs(lazymoe_jax.load(store).logits(ids) - ref).max() <= TOL


def _gpt_oss_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)[None]).logits[0].numpy()


def test_gpt_oss_parity_is_sensitive_to_window_sinks_and_clamp(family_models):
  """The gpt-oss parity above means something: each of its own features moves the 20-token
  logits far beyond the tolerance, and the YaRN frequencies equal transformers' own."""
  import copy  # pylint: disable=import-outside-toplevel
  from lazymoe_jax.config import SLIDING  # pylint: disable=import-outside-toplevel
  from lazymoe_jax.model import layers  # pylint: disable=import-outside-toplevel
  model, _, store = family_models["gpt_oss"]
  ids = token_ids(N_TOKENS)
  ref = _gpt_oss_logits(model, ids)
  cfg = lazymoe_jax.load(store, expert_slots=2).cfg
  assert cfg.sliding_window < N_TOKENS and SLIDING in cfg.layer_types
  no_window = copy.deepcopy(model)
  no_window.config.sliding_window = 10_000
  no_sinks = copy.deepcopy(model)
  no_clamp = copy.deepcopy(model)
  with torch.no_grad():
    for layer in no_sinks.model.layers:
      layer.self_attn.sinks.fill_(-1e9)
    for layer in no_clamp.model.layers:
      layer.mlp.experts.limit = 1e9
  for name, m in (("window", no_window), ("sinks", no_sinks), ("clamp", no_clamp)):
    moved = np.abs(_gpt_oss_logits(m, ids) - ref).max()
    print(f"gpt_oss without {name}: logits move by {moved:.2e}")
    assert moved > 1e3 * TOL, name
  rotary = model.model.rotary_emb
  np.testing.assert_allclose(layers.rope_inv_freq(cfg), rotary.inv_freq.numpy(), rtol=1e-6)
  assert cfg.rope_type == "yarn" and cfg.rope_attention_factor == rotary.attention_scaling != 1


def test_gpt_oss_mxfp4_checkpoint_matches_transformers_on_dequantised_weights(tmp_path):
  """Experts published as MXFP4 `*_blocks` / `*_scales` (quantised here with the engine's
  encoder, dequantised for the reference by transformers' own code, so the two read the layout
  independently): the store keeps the bytes, and logits equal transformers' on the dequantised
  weights. Re-encoding the MXFP4 experts as float32 at conversion gives the same logits."""
  import json  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  from safetensors.torch import load_file, save_file  # pylint: disable=import-outside-toplevel
  from transformers.integrations.mxfp4 import (  # pylint: disable=import-outside-toplevel
      convert_moe_packed_tensors)
  from lazymoe_jax.model import encodings  # pylint: disable=import-outside-toplevel
  from tests.conftest import convert_cli, make_hf_model  # pylint: disable=import-outside-toplevel
  model = make_hf_model("gpt_oss", seed=5)
  model.save_pretrained(tmp_path / "float")
  tensors = load_file(str(tmp_path / "float" / "model.safetensors"))
  enc = encodings.get("mxfp4")
  params = dict(model.named_parameters())
  for layer in range(model.config.num_hidden_layers):
    for proj in ("gate_up_proj", "down_proj"):
      name = f"model.layers.{layer}.mlp.experts.{proj}"
      w = tensors.pop(name).numpy()  # [E, in, out]
      packed = [enc.encode(w[e].T) for e in range(w.shape[0])]  # the published [out, in] rows
      blocks = torch.from_numpy(np.stack([p[""] for p in packed]))  # [E, out, in/32, 16]
      scales = torch.from_numpy(np.stack([p["scale"] for p in packed]))  # [E, out, in/32]
      tensors[name + "_blocks"] = blocks.clone().contiguous()
      tensors[name + "_scales"] = scales.clone().contiguous()
      deq = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
      err = np.abs(deq.numpy() - w)
      assert err.max() > 1e-3  # really quantised, and transformers reads what was meant:
      assert all(np.all(err[e].T <= enc.error_bound(w[e].T)) for e in range(w.shape[0]))
      with torch.no_grad():
        params[name].copy_(deq)
  os.makedirs(tmp_path / "mxfp4")
  save_file(tensors, str(tmp_path / "mxfp4" / "model.safetensors"))
  shutil.copy(tmp_path / "float" / "config.json", tmp_path / "mxfp4" / "config.json")
  ids = token_ids(N_TOKENS, seed=6)
  ref = _gpt_oss_logits(model, ids)
  for store, args in (("store", ()), ("store_f32", ("--expert_dtype=f32",))):
    res = convert_cli(str(tmp_path / "mxfp4"), str(tmp_path / store), *args)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(tmp_path / store / "manifest.json") as f:
      assert json.load(f)["experts"]["encoding"] == ("mxfp4" if not args else "float32")
    engine = lazymoe_jax.load(str(tmp_path / store), expert_slots=2)
    diff = np.abs(engine.logits(ids) - ref).max()
    print(f"gpt_oss {store} from MXFP4 experts: max |logit diff| = {diff:.2e}")
    assert diff <= TOL
    engine.eos_ids = set()
    with torch.no_grad():
      want = model.generate(torch.tensor(ids[:6])[None], max_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
    assert engine.generate(ids[:6], 12) == want
