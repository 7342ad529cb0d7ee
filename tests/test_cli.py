"""The entry points, run as a user runs them."""

import os
import re
import subprocess
import sys

import pytest

import lazymoe_jax
from lazymoe_jax import generate
from checkpoints_tools import corpus, default_model
from lazymoe_jax.store import format as fmt
from tests.conftest import ROOT

SUMMARY = re.compile(r"\[(\d+) prompt tokens at [\d.]+ tok/s \| (\d+) new at [\d.]+ tok/s \| "
                     r"experts read (\d+), hit rate [\d.]+%, [\d.]+ MB read \| pool (\d+) slots \| "
                     r"peak RSS \d+ MiB\]")


def _generate(*args, env=None):
  return subprocess.run([sys.executable, "-m", "lazymoe_jax.generate", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, **(env or {})})


def test_generate_on_a_store_without_tokenizer(tiny_stores):
  _, store = tiny_stores["olmoe"]
  res = _generate(f"--model={store}", "--prompt_ids=5,6,7,8", "--max_new_tokens=6",
                  "--expert_slots=2")
  assert res.returncode == 0, res.stderr
  m = SUMMARY.search(res.stdout)
  assert m and m.groups()[:2] == ("4", "6") and m.group(4) == "2", res.stdout
  engine = lazymoe_jax.load(store)
  engine.eos_ids = set()
  expected = engine.generate([5, 6, 7, 8], 6)
  first_line = res.stdout.splitlines()[0].split()
  assert [int(t) for t in first_line] == expected  # all 6 (the summary counts 6 new)


def test_generate_bad_model_path_is_a_clear_error(tmp_path):
  res = _generate(f"--model={tmp_path}/missing")
  assert res.returncode != 0 and "does not exist" in res.stderr and "convert_hf" in res.stderr


def test_default_model_builds_once_and_rebuilds_when_broken(tmp_path):
  env = {"LAZYMOE_CACHE": str(tmp_path)}
  res = _generate("--max_new_tokens=8", env=env)
  assert res.returncode == 0, res.stderr
  assert "converting" in res.stderr and "No --model" in res.stderr
  assert res.stdout.startswith(generate.DEFAULT_PROMPT)
  assert SUMMARY.search(res.stdout)
  res2 = _generate("--max_new_tokens=8", env=env)
  assert res2.returncode == 0 and "converting" not in res2.stderr
  assert res2.stdout.splitlines()[:2] == res.stdout.splitlines()[:2]  # same greedy text
  store = os.path.join(str(tmp_path), "stores", default_model.NAME)
  os.remove(os.path.join(store, "manifest.json"))  # a broken cache is rebuilt, not trusted
  res3 = _generate("--max_new_tokens=8", env=env)
  assert res3.returncode == 0 and "converting" in res3.stderr
  assert res3.stdout == res.stdout.replace(SUMMARY.search(res.stdout).group(0),
                                           SUMMARY.search(res3.stdout).group(0))
  with open(fmt.chunk_path(store, "w_down", 0, 0), "r+b") as f:  # corrupt a chunk in place
    f.seek(64)
    f.write(b"\xff" * 16)
  res4 = _generate("--max_new_tokens=8", "--expert_slots=2", env=env)
  assert res4.returncode == 0 and "damaged" in res4.stderr, res4.stderr


def test_tokenizer_round_trip_is_exact(tmp_path):
  pytest.importorskip("sentencepiece")
  tok = lazymoe_jax.tokenizer.SentencePieceTokenizer(
      os.path.join(default_model.DEMO_DIR, "tokenizer.model"), False)
  files = corpus.stdlib_files(held_out=True)
  assert len(files) > 50
  for path in files:
    text = corpus.read_source(path)
    assert tok.decode(tok.encode(text)) == text, path
  odd = "\n\tünïcödé → 🙂  \r\n  \x00\x7f trailing  "
  assert tok.decode(tok.encode(odd)) == odd


@pytest.mark.parametrize("flag, valid", [
    ("--temperature=nan", "finite number >= 0"), ("--temperature=inf", "finite number >= 0"),
    ("--temperature=-1", "finite number >= 0"), ("--top_p=nan", "outside (0, 1]"),
    ("--top_p=0", "outside (0, 1]"), ("--top_p=1.01", "outside (0, 1]"),
    ("--top_k=-2", "give 0"), ("--max_new_tokens=-1", "count >= 0")])
def test_bad_sampling_flags_are_refused_before_any_output(tmp_path, flag, valid):
  res = _generate(flag, "--prompt=zebra", env={"LAZYMOE_CACHE": str(tmp_path)})
  assert res.returncode != 0
  assert flag.split("=")[0] in res.stderr and valid in res.stderr, res.stderr
  assert res.stdout == "" and "converting" not in res.stderr  # refused before loading


@pytest.mark.parametrize("repeat, new_tokens, message", [
    (8, 4, "tokens exceed the context of 32 positions"),  # the prompt alone is too long
    (1, 30, "exceeds the model's context of 32 positions; shorten")])  # with the new tokens
def test_too_long_prompt_is_refused_before_it_is_echoed(demo_store, repeat, new_tokens, message):
  prompt = "def zebra(x):\n    return x + 1\n" * repeat
  res = _generate(f"--model={demo_store}", f"--prompt={prompt}", "--max_context=32",
                  f"--max_new_tokens={new_tokens}")
  assert res.returncode != 0
  assert message in res.stderr, res.stderr
  assert "zebra" not in res.stdout


def test_streamed_text_is_the_decoding_of_the_generated_ids(demo_store):
  """The printed continuation (through IncrementalDecoder) is exactly decode(prompt + new)
  past decode(prompt), for a sampled continuation (byte tokens and all)."""
  prompt = "def f(x):\n    return"
  res = _generate(f"--model={demo_store}", f"--prompt={prompt}", "--max_new_tokens=24",
                  "--temperature=1.5", "--seed=3")
  assert res.returncode == 0, res.stderr
  engine = lazymoe_jax.load(demo_store)
  ids = engine.tokenizer.encode(prompt)
  new = engine.generate(ids, 24, temperature=1.5, seed=3)
  text = engine.tokenizer.decode(ids + new)
  expected = prompt + text[len(engine.tokenizer.decode(ids)):] + "\n"
  assert res.stdout[:len(expected)] == expected
  assert SUMMARY.search(res.stdout[len(expected):])
