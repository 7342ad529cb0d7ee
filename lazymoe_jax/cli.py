"""What every command-line entry point does around its work."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

from absl import flags, logging

from lazymoe_jax.errors import LazyMoEError
from lazymoe_jax.store.pool import POLICIES


def define_engine_flags() -> None:
  """The flags of `lazymoe_jax.load`, shared by every CLI that loads a store."""
  flags.DEFINE_integer("expert_slots", None, "Expert pool slots shared by all layers "
                       "(min num_experts_per_tok; default: as many as half the free RAM holds).")
  flags.DEFINE_float("memory_budget_gb", None, "Plan dense + KV + expert pool to fit this "
                     "many GB (instead of --expert_slots); prints the plan.")
  flags.DEFINE_float("kv_bits", None, "TurboQuant KV cache bits (1-4, also 2.5 / 3.5); "
                     "default: float32 cache.")
  flags.DEFINE_float("k_bits", None, "TurboQuant bits for keys only (with --v_bits).")
  flags.DEFINE_float("v_bits", None, "TurboQuant bits for values only (with --k_bits).")
  flags.DEFINE_bool("prefetch", True, "Speculative prefetch of the next layer's experts.")
  flags.DEFINE_enum("cache_policy", "lfu", POLICIES, "Expert pool eviction policy.")
  flags.DEFINE_enum("dense_dtype", None, ["bfloat16", "int8"], "Re-encode the dense matrices "
                    "read every token (attention, output head, dense/shared MLPs) at load.")
  flags.DEFINE_integer("max_context", None, "Longest sequence (prompt + new tokens); the "
                       "memory plan sizes the KV cache for it.")


def engine_options() -> dict:
  """The values of define_engine_flags() as keyword arguments of `lazymoe_jax.load`."""
  f = flags.FLAGS
  return {n: f[n].value for n in ("expert_slots", "memory_budget_gb", "kv_bits", "k_bits",
                                   "v_bits", "prefetch", "cache_policy", "max_context",
                                   "dense_dtype")}


def check_sampling_flags() -> None:
  """Refuses nonsense --max_new_tokens, --temperature, --top_p, --top_k (the flags of the
  commands that sample) with a message naming the flag and its valid range."""
  f = flags.FLAGS
  max_new_tokens, temperature, top_p, top_k = (
      f.max_new_tokens, f.temperature, f.top_p, f.top_k)
  if max_new_tokens < 0:
    raise ValueError(f"--max_new_tokens={max_new_tokens} is negative: give a count >= 0.")
  if not math.isfinite(temperature) or temperature < 0:  # nan < 0 is False: isfinite first
    raise ValueError(f"--temperature={temperature} is not a finite number >= 0: give 0 for "
                     "greedy decoding or a positive temperature such as 0.7.")
  if not (math.isfinite(top_p) and 0 < top_p <= 1):
    raise ValueError(f"--top_p={top_p} is outside (0, 1]: give a probability mass such as 0.9 "
                     "(1 keeps every token).")
  if top_k < 0:
    raise ValueError(f"--top_k={top_k} is negative: give 0 (keep every token) or a count >= 1.")


def run(work: Callable[[], object]) -> None:
  """Quiet library logging (orbax logs every save and restore at INFO) unless --verbosity was
  given, then run `work`; a LazyMoEError or ValueError ends the program with its message (no
  traceback: the messages say what is wrong and what to do)."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    work()
  except (LazyMoEError, ValueError) as e:
    sys.exit(f"error: {e}")
