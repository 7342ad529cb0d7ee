"""Model families, one module each, registered by Hugging Face `model_type`.

A family parses config.json into a ModelSpec (model/spec.py) and knows its checkpoints' tensor
names and weight transforms (families/base.py says what it overrides). To add a family: write
its module and add it to FAMILIES below.
"""

from __future__ import annotations

from typing import Any

from lazymoe_jax.errors import UnsupportedModelError
from lazymoe_jax.families import base
from lazymoe_jax.families.deepseek import DeepseekV2, DeepseekV3
from lazymoe_jax.families.glm4_moe import Glm4Moe
from lazymoe_jax.families.gpt_oss import GptOss
from lazymoe_jax.families.mixtral import Mixtral
from lazymoe_jax.families.olmoe import Olmoe
from lazymoe_jax.families.qwen_moe import Qwen2Moe, Qwen3Moe
from lazymoe_jax.model.spec import ModelSpec

FAMILIES: dict[str, type[base.Family]] = {f.model_type: f for f in (
    Mixtral, Qwen2Moe, Qwen3Moe, Olmoe, GptOss, DeepseekV3, DeepseekV2, Glm4Moe,
)}
ALIASES: dict[str, str] = {a: f.model_type for f in FAMILIES.values() for a in f.aliases}
# Some keys have two spellings in the wild (transformers 5 writes `num_local_experts` for
# Qwen3-MoE, published configs say `num_experts`); the other spelling is copied in first.
KEY_ALIASES = (("num_experts", "num_local_experts"),)


def family(model_type: str) -> type[base.Family]:
  name = ALIASES.get(model_type, model_type)
  if name not in FAMILIES:
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}.")
  return FAMILIES[name]


def with_aliases(hf: dict[str, Any]) -> dict[str, Any]:
  hf = dict(hf)
  for a, b in KEY_ALIASES:
    if a in hf and b not in hf:
      hf[b] = hf[a]
    elif b in hf and a not in hf:
      hf[a] = hf[b]
  return hf


def of_config(hf: dict[str, Any]) -> type[base.Family]:
  """The family of a parsed config.json."""
  if "model_type" not in hf:
    raise UnsupportedModelError(
        "config.json has no model_type; supported: " + ", ".join(sorted(FAMILIES)) + ".")
  return family(hf["model_type"])


def spec_from_hf(hf: dict[str, Any]) -> ModelSpec:
  """The ModelSpec of a parsed Hugging Face config.json."""
  return base.check_moe(of_config(hf).spec(with_aliases(hf)))
