"""Native kernels (lazymoe_jax.kernels) against the XLA path, on every compiled ISA variant.

float32 / bfloat16 weights: within 1e-5 relative. Integer weights (int8 activations): within
kernels.error_bound of the exact product with the decoded weight for `linear`; `moe_ffn`
within the relative bounds MOE_REL below (the activation's rounding goes through the gated
activation and a second product). Skipped, with the reason, when the library is unavailable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lazymoe_jax import kernels
from lazymoe_jax.model import encodings, layers
from lazymoe_jax.model.spec import Activation

_LIB, _WHY = kernels._library()  # pylint: disable=protected-access
pytestmark = pytest.mark.skipif(_LIB is None, reason=f"native kernels unavailable: {_WHY}")
ISAS = kernels.supported_isas() or ["portable"]
FLOAT = ("float32", "bfloat16")
QUANT = ("int8", "int4-g32", "int4-g64", "int4-g128", "mxfp4")
# moe_ffn, max |native - xla| / max |xla|: int8 two-level activations (measured ~5e-5);
# int4 / mxfp4 one level (measured 1-2e-2; their weights' own error is ~0.1 relative RMS)
MOE_REL = {"float32": 1e-5, "bfloat16": 1e-5, "int8": 1e-3, "int4-g32": 5e-2,
           "int4-g64": 5e-2, "int4-g128": 5e-2, "mxfp4": 5e-2}


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
  monkeypatch.setenv("LAZYMOE_KERNELS_ISA", request.param)
  monkeypatch.delenv("LAZYMOE_KERNELS", raising=False)
  return request.param


def _encode(name: str, w: np.ndarray) -> dict:
  return {k: jnp.asarray(v) for k, v in encodings.get(name).encode(w).items()}


def _decode(name: str, arrays: dict) -> np.ndarray:
  return encodings.get(name).decode({k: np.asarray(v) for k, v in arrays.items()})


def _width(name: str, c: int) -> int:
  g = 128 if name == "int4-g128" else 64 if name == "int4-g64" else 32
  return c if c % g == 0 else (c // g + 1) * g


def _linear(name, arrays, x):
  return np.asarray(jax.jit(lambda a, x: kernels.linear(name, a, x))(arrays, x))


# (rows, cols, tokens): widths not a multiple of the vector width, odd row counts
LINEAR_CASES = [(37, 96, 1), (33, 160, 2), (5, 2880, 3), (64, 2880, 8), (17, 160, 16),
                (9, 4096, 1), (7, 4224, 1), (37, 100, 1), (5, 2047, 1)]
# one token: whole rows up to 2048 (float) / 4096 (int8) columns, with their scalar tails (100,
# 2047); row tiles beyond (4224; rowdot.cc, kSeqXBytes)


@pytest.mark.parametrize("name", FLOAT)
@pytest.mark.parametrize("o,c,t", LINEAR_CASES)
def test_linear_float_equals_xla(isa, name, o, c, t):
  rng = np.random.default_rng(o * c + t)
  arrays = _encode(name, rng.standard_normal((o, c), dtype=np.float32))
  x = jnp.asarray(rng.standard_normal((t, c), dtype=np.float32))
  ref = np.asarray(encodings.get(name).matmul(arrays, x))
  y = _linear(name, arrays, x)
  assert y.shape == (t, o)
  assert np.max(np.abs(y - ref)) <= 1e-5 * np.max(np.abs(ref))


@pytest.mark.parametrize("name", QUANT)
@pytest.mark.parametrize("o,c,t", LINEAR_CASES)
def test_linear_quantised_within_bound(isa, name, o, c, t):
  c = _width(name, c)
  rng = np.random.default_rng(o * c + t + 1)
  arrays = _encode(name, rng.standard_normal((o, c), dtype=np.float32))
  x = rng.standard_normal((t, c), dtype=np.float32)
  x[0, :7] *= 20.0  # an outlier row: the int8 step is per token
  wd = _decode(name, arrays)
  exact = x.astype(np.float64) @ wd.T.astype(np.float64)
  bound = kernels.error_bound(name, wd, x)
  y = _linear(name, arrays, jnp.asarray(x))
  assert np.all(np.abs(y - exact) <= bound)
  xla = np.asarray(encodings.get(name).matmul(arrays, jnp.asarray(x)))
  xla_bound = (kernels.error_bound(name, wd, x) if name == "int8" else
               kernels.error_bound("float32", wd, x))  # XLA's int8 path: two levels too
  assert np.all(np.abs(y - xla) <= bound + xla_bound)


@pytest.mark.parametrize("name", QUANT)
@pytest.mark.parametrize("t", [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 30, 64])
def test_linear_row_does_not_depend_on_the_tokens_beside_it(isa, name, t):
  """Each token's product equals, bit for bit, the same token alone, on both sides of the
  many-token panels' thresholds (int4 / mxfp4 from 4 tokens, rowdot.cc kPanelTokens, and 4-row
  panels on avx2-vnni from 32, kPanel4Tokens; int8 on avx2-vnni from 8, kI8PanelTokens), with
  every remainder of their token steps (4; int8: 6, and blocks of 24), an odd row count (a
  last single row), widths of whole chunks of groups / blocks and a partial one, and the last
  rows of the array (the tails that copy)."""
  rng = np.random.default_rng(t + 3)
  c = {"int4-g64": 64 * 33, "int4-g128": 128 * 33}.get(name, 2880)  # whole chunks + a tail
  arrays = _encode(name, rng.standard_normal((37, c), dtype=np.float32))
  x = rng.standard_normal((t, c), dtype=np.float32)
  x[t // 2, :5] *= 30.0
  y = _linear(name, arrays, jnp.asarray(x))
  for r in range(t):
    np.testing.assert_array_equal(y[r], _linear(name, arrays, jnp.asarray(x[r:r + 1]))[0],
                                  err_msg=f"token {r} of {t}")


@pytest.mark.parametrize("name", FLOAT)
@pytest.mark.parametrize("t", [4, 5, 6, 7, 13, 64, 70])
def test_float_row_does_not_depend_on_the_tokens_beside_it(isa, name, t):
  """float32 / bf16 from kPanelTokens tokens on (avx2-vnni: rowdot.cc's float panels, blocks of
  8 rows, 64-column chunks, 64-token blocks, 6-token register tiles): each token equals, bit for
  bit, the same token in a call of two (the float tiles). A token alone sums in another order
  (rowdot.h, one_token_sums_apart). 1005 columns: 15 whole chunks, a partial one and a scalar
  tail of 5; 37 rows: a last block of 5 (an odd pair); 70 tokens: a second token block."""
  rng = np.random.default_rng(t + 11)
  arrays = _encode(name, rng.standard_normal((37, 1005), dtype=np.float32))
  x = rng.standard_normal((t, 1005), dtype=np.float32)
  x[t // 2, :5] *= 30.0
  y = _linear(name, arrays, jnp.asarray(x))
  for r in range(t):
    pair = _linear(name, arrays, jnp.asarray(np.stack([x[r], x[r]])))
    np.testing.assert_array_equal(y[r], pair[0], err_msg=f"token {r} of {t}")


def _experts(name, h, i, k, rng, bias):
  exs = []
  for _ in range(k):
    ex = {"w_gate_up": _encode(name, rng.standard_normal((2 * i, h), dtype=np.float32) * 0.2),
          "w_down": _encode(name, rng.standard_normal((h, i), dtype=np.float32) * 0.2)}
    if bias:
      ex["b_gate_up"] = {"": jnp.asarray(rng.standard_normal(2 * i, dtype=np.float32))}
      ex["b_down"] = {"": jnp.asarray(rng.standard_normal(h, dtype=np.float32))}
    exs.append(ex)
  return tuple(exs)


def _moe_xla(name, exs, x, w, act):
  """The XLA path, by the encoding's own products (Encoding.matmul never dispatches native)."""
  enc, ea = encodings.get(name), Activation(*act)
  out = 0
  for j, ex in enumerate(exs):
    gu = enc.matmul(ex["w_gate_up"], x)
    if "b_gate_up" in ex:
      gu = gu + ex["b_gate_up"][""]
    i = gu.shape[1] // 2
    y = enc.matmul(ex["w_down"], layers.activate(ea, gu[:, :i], gu[:, i:]))
    if "b_down" in ex:
      y = y + ex["b_down"][""]
    out = out + w[:, j:j + 1] * y
  return out


