"""Native CPU kernels (C++, through XLA's typed FFI): expert FFNs, dense products, decode attention.

Nothing is built at import: the shared library that `pip install` compiled (setup.py; or
CMakeLists.txt by hand, pointed to by LAZYMOE_KERNELS_LIB) is loaded with ctypes on first use
and its handlers registered as XLA FFI targets. The functions are traceable and meant to be
called inside the engine's jitted programs; every call site choice below (mode, ISA variant)
is read when a program is traced.

  LAZYMOE_KERNELS      native | xla   (default: native when the library loaded, else xla with
                                       a one-line warning; native without it is an error)
  LAZYMOE_KERNELS_ISA  portable | avx2 | avx2-vnni | avx512  (default: avx2-vnni where the CPU
                                       has it, else avx2 or portable; forcing another is how
                                       the tests cover every variant)

Activations are quantised to int8 for the integer weight encodings (one int8 step per token
and column range; `ACT_LEVELS` levels: the value, then its residual): results differ from the
float32 product with the decoded weights by at most `error_bound` (BUILD_NOTES.md, "Native
kernels"). float32 and bfloat16 weights keep float32 activations (exact up to summation order).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.util
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

ISAS = {"portable": 0, "avx2": 1, "avx512": 2, "avx2-vnni": 3}
# Variants chosen by default when the CPU has them. The AVX-512 variant passes the kernel
# tests on AVX-512 machines but measured no faster than AVX2 there (BUILD_NOTES, sessions 9-12):
# it runs only when asked for (LAZYMOE_KERNELS_ISA=avx512). avx2-vnni is the AVX2 kernels with
# vpdpbusd (int4 / mxfp4) and vpdpwssd (int8) on ymm where the CPU has AVX512-F/VL/BW + VNNI,
# and zmm forms of the same sums in the paths that gain from them (many-token panels, one-token
# int4 / mxfp4 row pairs): results bit for bit avx2's, faster (BUILD_NOTES "session 13", "session
# 14", "session 17", "session 19", "session 20").
DEFAULT_ISAS = ("portable", "avx2", "avx2-vnni")
_ENC_IDS = {"float32": 0, "bfloat16": 1, "int8": 2, "int4": 3, "mxfp4": 4}
ENCODINGS = ("float32", "bfloat16", "int8", "int4-g32", "int4-g64", "int4-g128", "mxfp4")
# int8 steps of the activation for integer weights: two levels (value + residual) for int8
# weights, whose own error is small; one for int4 / mxfp4, whose weight error dominates.
ACT_LEVELS = {"int8": 2, "int4": 1, "mxfp4": 1}
ACTIVATIONS = {"silu": 0, "clamped_swiglu": 1}
_LIB_NAME = "_lazymoe_kernels"


def _library_path() -> str | None:
  """Where the built library is: LAZYMOE_KERNELS_LIB, else the extension file pip built
  (found through the import system, so editable and regular installs both work)."""
  path = os.environ.get("LAZYMOE_KERNELS_LIB")
  if path:
    return path
  try:
    spec = importlib.util.find_spec(f"{__name__}.{_LIB_NAME}")
  except (ImportError, ValueError):
    spec = None
  if spec is not None and spec.origin and os.path.exists(spec.origin):
    return spec.origin
  here = os.path.dirname(os.path.abspath(__file__))
  found = sorted(glob.glob(os.path.join(here, f"{_LIB_NAME}*.so")) +
                 glob.glob(os.path.join(here, "liblazymoe_kernels.so")))
  return found[0] if found else None


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
  """(library, "") once loaded and registered, or (None, why not)."""
  path = _library_path()
  if path is None:
    return None, "native kernel library not built (no compiler at install?)"
  try:
    lib = ctypes.CDLL(path)
    for name, sym in (("lazymoe_linear", lib.LazymoeLinear), ("lazymoe_moe_ffn", lib.LazymoeMoeFfn),
                      ("lazymoe_moe_ffn_pooled", lib.LazymoeMoeFfnPooled),
                      ("lazymoe_attn_dense", lib.LazymoeAttnDense),
                      ("lazymoe_attn_latent", lib.LazymoeAttnLatent),
                      ("lazymoe_attn_turboquant", lib.LazymoeAttnTurboquant)):
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(sym), platform="cpu")
    lib.lazymoe_best_isa.restype = ctypes.c_int
    lib.lazymoe_isa_supported.restype = ctypes.c_int
    lib.lazymoe_isa_supported.argtypes = [ctypes.c_int]
  except (OSError, AttributeError) as e:
    return None, f"native kernel library {path} failed to load: {e}"
  return lib, ""


@functools.cache
def _warn_once(why: str) -> None:
  warnings.warn(f"lazymoe_jax.kernels: {why}; using the XLA path.", RuntimeWarning, stacklevel=3)


def _requested_mode() -> str:
  m = os.environ.get("LAZYMOE_KERNELS", "").strip().lower()
  if m not in ("", "native", "xla"):
    raise ValueError(f"LAZYMOE_KERNELS={m!r}: choose native or xla.")
  return m


def available() -> bool:
  """The library is loaded and LAZYMOE_KERNELS is not "xla" (warns once, on one line, when the
  library is missing and the XLA path will be taken)."""
  if _requested_mode() == "xla":
    return False
  lib, why = _library()
  if lib is None:
    _warn_once(why)
  return lib is not None


def mode() -> str:
  """"native" or "xla": which path linear / moe_ffn take (LAZYMOE_KERNELS selects)."""
  m = _requested_mode()
  if m == "xla":
    return "xla"
  lib, why = _library()
  if lib is None:
    if m == "native":
      raise RuntimeError(f"LAZYMOE_KERNELS=native but the {why}. Reinstall with a C++17 "
                         "compiler (pip install -e .) or set LAZYMOE_KERNELS=xla.")
    _warn_once(why)
    return "xla"
  return "native"


def isa() -> str:
  """The ISA variant the native kernels run: LAZYMOE_KERNELS_ISA, else the best supported."""
  lib, why = _library()
  if lib is None:
    raise RuntimeError(why)
  name = os.environ.get("LAZYMOE_KERNELS_ISA", "").strip().lower()
  if not name:
    best = {v: k for k, v in ISAS.items()}[lib.lazymoe_best_isa()]
    if best in DEFAULT_ISAS:
      return best
    return "avx2-vnni" if lib.lazymoe_isa_supported(ISAS["avx2-vnni"]) else "avx2"
  if name not in ISAS:
    raise ValueError(f"LAZYMOE_KERNELS_ISA={name!r}: choose one of {list(ISAS)}.")
  if not lib.lazymoe_isa_supported(ISAS[name]):
    raise RuntimeError(f"LAZYMOE_KERNELS_ISA={name}: this CPU cannot run that variant.")
  return name


def supported_isas() -> list[str]:
  """Every compiled variant this CPU can run (for tests)."""
  lib = _library()[0]
  return [] if lib is None else [k for k, v in ISAS.items() if lib.lazymoe_isa_supported(v)]


def _encoding(name: str) -> tuple[str, int, int]:
  """(kind, encoding id, group) of an encoding name."""
  if name not in ENCODINGS:
    raise ValueError(f"native kernels have no encoding {name!r}; choose one of {ENCODINGS}.")
  kind = name.split("-")[0]
  return kind, _ENC_IDS[kind], int(name.split("-g")[1]) if kind == "int4" else 0


def _operands(kind: str, arrays: dict) -> list[jax.Array]:
  ops = [jnp.asarray(arrays[""])]
  if kind not in ("float32", "bfloat16"):
    ops.append(jnp.asarray(arrays["scale"]))
  return ops


def _attrs(kind: str, enc: int, group: int) -> dict:
  return dict(enc=np.int64(enc), group=np.int64(group), isa=np.int64(ISAS[isa()]),
              levels=np.int64(ACT_LEVELS.get(kind, 1)))


def linear(encoding: str, arrays: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  """x [T, C] float32 -> x @ W^T [T, O] float32 for one weight {suffix: array} stored in
  `encoding` (float32, bfloat16, int8, int4-gG, mxfp4; the layouts of model/encodings.py)."""
  if mode() == "xla":
    from lazymoe_jax.model import encodings  # pylint: disable=import-outside-toplevel
    return encodings.get(encoding).matmul(arrays, x)
  kind, enc, group = _encoding(encoding)
  ops = _operands(kind, arrays)
  out = jax.ShapeDtypeStruct((x.shape[0], ops[0].shape[0]), jnp.float32)
  return jax.ffi.ffi_call("lazymoe_linear", out)(jnp.asarray(x, jnp.float32), *ops,
                                                 **_attrs(kind, enc, group))


def moe_ffn(encoding: str, experts: tuple[dict, ...], x: jax.Array, weights: jax.Array,
            act: tuple[str, float, float] = ("silu", 1.702, 7.0)) -> jax.Array:
  """sum_j weights[:, j] * expert_j(x) -> [T, H] float32, all k experts in one native call.

  experts[j] = {"w_gate_up": {suffix: array} [2I, H] (gate rows, then up rows), "w_down":
  {suffix: array} [H, I], optional "b_gate_up": {"": f32 [2I]}, "b_down": {"": f32 [H]}} as
  the pool holds them (passed as separate operands, never stacked); x [T, H] float32,
  weights [T, k]; act = (kind, alpha, limit) as spec.Activation ("silu" ignores the two).
  """
  kind_act, alpha, limit = act
  if kind_act not in ACTIVATIONS:
    raise ValueError(f"unknown expert activation {kind_act!r}; choose one of {list(ACTIVATIONS)}.")
  if mode() == "xla":
    from lazymoe_jax.model import encodings, layers  # pylint: disable=import-outside-toplevel
    from lazymoe_jax.model.spec import Activation  # pylint: disable=import-outside-toplevel
    out = jnp.zeros(x.shape, jnp.float32)
    for j, ex in enumerate(experts):
      ws = {t: encodings.Weight(encodings.get(encoding if t.startswith("w_") else "float32"), a)
            for t, a in ex.items()}
      out = out + weights[:, j:j + 1] * layers.expert_ffn(Activation(*act), ws, x)
    return out
  kind, enc, group = _encoding(encoding)
  has_bias = [("b_gate_up" in ex) or ("b_down" in ex) for ex in experts]
  if any(has_bias) and not all("b_gate_up" in ex and "b_down" in ex for ex in experts):
    raise ValueError("moe_ffn: give both biases for every expert, or none.")
  ops = []
  for ex in experts:
    ops += _operands(kind, ex["w_gate_up"]) + _operands(kind, ex["w_down"])
    if has_bias[0]:
      ops += [jnp.asarray(ex["b_gate_up"][""], jnp.float32), jnp.asarray(ex["b_down"][""], jnp.float32)]
  x = jnp.asarray(x, jnp.float32)
  return jax.ffi.ffi_call("lazymoe_moe_ffn", jax.ShapeDtypeStruct(x.shape, jnp.float32))(
      x, jnp.asarray(weights, jnp.float32), *ops, **_attrs(kind, enc, group),
      act=np.int64(ACTIVATIONS[kind_act]), alpha=np.float32(alpha), limit=np.float32(limit),
      has_bias=np.int64(bool(has_bias[0])))


def moe_ffn_pooled(encoding: str, arena: jax.Array, layout: tuple, slots: jax.Array,
                   x: jax.Array, weights: jax.Array,
                   act: tuple[str, float, float] = ("silu", 1.702, 7.0),
                   init: jax.Array | None = None) -> jax.Array:
  """moe_ffn over experts found in the expert pool's arena by slot index (native only).

  arena: the pool's slots as one uint8 [bytes] array (ExpertPool.arena_array); layout =
  (inter, slot_bytes, offsets): the expert width, the bytes between slots, and the byte offsets
  inside a slot of w_gate_up, its scale, w_down, its scale, b_gate_up, b_down (-1: absent;
  ExpertPool.layout); slots int32, computed inside the program (a decode step that picks its
  experts on the device): [k], the experts of every token, or [T, k], each token's own (-1:
  none), each distinct slot's expert then run once over the tokens that name it (one decode
  token of each of T sequences; a token's result is the same whichever others share the
  call); x [T, H], weights [T, k] (a token's picks are summed in their order, onto its row
  of `init` [T, H] float32: the sums of earlier experts, updated in place when donated;
  None: zeros)."""
  kind_act, alpha, limit = act
  if kind_act not in ACTIVATIONS:
    raise ValueError(f"unknown expert activation {kind_act!r}; choose one of {list(ACTIVATIONS)}.")
  if mode() != "native":
    raise RuntimeError("moe_ffn_pooled needs the native kernels (LAZYMOE_KERNELS=native).")
  kind, enc, group = _encoding(encoding)
  inter, slot_bytes, offsets = layout
  x = jnp.asarray(x, jnp.float32)
  init = jnp.zeros(x.shape, jnp.float32) if init is None else jnp.asarray(init, jnp.float32)
  return jax.ffi.ffi_call("lazymoe_moe_ffn_pooled", jax.ShapeDtypeStruct(x.shape, jnp.float32),
                          input_output_aliases={4: 0})(
      x, jnp.asarray(weights, jnp.float32), jnp.asarray(slots, jnp.int32), arena, init,
      **_attrs(kind, enc, group), act=np.int64(ACTIVATIONS[kind_act]), alpha=np.float32(alpha),
      limit=np.float32(limit), inter=np.int64(inter), slot_bytes=np.int64(slot_bytes),
      offsets=np.asarray(offsets, np.int64))


def error_bound(encoding: str, w: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Bound [T, O] on |linear(encoding, W, x) - x @ w^T| where w [O, C] is the decoded float
  weight (Encoding.decode) and x [T, C]: the activation's int8 rounding (half a step a level:
  step max|x_t| / 127, a second level's step at most that / 254) times sum_c |w[o, c]|, plus
  float32 summation (1e-5 of sum |w| |x|). Zero rounding term for float weights."""
  w = np.abs(np.asarray(w, np.float64))
  x = np.asarray(x, np.float64)
  kind = _encoding(encoding)[0]
  fp = 1e-5 * np.abs(x) @ w.T
  levels = ACT_LEVELS.get(kind, 0)
  if not levels:
    return fp
  step = np.abs(x).max(axis=1, keepdims=True) / 127.0  # [T, 1]
  half = step / 2.0 if levels == 1 else step / 508.0
  return half * w.sum(axis=1)[None, :] + fp


