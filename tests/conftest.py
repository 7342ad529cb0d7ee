"""Test fixtures: tiny random checkpoints of every family.

`tiny_stores` (torch-free): checkpoints written with numpy + safetensors (tests/checkpoints.py),
converted once per session through the CLI; what every test that does not compare with
transformers uses. `family_models` (needs the test extra: torch + transformers): the same
models built by transformers and saved with save_pretrained, the reference of the parity tests.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.checkpoints import COMMON, CONFIGS, write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# family -> (transformers config class, model class, settings): the settings are
# tests/checkpoints.py's, so the torch-free checkpoints are the same models
FAMILIES = {family: (arch.replace("ForCausalLM", "Config"), arch, extra)
            for family, (arch, extra) in CONFIGS.items()}
PARITY_REASON = ("compares with transformers: needs the test extra (pip install -e '.[test]', "
                 "torch + transformers)")


def import_reference():
  """(torch, transformers), or a skip naming the test extra."""
  torch = pytest.importorskip("torch", reason=PARITY_REASON)
  transformers = pytest.importorskip("transformers", reason=PARITY_REASON)
  return torch, transformers


def make_hf_model(family: str, seed: int = 0, **overrides):
  """A tiny model with every parameter random (norm weights near 1, biases non-zero)."""
  torch, transformers = import_reference()
  cfg_cls, model_cls, extra = FAMILIES[family]
  cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra, **overrides})
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "embed_tokens" in name:
        p.normal_(0.0, 1.0)  # std-1 embeddings: varied routing, as trained models have
      elif p.ndim == 1 and "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif "sinks" in name:
        p.normal_(0.0, 1.0)  # attention sinks: comparable to the attention logits
      elif "router" in name:
        p.normal_(0.0, 0.3)  # gpt-oss router weight and bias
      elif p.ndim == 1:
        p.normal_(0.0, 0.1)
      elif "gate" in name and "proj" not in name:
        p.normal_(0.0, 0.3)  # routers: decisive, so ties between experts are unlikely
      else:
        p.normal_(0.0, 0.08)
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):  # DeepSeek-V3: zeros at init, not in a
        b.normal_(0.0, 0.2)  # trained model; large enough to change which experts win
  return model


def convert_cli(src: str, dst: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "checkpoints_tools.convert_hf", f"--src={src}",
                         f"--dst={dst}", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)


class _FamilyModels(dict):
  """family -> (HF model, HF dir, store dir), each made and converted (through the CLI) on
  first use, so a run selecting a few families converts only those."""

  def __init__(self, tmp_path_factory):
    super().__init__()
    self.tmp = tmp_path_factory

  def __missing__(self, family):
    import_reference()
    base = self.tmp.mktemp(family)
    model = make_hf_model(family)
    model.save_pretrained(base / "hf")
    res = convert_cli(str(base / "hf"), str(base / "store"))
    assert res.returncode == 0, res.stderr[-3000:]
    self[family] = (model, str(base / "hf"), str(base / "store"))
    return self[family]


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
  """family -> (HF model, HF dir, store dir), converted once per session through the CLI."""
  return _FamilyModels(tmp_path_factory)


class _TinyStores(dict):
  """name -> (HF dir, store dir) of a torch-free checkpoint (tests/checkpoints.py), written
  and converted through the CLI on first use; a name is a family of tests/checkpoints.py."""

  def __init__(self, tmp_path_factory):
    super().__init__()
    self.tmp = tmp_path_factory

  def __missing__(self, name):
    base = self.tmp.mktemp("tiny_" + name)
    hf = write_checkpoint(base / "hf", name)
    res = convert_cli(hf, str(base / "store"))
    assert res.returncode == 0, res.stderr[-3000:]
    self[name] = (hf, str(base / "store"))
    return self[name]


@pytest.fixture(scope="session")
def tiny_stores(tmp_path_factory):
  """name -> (HF dir, store dir): torch-free tiny checkpoints, converted once per session."""
  return _TinyStores(tmp_path_factory)


def token_ids(n: int, vocab: int = 96, seed: int = 1) -> np.ndarray:
  return np.random.RandomState(seed).randint(3, vocab, n)


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory):
  """The shipped demo checkpoint converted once per session."""
  from checkpoints_tools import convert_hf, default_model  # pylint: disable=import-outside-toplevel
  store = str(tmp_path_factory.mktemp("demo") / "store")
  convert_hf.convert(default_model.DEMO_DIR, store, log=lambda s: None)
  return store
