"""The shipped demo model: transformers loads it as it is, we agree with it, and it learned."""

import os
import subprocess
import sys

import numpy as np
import pytest

import lazymoe_jax
from checkpoints_tools import corpus, default_model
from tests.conftest import import_reference


@pytest.fixture(scope="module")
def demo(demo_store):
  engine = lazymoe_jax.load(demo_store)
  text = corpus.stdlib_corpus(1 << 16, held_out=True)
  return engine, np.array(engine.tokenizer.encode(text))


def _cpu() -> str:
  """The CPU's model name and its AMX / AVX512-BF16 flags: XLA's dot kernels differ by CPU
  (BUILD_NOTES "session 12, the demo model on another CPU"), so a failure says where it ran."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      info = f.read()
  except OSError:
    return "an unknown CPU"
  name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")),
              "?")
  flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
  return f"{name} ({', '.join(f for f in flags if f in ('amx_bf16', 'avx512_bf16')) or 'no bf16 dot'})"


def test_shipped_files_are_small_and_complete():
  files = set(os.listdir(default_model.DEMO_DIR))
  assert {"config.json", "model.safetensors", "tokenizer.model"} <= files
  total = sum(os.path.getsize(os.path.join(default_model.DEMO_DIR, f)) for f in files)
  assert total <= 20 * 2**20


def test_matches_transformers_mixtral(demo):
  torch, transformers = import_reference()
  engine, ids = demo
  model = transformers.MixtralForCausalLM.from_pretrained(default_model.DEMO_DIR,
                                                          dtype=torch.float32).eval()
  window = ids[:96]
  with torch.no_grad():
    ref = model(torch.tensor(window)[None]).logits[0].numpy()
  diff = np.abs(engine.logits(window) - ref).max()
  print(f"demo model: max |logit diff| vs transformers = {diff:.2e} on {_cpu()}")
  assert diff <= 1e-4
  prompt = engine.tokenizer.encode("def fibonacci(n):\n    ")
  with torch.no_grad():
    want = model.generate(torch.tensor(prompt)[None], max_new_tokens=32, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
  assert engine.generate(prompt, 32) == want


def test_held_out_perplexity_is_far_below_unigram(demo):
  engine, ids = demo
  train = np.array(engine.tokenizer.encode(corpus.stdlib_corpus(1 << 40)))
  counts = np.bincount(train, minlength=engine.spec.vocab_size) + 1.0
  logp_uni = np.log(counts / counts.sum())
  windows = [ids[i * 256:(i + 1) * 256] for i in range(4)]
  nll_model, nll_uni, n = 0.0, 0.0, 0
  for w in windows:
    logits = engine.logits(w).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll_model -= logp[np.arange(len(w) - 1), w[1:]].sum()
    nll_uni -= logp_uni[w[1:]].sum()
    n += len(w) - 1
  ppl, uni = np.exp(nll_model / n), np.exp(nll_uni / n)
  print(f"held-out perplexity {ppl:.2f}, unigram {uni:.2f}")
  assert ppl <= uni / 3


@pytest.mark.parametrize("dtype,minimum", [("int8", 0.98), ("int4", 0.80)])
def test_quantised_demo_keeps_top1(demo, tmp_path, dtype, minimum):
  engine, ids = demo
  from checkpoints_tools import convert_hf  # pylint: disable=import-outside-toplevel
  convert_hf.convert(default_model.DEMO_DIR, str(tmp_path / dtype), expert_dtype=dtype,
                     log=lambda s: None)
  quant = lazymoe_jax.load(str(tmp_path / dtype))
  agree, total = 0, 0
  for i in range(4):
    w = ids[i * 256:(i + 1) * 256]
    agree += int((engine.logits(w).argmax(-1) == quant.logits(w).argmax(-1)).sum())
    total += len(w)
  print(f"demo model, {dtype} experts: teacher-forced top-1 agreement with the bf16 store "
        f"{agree / total:.2%} over {total} held-out positions")
  assert agree / total >= minimum


def test_int8_dense_weights_keep_top1(demo, demo_store):
  """load(dense_dtype="int8"): attention, head and dense MLP matrices re-encoded at load."""
  engine, ids = demo
  q = lazymoe_jax.load(demo_store, dense_dtype="int8")
  assert q.dense_bytes < 0.7 * engine.dense_bytes  # bf16 matrices -> int8 + row scales
  agree = total = 0
  for i in range(4):
    w = ids[i * 256:(i + 1) * 256]
    agree += int((engine.logits(w).argmax(-1) == q.logits(w).argmax(-1)).sum())
    total += len(w)
  print(f"dense int8: top-1 agreement {agree / total:.2%}")
  assert agree / total >= 0.98  # measured 99.34% over 16 windows
  with pytest.raises(ValueError, match="not one of bfloat16, int8"):
    lazymoe_jax.load(demo_store, dense_dtype="int4")


_CONVERT = """
from checkpoints_tools import default_model
print(default_model.ensure_default_store(lambda s: print("LOG", s, flush=True)))
"""


def test_two_first_runs_convert_once(tmp_path):
  """Two processes needing the demo store at once: one converts (holding the lock), the other
  waits and reuses that store."""
  from tests.conftest import ROOT  # pylint: disable=import-outside-toplevel
  env = {**os.environ, "LAZYMOE_CACHE": str(tmp_path), "PYTHONPATH": ROOT}
  procs = [subprocess.Popen([sys.executable, "-c", _CONVERT], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
  store = os.path.join(str(tmp_path), "stores", default_model.NAME)
  assert [out.splitlines()[-1] for out, _ in outs] == [store, store]
  assert sum("LOG converting" in out for out, _ in outs) == 1, [out for out, _ in outs]
  assert sorted(os.listdir(os.path.join(str(tmp_path), "stores"))) == [
      default_model.NAME, default_model.NAME + ".lock", default_model.NAME + ".source.json"]
  engine = lazymoe_jax.load(store)
  assert engine.tokenizer.decode(engine.tokenizer.encode("def f(x):")) == "def f(x):"