# Above this many rows (of one product, or tokens of one expert) the XLA dots (YNNPACK) serve
# prefill, per encoding kind: where the native kernels were measured as fast or faster, on the
# default avx2-vnni variant (up to 512 tokens for int8, bf16 and int4, 256 for mxfp4; float32
# is faster in XLA above 32). Below it, the experts a prompt's tokens pick run unpadded, a run
# of them in one call (Forward._moe_grouped); BUILD_NOTES "session 10", "session 15",
# "session 16".
NATIVE_MAX_TOKENS = {"float32": 32, "int8": 512, "bfloat16": 512, "int4": 512, "mxfp4": 256}


def native_for(encoding: str, tokens: int) -> bool:
  """Whether a product of `tokens` rows with an `encoding` weight takes the native kernels."""
  return (encoding in ENCODINGS and tokens <= NATIVE_MAX_TOKENS[encoding.split("-")[0]]
          and mode() == "native")


# ---- decode attention (csrc/attention.cc) ----------------------------------------------------
# Up to this many query tokens attend through the native kernels; longer prompts keep the XLA
# path (its blocked batched products are the faster form there).
ATTN_MAX_TOKENS = 16


def attention_native(tokens: int) -> bool:
  """Whether an attention of `tokens` query tokens takes the native kernels."""
  return tokens <= ATTN_MAX_TOKENS and mode() == "native"


