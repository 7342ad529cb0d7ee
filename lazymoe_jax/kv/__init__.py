"""KV caches: pytrees plus pure functions, one interface for every variant.

  kv = DenseKV() | TurboQuantKV(k_bits, v_bits) | LatentKV()   (frozen, hashable: a static
                                                       jit argument; LatentKV for MLA models)
  cache = kv.init(spec, capacity)                      one pytree per layer (spec: ModelSpec)
  cache[l] = kv.update(cache[l], k, v, start)          k, v [T, K, D]
  out = kv.attend(cache[l], q, q_pos, window, scale, sinks=None)   q [T, H, D] -> [T, H, D]
  kv.nbytes(cache)                                     bytes really held
"""

from lazymoe_jax.kv.dense import DenseKV
from lazymoe_jax.kv.latent import LatentKV
from lazymoe_jax.kv.turboquant import MLA_REFUSAL, TurboQuantKV


def make(kv_bits: float | None = None, k_bits: float | None = None,
         v_bits: float | None = None, seed: int = 0, k_variant: str = "mse", mla: bool = False):
  """DenseKV without bits; TurboQuantKV with kv_bits (both) or k_bits / v_bits (each);
  LatentKV for multi-head latent attention models (`mla`), which refuse bits."""
  k_bits = k_bits if k_bits is not None else kv_bits
  v_bits = v_bits if v_bits is not None else kv_bits
  if mla:
    if k_bits is not None or v_bits is not None:
      raise ValueError(MLA_REFUSAL)
    return LatentKV()
  if k_bits is None and v_bits is None:
    return DenseKV()
  if k_bits is None or v_bits is None:
    raise ValueError("give kv_bits, or both k_bits and v_bits.")
  return TurboQuantKV(float(k_bits), float(v_bits), seed, k_variant)
