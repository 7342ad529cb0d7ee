"""IncrementalDecoder: streamed pieces add up to the whole decoding, for every tokenizer kind."""

import json
import os

import numpy as np
import pytest

from checkpoints_tools import default_model
from lazymoe_jax import detokenize, tokenizer

TEXTS = ["hello world 🙂 你好世界 café naïve", "def f(x):\n    return x  # 中文 😀👍🏽",
         "日本語のテキスト and emoji 🎉🎉", "  leading spaces\tand tabs\n\n"]


def _byte_level_json(path: str) -> str:
  """GPT-2 style: every character is bytes, so CJK and emoji split over several tokens."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(path)
  return path


def _byte_fallback_json(path: str) -> str:
  """Llama style: "▁" for spaces, <0xNN> byte tokens for characters outside the vocab (CJK,
  emoji here), and a decoder that strips the first leading space of a decoding."""
  from tokenizers import Tokenizer, decoders, models, normalizers, trainers
  tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
  tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                         normalizers.Replace(" ", "▁")])
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  ascii_only = ["".join(c for c in t if ord(c) < 128) for t in TEXTS]
  tok.train_from_iterator(ascii_only * 20, trainers.BpeTrainer(
      vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
  spec = json.loads(tok.to_str())
  vocab = spec["model"]["vocab"]
  for b in range(256):
    vocab.setdefault(f"<0x{b:02X}>", len(vocab))
  Tokenizer.from_str(json.dumps(spec)).save(path)
  return path


@pytest.fixture(scope="module", params=["sentencepiece", "byte_level", "byte_fallback"])
def tok(request, tmp_path_factory):
  if request.param == "sentencepiece":
    return tokenizer.SentencePieceTokenizer(
        os.path.join(default_model.DEMO_DIR, "tokenizer.model"), add_bos=False)
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
  make = _byte_level_json if request.param == "byte_level" else _byte_fallback_json
  return tokenizer.JsonTokenizer(make(path), add_bos=False, bos_id=None)


def _vocab_size(tok) -> int:
  if isinstance(tok, tokenizer.SentencePieceTokenizer):
    return tok.sp.vocab_size()
  return tok.tok.get_vocab_size()


def _byte_ids(tok) -> list[int]:
  """The ids whose decoding is a lone byte or part of a character (split multi-byte text)."""
  return [i for i in range(_vocab_size(tok)) if "\ufffd" in tok.decode([i])]


def _sequences(tok, n: int = 150):
  """(prompt, new) pairs: real text split at a character boundary, uniform random ids, and
  runs of byte tokens (split and invalid characters) mixed with ordinary ones."""
  rng = np.random.RandomState(0)
  vocab, byte_ids = _vocab_size(tok), _byte_ids(tok)
  assert len(byte_ids) >= 4  # the tokenizers under test do split characters
  for i in range(n):
    kind = i % 3
    if kind == 0:
      ids = tok.encode(TEXTS[rng.randint(len(TEXTS))] + TEXTS[rng.randint(len(TEXTS))])
    elif kind == 1:
      ids = list(rng.randint(0, vocab, rng.randint(1, 40)))
    else:
      ids = [int(rng.choice(byte_ids)) if rng.rand() < 0.6 else int(rng.randint(vocab))
             for _ in range(rng.randint(1, 40))]
    # a prompt is text, so it ends at a character boundary: its decoding begins the whole's
    cut = rng.randint(0, len(ids))
    while cut and not tok.decode(ids).startswith(tok.decode(ids[:cut])):
      cut -= 1
    yield [int(t) for t in ids[:cut]], [int(t) for t in ids[cut:]]


def test_pushes_add_up_to_the_whole_decoding(tok):
  for prompt, new in _sequences(tok):
    dec = detokenize.IncrementalDecoder(tok, prompt)
    pieces = [dec.push(t) for t in new]
    rest = dec.flush()
    whole = tok.decode(prompt + new)
    expected = whole[len(tok.decode(prompt)):] if prompt else whole
    assert "".join(pieces) + rest == expected, (prompt, new, pieces, rest)
    if "\ufffd" not in whole:  # no piece shows half a character
      assert not any("\ufffd" in p for p in pieces), (prompt, new, pieces)


def test_window_stays_bounded(tok):
  """A long stream of text and of invalid bytes: the decoder decodes a few tokens per push,
  never the whole output."""
  prompt, ids = tok.encode(TEXTS[0]), tok.encode("".join(TEXTS) * 16)
  byte_ids = _byte_ids(tok)
  junk = [byte_ids[i % len(byte_ids)] for i in range(300)]  # mostly invalid UTF-8
  dec = detokenize.IncrementalDecoder(tok, prompt)
  out = "".join(dec.push(t) for t in ids + junk) + dec.flush()
  assert out == tok.decode(prompt + ids + junk)[len(tok.decode(prompt)):]
  bound = detokenize.MAX_WINDOW
  assert len(ids) + len(junk) > 10 * bound and dec.max_window <= bound


def test_leading_space_at_the_prompt_boundary(tok):
  prompt = tok.encode("def f(x):")
  new = tok.encode(" return 中")
  dec = detokenize.IncrementalDecoder(tok, prompt)
  out = "".join(dec.push(t) for t in new) + dec.flush()
  assert out == tok.decode(prompt + new)[len(tok.decode(prompt)):]
  assert out.endswith("中")


def test_special_tokens_are_printed_as_decode_prints_them(tok):
  """JsonTokenizer.decode keeps special tokens (skip_special_tokens=False): so do the pieces."""
  if isinstance(tok, tokenizer.SentencePieceTokenizer):
    special = [tok.sp.bos_id(), tok.sp.eos_id()]
  else:
    special = [tok.tok.token_to_id("<s>"), tok.tok.token_to_id("</s>")]
  prompt, new = tok.encode("def f(x):"), special + tok.encode(" return")
  dec = detokenize.IncrementalDecoder(tok, prompt)
  out = "".join(dec.push(t) for t in new) + dec.flush()
  assert out == tok.decode(prompt + new)[len(tok.decode(prompt)):]
  if not isinstance(tok, tokenizer.SentencePieceTokenizer):
    assert out.startswith("<s></s>")


def test_token_bytes_and_id_only_stores():
  sp = tokenizer.SentencePieceTokenizer(os.path.join(default_model.DEMO_DIR, "tokenizer.model"),
                                        add_bos=False)
  ids = sp.encode("a b\n")
  assert b"".join(detokenize.token_bytes(sp, t) for t in ids) == b"a b\n"  # no dummy prefix
  dec = detokenize.IncrementalDecoder(tokenizer.NoTokenizer(), [1, 2])
  assert dec.push(5) + dec.push(6) + dec.flush() == "5 6 "


def test_ids_past_the_tokenizer_decode_to_nothing(tok):
  """A vocabulary padded beyond the tokenizer (many checkpoints') lets a model sample an id the
  tokenizer has no piece for: it decodes to nothing, in the whole and in the increments (the
  server's stream of such a model used to end its engine thread)."""
  past = 10 ** 6
  ids = tok.encode("Hello world, once more")
  mixed = ids[:2] + [past] + ids[2:] + [past]
  assert tok.decode(mixed) == tok.decode(ids)
  dec = detokenize.IncrementalDecoder(tok, ids[:1])
  assert "".join(dec.push(t) for t in mixed[1:]) + dec.flush() == tok.decode(ids)[
      len(tok.decode(ids[:1])):]
