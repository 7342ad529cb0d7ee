"""Expert weight encodings: how a [rows, cols] weight is stored, and its fast products.

Each encoding turns one float weight into one or more arrays (the layout on disk is the layout
the kernel reads, so a slot is filled straight from disk) and computes x @ W^T from them:

  float32 / bfloat16 / float16  {"": W}                       x @ W^T, f32 accumulation
  int8                          {"": q int8 [rows, cols],     per output row: W ~ scale * q
                                 "scale": f32 [rows]}
  int4-gG (G = 32, 64, 128)     {"": packed int8 [rows, G/2, cols/G],   per (row, group of G
                                 "scale": f16 [rows, cols/G]}            columns): W ~ s * q,
                                                                          q in [-7, 7]
  mxfp4                         {"": blocks uint8 [rows, cols/32, 16],   per (row, block of 32
                                 "scale": uint8 [rows, cols/32]}          columns): W = 2^(s-127)
                                                                          * e2m1 value
  mxfp4 is gpt-oss' published layout, kept byte for byte: block byte j holds column 2j in its
  low nibble and column 2j+1 in its high nibble; a nibble is an e2m1 code (bit 3 the sign,
  magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6); the scale byte is an e8m0 exponent biased by 127.
int4 packing: byte[o, j, g] = 16 * q[o, g*G + G/2 + j] + (q[o, g*G + j] + 8), i.e. the high
nibble (signed) holds the second half of the group and the low nibble (biased by 8) the first
half. The group index is the minor axis, so one reduction over the last two axes does the whole
product, which is the form XLA-CPU runs fast; nibbles are split with float ops (convert, scale,
floor) since its integer shifts fall back to slow loops (BUILD_NOTES "Foundation").
Legend: T = tokens, O = rows (outputs), C = cols (inputs), G = group, N = number of groups.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
INT4_GROUPS = (32, 64, 128)
MXFP4_BLOCK = 32
DEQUANT_BLOCK_BYTES = 16 << 20  # float32 rows decoded at a time, int8/int4 many-token products
INT8_DEQUANT_TOKENS = 16  # above this many tokens int8 weights are decoded to float32 products
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)  # magnitudes by code & 7


class Encoding:
  """A weight encoding: its arrays, size, encode / decode, error bound and fast product.

  Subclasses are frozen dataclasses (hashable: jitted programs take an encoding as a static
  argument, usually inside a `Weight`) and are registered by name with `register`."""

  name: str

  def arrays(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Suffix -> (shape, dtype name) of the arrays one [rows, cols] weight becomes."""
    raise NotImplementedError

  def bytes_per_weight(self) -> float:
    raise NotImplementedError

  def encode(self, w: np.ndarray) -> dict[str, np.ndarray]:
    """float weight [rows, cols] -> its arrays (numpy, offline)."""
    raise NotImplementedError

  def decode(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The float32 weight the encoded arrays stand for (the kernels' exact reference)."""
    raise NotImplementedError

  def error_bound(self, w: np.ndarray) -> np.ndarray:
    """Elementwise bound on |w - decode(encode(w))|."""
    raise NotImplementedError

  def matmul(self, arrays: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """x [T, C] float32 -> x @ W^T [T, O] float32, in the encoding's fast form (inside jit)."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Float(Encoding):
  """float32 / bfloat16 / float16: {"": W [O, C]}."""

  name: str = "float32"

  def arrays(self, rows, cols):
    return {"": ((rows, cols), self.name)}

  def bytes_per_weight(self):
    return 4.0 if self.name == "float32" else 2.0

  def encode(self, w):
    from lazymoe_jax.store.format import numpy_dtype  # pylint: disable=import-outside-toplevel
    return {"": np.asarray(w, np.float32).astype(numpy_dtype(self.name))}

  def decode(self, arrays):
    return np.asarray(arrays[""], np.float32)

  def error_bound(self, w):
    eps, tiny = {"float32": (0.0, 0.0), "bfloat16": (2.0 ** -8, 0.0),
                 "float16": (2.0 ** -11, 2.0 ** -25)}[self.name]  # f16: subnormals below 6e-5
    return np.abs(np.asarray(w, np.float32)) * eps + tiny

  def matmul(self, arrays, x):
    # Activations stay float32 (exact against the reference): 16-bit weights are upcast for
    # one or two tokens, by multiply-sum over the long axis (fused, no temporary).
    a = arrays[""]
    t = x.shape[0]
    if self.name == "float32":
      return _dot(a, _pad_rows(x.astype(F32)))[:, :t].T
    if t <= 2:
      return jnp.stack([jnp.sum(a.astype(F32) * x[i][None, :], axis=-1) for i in range(t)])
    # float16: the weight upcast (its narrow range would overflow or flush the split parts
    # of x), with HIGHEST precision said outright: a dot of an upcast 16-bit operand is one
    # XLA may run in 16 bits (BUILD_NOTES "session 12, the demo model on another CPU").
    if self.name == "float16":
      return _dot(a.astype(F32), x.astype(F32), HIGHEST).T
    # bfloat16, more than two tokens: x split into three bf16 parts (x = x0 + x1 + x2 to
    # float32 precision), all multiplied in bf16 with float32 accumulation. Each product is
    # exact in float32 whatever kernel XLA picks; from 0.8x the upcast product's speed at
    # small shapes to 2.4x at Mixtral's (BUILD_NOTES "session 4", "session 12").
    parts, rest = [], x.astype(F32)
    for _ in range(3):
      parts.append(rest.astype(a.dtype))
      rest = rest - parts[-1].astype(F32)
    y = _dot(a, jnp.concatenate(parts, axis=0))  # [O, 3T]
    return (y[:, :t] + y[:, t:2 * t] + y[:, 2 * t:]).T


@dataclasses.dataclass(frozen=True)
class Int8(Encoding):
  """{"": q int8 [O, C], "scale": f32 [O]}: per output row, W ~ scale * q."""

  name = "int8"

  def arrays(self, rows, cols):
    return {"": ((rows, cols), "int8"), "scale": ((rows,), "float32")}

  def bytes_per_weight(self):
    return 1.0

  def encode(self, w):
    w = np.asarray(w, np.float32)
    scale = np.abs(w).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return {"": np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8),
            "scale": scale}

  def decode(self, arrays):
    return arrays[""].astype(np.float32) * np.asarray(arrays["scale"], np.float32)[:, None]

  def error_bound(self, w):
    w = np.asarray(w, np.float32)
    return np.broadcast_to((np.abs(w).max(axis=1) / 127.0 * 0.5)[:, None], w.shape) * (1 + 1e-6)

  def matmul(self, arrays, x):
    a = arrays[""]
    if x.shape[0] > INT8_DEQUANT_TOKENS:  # exact f32 products beat the int8 dot here
      return _by_row_blocks(lambda r, n: _rows(a, r, n).astype(F32), a.shape[0], a.shape[1],
                            x.astype(F32)) * arrays["scale"][None, :]
    return _int8_matmul(a, arrays["scale"], x)


@dataclasses.dataclass(frozen=True)
class Int4(Encoding):
  """int4-gG: {"": packed int8 [O, G/2, C/G], "scale": f16 [O, C/G]}, per (row, group of G
  columns) W ~ s * q, q in [-7, 7]; packing as the module docstring says."""

  group: int = 32

  @property
  def name(self) -> str:
    return f"int4-g{self.group}"

  def arrays(self, rows, cols):
    g = self.group
    if cols % g:
      fits = [x for x in INT4_GROUPS if cols % x == 0]
      raise ValueError(f"int4 group {g} does not divide the input width {cols}; " + (
          f"choose a group in {fits}." if fits else "no int4 group fits: use int8."))
    return {"": ((rows, g // 2, cols // g), "int8"), "scale": ((rows, cols // g), "float16")}

  def bytes_per_weight(self):
    return 0.5 + 2.0 / self.group

  def encode(self, w):
    w = np.asarray(w, np.float32)
    rows, cols = w.shape
    g = self.group
    wg = w.reshape(rows, cols // g, g)
    scale = (np.abs(wg).max(axis=2) / 7.0).astype(np.float16)
    s = scale.astype(np.float32)
    s = np.where(s > 0, s, 1.0)
    q = np.clip(np.round(wg / s[..., None]), -7, 7).astype(np.int16)  # [O, N, G]
    packed = 16 * q[..., g // 2:] + (q[..., :g // 2] + 8)  # [O, N, G/2] in [-128, 127]
    return {"": np.ascontiguousarray(packed.transpose(0, 2, 1)).astype(np.int8),
            "scale": scale}

  def decode(self, arrays):
    a = arrays[""]
    b = a.astype(np.int16)  # [O, G/2, N]
    hi = np.floor_divide(b, 16)
    lo = b - 16 * hi - 8
    q = np.concatenate([lo, hi], axis=1)  # [O, G, N]
    w = q.astype(np.float32) * np.asarray(arrays["scale"], np.float32)[:, None, :]
    return np.ascontiguousarray(w.transpose(0, 2, 1)).reshape(a.shape[0], -1)

  def error_bound(self, w):
    w = np.asarray(w, np.float32)
    rows = w.shape[0]
    g = self.group
    step = np.abs(w.reshape(rows, -1, g)).max(axis=2) / 7.0
    # half a step, plus the f16 rounding of the scale times the largest level (7)
    bound = step * 0.5 + 7 * step * 2.0 ** -11
    return np.repeat(bound, g, axis=1) * (1 + 1e-5)

  def matmul(self, arrays, x):
    return _int4_matmul(arrays[""], arrays["scale"], x, self.group)


@dataclasses.dataclass(frozen=True)
class Mxfp4(Encoding):
  """gpt-oss' published MXFP4 layout, byte for byte: {"": blocks uint8 [O, C/32, 16], "scale":
  uint8 [O, C/32]}, W = 2^(s-127) * e2m1 value per (row, block of 32 columns)."""

  name = "mxfp4"

  def arrays(self, rows, cols):
    if cols % MXFP4_BLOCK:
      raise ValueError(f"mxfp4 blocks of {MXFP4_BLOCK} do not divide the input width {cols}.")
    n = cols // MXFP4_BLOCK
    return {"": ((rows, n, MXFP4_BLOCK // 2), "uint8"), "scale": ((rows, n), "uint8")}

  def bytes_per_weight(self):
    return 0.5 + 1.0 / MXFP4_BLOCK

  def encode(self, w):
    return _mxfp4_encode(np.asarray(w, np.float32))

  def decode(self, arrays):
    a = arrays[""]
    b = a.astype(np.int32)  # [O, N, 16]
    lut = np.concatenate([E2M1, -E2M1])
    w = np.stack([lut[b & 15], lut[b >> 4]], axis=-1)  # [O, N, 16, 2]: columns 2j, 2j+1
    w = np.ldexp(w, np.asarray(arrays["scale"], np.int32)[:, :, None, None] - 127)
    return w.reshape(a.shape[0], -1).astype(np.float32)

  def error_bound(self, w):  # half the widest gap (4 to 6) at the block's scale
    w = np.asarray(w, np.float32)
    scale = np.ldexp(1.0, _mxfp4_exponents(w.reshape(w.shape[0], -1, MXFP4_BLOCK)))
    return np.repeat(scale, MXFP4_BLOCK, axis=1).astype(np.float32)

  def matmul(self, arrays, x):
    return _mxfp4_matmul(arrays[""], arrays["scale"], x)


_REGISTRY: dict[str, Encoding] = {}


def register(encoding: Encoding) -> Encoding:
  """Makes `encoding` known by its name (to `get`, the store and the converter)."""
  if encoding.name in _REGISTRY:
    raise ValueError(f"an encoding named {encoding.name!r} is registered already.")
  _REGISTRY[encoding.name] = encoding
  return encoding


for _enc in (*(Float(n) for n in FLOAT_DTYPES), Int8(), *(Int4(g) for g in INT4_GROUPS),
             Mxfp4()):
  register(_enc)


def names() -> list[str]:
  return list(_REGISTRY)


def get(name: str) -> Encoding:
  """The registered encoding called `name`; an unknown name is an error listing the known."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown weight encoding {name!r}; registered: {names()}.")
  return _REGISTRY[name]


@jax.tree_util.register_pytree_node_class
class Weight:
  """A weight as the model math uses it: its encoding (static: part of the jitted program)
  and its arrays by suffix (the pytree's leaves). `w.matmul(x)` is x @ W^T in float32, by the
  native kernels where they serve (LAZYMOE_KERNELS), else by `encoding.matmul` (pure XLA)."""

  def __init__(self, encoding: Encoding, arrays: dict[str, jax.Array]):
    self.encoding = encoding
    self.arrays = arrays

  @classmethod
  def of(cls, w) -> "Weight":
    """A Weight as it is; a bare float array as a Weight of its own float encoding."""
    return w if isinstance(w, Weight) else cls(get(w.dtype.name), {"": w})

  def matmul(self, x: jax.Array) -> jax.Array:
    """x @ W^T: the native kernel where one serves this encoding and row count (kernels/),
    else the encoding's XLA form."""
    from lazymoe_jax import kernels  # pylint: disable=import-outside-toplevel
    if kernels.native_for(self.encoding.name, x.shape[0]):
      return kernels.linear(self.encoding.name, self.arrays, x)
    return self.encoding.matmul(self.arrays, x)

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in self.arrays.values())

  def tree_flatten(self):
    return (self.arrays,), self.encoding

  @classmethod
  def tree_unflatten(cls, encoding, children):
    return cls(encoding, children[0])

  def __repr__(self) -> str:
    return f"Weight({self.encoding.name}, {dict((k, a.shape) for k, a in self.arrays.items())})"


