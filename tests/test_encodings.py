"""Expert encodings: reconstruction within the stated bound; fast products equal plain jnp."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lazymoe_jax.model import encodings

NAMES = ["float32", "bfloat16", "float16", "int8", "int4-g32", "int4-g64", "int4-g128", "mxfp4"]


def _weight(rows=96, cols=256, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
  w[3] *= 40.0  # an outlier row: per-row / per-group scales must absorb it
  w[:, 7] = 0.0
  return w


@pytest.mark.parametrize("name", NAMES)
def test_reconstruction_within_stated_bound(name):
  enc = encodings.get(name)
  w = _weight()
  arrays = enc.encode(w)
  for suffix, (shape, dtype) in enc.arrays(*w.shape).items():
    assert arrays[suffix].shape == shape and arrays[suffix].dtype.name == dtype
  err = np.abs(w - enc.decode(arrays))
  assert np.all(err <= enc.error_bound(w))
  rel_rms = float(np.sqrt(np.mean(err ** 2) / np.mean(w ** 2)))
  print(f"{name}: relative RMS reconstruction error {rel_rms:.2e}")
  # the bound is tight enough to mean something: a step of the quantiser at most
  limit = {"float32": 0, "bfloat16": 4e-3, "float16": 5e-4, "int8": 1e-2, "int4-g32": 0.11,
           "int4-g64": 0.13, "int4-g128": 0.15, "mxfp4": 0.15}[name]
  assert rel_rms <= limit


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tokens", [1, 2, 3, 8, 16, 17, 64])
def test_fast_product_equals_plain_jnp(name, tokens):
  enc = encodings.get(name)
  w = _weight(seed=tokens)
  arrays = {k: jnp.asarray(v) for k, v in enc.encode(w).items()}
  x = np.random.default_rng(100 + tokens).standard_normal((tokens, w.shape[1])).astype(np.float32)
  got = np.asarray(jax.jit(enc.matmul)(arrays, x))
  want = np.asarray(jnp.dot(jnp.asarray(x), jnp.asarray(enc.decode(enc.encode(w))).T,
                            precision="highest"))
  rel = np.abs(got - want).max() / np.abs(want).max()
  # int8 up to 16 tokens quantises activations too (two levels: value and residual, ~1e-4
  # relative), more are float32 products; int4 folds its nibble bias into a separate sum
  tol = 1e-5 if name.startswith("int4") else 2e-6
  if name == "int8" and tokens <= 16:
    tol = 1e-3
  assert rel <= tol, rel


@pytest.mark.parametrize("name", ["int8", "int4-g32", "int4-g128"])
def test_many_token_product_by_row_blocks(name, monkeypatch):
  # blocks of 8 rows for 100 rows: 13 blocks, the last overlapping the one before it
  monkeypatch.setattr(encodings, "DEQUANT_BLOCK_BYTES", 8 * 4 * 256)
  enc = encodings.get(name)
  w = _weight(rows=100)
  arrays = {k: jnp.asarray(v) for k, v in enc.encode(w).items()}
  x = np.random.default_rng(7).standard_normal((64, w.shape[1])).astype(np.float32)
  got = np.asarray(jax.jit(enc.matmul)(arrays, x))
  want = np.asarray(jnp.dot(jnp.asarray(x), jnp.asarray(enc.decode(enc.encode(w))).T,
                            precision="highest"))
  assert np.abs(got - want).max() / np.abs(want).max() <= 2e-6


def test_int4_group_must_divide_width():
  with pytest.raises(ValueError, match="does not divide"):
    encodings.get("int4-g128").arrays(64, 96)
  with pytest.raises(ValueError, match="unknown weight encoding"):
    encodings.get("int3")