def _moe(name, exs, x, w, act):
  return jax.jit(lambda e, x, w: kernels.moe_ffn(name, e, x, w, act))(exs, x, w)


ACTS = {"silu": ("silu", 1.702, 7.0), "clamped_swiglu": ("clamped_swiglu", 1.702, 7.0)}


@pytest.mark.parametrize("name", FLOAT + QUANT)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("t", [1, 2, 3, 8, 16])
def test_moe_ffn_equals_xla(isa, name, act, t):
  rng = np.random.default_rng(t)
  # expert width 96 splits unevenly over two threads (64 + 32); g64/g128 need 128 (for g128
  # one part gets the whole width, the other none)
  h, i = (160, 96) if name not in ("int4-g64", "int4-g128") else (256, 128)
  exs = _experts(name, h, i, 3, rng, bias=act == "clamped_swiglu")
  x = jnp.asarray(rng.standard_normal((t, h), dtype=np.float32))
  w = jnp.asarray(rng.random((t, 3), dtype=np.float32))
  y = np.asarray(_moe(name, exs, x, w, ACTS[act]))
  ref = np.asarray(_moe_xla(name, exs, x, w, ACTS[act]))
  assert y.shape == (t, h)
  assert np.max(np.abs(y - ref)) <= MOE_REL[name] * np.max(np.abs(ref))


