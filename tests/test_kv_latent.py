"""lazymoe_jax/kv/latent.py on hand-built latents: per position one [c (R), k_r (Dr)] row; the
attention of absorbed queries [T, H, R + Dr] over it equals a numpy softmax attention whose
keys are the rows and whose values are their first R entries (the latents c)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from lazymoe_jax.kv import LatentKV
from lazymoe_jax.model.spec import LatentAttention, Rope, cache_spec
from tests.test_kv_dense import reference_attention

R, DR, HEADS = 12, 8, 4


def _latent_spec(layers=2):
  spec = cache_spec(1, R + DR, num_layers=layers)
  return dataclasses.replace(spec, attention=LatentAttention(HEADS, 0, R, 8, DR, 12,
                                                             Rope(1e4, DR), 0.1))


def _filled(rng, s, written):
  kv = LatentKV()
  rows = rng.standard_normal((written, 1, R + DR)).astype(np.float32)  # [c, k_r] per position
  cache = kv.init(_latent_spec(), s)[0]
  cache = kv.update(cache, jnp.asarray(rows[:5]), None, 0)
  cache = kv.update(cache, jnp.asarray(rows[5:]), None, jnp.asarray(5))
  return kv, cache, rows


def test_init_and_update_lay_out_the_rows_by_position():
  rng = np.random.default_rng(0)
  kv, cache, rows = _filled(rng, 16, 9)
  assert len(kv.init(_latent_spec(3), 16)) == 3
  assert cache["k"].shape == (1, R + DR, 16)
  np.testing.assert_array_equal(np.asarray(cache["k"])[0, :, :9], rows[:, 0].T)
  assert not np.asarray(cache["k"])[0, :, 9:].any()
  assert kv.nbytes([cache, cache]) == 2 * (R + DR) * 16 * 4


@pytest.mark.parametrize("window", [None, 4])
def test_attend_equals_numpy_attention_with_the_latents_as_values(window):
  rng = np.random.default_rng(1)
  kv, cache, rows = _filled(rng, 16, 11)
  q = rng.standard_normal((3, HEADS, R + DR)).astype(np.float32)
  q_pos = np.array([8, 9, 10])
  got = kv.attend(cache, jnp.asarray(q), jnp.asarray(q_pos), window, 0.2, value_dim=R)
  assert got.shape == (3, HEADS, R)
  want = reference_attention(q, rows, rows[:, :, :R], q_pos, window, 0.2)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=1e-5)


def test_value_dim_is_required():
  rng = np.random.default_rng(2)
  kv, cache, _ = _filled(rng, 16, 6)
  q = jnp.asarray(rng.standard_normal((1, HEADS, R + DR)).astype(np.float32))
  with pytest.raises(ValueError, match="needs value_dim"):
    kv.attend(cache, q, jnp.asarray([5]), None, 0.2)


def test_latent_cache_refuses_a_model_without_latents():
  with pytest.raises(ValueError, match="use DenseKV"):
    LatentKV().init(cache_spec(2, 8), 8)