def _attn_call(target: str, out_width: int, q: jax.Array, q_pos: jax.Array, window: int | None,
               scale: float, sinks: jax.Array | None, *operands, **attrs) -> jax.Array:
  """One decode-attention FFI call: q [T, H, D] -> [T, H, out_width] float32.

  vmap_method="expand_dims": under jax.vmap every operand gets the batch axis (size 1 where
  it is not batched) and the handler loops over the leading axes itself, broadcasting the
  size-1 ones, so a batch of sequences' caches is one call with no copies."""
  if window is not None and int(window) < 1:
    raise ValueError(f"attention window must be >= 1 or None, got {window}.")
  t, hq, _ = q.shape
  sinks_op = jnp.zeros((hq,), jnp.float32) if sinks is None else jnp.asarray(sinks, jnp.float32)
  out = jax.ShapeDtypeStruct((t, hq, out_width), jnp.float32)
  return jax.ffi.ffi_call(target, out, vmap_method="expand_dims")(
      jnp.asarray(q, jnp.float32), jnp.asarray(q_pos, jnp.int32), sinks_op, *operands,
      window=np.int64(window or 0), scale=np.float32(scale), has_sinks=np.int64(sinks is not None),
      isa=np.int64(ISAS[isa()]), **attrs)


def attend_dense(k: jax.Array, v: jax.Array, q: jax.Array, q_pos: jax.Array, window: int | None,
                 scale: float, sinks: jax.Array | None = None) -> jax.Array:
  """softmax(scale q k^T, causal by q_pos [T], window, sinks [H]) v over a dense cache: k
  [K, D, S], v [K, S, D] float32 (kv/dense.py's layout), q [T, K*G, D] -> [T, K*G, D]."""
  return _attn_call("lazymoe_attn_dense", q.shape[-1], q, q_pos, window, scale, sinks, k, v)


