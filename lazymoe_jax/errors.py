"""Errors the engine raises for bad input. Each message names the problem and the fix."""


class LazyMoEError(Exception):
  """Base class of every error LazyMoE-JAX raises on purpose."""


class UnsupportedModelError(LazyMoEError):
  """The checkpoint's architecture or one of its settings is not implemented."""


class CheckpointError(LazyMoEError):
  """A Hugging Face checkpoint folder is missing files or has wrong tensors."""


class StoreError(LazyMoEError):
  """A converted store is missing, incomplete, corrupt or of another format version."""


class PlanError(LazyMoEError):
  """The requested pool or memory budget cannot hold what one token needs."""


class TokenizerMissingError(LazyMoEError):
  """Text was given to a store that was converted without a tokenizer."""
