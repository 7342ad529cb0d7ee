"""TurboQuant vector quantisation (Zandieh et al. 2025, arXiv 2504.19874), for the KV cache.

Each vector x [..., d] is stored as its norm (16 bits) and the b-bit indices of its rotated,
normalised coordinates: u = x / |x|, y = R u with R a random rotation fixed by the seed
(randomized Hadamard: sign flips then the fast Walsh-Hadamard transform), each y_i snapped to
the nearest of 2^b Lloyd-Max centroids computed for the exact density of one coordinate of a
uniformly random unit vector, f(t) ~ (1 - t^2)^((d - 3) / 2) on [-1, 1]. Decoding is
x_hat = |x| R^T c[idx]. Inner products with a query need no decoding: <q, x_hat> =
|x| <R q, c[idx]>, so the query is rotated once.

- Fractional rates (2.5, 3.5): the first round(frac * d) rotated channels get the higher bit
  width, the rest the lower (after a random rotation every channel is alike).
- variant="prod": b-1 bits as above plus a 1-bit QJL sketch of the residual r = u - u_hat:
  sign(S r) with S a d x d Gaussian matrix and |r|; decoding adds sqrt(pi/2)/d |r| S^T signs,
  which makes inner products unbiased.
Indices are stored in byte-aligned fields of 4, 2 or 1 bits (3 bits = a 2-bit and a 1-bit
field): b * d / 8 bytes per vector, unpacked by one shift and mask per value.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lazymoe_jax import kernels

F32 = jnp.float32
MLA_REFUSAL = ("kv_bits / k_bits / v_bits (TurboQuant) are not supported for multi-head latent "
               "attention models (deepseek_v2, deepseek_v3): their cache holds a compressed "
               "latent that is read as both key and value, which TurboQuant's separate key and "
               "value codes do not cover. Run without kv_bits; the latent cache is already "
               "small.")


@functools.lru_cache(maxsize=None)
def lloyd_max_codebook(dim: int, bits: int, iters: int = 300, grid: int = 1 << 16) -> np.ndarray:
  """2^bits centroids minimising E (t - c(t))^2 for one coordinate of a random unit vector."""
  # the density is negligible beyond ~12 standard deviations (1/sqrt(dim)); integrate there
  half = min(1.0, 12.0 / math.sqrt(dim))
  t = np.linspace(-half, half, grid)
  logf = 0.5 * (dim - 3) * np.log(np.clip(1.0 - t * t, 1e-300, None))
  w = np.exp(logf - logf.max())
  w /= w.sum()
  k = 1 << bits
  # start from equal-mass quantiles, then alternate nearest-centroid cells and cell means
  cdf = np.cumsum(w)
  c = np.interp((np.arange(k) + 0.5) / k, cdf, t)
  for _ in range(iters):
    edges = (c[1:] + c[:-1]) / 2
    cell = np.searchsorted(edges, t)
    mass = np.bincount(cell, weights=w, minlength=k)
    mean = np.bincount(cell, weights=w * t, minlength=k)
    c = np.where(mass > 0, mean / np.maximum(mass, 1e-300), c)
  return c.astype(np.float32)


def codebook_mse(dim: int, bits: int) -> float:
  """E |u - u_hat|^2 of the codebook for a unit vector (sum over the dim coordinates)."""
  half = min(1.0, 12.0 / math.sqrt(dim))
  t = np.linspace(-half, half, 1 << 16)
  logf = 0.5 * (dim - 3) * np.log(np.clip(1.0 - t * t, 1e-300, None))
  w = np.exp(logf - logf.max())
  w /= w.sum()
  c = lloyd_max_codebook(dim, bits)
  err = np.min((t[:, None] - c[None, :]) ** 2, axis=1)
  return float(dim * np.sum(w * err))


def _hadamard(x: jax.Array) -> jax.Array:
  """Fast Walsh-Hadamard transform over the last axis (length a power of two), unnormalised."""
  d = x.shape[-1]
  lead = x.shape[:-1]
  h = 1
  while h < d:
    x = x.reshape(*lead, d // (2 * h), 2, h)
    a, b = x[..., 0, :], x[..., 1, :]
    x = jnp.stack([a + b, a - b], axis=-2)
    h *= 2
  return x.reshape(*lead, d)


def _field_widths(bits: int) -> list[int]:
  """The byte-aligned field widths (4, 2, 1) that sum to `bits`, low bits first: 3 = 1 + 2."""
  return [w for w in (1, 2, 4) if bits & w]


def _pack_field(f: jax.Array, w: int) -> jax.Array:
  """f [..., n] < 2^w -> uint8 [..., n * w / 8]: 8 / w values per byte, the first lowest."""
  *lead, n = f.shape
  per = 8 // w
  f = f.astype(jnp.uint8).reshape(*lead, n // per, per)
  return jnp.sum(f << (jnp.arange(per, dtype=jnp.uint8) * w), axis=-1, dtype=jnp.uint8)


def _unpack_field(b: jax.Array, w: int) -> jax.Array:
  """uint8 [..., m] -> uint8 [..., m * 8 / w] (inverse of _pack_field): one shift and one mask
  per value, no reduction, so XLA fuses it into whatever consumes the values."""
  # one constant shift per position in the byte: a vector of shift amounts (b[..., None] >>
  # arange) has no vector instruction for bytes and runs element by element (BUILD_NOTES "Measurements moved out of the code")
  if w == 1:  # one AND with a constant vector of the 8 bit masks: faster than 8 shifts
    f = (b[..., None] & jnp.asarray([1 << j for j in range(8)], jnp.uint8)) != 0
    return f.reshape(*b.shape[:-1], -1).astype(jnp.uint8)
  f = jnp.stack([(b >> (j * w)) & ((1 << w) - 1) for j in range(8 // w)], axis=-1)
  return f.reshape(*b.shape[:-1], -1)


def _pack_bits(idx: jax.Array, bits: int, name: str) -> dict[str, jax.Array]:
  """idx [..., n] < 2^bits -> {f"{name}_w{width}": uint8 [..., n * width / 8]}: the low bits in
  the narrowest field (bits = 3: a 1-bit field and a 2-bit field), n * bits / 8 bytes in all."""
  out, shift = {}, 0
  for w in _field_widths(bits):
    out[f"{name}_w{w}"] = _pack_field((idx >> shift) & ((1 << w) - 1), w)
    shift += w
  return out


def _unpack_bits(codes: dict[str, jax.Array], bits: int, name: str) -> jax.Array:
  """Inverse of _pack_bits -> uint8 [..., n] (kept in bytes: 64 lanes per vector op)."""
  idx, shift = None, 0
  for w in _field_widths(bits):
    f = _unpack_field(codes[f"{name}_w{w}"], w) << shift
    idx = f if idx is None else idx | f
    shift += w
  return idx


def _lookup(codebook: np.ndarray, idx: jax.Array) -> jax.Array:
  """codebook[idx] as a tree of selects on the index bits (2^b - 1 vectorised selects): a gather
  from the table runs element by element on XLA-CPU (BUILD_NOTES "Measurements moved out of the code")."""
  vals = [jnp.float32(v) for v in codebook]
  bit = 0
  while len(vals) > 1:
    on = ((idx >> bit) & 1).astype(bool)
    vals = [jnp.where(on, vals[j + 1], vals[j]) for j in range(0, len(vals), 2)]
    bit += 1
  return jnp.broadcast_to(vals[0], idx.shape).astype(F32)


@dataclasses.dataclass(frozen=True)
class TurboQuant:
  """encode(x) -> codes (a dict pytree); decode(codes) -> x_hat; scores(q, codes) -> <q, x_hat>."""

  dim: int
  bits: float
  seed: int = 0
  variant: str = "mse"

  def __post_init__(self):
    if self.dim & (self.dim - 1) or self.dim < 8:
      raise ValueError(f"dim must be a power of two >= 8 (Hadamard rotation), got {self.dim}.")
    if self.variant not in ("mse", "prod"):
      raise ValueError(f"variant must be 'mse' or 'prod', got {self.variant!r}.")
    lo = self.mse_bits_low
    if not (0 if self.variant == "prod" else 1) <= lo <= 4 or self.bits > 4:
      raise ValueError(f"bits={self.bits} not supported: 1 to 4 (fractional x.5 allowed).")

  # ---- bit allocation ------------------------------------------------------------------------
  @property
  def _mse_bits(self) -> float:
    return self.bits - 1 if self.variant == "prod" else self.bits

  @property
  def mse_bits_low(self) -> int:
    return int(math.floor(self._mse_bits))

  @property
  def n_high(self) -> int:
    """Channels (of the rotated vector) that get mse_bits_low + 1 bits."""
    n = round((self._mse_bits - self.mse_bits_low) * self.dim)
    return n - n % 8  # whole bytes per field

  def groups(self) -> list[tuple[int, int, int]]:
    """[(start, stop, bits)] of the rotated channels."""
    lo, hi = self.mse_bits_low, self.n_high
    return [g for g in ((0, hi, lo + 1), (hi, self.dim, lo)) if g[1] > g[0] and g[2] > 0]

  def bytes_per_vector(self) -> float:
    qjl = self.dim / 8 + 2 if self.variant == "prod" else 0
    return sum((b - a) * bits / 8 for a, b, bits in self.groups()) + 2 + qjl

  # ---- fixed random state ----------------------------------------------------------------------
  @functools.cached_property
  def _signs(self) -> np.ndarray:
    return np.random.default_rng(self.seed).choice([-1.0, 1.0], self.dim).astype(np.float32)

  @functools.cached_property
  def _qjl(self) -> np.ndarray:
    return np.random.default_rng([self.seed, 1]).standard_normal((self.dim, self.dim),
                                                                 dtype=np.float32)

  def rotate(self, x: jax.Array) -> jax.Array:
    return _hadamard(x.astype(F32) * self._signs) / math.sqrt(self.dim)

  def unrotate(self, y: jax.Array) -> jax.Array:
    return _hadamard(y.astype(F32)) / math.sqrt(self.dim) * self._signs

  # ---- quantise ------------------------------------------------------------------------------
  def _quantise(self, y: jax.Array) -> dict[str, jax.Array]:
    codes = {}
    for a, b, bits in self.groups():
      c = jnp.asarray(lloyd_max_codebook(self.dim, bits))
      edges = (c[1:] + c[:-1]) / 2
      codes.update(_pack_bits(jnp.searchsorted(edges, y[..., a:b]).astype(jnp.int32), bits,
                              f"idx{a}"))
    return codes

  def _parts(self, codes: dict) -> list[tuple[int, int, jax.Array]]:
    """(start, stop, centroids [..., stop - start]) per channel group of the rotated unit
    vector. Consumers take the groups one by one (a concatenation of two half-width groups
    costs more than decoding them).

    Each part is materialised on purpose (optimization_barrier): left to itself XLA fuses the
    decode into the attention products that consume it and recomputes it there, twice as slow
    (BUILD_NOTES "Measurements moved out of the code")."""
    return [(a, b, jax.lax.optimization_barrier(_lookup(
        lloyd_max_codebook(self.dim, bits), _unpack_bits(codes, bits, f"idx{a}"))))
            for a, b, bits in self.groups()]

  def _whole(self, pieces: list[tuple[int, int, jax.Array]], lead: tuple) -> jax.Array:
    """[..., dim] from (start, stop, [..., stop - start]) pieces; channels no piece covers
    (a group with no MSE bits, e.g. the prod variant at 1.5 bits) are zero."""
    out, at = [], 0
    for a, b, x in pieces:
      if a > at:
        out.append(jnp.zeros((*lead, a - at), F32))
      out.append(x)
      at = b
    if at < self.dim:
      out.append(jnp.zeros((*lead, self.dim - at), F32))
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=-1)

  def _centroids(self, codes: dict) -> jax.Array:
    """The rotated unit vector the indices stand for, [..., dim] (zero with no MSE bits)."""
    return self._whole(self._parts(codes), codes["norm"].shape[:-1])

  def rotated_scores(self, qr: jax.Array, codes: dict, spec: str) -> jax.Array:
    """einsum(spec, qr, centroids) group by group, summed: qr is a query already rotated
    (rotate), spec contracts its last axis with the centroids' (e.g. "kmd,ksd->kms")."""
    out = None
    for a, b, c in self._parts(codes):
      part = jnp.einsum(spec, qr[..., a:b], c)
      out = part if out is None else out + part
    if out is None:  # no MSE bits (prod variant at 1 bit): the centroids are zero
      out = jnp.einsum(spec, qr, jnp.zeros((*codes["norm"].shape[:-1], self.dim), F32))
    return out

  def rotated_sum(self, p: jax.Array, codes: dict, spec: str) -> jax.Array:
    """einsum(spec, p, centroids) -> [..., dim] in the rotated space: weights p summed over
    the encoded vectors (e.g. "kms,ksd->kmd"), group by group, concatenated (small)."""
    parts = [(a, b, jnp.einsum(spec, p, c)) for a, b, c in self._parts(codes)]
    if not parts:
      return jnp.einsum(spec, p, jnp.zeros((*codes["norm"].shape[:-1], self.dim), F32))
    return self._whole(parts, parts[0][2].shape[:-1])

  def encode(self, x: jax.Array) -> dict[str, jax.Array]:
    x = x.astype(F32)
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    u = x / jnp.where(norm > 0, norm, 1.0)
    y = self.rotate(u)
    codes = self._quantise(y)
    codes["norm"] = norm.astype(jnp.float16)
    if self.variant == "prod":
      r = u - self.unrotate(self._centroids(codes))
      codes["qjl"] = _pack_field(r @ jnp.asarray(self._qjl).T > 0, 1)
      codes["rnorm"] = jnp.linalg.norm(r, axis=-1, keepdims=True).astype(jnp.float16)
    return codes

  def _qjl_term(self, codes: dict) -> jax.Array:
    signs = 2.0 * _unpack_field(codes["qjl"], 1).astype(F32) - 1.0  # [..., dim]
    return (math.sqrt(math.pi / 2) / self.dim) * codes["rnorm"].astype(F32) * (
        signs @ jnp.asarray(self._qjl))

  def decode(self, codes: dict) -> jax.Array:
    u = self.unrotate(self._centroids(codes))
    if self.variant == "prod":
      u = u + self._qjl_term(codes)
    return codes["norm"].astype(F32) * u

  def scores(self, q: jax.Array, codes: dict) -> jax.Array:
    """<q, x_hat> for q [..., dim] against every encoded vector: q [Q, d], codes [N] -> [Q, N]."""
    s = self.rotated_scores(self.rotate(q), codes, "qd,nd->qn")  # rotate the query once
    if self.variant == "prod":
      s = s + jnp.einsum("qd,nd->qn", q.astype(F32), self._qjl_term(codes))
    return s * codes["norm"].astype(F32)[:, 0][None, :]