@pytest.mark.skipif("avx2-vnni" not in ISAS, reason="this CPU has no AVX512-VL + VNNI")
@pytest.mark.parametrize("name", ["float32", "bfloat16", "int8", "int4-g32", "int4-g64",
                                  "int4-g128", "mxfp4"])
@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 64])
def test_avx2_vnni_is_bit_identical_to_avx2(monkeypatch, name, t):
  """avx2-vnni changes only the integer dot of the integer loops (vpdpbusd for vpmaddubsw +
  vpmaddwd in int4 / mxfp4; vpdpwssd, over 4 accumulators, for vpmaddwd + vpaddd in int8),
  which gives the same int32 sums, and runs float weights from 4 tokens on in zmm panels whose
  lanes sum as the AVX2 tiles do, and int8 weights in zmm panels of exact int32 / int64 sums:
  outputs must be equal bit for bit. int8 at 2100 columns crosses the 2048-column flush (the
  panels' fold) and ends in a scalar tail (2100 = 131 x 16 + 4); 5 tokens and
  an odd row count (37) reach its tiles of two (row, token) pairs (2 accumulators). Float
  widths 389 / 203 end in scalar tails. 37, 38 and 39 rows end in a last call of 1, 2 and 3 rows
  (work units are whole multiples of 4), at the array's end: the one-token row pairs' and the
  4-row panels' remainders and the copies of the last rows' codes."""
  rng = np.random.default_rng(t + 7)
  h, i = {"int8": (2100, 200), "int4-g32": (288, 160), "mxfp4": (288, 160), "float32": (389, 203),
          "bfloat16": (389, 203)}.get(name, (384, 256))
  exs = _experts(name, h, i, 2, rng, bias=name == "mxfp4")
  odd = [_encode(name, rng.standard_normal((n, h), dtype=np.float32)) for n in (37, 38, 39)]
  x = jnp.asarray(rng.standard_normal((t, h), dtype=np.float32))
  w = jnp.asarray(rng.random((t, 2), dtype=np.float32))
  act = ACTS["clamped_swiglu" if name == "mxfp4" else "silu"]
  monkeypatch.delenv("LAZYMOE_KERNELS", raising=False)  # the native path, whatever CI sets
  out = {}
  for variant in ("avx2", "avx2-vnni"):
    monkeypatch.setenv("LAZYMOE_KERNELS_ISA", variant)
    out[variant] = (np.asarray(_moe(name, exs, x, w, act)),
                    _linear(name, exs[0]["w_down"], x[:, :i] * 3.0),
                    *(_linear(name, o, x) for o in odd))
  for a, b in zip(out["avx2"], out["avx2-vnni"]):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["bfloat16", "int8", "int4-g32", "mxfp4"])
