"""lazymoe_jax/kv/dense.py on hand-built arrays: `update` writes exactly the positions it is
given, and `attend` equals a plain numpy softmax attention (causal mask, sliding window,
gpt-oss sinks, grouped-query heads), in one block of queries and in many."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from lazymoe_jax.kv import DenseKV
from lazymoe_jax.kv.dense import QUERY_BLOCK
from lazymoe_jax.model.spec import LatentAttention, Rope, cache_spec

KV_HEADS, GROUP, D = 2, 3, 8  # 6 query heads, 3 per KV head


def reference_attention(q, k, v, q_pos, window, scale, sinks=None):
  """q [T, H, D]; k, v [S, K, D] by position; query head h reads KV head h // (H / K)."""
  t, h, _ = q.shape
  s, kv_heads, _ = k.shape
  g = h // kv_heads
  out = np.zeros((t, h, v.shape[-1]), np.float64)
  for i in range(t):
    visible = np.arange(s) <= q_pos[i]
    if window is not None:
      visible &= np.arange(s) > q_pos[i] - window
    for head in range(h):
      kv = head // g
      logits = scale * (k[visible, kv].astype(np.float64) @ q[i, head].astype(np.float64))
      m = logits.max() if sinks is None else max(logits.max(), sinks[head])
      e = np.exp(logits - m)
      denom = e.sum() + (0.0 if sinks is None else np.exp(sinks[head] - m))
      out[i, head] = (e / denom) @ v[visible, kv]
  return out


def _rand(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


def test_update_at_an_offset_writes_exactly_those_positions():
  rng = np.random.default_rng(0)
  kv = DenseKV()
  cache = kv.init(cache_spec(KV_HEADS, D, num_layers=2), 16)
  assert len(cache) == 2
  assert cache[0]["k"].shape == (KV_HEADS, D, 16) and cache[0]["v"].shape == (KV_HEADS, 16, D)
  k0, v0 = _rand(rng, 16, KV_HEADS, D), _rand(rng, 16, KV_HEADS, D)
  full = kv.update(cache[0], jnp.asarray(k0), jnp.asarray(v0), 0)
  np.testing.assert_array_equal(np.asarray(full["k"]), k0.transpose(1, 2, 0))
  np.testing.assert_array_equal(np.asarray(full["v"]), v0.transpose(1, 0, 2))
  k1, v1 = _rand(rng, 3, KV_HEADS, D), _rand(rng, 3, KV_HEADS, D)
  part = kv.update(full, jnp.asarray(k1), jnp.asarray(v1), jnp.asarray(5))
  want_k, want_v = k0.copy(), v0.copy()
  want_k[5:8], want_v[5:8] = k1, v1
  np.testing.assert_array_equal(np.asarray(part["k"]), want_k.transpose(1, 2, 0))
  np.testing.assert_array_equal(np.asarray(part["v"]), want_v.transpose(1, 0, 2))
  assert kv.nbytes(cache) == 2 * 2 * KV_HEADS * D * 16 * 4


def _filled(rng, s, written):
  kv = DenseKV()
  k, v = _rand(rng, written, KV_HEADS, D), _rand(rng, written, KV_HEADS, D)
  cache = kv.init(cache_spec(KV_HEADS, D, num_heads=KV_HEADS * GROUP), s)[0]
  half = written // 2  # written in two chunks, the second at an offset
  cache = kv.update(cache, jnp.asarray(k[:half]), jnp.asarray(v[:half]), 0)
  cache = kv.update(cache, jnp.asarray(k[half:]), jnp.asarray(v[half:]), jnp.asarray(half))
  return kv, cache, k, v


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_attend_equals_numpy_softmax_attention(window, with_sinks):
  rng = np.random.default_rng(1)
  kv, cache, k, v = _filled(rng, 16, 12)
  q = _rand(rng, 5, KV_HEADS * GROUP, D)
  q_pos = np.array([7, 8, 9, 10, 11])  # decode-like: the last positions written
  sinks = _rand(rng, KV_HEADS * GROUP) if with_sinks else None
  got = kv.attend(cache, jnp.asarray(q), jnp.asarray(q_pos), window, 0.35,
                  sinks=None if sinks is None else jnp.asarray(sinks))
  want = reference_attention(q, k, v, q_pos, window, 0.35, sinks)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=1e-5)
  if window is not None:  # the window really cut: the full attention differs
    assert np.abs(want - reference_attention(q, k, v, q_pos, None, 0.35, sinks)).max() > 1e-2


def test_unwritten_positions_are_never_read():
  """A query at position p sees keys 0..p only: garbage past p changes nothing."""
  rng = np.random.default_rng(2)
  kv, cache, k, v = _filled(rng, 16, 10)
  q = _rand(rng, 1, KV_HEADS * GROUP, D)
  before = np.asarray(kv.attend(cache, jnp.asarray(q), jnp.asarray([9]), None, 0.35))
  junk = kv.update(cache, jnp.asarray(_rand(rng, 6, KV_HEADS, D) * 100),
                   jnp.asarray(_rand(rng, 6, KV_HEADS, D) * 100), jnp.asarray(10))
  after = np.asarray(kv.attend(junk, jnp.asarray(q), jnp.asarray([9]), None, 0.35))
  np.testing.assert_array_equal(after, before)
  np.testing.assert_allclose(before, reference_attention(q, k, v, [9], None, 0.35),
                             atol=2e-6, rtol=1e-5)


def test_a_long_prompt_attends_in_query_blocks():
  """2 x QUERY_BLOCK queries go through the blocked path; the result is still the reference."""
  rng = np.random.default_rng(3)
  t = 2 * QUERY_BLOCK
  kv, cache, k, v = _filled(rng, t, t)
  q = _rand(rng, t, KV_HEADS * GROUP, D)
  pos = np.arange(t)
  got = kv.attend(cache, jnp.asarray(q), jnp.asarray(pos), 100, 0.35)
  np.testing.assert_allclose(np.asarray(got), reference_attention(q, k, v, pos, 100, 0.35),
                             atol=2e-6, rtol=1e-5)


def test_dense_cache_refuses_a_latent_model():
  spec = cache_spec(KV_HEADS, D)
  latent = dataclasses.replace(spec, attention=LatentAttention(4, 0, 12, 8, 8, 12, Rope(1e4, 8),
                                                               0.1))
  with pytest.raises(ValueError, match="use LatentKV"):
    DenseKV().init(latent, 8)
