"""TurboQuant: codebooks, distortion against the paper, unbiased inner products, determinism."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from lazymoe_jax.kv.turboquant import TurboQuant, codebook_mse, lloyd_max_codebook

GAUSSIAN_LIMIT = {1: 0.3634, 2: 0.1175, 3: 0.0345, 4: 0.0095}  # Lloyd-Max, d -> infinity
EXACT_D128 = {1: 0.3609, 2: 0.1160, 3: 0.0340, 4: 0.0093}  # REFERENCES.md
PROD_VARIANCE = {1: 1.57, 2: 0.56, 3: 0.18, 4: 0.047}  # x 1/d, paper, |y| = 1


def _unit(n, d=128, seed=0):
  x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_codebook_is_lloyd_max_for_the_sphere_density():
  c = lloyd_max_codebook(128, 1)
  np.testing.assert_allclose(c, [-math.sqrt(2 / math.pi) / math.sqrt(128),
                                 math.sqrt(2 / math.pi) / math.sqrt(128)], rtol=2e-2)
  c2 = lloyd_max_codebook(128, 2) * math.sqrt(128)
  np.testing.assert_allclose(np.abs(c2), [1.51, 0.453, 0.453, 1.51], rtol=2e-2)
  for b in (1, 2, 3, 4):
    assert abs(codebook_mse(128, b) - EXACT_D128[b]) / EXACT_D128[b] < 0.01


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_distortion_matches_the_paper(bits):
  tq = TurboQuant(128, bits, seed=3)
  u = _unit(4096)
  mse = float(np.mean(np.sum((np.asarray(tq.decode(tq.encode(u))) - u) ** 2, axis=1)))
  print(f"TurboQuant-mse {bits} bits, dim 128: E|u - u_hat|^2 = {mse:.4f} "
        f"(Gaussian-limit optimum {GAUSSIAN_LIMIT[bits]})")
  assert abs(mse - GAUSSIAN_LIMIT[bits]) / GAUSSIAN_LIMIT[bits] <= 0.05
  assert mse <= math.sqrt(3) * math.pi / 2 * 4.0 ** -bits


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_prod_variant_is_unbiased(bits):
  tq = TurboQuant(128, bits, seed=5, variant="prod")
  x = _unit(2048, seed=1)
  y = _unit(1, seed=2)[0]
  err = np.asarray(tq.decode(tq.encode(x))) @ y - x @ y
  var = float(np.var(err)) * 128
  print(f"TurboQuant-prod {bits} bits: inner-product error mean {err.mean():+.2e}, "
        f"variance {var:.3f}/d (paper {PROD_VARIANCE[bits]}/d)")
  assert abs(err.mean()) < 4 * math.sqrt(var / 128 / len(err))  # zero within 4 standard errors
  assert 0.6 * PROD_VARIANCE[bits] <= var <= 1.3 * PROD_VARIANCE[bits]


def test_fractional_rates_fall_between():
  u = _unit(2048)
  mse = {}
  for b in (2, 2.5, 3, 3.5, 4):
    tq = TurboQuant(128, b)
    mse[b] = float(np.mean(np.sum((np.asarray(tq.decode(tq.encode(u))) - u) ** 2, axis=1)))
    assert tq.bytes_per_vector() == 128 * b / 8 + 2
  assert mse[2] > mse[2.5] > mse[3] > mse[3.5] > mse[4]


def test_deterministic_and_scores_equal_decoded_dot():
  x = jnp.asarray(_unit(64) * 3.0)
  q = jnp.asarray(_unit(5, seed=9))
  a, b = TurboQuant(128, 3, seed=1), TurboQuant(128, 3, seed=2)
  c1, c2 = a.encode(x), a.encode(x)
  for k in c1:
    np.testing.assert_array_equal(np.asarray(c1[k]), np.asarray(c2[k]))
  assert not np.array_equal(np.asarray(a.decode(c1)), np.asarray(b.decode(b.encode(x))))
  for tq in (a, TurboQuant(128, 3, variant="prod")):
    codes = tq.encode(x)
    np.testing.assert_allclose(np.asarray(tq.scores(q, codes)),
                               np.asarray(q @ tq.decode(codes).T), rtol=1e-4, atol=1e-5)


def test_prod_with_a_zero_bit_channel_group():
  # prod at 1.5 bits: half the rotated channels get 1 MSE bit, the other half none (zero)
  tq = TurboQuant(128, 1.5, variant="prod")
  x = jnp.asarray(_unit(16))
  codes = tq.encode(x)
  assert tq.decode(codes).shape == (16, 128)
  q = jnp.asarray(_unit(3, seed=4))
  np.testing.assert_allclose(np.asarray(tq.scores(q, codes)),
                             np.asarray(q @ tq.decode(codes).T), rtol=1e-4, atol=1e-5)
  p = jnp.asarray(np.random.default_rng(0).random((3, 16)).astype(np.float32))
  np.testing.assert_allclose(np.asarray(tq.rotated_sum(p, codes, "ms,sd->md")),
                             np.asarray(p @ (tq._centroids(codes))), rtol=1e-5, atol=1e-6)


def test_kv_bytes_at_4_bits_are_3_5x_below_bf16():
  tq = TurboQuant(128, 4)
  codes = tq.encode(jnp.asarray(_unit(10)))
  held = sum(np.asarray(v).nbytes for v in codes.values()) / 10
  assert held == tq.bytes_per_vector() == 66
  assert 128 * 2 / held >= 3.5


def test_bad_settings():
  with pytest.raises(ValueError, match="power of two"):
    TurboQuant(96, 4)
  with pytest.raises(ValueError, match="not supported"):
    TurboQuant(128, 5)


@pytest.mark.parametrize("variant", ["mse", "prod"])
def test_cache_attention_equals_dense_attention_on_decoded_vectors(variant):
  import jax  # pylint: disable=import-outside-toplevel
  from lazymoe_jax.kv import DenseKV, TurboQuantKV  # pylint: disable=import-outside-toplevel
  from lazymoe_jax.model.spec import cache_spec  # pylint: disable=import-outside-toplevel
  Cfg = cache_spec(2, 64)
  rng = np.random.default_rng(0)
  t, s = 16, 256
  common = rng.standard_normal((1, 2, 64)).astype(np.float32) * 4  # shared by every token
  k = jnp.asarray(rng.standard_normal((t, 2, 64)).astype(np.float32) * 3 + common)
  v = jnp.asarray(rng.standard_normal((t, 2, 64)).astype(np.float32) + common)
  q = jnp.asarray(rng.standard_normal((t, 4, 64)).astype(np.float32))
  pos = jnp.arange(t)
  tkv = TurboQuantKV(4.0, 3.0, k_variant=variant)
  cache = tkv.update(tkv.init(Cfg, s)[0], k, v, 0)
  kq, vq = tkv.quantisers(64)
  first = lambda c: jax.tree.map(lambda a: a[:, :t], c)  # noqa: E731
  # decoded vectors plus the shift the cache subtracted before quantising
  kd = kq.decode(first(cache["k"])) + cache["k_shift"][:, None]  # [K, T, D]
  vd = vq.decode(first(cache["v"])) + cache["v_shift"][:, None]
  np.testing.assert_allclose(np.asarray(cache["k_shift"]), np.asarray(k.mean(0)), atol=1e-5)
  dense = DenseKV()
  dc = dense.update(dense.init(Cfg, s)[0], kd.transpose(1, 0, 2), vd.transpose(1, 0, 2), 0)
  np.testing.assert_allclose(np.asarray(tkv.attend(cache, q, pos, None, 0.125)),
                             np.asarray(dense.attend(dc, q, pos, None, 0.125)), atol=2e-5)
  # with gpt-oss attention sinks the probabilities sum below one: the shift must follow
  sinks = jnp.asarray([2.0, -1.0, 0.5, 3.0])
  np.testing.assert_allclose(np.asarray(tkv.attend(cache, q, pos, 4, 0.125, sinks=sinks)),
                             np.asarray(dense.attend(dc, q, pos, 4, 0.125, sinks=sinks)), atol=2e-5)


def test_centering_is_exact_and_shrinks_the_error():
  """Subtracting the prompt's mean key / value changes attention by nothing but the quantiser's
  error, and that error is smaller when the vectors share a common component."""
  from lazymoe_jax.kv import DenseKV, TurboQuantKV  # pylint: disable=import-outside-toplevel
  from lazymoe_jax.model.spec import cache_spec  # pylint: disable=import-outside-toplevel
  Cfg = cache_spec(2, 64)
  rng = np.random.default_rng(1)
  t, s = 64, 64
  common = rng.standard_normal((1, 2, 64)).astype(np.float32) * 3
  k = jnp.asarray(rng.standard_normal((t, 2, 64)).astype(np.float32) + common)
  v = jnp.asarray(rng.standard_normal((t, 2, 64)).astype(np.float32) + common)
  q = jnp.asarray(rng.standard_normal((t, 4, 64)).astype(np.float32) * 0.3)
  pos = jnp.arange(t)
  dense = DenseKV()
  exact = np.asarray(dense.attend(dense.update(dense.init(Cfg, s)[0], k, v, 0), q, pos, None, 0.125))
  err = {}
  for center in (False, True):
    tkv = TurboQuantKV(4.0, 4.0, center=center)
    out = np.asarray(tkv.attend(tkv.update(tkv.init(Cfg, s)[0], k, v, 0), q, pos, None, 0.125))
    err[center] = float(np.sqrt(np.mean((out - exact) ** 2)))
  assert err[True] < 0.5 * err[False], err
  # a later chunk keeps the shift of the first one
  tkv = TurboQuantKV(4.0, 4.0)
  c = tkv.update(tkv.init(Cfg, s)[0], k[:32], v[:32], 0)
  c2 = tkv.update(c, k[32:], v[32:], jnp.asarray(32))
  np.testing.assert_array_equal(np.asarray(c2["k_shift"]), np.asarray(c["k_shift"]))