def test_moe_ffn_many_tokens(isa, name):
  """The kernel itself at 64 tokens (the engine sends groups of up to
  kernels.NATIVE_MAX_TOKENS rows to it)."""
  rng = np.random.default_rng(64)
  exs = _experts(name, 160, 96, 2, rng, bias=False)
  x = jnp.asarray(rng.standard_normal((64, 160), dtype=np.float32))
  w = jnp.asarray(rng.random((64, 2), dtype=np.float32))
  y, ref = (np.asarray(f(name, exs, x, w, ACTS["silu"])) for f in (_moe, _moe_xla))
  assert np.max(np.abs(y - ref)) <= MOE_REL[name] * np.max(np.abs(ref))


@pytest.mark.parametrize("name", ["bfloat16", "int8", "int4-g32", "mxfp4"])
def test_buffer_refilled_in_place_is_read_afresh(isa, name):
  """The pool refills a slot's buffers in place (donation): the kernel must read the new
  contents on the next call, through the same jitted program."""
  rng = np.random.default_rng(5)
  a, b = (_experts(name, 160, 96, 1, rng, bias=False) for _ in range(2))
  x = jnp.asarray(rng.standard_normal((2, 160), dtype=np.float32))
  w = jnp.ones((2, 1), jnp.float32)
  fn = jax.jit(lambda e, x, w: kernels.moe_ffn(name, e, x, w))
  slot = jax.tree.map(lambda v: v.copy(), a)
  y_a = np.asarray(fn(slot, x, w))
  ptrs = [v.unsafe_buffer_pointer() for v in jax.tree.leaves(slot)]
  refill = jax.jit(lambda old, new: jax.tree.map(lambda o, n: o.at[...].set(n), old, new),
                   donate_argnums=0)
  slot = refill(slot, b)
  same_buffers = ptrs == [v.unsafe_buffer_pointer() for v in jax.tree.leaves(slot)]
  y_b = np.asarray(fn(slot, x, w))
  ref_b = np.asarray(_moe_xla(name, b, x, w, ACTS["silu"]))
  assert not np.allclose(y_a, y_b)
  assert np.max(np.abs(y_b - ref_b)) <= MOE_REL[name] * np.max(np.abs(ref_b))
  assert same_buffers  # the refill really reused the buffers the kernel read before
  # dense products too: a weight refilled in place
  wt = _encode(name, rng.standard_normal((33, 160), dtype=np.float32))
  wt2 = _encode(name, rng.standard_normal((33, 160), dtype=np.float32))
  lin = jax.jit(lambda a, x: kernels.linear(name, a, x))
  y1 = np.asarray(lin(wt, x))
  wt = refill(wt, wt2)
  y2 = np.asarray(lin(wt, x))
  assert not np.allclose(y1, y2)
  np.testing.assert_allclose(y2, np.asarray(lin(jax.tree.map(jnp.copy, wt2), x)), rtol=0,
                             atol=0)


def test_bad_shapes_give_a_clear_error(isa):
  rng = np.random.default_rng(0)
  arrays = _encode("int8", rng.standard_normal((8, 64), dtype=np.float32))
  bad = {"": arrays[""], "scale": arrays["scale"][:4]}
  with pytest.raises(Exception, match="linear weight scale: got dtype .* shape \\[4\\]"):
    np.asarray(kernels.linear("int8", bad, jnp.ones((1, 64), jnp.float32)))
  exs = _experts("float32", 64, 32, 2, rng, bias=False)
  with pytest.raises(Exception, match="weights must be \\[T, k\\]"):
    np.asarray(kernels.moe_ffn("float32", exs, jnp.ones((1, 64)), jnp.ones((1, 3))))