def attend_latent(k: jax.Array, q: jax.Array, q_pos: jax.Array, window: int | None, scale: float,
                  value_dim: int, sinks: jax.Array | None = None) -> jax.Array:
  """MLA over the latent cache k [1, R + Dr, S] (kv/latent.py): keys [c, k_r], values its
  first value_dim (R) rows; q [T, H, R + Dr] -> [T, H, R]."""
  return _attn_call("lazymoe_attn_latent", value_dim, q, q_pos, window, scale, sinks, k)


def attend_turboquant(k_side: tuple, v_side: tuple, qr: jax.Array, q_pos: jax.Array,
                      window: int | None, scale: float, sinks: jax.Array | None,
                      score_bias: jax.Array, v_shift: jax.Array) -> jax.Array:
  """Attention over TurboQuant codes (kv/turboquant.py, MSE variant) in the rotated space.

  qr [T, H, D]: the query already rotated; k_side / v_side = (norm f16 [K, S, 1], [(start,
  stop, bits, codebook [2^bits], [codes of the fields of width 1, 2, 4 the bits hold, uint8
  [K, S, (stop - start) * width / 8]])]); score_bias [T, H] is added to q.k before the scale;
  v_shift [K, D] (rotated) is added to each output times its probability mass. Returns the
  rotated output [T, H, D] (the caller rotates it back, once)."""
  operands, groups, books = [], {}, []
  for name, (norm, parts) in (("k", k_side), ("v", v_side)):
    operands.append(norm)
    flat = []
    for a, b, bits, codebook, fields in parts:
      flat += [a, b, bits]
      books.append(np.asarray(codebook, np.float32))
      operands += list(fields)
    groups[name] = np.asarray(flat, np.int64)
  k_norm = k_side[0]
  return _attn_call("lazymoe_attn_turboquant", qr.shape[-1], qr, q_pos, window, scale, sinks,
                    jnp.asarray(score_bias, jnp.float32), jnp.asarray(v_shift, jnp.float32),
                    *operands, kv_heads=np.int64(k_norm.shape[0]),
                    capacity=np.int64(k_norm.shape[1]), k_groups=groups["k"],
                    v_groups=groups["v"], codebooks=np.concatenate(books))
