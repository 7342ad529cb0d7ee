"""The entry points, run as a user runs them."""

import os
import re
import subprocess
import sys

import pytest

import lazymoe_jax
from checkpoints_tools import default_model, make_tiny
from tests.conftest import ROOT

SUMMARY = re.compile(r"\[(\d+) prompt tokens at [\d.]+ tok/s \| (\d+) new at [\d.]+ tok/s \| "
                     r"experts read (\d+), hit rate [\d.]+%, [\d.]+ MB read \| pool (\d+) slots \| "
                     r"peak RSS \d+ MiB\]")


def _generate(*args, env=None):
  return subprocess.run([sys.executable, "-m", "lazymoe_jax.generate", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, **(env or {})})


def test_generate_on_a_store_without_tokenizer(family_models):
  _, _, store = family_models["olmoe"]
  res = _generate(f"--model={store}", "--prompt_ids=5,6,7,8", "--max_new_tokens=6",
                  "--expert_slots=2")
  assert res.returncode == 0, res.stderr
  m = SUMMARY.search(res.stdout)
  assert m and m.groups()[:2] == ("4", "6") and m.group(4) == "2", res.stdout
  engine = lazymoe_jax.load(store)
  engine.eos_ids = set()
  expected = engine.generate([5, 6, 7, 8], 6)
  first_line = res.stdout.splitlines()[0].split()
  assert [int(t) for t in first_line] == expected[:len(first_line)]


def test_generate_bad_model_path_is_a_clear_error(tmp_path):
  res = _generate(f"--model={tmp_path}/missing")
  assert res.returncode != 0 and "does not exist" in res.stderr and "convert_hf" in res.stderr


def test_default_model_builds_once_and_rebuilds_when_broken(tmp_path):
  env = {"LAZYMOE_CACHE": str(tmp_path)}
  res = _generate("--max_new_tokens=8", env=env)
  assert res.returncode == 0, res.stderr
  assert "building" in res.stderr and "No --model" in res.stderr
  assert res.stdout.startswith("def fibonacci(n):")
  assert SUMMARY.search(res.stdout)
  res2 = _generate("--max_new_tokens=8", env=env)
  assert res2.returncode == 0 and "building" not in res2.stderr
  assert res2.stdout.splitlines()[:2] == res.stdout.splitlines()[:2]  # same greedy text
  store = os.path.join(str(tmp_path), "stores", default_model.NAME)
  os.remove(os.path.join(store, "manifest.json"))  # a broken cache is rebuilt, not trusted
  res3 = _generate("--max_new_tokens=8", env=env)
  assert res3.returncode == 0 and "building" in res3.stderr


def test_tokenizer_round_trip_is_exact(tmp_path):
  pytest.importorskip("sentencepiece")
  make_tiny.train_tokenizer(str(tmp_path), 1024, make_tiny.stdlib_corpus(1 << 19))
  tok = lazymoe_jax.tokenizer.SentencePieceTokenizer(str(tmp_path / "tokenizer.model"), False)
  text = make_tiny.stdlib_corpus(1 << 17, held_out=True) + "\n\tünïcödé → 🙂  \n"
  assert tok.decode(tok.encode(text)) == text
