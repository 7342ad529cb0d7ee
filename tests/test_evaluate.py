"""python -m lazymoe_jax.evaluate: perplexity parity, resumable prompt runs, bad lines."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import lazymoe_jax
from checkpoints_tools import corpus, default_model
from lazymoe_jax import evaluate
from lazymoe_jax.sampling import Sampler
from tests.conftest import ROOT, import_reference


@pytest.fixture(scope="module")
def hf_demo():
  torch, transformers = import_reference()
  return transformers.MixtralForCausalLM.from_pretrained(default_model.DEMO_DIR,
                                                         dtype=torch.float32).eval()


def _hf_perplexity(model, ids, context, stride):
  """The transformers-docs sliding-window scheme, with transformers' own loss (labels=-100)."""
  torch, _ = import_reference()
  nll, count, done, begin = 0.0, 0, 1, 0
  while done < len(ids):
    end = min(begin + context, len(ids))
    window = torch.tensor(ids[begin:end])[None]
    labels = window.clone()
    labels[:, :done - begin] = -100  # already scored (or the unscored first token)
    n = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
      nll += float(model(window, labels=labels).loss) * n
    count, done, begin = count + n, end, begin + stride
  return float(np.exp(nll / count)), count


@pytest.mark.parametrize("context,stride", [(256, 128), (128, 48)])
def test_perplexity_equals_transformers(demo_store, hf_demo, tmp_path, context, stride):
  text = corpus.read_source(corpus.stdlib_files(held_out=True)[3])[:2500]
  path = tmp_path / "text.py"
  path.write_text(text)
  summary = evaluate.evaluate(demo_store, text_file=str(path), context=context, stride=stride,
                              output=str(tmp_path / "ppl"), progress=False)
  ids = lazymoe_jax.load(demo_store).tokenizer.encode(text)
  assert len(ids) > 2 * context
  want, count = _hf_perplexity(hf_demo, ids, context, stride)
  assert summary["scored_tokens"] == count == len(ids) - 1
  assert abs(summary["perplexity"] - want) / want <= 1e-4
  assert json.loads((tmp_path / "ppl.summary.json").read_text())["perplexity"] == \
      summary["perplexity"]


def _prompts(path, n=6):
  lines = [json.dumps({"id": f"p{i}", "prompt": f"def f{i}(x):\n    "}) for i in range(n)]
  path.write_text("\n".join(lines) + "\n")


def _evaluate_cli(*args):
  return [sys.executable, "-m", "lazymoe_jax.evaluate", *args]


def test_resume_after_kill_writes_each_id_once(demo_store, tmp_path):
  _prompts(tmp_path / "in.jsonl", 8)
  out = tmp_path / "out.jsonl"
  args = _evaluate_cli(f"--model={demo_store}", f"--prompts_jsonl={tmp_path / 'in.jsonl'}",
                       f"--output={out}", "--max_new_tokens=48")
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if out.exists() and out.read_text().count("\n") >= 2:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  with open(out, "a") as f:
    f.write('{"id": "p7", "completion": "torn wri')  # a record cut short by the kill
  first = [json.loads(l)["id"] for l in out.read_text().splitlines()[:-1]]
  assert 2 <= len(first) < 8
  res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr
  records = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r["id"] for r in records] == [f"p{i}" for i in range(8)]  # once each, in order
  summary = json.loads(res.stdout[res.stdout.index("{"):])
  assert summary["skipped_already_done"] == len(first)
  assert summary["completed"] == 8 - len(first)
  # resumed records equal what an uninterrupted run gives (greedy is deterministic)
  clean = tmp_path / "clean.jsonl"
  evaluate.evaluate(demo_store, prompts_jsonl=str(tmp_path / "in.jsonl"), output=str(clean),
                    max_new_tokens=48, progress=False)
  strip = lambda r: {k: r[k] for k in ("id", "completion", "new_token_ids")}  # noqa: E731
  assert [strip(r) for r in records] == [strip(json.loads(l)) for l in
                                        clean.read_text().splitlines()]


def test_malformed_lines_are_reported_and_skipped(demo_store, tmp_path):
  lines = ['{"id": "a", "prompt": "x = "}', "not json", '{"id": "b"}', "",
           '{"id": "c", "prompt": "y", "colour": 1}', '{"id": "a", "prompt": "dup"}',
           '[1, 2]', '{"id": "d", "prompt": "z = ", "max_new_tokens": -1}',
           '{"id": "e", "prompt": "import \u2028 "}', '{"id": "f", "prompt": "x", "seed": 1e400}',
           '{"id": "g", "prompt": "x", "temperature": NaN}']
  (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
  out = tmp_path / "out.jsonl"
  for _ in range(2):  # the second run adds nothing: errors are not written twice either
    summary = evaluate.evaluate(demo_store, prompts_jsonl=str(tmp_path / "in.jsonl"),
                                output=str(out), max_new_tokens=4, progress=False)
  records = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r.get("id") for r in records if "id" in r] == ["a", "e"]
  errors = {r["line"]: r["error"] for r in records if "line" in r}
  assert sorted(errors) == [2, 3, 5, 6, 7, 8, 10, 11]
  assert "JSONDecodeError" in errors[2] and "prompt" in errors[3] and "colour" in errors[5]
  assert "duplicate id 'a'" in errors[6] and "max_new_tokens" in errors[8]
  assert "seed" in errors[10] and "temperature" in errors[11]
  assert summary["errors"] == 8 and summary["skipped_already_done"] == 2


def test_prompt_line_settings_override_flags(demo_store, tmp_path):
  (tmp_path / "in.jsonl").write_text(
      json.dumps({"id": 1, "prompt": "class A:\n    ", "max_new_tokens": 3}) + "\n" +
      json.dumps({"id": 2, "prompt": "import ", "temperature": 1.0, "seed": 5, "top_k": 20}) +
      "\n")
  out = tmp_path / "out.jsonl"
  evaluate.evaluate(demo_store, prompts_jsonl=str(tmp_path / "in.jsonl"), output=str(out),
                    max_new_tokens=10, sampler=Sampler(temperature=0.0, seed=0), progress=False)
  r1, r2 = [json.loads(l) for l in out.read_text().splitlines()]
  assert r1["completion_tokens"] == 3 and r2["completion_tokens"] == 10
  engine = lazymoe_jax.load(demo_store)
  want = engine.generate(engine.tokenizer.encode("import "), 10, temperature=1.0, top_k=20,
                         seed=5)
  assert r2["new_token_ids"] == want
  assert want != engine.generate(engine.tokenizer.encode("import "), 10)  # it did sample


def test_context_beyond_the_model_is_refused(demo_store, tmp_path):
  (tmp_path / "t.py").write_text("x = 1\n" * 50)
  with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
    evaluate.evaluate(demo_store, text_file=str(tmp_path / "t.py"), context=512, progress=False)