def _rows(a: jax.Array, start: jax.Array, n: int) -> jax.Array:
  """a[start:start + n] along the first axis (start traced: one block of a loop)."""
  return jax.lax.dynamic_slice_in_dim(a, start, n, axis=0)


def _by_row_blocks(dequant, rows: int, cols: int, x: jax.Array) -> jax.Array:
  """x [T, cols] @ W^T -> [T, rows] float32, W decoded to float32 a block of rows at a time by
  dequant(start, n) -> [n, cols] (x in the column order the decoded block comes in).

  Decoding the whole weight at once makes a float32 temporary 4x (int8) or 8x (int4) its size:
  above glibc's 32 MB mmap ceiling it is page-faulted in afresh every call. A loop over blocks
  of ~DEQUANT_BLOCK_BYTES reuses one warm buffer (figures: BUILD_NOTES "Measurements moved out of the code"). Blocks are equal; the last one
  starts at rows - n, recomputing a few rows (same values). A weight within one block is done
  whole.
  """
  n = min(rows, max(8, DEQUANT_BLOCK_BYTES // (4 * cols)))
  nb = -(-rows // n)
  n = -(-rows // nb)  # equal blocks, as few as that size allows
  if nb == 1:
    return _dot(dequant(0, rows), x).T

  def body(i, out):
    start = jnp.minimum(i * n, rows - n)
    return jax.lax.dynamic_update_slice_in_dim(out, _dot(dequant(start, n), x), start, axis=0)

  return jax.lax.fori_loop(0, nb, body, jnp.zeros((rows, x.shape[0]), F32)).T


def _dot(w: jax.Array, x: jax.Array, precision=None) -> jax.Array:
  """w [O, C] . x [M, C] -> [O, M], contracting both minor axes (the weight as the left operand).

  Handing x over transposed ([C, M]) makes XLA pick a slow loop, 30x slower (BUILD_NOTES "Measurements moved out of the code").
  """
  pref = jnp.int32 if w.dtype == jnp.int8 else F32
  return jax.lax.dot_general(w, x, (((1,), (1,)), ((), ())), preferred_element_type=pref,
                             precision=precision)


def _pad_rows(x: jax.Array) -> jax.Array:
  """[T, C] -> [max(T, 2), C]: a product with M = 1 is catastrophically slow on XLA-CPU."""
  return jnp.pad(x, ((0, 1), (0, 0))) if x.shape[0] == 1 else x


def _int8_dot(q: jax.Array, xq: jax.Array) -> jax.Array:
  """q [O, C] . xq [M, C] -> int32 [O, M]. For one token (M = 2: the two levels), the weight is
  read as [O/2, 2C] (each pair of rows side by side, a free reshape) against the block-diagonal
  [[x, 0], [0, x]]: exact (integer products of zeros add nothing), and rows twice as long suit
  the int8 kernel; blocks of 4 or 8 rows were slower again, the zero products start to cost
  (BUILD_NOTES "Measurements moved out of the code")."""
  o, c = q.shape
  m = xq.shape[0]
  if m > 2 or o % 2:
    return _dot(q, xq)
  xb = jnp.concatenate([jnp.pad(xq, ((0, 0), (0, c))), jnp.pad(xq, ((0, 0), (c, 0)))])
  return _dot(q.reshape(o // 2, 2 * c), xb).reshape(o, m)  # [O/2, (2, M)] -> [O, M]


def _int8_matmul(q: jax.Array, scale: jax.Array, x: jax.Array) -> jax.Array:
  """Activations quantised per token in two levels (value, then residual) as two int8 columns;
  int8 x int8 -> int32 products; rescaled by both activation scales and the row scale.

  Relative error ~1e-4, and for one token it fills the second column the product needs anyway.
  One level would be faster for 8-64 tokens, but its ~4e-3 error cost the demo model top-1
  agreement: not taken (BUILD_NOTES "Measurements moved out of the code"). Used up to INT8_DEQUANT_TOKENS tokens; more go through exact
  float32 products by blocks of rows.
  """
  x = x.astype(F32)
  s1 = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.0  # [T, 1]
  s1 = jnp.where(s1 > 0, s1, 1.0)
  q1 = jnp.round(x / s1)
  r = x - q1 * s1
  s2 = jnp.max(jnp.abs(r), axis=1, keepdims=True) / 127.0
  s2 = jnp.where(s2 > 0, s2, 1.0)
  q2 = jnp.round(r / s2)
  xq = jnp.concatenate([q1, q2], axis=0).astype(jnp.int8)  # [2T, C]
  y = _int8_dot(q, xq).astype(F32)  # [O, 2T]
  t = x.shape[0]
  return (y[:, :t] * s1[:, 0] + y[:, t:] * s2[:, 0]).T * scale[None, :]


def _int4_matmul(b: jax.Array, scale: jax.Array, x: jax.Array, g: int) -> jax.Array:
  o, half, n = b.shape
  s = scale.astype(F32)  # [O, N]
  xg = x.astype(F32).reshape(x.shape[0], n, g).transpose(0, 2, 1)  # [T, G, N]
  if x.shape[0] > 4:  # prefill: dequantise (by blocks of rows), then matrix products
    def dequant(r, m):
      fb = _rows(b, r, m).astype(F32)
      hb = jnp.floor(fb * (1.0 / 16.0))
      w = jnp.concatenate([fb - 16.0 * hb - 8.0, hb], axis=1) * _rows(s, r, m)[:, None, :]
      return w.reshape(m, -1)  # [m, G*N], columns in (j, g) order
    return _by_row_blocks(dequant, o, g * n, xg.reshape(x.shape[0], -1))  # x in (j, g) too
  x_lo, x_hi = xg[:, :half], xg[:, half:]  # [T, G/2, N]
  f = b.astype(F32)
  hi = jnp.floor(f * (1.0 / 16.0))
  # f = 16 hi + lo + 8  =>  lo*x_lo + hi*x_hi = f*x_lo + hi*(x_hi - 16 x_lo) - 8 x_lo
  x2 = x_hi - 16.0 * x_lo
  bias = 8.0 * jnp.einsum("on,tn->to", s, jnp.sum(x_lo, axis=1))  # [T, O]
  outs = [jnp.sum((f * x_lo[i][None] + hi * x2[i][None]) * s[:, None, :], axis=(1, 2))
          for i in range(x.shape[0])]
  return jnp.stack(outs) - bias


def _mxfp4_exponents(wb: np.ndarray) -> np.ndarray:
  """Per block of 32 ([O, N, 32]): the smallest power of two that brings the block's largest
  magnitude to <= 6 (e2m1's largest), clipped to e8m0's range."""
  amax = np.abs(wb).max(axis=-1)
  with np.errstate(divide="ignore"):
    e = np.ceil(np.log2(np.where(amax > 0, amax, 1.0) / 6.0))
  return np.clip(np.where(amax > 0, e, -127), -127, 127).astype(np.int32)


def _mxfp4_encode(w: np.ndarray) -> dict[str, np.ndarray]:
  """Round to nearest e2m1 value at a per-block power-of-two scale (offline, numpy)."""
  rows, cols = w.shape
  wb = w.reshape(rows, cols // MXFP4_BLOCK, MXFP4_BLOCK)
  e = _mxfp4_exponents(wb)
  v = np.ldexp(wb, -e[..., None])  # |v| <= 6
  mag = np.argmin(np.abs(np.abs(v)[..., None] - E2M1), axis=-1)  # nearest magnitude code
  code = (mag + 8 * (v < 0)).astype(np.uint8)
  return {"": (code[..., 0::2] | (code[..., 1::2] << 4)).astype(np.uint8),
          "scale": (e + 127).astype(np.uint8)}


def _e2m1(code: jax.Array) -> jax.Array:
  """e2m1 code (0..15, float) -> value, with float ops only (no gather, no integer ops)."""
  neg = code >= 8.0
  m = jnp.where(neg, code - 8.0, code)
  mag = jnp.where(m < 4.0, 0.5 * m, jnp.where(m < 6.0, m - 2.0, 2.0 * m - 8.0))
  return jnp.where(neg, -mag, mag)


def _mxfp4_matmul(blocks: jax.Array, scale: jax.Array, x: jax.Array) -> jax.Array:
  """blocks [O, N, 16] uint8 (two e2m1 codes a byte, low nibble first), scale [O, N] e8m0.

  Up to 4 tokens: per token, a table of what each of the 256 byte values contributes with the
  two inputs it multiplies (256 per (block, byte position): x-sized work), gathered by the
  weight bytes and summed with the block scales, faster than dequantise-then-product
  (BUILD_NOTES "Measurements moved out of the code"). More tokens: dequantise once
  (exact: e2m1 times a power of two), then one product. Nibbles are split with float ops
  (XLA-CPU's integer shifts are slow loops); the scale 2^(s-127) is built from its bits,
  s << 23 as a float32, exact for s in 1..254 (s = 0, 2^-127, reads 0).
  """
  o, n, half = blocks.shape
  t = x.shape[0]
  s = jax.lax.bitcast_convert_type(scale.astype(jnp.int32) * (1 << 23), F32)  # [O, N]
  xr = x.astype(F32).reshape(t, n, half, 2)
  if t <= 4:
    codes = jnp.arange(256, dtype=F32)
    hi_code = jnp.floor(codes * (1.0 / 16.0))
    lo_v, hi_v = _e2m1(codes - 16.0 * hi_code), _e2m1(hi_code)  # [256]
    idx = blocks.astype(jnp.int32)[..., None]
    outs = []
    for i in range(t):
      table = lo_v * xr[i, :, :, 0, None] + hi_v * xr[i, :, :, 1, None]  # [N, 16, 256]
      g = jnp.take_along_axis(table[None], idx, axis=-1)[..., 0]  # [O, N, 16]
      outs.append(jnp.sum(g * s[:, :, None], axis=(1, 2)))
    return jnp.stack(outs)
  f = blocks.astype(F32)  # whole, not by blocks of rows: the e2m1 decode in a loop body is
  hi = jnp.floor(f * (1.0 / 16.0))  # slower (BUILD_NOTES "session 5")
  lo = f - 16.0 * hi
  w = jnp.stack([_e2m1(lo), _e2m1(hi)], axis=-1) * s[:, :, None, None]  # [O, N, 16, 2]
  return _dot(w.reshape(o, n * 2 * half), xr.reshape(t, -1)).T
