"""Native decode attention (kernels.attend_*, used by kv.attend for <= 16 tokens) against the
XLA path of the same cache, on every compiled ISA variant.

Bound: max |native - xla| <= 1e-5 max |xla| for every cache kind, TurboQuant included: the
kernel reads the same codes and computes the same function in float32 (codebook lookups, no
further quantisation), so only the order of float additions and the exp polynomial differ.
Skipped, with the reason, when the library is unavailable.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lazymoe_jax import kernels
from lazymoe_jax.kv import DenseKV, LatentKV, TurboQuantKV
from lazymoe_jax.model.spec import LatentAttention, Rope, cache_spec

_LIB, _WHY = kernels._library()  # pylint: disable=protected-access
pytestmark = pytest.mark.skipif(_LIB is None, reason=f"native kernels unavailable: {_WHY}")
ISAS = kernels.supported_isas() or ["portable"]
REL = 1e-5


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
  monkeypatch.setenv("LAZYMOE_KERNELS_ISA", request.param)
  monkeypatch.delenv("LAZYMOE_KERNELS", raising=False)
  return request.param


def _both(monkeypatch, fn, *args):
  """(native, xla) results of jit(fn)(*args), each traced under its LAZYMOE_KERNELS."""
  out = []
  for mode in ("native", "xla"):
    monkeypatch.setenv("LAZYMOE_KERNELS", mode)
    out.append(np.asarray(jax.jit(lambda *a: fn(*a))(*args)))  # a fresh trace per mode
  monkeypatch.delenv("LAZYMOE_KERNELS")
  return out


def _close(got, ref, rel=REL):
  assert got.shape == ref.shape
  assert np.all(np.isfinite(got))
  err = np.max(np.abs(got - ref))
  assert err <= rel * np.max(np.abs(ref)), (err, np.max(np.abs(ref)))


def _filled(kv, k_heads, d, capacity, n, rng, spec=None):
  """A cache of `capacity` positions with the first n written (the rest stay as init left
  them: zeros / zero codes), and keys as rows that the updates wrote."""
  spec = spec or cache_spec(k_heads, d)
  cache = kv.init(spec, capacity)[0]
  k = jnp.asarray(rng.standard_normal((n, k_heads, d)).astype(np.float32))
  v = jnp.asarray(rng.standard_normal((n, k_heads, d)).astype(np.float32) + 0.5)
  return jax.jit(kv.update)(cache, k, v, 0)


def _queries(rng, t, heads, d, p_last):
  q = jnp.asarray(rng.standard_normal((t, heads, d)).astype(np.float32))
  return q, jnp.arange(p_last - t + 1, p_last + 1, dtype=jnp.int32)


# (T, G, D, S, last position, window): head dims and capacities not multiples of the vector
# width, position 0, a window edge inside the tokens and every token past it
DENSE_CASES = [(1, 1, 64, 64, 0, None), (1, 4, 64, 100, 63, None), (2, 8, 37, 77, 40, None),
               (3, 4, 64, 130, 129, 16), (8, 1, 128, 200, 50, 47), (16, 4, 24, 301, 300, 8),
               (16, 8, 64, 64, 15, 4), (1, 8, 64, 4100, 4000, 128), (2, 4, 64, 90, 20, 21)]


@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("t,g,d,s,last,window", DENSE_CASES)
def test_dense_equals_xla(isa, monkeypatch, with_sinks, t, g, d, s, last, window):
  rng = np.random.default_rng(t * 1000 + g * 100 + d + s)
  k_heads = 2
  kv = DenseKV()
  cache = _filled(kv, k_heads, d, s, last + 1, rng)
  q, pos = _queries(rng, t, k_heads * g, d, last)
  sinks = jnp.asarray(rng.standard_normal(k_heads * g).astype(np.float32)) if with_sinks else None
  got, ref = _both(monkeypatch, lambda c, q, p: kv.attend(c, q, p, window, d ** -0.5, sinks=sinks),
                   cache, q, pos)
  _close(got, ref)


def test_dense_split_over_positions(isa, monkeypatch):
  """3 KV heads on 2 threads: positions are split in chunks whose partial softmax states are
  combined (the path MLA's single KV head always takes)."""
  rng = np.random.default_rng(3)
  kv = DenseKV()
  cache = _filled(kv, 3, 64, 3000, 2990, rng)
  q, pos = _queries(rng, 2, 12, 64, 2989)
  sinks = jnp.asarray(rng.standard_normal(12).astype(np.float32))
  got, ref = _both(monkeypatch, lambda c, q, p: kv.attend(c, q, p, 1000, 0.125, sinks=sinks),
                   cache, q, pos)
  _close(got, ref)


# (k_bits, v_bits, D): every bit width the class allows for the MSE variant (fractional ones
# are two channel groups), 4 bits the target
TQ_BITS = [(4.0, 4.0, 64), (4.0, 4.0, 128), (3.0, 3.0, 64), (2.0, 2.0, 64), (1.0, 1.0, 64),
           (2.5, 2.5, 64), (3.5, 3.5, 128), (4.0, 2.0, 64), (1.5, 3.5, 64)]


@pytest.mark.parametrize("k_bits,v_bits,d", TQ_BITS)
@pytest.mark.parametrize("t,g,last,window,with_sinks", [
    (1, 8, 200, None, True), (3, 4, 0 + 2, None, False), (16, 1, 90, 32, True),
    (8, 4, 300, 64, False)])
def test_turboquant_equals_xla(isa, monkeypatch, k_bits, v_bits, d, t, g, last, window, with_sinks):
  rng = np.random.default_rng(int(k_bits * 10 + v_bits) + t * 7 + g)
  kv = TurboQuantKV(k_bits, v_bits)
  cache = _filled(kv, 2, d, 333, last + 1, rng)
  q, pos = _queries(rng, t, 2 * g, d, last)
  sinks = jnp.asarray(rng.standard_normal(2 * g).astype(np.float32)) if with_sinks else None
  got, ref = _both(monkeypatch, lambda c, q, p: kv.attend(c, q, p, window, d ** -0.5, sinks=sinks),
                   cache, q, pos)
  _close(got, ref)


def test_turboquant_prod_variant_stays_on_xla(monkeypatch):
  """The prod variant (QJL keys) has no native form: native mode runs the very XLA program."""
  rng = np.random.default_rng(5)
  kv = TurboQuantKV(3.0, 3.0, k_variant="prod")
  cache = _filled(kv, 2, 64, 50, 40, rng)
  q, pos = _queries(rng, 1, 8, 64, 39)
  fn = lambda c, q, p: kv.attend(c, q, p, None, 0.125)
  got, ref = _both(monkeypatch, fn, cache, q, pos)
  np.testing.assert_array_equal(got, ref)
  assert "lazymoe_attn" not in str(jax.make_jaxpr(fn)(cache, q, pos))


@pytest.mark.parametrize("t,heads,last,window,with_sinks", [
    (1, 4, 0, None, False), (2, 16, 300, None, True), (16, 4, 999, 100, False), (3, 8, 70, 5, True)])
def test_latent_equals_xla(isa, monkeypatch, t, heads, last, window, with_sinks):
  rng = np.random.default_rng(t + heads + last)
  r, dr = 40, 12  # kv_lora_rank, qk_rope_head_dim: neither a multiple of the vector width
  spec = cache_spec(1, r + dr)
  spec = dataclasses.replace(spec, attention=LatentAttention(heads, 0, r, 8, dr, 12,
                                                             Rope(1e4, dr), 0.1))
  kv = LatentKV()
  cache = kv.init(spec, 1003)[0]
  lat = jnp.asarray(rng.standard_normal((last + 1, 1, r + dr)).astype(np.float32))
  cache = jax.jit(kv.update)(cache, lat, None, 0)
  q, pos = _queries(rng, t, heads, r + dr, last)
  sinks = jnp.asarray(rng.standard_normal(heads).astype(np.float32)) if with_sinks else None
  got, ref = _both(monkeypatch, lambda c, q, p: kv.attend(c, q, p, window, 0.2, sinks=sinks,
                                                          value_dim=r), cache, q, pos)
  assert got.shape == (t, heads, r)
  _close(got, ref)


@pytest.mark.parametrize("kv", [DenseKV(), TurboQuantKV(4.0, 4.0), TurboQuantKV(2.5, 3.0)],
                         ids=["dense", "tq4", "tq2.5/3"])
def test_under_vmap_over_sequences(isa, monkeypatch, kv):
  """A batch of caches, queries and positions in one call (issue 17's stacked caches), the
  sinks shared (not batched): equal to the XLA path under vmap and to each sequence alone."""
  rng = np.random.default_rng(11)
  b, k_heads, g, d, s = 3, 2, 4, 64, 150
  caches = [_filled(kv, k_heads, d, s, n, rng) for n in (150, 37, 1)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *caches)
  q = jnp.asarray(rng.standard_normal((b, 2, k_heads * g, d)).astype(np.float32))
  pos = jnp.asarray([[148, 149], [35, 36], [0, 0]], jnp.int32)
  sinks = jnp.asarray(rng.standard_normal(k_heads * g).astype(np.float32))
  fn = jax.vmap(lambda c, q, p: kv.attend(c, q, p, 64, 0.125, sinks=sinks))
  got, ref = _both(monkeypatch, fn, stacked, q, pos)
  _close(got, ref)
  monkeypatch.setenv("LAZYMOE_KERNELS", "native")
  assert "lazymoe_attn" in str(jax.make_jaxpr(fn)(stacked, q, pos))
  one = jax.jit(lambda c, q, p: kv.attend(c, q, p, 64, 0.125, sinks=sinks))
  for i in range(b):
    _close(got[i], np.asarray(one(caches[i], q[i], pos[i])))


def test_nested_vmap_and_a_shared_cache(isa, monkeypatch):
  """Two levels of vmap, and queries batched over one unbatched cache (broadcast, no copy)."""
  rng = np.random.default_rng(12)
  kv = DenseKV()
  cache = _filled(kv, 2, 32, 80, 80, rng)
  q = jnp.asarray(rng.standard_normal((2, 3, 1, 8, 32)).astype(np.float32))
  pos = jnp.asarray(rng.integers(0, 80, (2, 3, 1)), jnp.int32)
  fn = jax.vmap(jax.vmap(lambda q, p: kv.attend(cache, q, p, None, 0.3), in_axes=(0, 0)))
  got, ref = _both(monkeypatch, fn, q, pos)
  _close(got, ref)
  stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (2, 3) + a.shape), cache)
  fn2 = jax.vmap(jax.vmap(lambda c, q, p: kv.attend(c, q, p, None, 0.3)))
  got2, ref2 = _both(monkeypatch, fn2, stacked, q, pos)
  _close(got2, ref2)
  _close(got2, ref)


def test_path_selection(monkeypatch):
  """LAZYMOE_KERNELS=xla traces no native attention; more than ATTN_MAX_TOKENS tokens (a
  prompt) take the XLA path too."""
  rng = np.random.default_rng(13)
  kv = DenseKV()
  cache = _filled(kv, 2, 16, 64, 40, rng)
  for t, mode, native in ((1, "native", True), (16, "native", True), (17, "native", False),
                          (1, "xla", False)):
    monkeypatch.setenv("LAZYMOE_KERNELS", mode)
    q, pos = _queries(rng, t, 4, 16, 39)
    jaxpr = str(jax.make_jaxpr(lambda c, q, p: kv.attend(c, q, p, None, 0.25))(cache, q, pos))
    assert ("lazymoe_attn_dense" in jaxpr) == native, (t, mode)


def test_bad_window_is_refused(monkeypatch):
  monkeypatch.setenv("LAZYMOE_KERNELS", "native")
  kv = DenseKV()
  cache = kv.init(cache_spec(1, 8), 8)[0]
  with pytest.raises(ValueError, match="window"):
    kv.attend(cache, jnp.zeros((1, 1, 8)), jnp.asarray([3]), 0, 0.3)