@dataclasses.dataclass(frozen=True)
class TurboQuantKV:
  """KV cache whose keys and values are TurboQuant codes (MSE variant), [K, S, ...] per layer.

  Scores are computed in the rotated space (the query is rotated once per head); values are
  summed there and rotated back once per query.

  Centering (center=True): the cache quantises k - m_k and v - m_v, where m_k, m_v [K, D] are
  the means of the first chunk written (the prompt), fixed for the rest of the sequence. Both
  are exact rewrites of attention: q.(k_i - m_k) differs from q.k_i by q.m_k, the same for
  every key, which the softmax cancels; sum_i p_i (v_i - m_v) + m_v = sum_i p_i v_i since the
  p_i sum to one. What changes is what gets quantised: trained models' keys and values share a
  large common component, and the codebook's error scales with the norm of what it encodes.
  """

  k_bits: float
  v_bits: float
  seed: int = 0
  k_variant: str = "mse"  # "prod": keys get b-1 MSE bits + the 1-bit QJL residual sketch
  center: bool = True  # quantise k - mean(k), v - mean(v) of the first chunk (exact, see below)

  def quantisers(self, head_dim: int) -> tuple[TurboQuant, TurboQuant]:
    return (TurboQuant(head_dim, self.k_bits, self.seed, self.k_variant),
            TurboQuant(head_dim, self.v_bits, self.seed + 1))

  def validate(self, spec) -> None:
    if spec.attention.cache_kind != "heads":
      raise ValueError(MLA_REFUSAL)
    d = spec.attention.head_dim
    if d & (d - 1):
      raise ValueError(f"TurboQuant needs a power-of-two head_dim (Hadamard rotation); this "
                       f"model has {d}. Run without kv_bits.")
    self.quantisers(d)  # checks the bit widths

  def init(self, spec, capacity: int) -> list[dict]:
    self.validate(spec)
    a = spec.attention
    kq, vq = self.quantisers(a.head_dim)
    zeros = jnp.zeros((a.num_kv_heads, capacity, a.head_dim), F32)
    shift = (a.num_kv_heads, a.head_dim)
    return [{"k": kq.encode(zeros), "v": vq.encode(zeros), "k_shift": jnp.zeros(shift, F32),
             "v_shift": jnp.zeros(shift, F32)} for _ in range(spec.num_hidden_layers)]

  @staticmethod
  def nbytes(cache: list) -> int:
    return sum(a.nbytes for a in jax.tree.leaves(cache))

  def update(self, cache: dict, k: jax.Array, v: jax.Array, start: jax.Array) -> dict:
    kq, vq = self.quantisers(k.shape[-1])
    out = {}
    for name, tq, x in (("k", kq, k), ("v", vq, v)):
      x = jnp.transpose(x, (1, 0, 2)).astype(F32)  # [K, T, D]
      # The shift is fixed by the first chunk written (the prompt) and kept for the sequence.
      shift = cache[f"{name}_shift"]
      if self.center:
        shift = jnp.where(start == 0, jnp.mean(x, axis=1), shift)
      out[f"{name}_shift"] = shift
      new = tq.encode(x - shift[:, None, :])
      out[name] = jax.tree.map(
          lambda c, n: jax.lax.dynamic_update_slice(c, n, (0, start) + (0,) * (c.ndim - 2)),
          cache[name], new)
    return out

  def attend(self, cache: dict, q: jax.Array, q_pos: jax.Array, window: int | None,
             scale: float, sinks: jax.Array | None = None) -> jax.Array:
    from lazymoe_jax.kv.dense import (  # pylint: disable=import-outside-toplevel
        blocked, causal_softmax, from_rows, to_rows)
    kq, vq = self.quantisers(q.shape[-1])
    kv_heads = cache["k"]["norm"].shape[0]
    # Decode takes the native kernel for the MSE variant at every bit width the class allows;
    # the prod variant's QJL term (a d x d Gaussian sketch per key) stays on this XLA form.
    if kernels.attention_native(q.shape[0]) and kq.variant == "mse":
      return self._attend_native(kq, vq, cache, q, q_pos, window, scale, sinks)
    # unit vectors in the rotated space [K, S, D]; the norms [K, 1, S] scale the scores and
    # the probabilities instead ([K, G*T, S] products, not another [K, S, D] pass)
    k_norm = jnp.swapaxes(cache["k"]["norm"].astype(F32), 1, 2)
    v_norm = jnp.swapaxes(cache["v"]["norm"].astype(F32), 1, 2)

    if kq.variant == "prod":  # the QJL term lives in the original space: add it there
      qjl = kq._qjl_term(cache["k"]) * cache["k"]["norm"].astype(F32)  # [K, S, D]

    def one(q, q_pos):
      t, hq, _ = q.shape
      g = hq // kv_heads
      scores = kq.rotated_scores(to_rows(kq.rotate(q), kv_heads), cache["k"],
                                 "kmd,ksd->kms") * k_norm
      if kq.variant == "prod":
        scores = scores + jnp.einsum("kmd,ksd->kms", to_rows(q.astype(F32), kv_heads), qjl)
      if sinks is not None:  # the softmax cancels q.m_k of the centred keys, a sink does not
        scores = scores + jnp.einsum("kmd,kd->km", to_rows(q.astype(F32), kv_heads),
                                     cache["k_shift"].astype(F32))[..., None]
      probs = causal_softmax(scores.reshape(kv_heads, g, t, -1) * scale, q_pos, window, sinks)
      out_r = vq.rotated_sum(probs.reshape(kv_heads, g * t, -1) * v_norm, cache["v"],
                             "kms,ksd->kmd")
      # probabilities sum to one (to their mass with sinks): adding the value shift back
      # after the sum, times that mass, is exact
      shift = vq.rotate(cache["v_shift"])[:, None, :]
      if sinks is not None:
        shift = shift * jnp.sum(probs, axis=-1).reshape(kv_heads, g * t, 1)
      out_r = out_r + shift
      return vq.unrotate(from_rows(out_r, t))
    return blocked(one, q, q_pos)

  @staticmethod
  def _attend_native(kq: TurboQuant, vq: TurboQuant, cache: dict, q: jax.Array,
                     q_pos: jax.Array, window: int | None, scale: float,
                     sinks: jax.Array | None) -> jax.Array:
    """`attend` through kernels.attend_turboquant: the query rotated once here, scores and
    the value sum in the rotated space from the packed codes (no centroid array), the output
    rotated back once. The same exact rewrites of the centering as `attend`."""
    kv_heads = cache["k"]["norm"].shape[0]
    t, hq, d = q.shape

    def side(tq: TurboQuant, codes: dict) -> tuple:
      return codes["norm"], [(a, b, bits, lloyd_max_codebook(tq.dim, bits),
                              [codes[f"idx{a}_w{w}"] for w in _field_widths(bits)])
                             for a, b, bits in tq.groups()]
    if sinks is None:  # the softmax cancels q.m_k; a sink does not (see attend)
      bias = jnp.zeros((t, hq), F32)
    else:
      bias = jnp.einsum("tkgd,kd->tkg", q.astype(F32).reshape(t, kv_heads, hq // kv_heads, d),
                        cache["k_shift"].astype(F32)).reshape(t, hq)
    out_r = kernels.attend_turboquant(side(kq, cache["k"]), side(vq, cache["v"]), kq.rotate(q),
                                      q_pos, window, scale, sinks, bias,
                                      vq.rotate(cache["v_shift"]))
    return vq.unrotate(out_r)
