"""GLM-4.5 MoE (`glm4_moe`): the parity above each feature, the published config, MTP layers.

The shared parity tests (tests/test_parity.py) run this family through conftest.FAMILIES."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

import lazymoe_jax
from lazymoe_jax import families
from lazymoe_jax.model import layers
from tests.checkpoints import hf_config
from tests.conftest import ROOT, convert_cli, import_reference, make_hf_model, token_ids

TOL = 1e-4
N_TOKENS = 20


def _ref(model, ids):
  torch, _ = import_reference()
  with torch.no_grad():
    return model(torch.tensor(ids)[None]).logits[0].numpy()


def test_glm4_moe_parity_is_sensitive_to_each_of_its_features(family_models):
  """Each GLM feature moves the reference logits far beyond the tolerance, so the parity
  test proves the engine computes it: partial rotary (against full RoPE on the same weights),
  qk-norm, the score bias, the group limit, the routed scaling and the shared expert."""
  torch, _ = import_reference()
  model, _, store = family_models["glm4_moe"]
  ids = token_ids(N_TOKENS)
  ref = _ref(model, ids)
  full_rope = make_hf_model("glm4_moe", partial_rotary_factor=1.0)
  full_rope.load_state_dict(model.state_dict())
  edits = {
      "partial rotary": full_rope,
      "qk norm": lambda m: [setattr(l.self_attn, "use_qk_norm", False) for l in m.model.layers],
      "score bias": lambda m: [l.mlp.gate.e_score_correction_bias.zero_()
                               for l in m.model.layers[1:]],
      "group limit": lambda m: [setattr(l.mlp.gate, "topk_group", l.mlp.gate.num_group)
                                for l in m.model.layers[1:]],
      "routed scaling": lambda m: [setattr(l.mlp.gate, "routed_scaling_factor", 1.0)
                                   for l in m.model.layers[1:]],
      "shared expert": lambda m: [l.mlp.shared_experts.down_proj.weight.zero_()
                                  for l in m.model.layers[1:]],
  }
  for name, edit in edits.items():
    changed = edit if isinstance(edit, torch.nn.Module) else copy.deepcopy(model)
    if not isinstance(edit, torch.nn.Module):
      with torch.no_grad():
        edit(changed)
    moved = np.abs(_ref(changed, ids) - ref).max()
    print(f"glm4_moe without {name}: logits move by {moved:.2e}")
    assert moved > 30 * TOL, name
  spec = lazymoe_jax.load(store, expert_slots=2).spec
  np.testing.assert_allclose(layers.rope_inv_freq(spec.attention.rope),
                             model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
  assert spec.attention.rope.dim == spec.attention.head_dim // 2


def test_glm4_moe_published_config_parses():
  """GLM-4.5's published config.json keys: partial rotary from its default, qk-norm, biases,
  the router, the three dense layers, the shared expert, the MTP layer named to be skipped."""
  hf = {"model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": 5120,
        "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 92,
        "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128,
        "n_routed_experts": 160, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
        "first_k_dense_replace": 3, "use_qk_norm": True, "attention_bias": True,
        "rope_theta": 1000000, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072, "num_nextn_predict_layers": 1, "hidden_act": "silu",
        "tie_word_embeddings": False, "eos_token_id": [151329, 151336, 151338]}
  spec = families.spec_from_hf(hf)
  a, router = spec.attention, spec.moe.router
  assert (a.num_heads, a.num_kv_heads, a.head_dim, a.rope.dim) == (96, 8, 128, 64)
  assert a.qkv_bias and not a.o_bias and a.qk_norm == "head" and a.rope.theta == 1e6
  assert router.kind == "sigmoid_group_topk" and router.score_bias and router.renormalize
  assert (router.top_k, router.scaling, spec.moe.shared_width) == (8, 2.5, 1536)
  assert spec.moe_layers == tuple(range(3, 92)) and spec.num_experts == 160
  assert families.of_config(hf).ignored_prefixes(hf) == ("model.layers.92.",)
  no_factor = {k: v for k, v in hf.items() if k != "partial_rotary_factor"}
  assert families.spec_from_hf(no_factor).attention.rope.dim == 64  # transformers' default


def test_glm4_moe_mtp_layer_is_skipped(tiny_stores, tmp_path):
  """A checkpoint with a multi-token-prediction layer after the last one (as published)
  converts, ignoring it, to the same logits."""
  hf_dir, store = tiny_stores["glm4_moe"]
  src = tmp_path / "hf"
  src.mkdir()
  tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
  h = hf_config("glm4_moe")["hidden_size"]
  n = hf_config("glm4_moe")["num_hidden_layers"]
  rng = np.random.default_rng(0)
  tensors |= {f"model.layers.{n}.eh_proj.weight": rng.standard_normal((h, 2 * h), np.float32),
              f"model.layers.{n}.enorm.weight": np.ones(h, np.float32),
              f"model.layers.{n}.hnorm.weight": np.ones(h, np.float32)}
  save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(hf_dir, "config.json")) as f:
    cfg = json.load(f)
  with open(src / "config.json", "w") as f:
    json.dump(dict(cfg, num_nextn_predict_layers=1), f)
  res = convert_cli(str(src), str(tmp_path / "store"))
  assert res.returncode == 0, res.stderr[-3000:]
  ids = token_ids(N_TOKENS)
  np.testing.assert_array_equal(lazymoe_jax.load(str(tmp_path / "store")).logits(ids),
                                lazymoe_jax.load(store).logits(ids))
  with open(src / "config.json", "w") as f:  # without the key, the layer is a wrong tensor
    json.dump(dict(cfg, num_nextn_predict_layers=0), f)
  res = convert_cli(str(src), str(tmp_path / "store2"))
  assert res.returncode != 0 and "does not use" in res.stderr


def _greedy(engine, prompt, n):
  engine.eos_ids = set()
  return engine.generate(prompt, n)


def test_glm4_moe_generates_through_the_cli(tiny_stores):
  _, store = tiny_stores["glm4_moe"]
  res = subprocess.run([sys.executable, "-m", "lazymoe_jax.generate", f"--model={store}",
                        "--prompt_ids=5,6,7,8", "--max_new_tokens=8", "--expert_slots=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  engine = lazymoe_jax.load(store, expert_slots=2)
  eos = engine.eos_ids
  want = _greedy(engine, [5, 6, 7, 8], 8)
  # the CLI stops after the first eos it prints (the engine above ran without eos)
  cut = next((i + 1 for i, t in enumerate(want) if t in eos), len(want))
  printed = [int(t) for t in res.stdout.splitlines()[0].split()]
  assert printed == want[:cut]


def test_glm4_moe_greedy_generation_equals_transformers(family_models):
  """What the CLI test above prints, from the engine, is transformers' own greedy output."""
  torch, _ = import_reference()
  model, _, store = family_models["glm4_moe"]
  want = _greedy(lazymoe_jax.load(store, expert_slots=2), [5, 6, 7, 8], 8)
  with torch.no_grad():
    ref = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, 4:].tolist()
  assert want == ref