def test_mode_selection(monkeypatch):
  monkeypatch.delenv("LAZYMOE_KERNELS", raising=False)
  assert kernels.available() and kernels.mode() == "native"
  monkeypatch.setenv("LAZYMOE_KERNELS", "xla")
  assert not kernels.available() and kernels.mode() == "xla"
  rng = np.random.default_rng(1)
  arrays = _encode("int8", rng.standard_normal((8, 64), dtype=np.float32))
  x = jnp.asarray(rng.standard_normal((2, 64), dtype=np.float32))
  np.testing.assert_array_equal(np.asarray(kernels.linear("int8", arrays, x)),
                                np.asarray(encodings.get("int8").matmul(arrays, x)))
  monkeypatch.setenv("LAZYMOE_KERNELS", "fast")
  with pytest.raises(ValueError, match="LAZYMOE_KERNELS"):
    kernels.mode()


def test_unsupported_isa_is_refused(monkeypatch):
  missing = [n for n in kernels.ISAS if n not in kernels.supported_isas()]
  if not missing:
    pytest.skip("this CPU runs every compiled variant")
  monkeypatch.setenv("LAZYMOE_KERNELS_ISA", missing[0])
  with pytest.raises(RuntimeError, match="cannot run"):
    kernels.isa()


def test_missing_library_falls_back_or_fails_clearly(monkeypatch):
  monkeypatch.setattr(kernels, "_library", lambda: (None, "native kernel library not built"))
  kernels._warn_once.cache_clear()  # pylint: disable=protected-access
  monkeypatch.delenv("LAZYMOE_KERNELS", raising=False)
  with pytest.warns(RuntimeWarning, match="using the XLA path"):
    assert not kernels.available()
  assert kernels.mode() == "xla"
  monkeypatch.setenv("LAZYMOE_KERNELS", "native")
  with pytest.raises(RuntimeError, match="LAZYMOE_KERNELS=native but the native kernel library"):
    kernels.mode()


def _arena(exs):
  """The experts laid out as the pool's arena (store/pool.py slot_arena / slot_offsets), one
  per slot: (uint8 arena array, layout for moe_ffn_pooled)."""
  from lazymoe_jax.store.pool import slot_offsets  # pylint: disable=import-outside-toplevel
  keys = (("w_gate_up", ""), ("w_gate_up", "scale"), ("w_down", ""), ("w_down", "scale"),
          ("b_gate_up", ""), ("b_down", ""))
  arrays = {f"{t}.{s}": np.asarray(exs[0][t][s]) for t, s in keys
            if t in exs[0] and s in exs[0][t]}
  per_slot, offsets = slot_offsets({n: a.shape for n, a in arrays.items()},
                                   {n: a.dtype for n, a in arrays.items()})
  arena = np.zeros(per_slot * len(exs), np.uint8)
  for j, ex in enumerate(exs):
    for n, off in offsets.items():
      t, s = n.split(".")
      raw = np.asarray(ex[t][s]).reshape(-1).view(np.uint8)
      arena[j * per_slot + off:j * per_slot + off + raw.size] = raw
  return jnp.asarray(arena), (per_slot, tuple(offsets.get(f"{t}.{s}", -1) for t, s in keys))


