"""IncrementalDecoder: the pieces pushed one token at a time add up to the whole decoding."""

from __future__ import annotations

import os

import pytest

from checkpoints_tools import default_model
from lazymoe_jax import tokenizer as tokenizer_lib
from lazymoe_jax.detokenize import IncrementalDecoder, token_bytes

TEXT = ('def greet(name):\n    """Say hello — to ünïcode names ✓ 日本語."""\n'
        '    return f"Hello, {name}! 🎉"\n\n\nclass Point:\n    x: int = 0\n')


def _sentencepiece():
  return tokenizer_lib.SentencePieceTokenizer(
      os.path.join(default_model.DEMO_DIR, "tokenizer.model"), add_bos=False)


def _byte_level_bpe(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=["<|endoftext|>"])
  tok.train_from_iterator([TEXT * 3, "plain ascii words and more words"], trainer)
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  return tokenizer_lib.JsonTokenizer(path, add_bos=False, bos_id=None)


def _check(tok, prompt: str, text: str):
  ctx, ids = tok.encode(prompt), tok.encode(prompt + text)[len(tok.encode(prompt)):]
  dec = IncrementalDecoder(tok, ctx)
  pieces = [dec.push(t) for t in ids]
  out = "".join(pieces) + dec.flush()
  assert out == tok.decode(ctx + ids)[len(tok.decode(ctx)):]
  assert all("\ufffd" not in p for p in pieces)  # incomplete characters are held back
  return pieces


@pytest.mark.parametrize("kind", ["sentencepiece", "byte_level_bpe"])
def test_pushes_add_up_to_the_decoding(kind, tmp_path):
  tok = _sentencepiece() if kind == "sentencepiece" else _byte_level_bpe(tmp_path)
  pieces = _check(tok, "x = 1\n", TEXT)
  assert len(pieces) > 10 and sum(bool(p) for p in pieces) > len(pieces) // 2
  _check(tok, "print(", '"ü 🎉 ✓")')
  _check(tok, "", TEXT)  # no context: the first token's text as decode gives it


def test_leading_space_kept_after_the_prompt():
  tok = _sentencepiece()
  ctx = tok.encode("def f(x):\n    return")
  dec = IncrementalDecoder(tok, ctx)
  assert dec.push(tok.encode(" x")[-1]) == " x"


def test_long_streams_keep_a_bounded_window():
  tok = _sentencepiece()
  ids = tok.encode(TEXT * 20)
  dec = IncrementalDecoder(tok)
  out = "".join(dec.push(t) for t in ids) + dec.flush()
  assert out == tok.decode(ids)
  assert len(dec._ids) < 64  # pylint: disable=protected-access


def test_token_bytes():
  tok = _sentencepiece()
  ids = tok.encode("a b\n")
  assert b"".join(token_bytes(tok, t) for t in ids).strip() == b"a b\n".strip()