@pytest.mark.parametrize("name", FLOAT + QUANT)
@pytest.mark.parametrize("t", [1, 3])
def test_moe_ffn_pooled_equals_moe_ffn(isa, name, t):
  """Experts found in the arena by slot index (inside the program) give exactly what the same
  experts passed as operands give: the same job, only located differently."""
  rng = np.random.default_rng(7 + t)
  h, i = (160, 96) if name not in ("int4-g64", "int4-g128") else (256, 128)
  bias = name in ("bfloat16", "mxfp4")
  exs = _experts(name, h, i, 4, rng, bias=bias)
  arena, (per_slot, offsets) = _arena(exs)
  act = ACTS["clamped_swiglu" if bias else "silu"]
  x = jnp.asarray(rng.standard_normal((t, h), dtype=np.float32))
  w = jnp.asarray(rng.random((t, 2), dtype=np.float32))
  pick = jnp.asarray([3, 1], jnp.int32)
  fn = jax.jit(lambda a, s, x, w: kernels.moe_ffn_pooled(name, a, (i, per_slot, offsets), s, x,
                                                         w, act))
  y = np.asarray(fn(arena, pick, x, w))
  np.testing.assert_array_equal(y, np.asarray(_moe(name, (exs[3], exs[1]), x, w, act)))
  with pytest.raises(Exception, match="slot 4 of expert 1 is outside the pool's 4"):
    np.asarray(fn(arena, jnp.asarray([0, 4], jnp.int32), x, w))
  with pytest.raises(Exception, match="does not fit a slot"):
    np.asarray(kernels.moe_ffn_pooled(name, arena, (i, per_slot // 2, offsets), pick, x, w, act))
  moved = (offsets[0] + 1,) + tuple(offsets[1:])  # not 4-byte aligned
  with pytest.raises(Exception, match="not 4-byte aligned"):
    np.asarray(kernels.moe_ffn_pooled(name, arena, (i, per_slot, moved), pick, x, w, act))
  with pytest.raises(Exception, match="slots must name at least one expert"):
    np.asarray(kernels.moe_ffn_pooled(name, arena, (i, per_slot, offsets),
                                      jnp.zeros((0,), jnp.int32), x, w[:, :0], act))


@pytest.mark.parametrize("name", FLOAT + QUANT)
def test_moe_ffn_pooled_with_slots_per_token(isa, name):
  """slots [T, k]: each token through its own experts (-1: none), each expert run once over
  the tokens that pick it. Every row equals, bit for bit, that token through moe_ffn among
  others (the token twice): a token's result does not depend on which tokens share the call,
  also for an expert only one token picks (run over two rows where a one-token product sums
  in another order: kernels/csrc/rowdot.h)."""
  rng = np.random.default_rng(11)
  h, i = (160, 96) if name not in ("int4-g64", "int4-g128") else (256, 128)
  bias = name in ("bfloat16", "mxfp4")
  exs = _experts(name, h, i, 5, rng, bias=bias)
  arena, (per_slot, offsets) = _arena(exs)
  act = ACTS["clamped_swiglu" if bias else "silu"]
  # expert 4 is picked by token 4 alone
  picks = np.array([[3, 1], [0, 3], [-1, -1], [2, 1], [4, -1], [3, 0], [2, 0]], np.int32)
  t = len(picks)
  x = jnp.asarray(rng.standard_normal((t, h), dtype=np.float32))
  w = jnp.asarray(rng.random((t, 2), dtype=np.float32))
  fn = jax.jit(lambda s, x, w: kernels.moe_ffn_pooled(name, arena, (i, per_slot, offsets), s, x,
                                                      w, act))
  y = np.asarray(fn(jnp.asarray(picks), x, w))
  for r, row in enumerate(picks):
    used = np.array([j for j in range(2) if row[j] >= 0])
    if not len(used):
      np.testing.assert_array_equal(y[r], 0.0)
      continue
    twice = np.array([r, r])
    want = np.asarray(_moe(name, tuple(exs[row[j]] for j in used), x[twice],
                           w[twice][:, used], act))[0]
    np.testing.assert_array_equal(y[r], want, err_msg=f"token {r}")
  np.testing.assert_array_equal(np.asarray(fn(jnp.full((t, 2), -1, jnp.int32), x, w)), 0.0)
  with pytest.raises(Exception, match="slot 5 of token 1, pick 0 is outside the pool's 5"):
    np.asarray(fn(jnp.asarray(np.where(picks == 0, 5, picks)), x, w))
  with pytest.raises(Exception, match="slot -2 of token 0, pick 1"):
    np.asarray(fn(jnp.asarray(np.where(picks == 1, -2, picks)), x, w))
  with pytest.raises(Exception, match=r"slots must be \[k\] or \[T, k\] with T = 7"):
    np.asarray(fn(jnp.asarray(picks[:3]), x, w))
