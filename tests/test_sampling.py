"""Sampler: greedy and truncations pick the argmax, draws follow the softmax, bad settings fail."""

import math

import numpy as np
import pytest

from lazymoe_jax.sampling import Sampler

LOGITS = np.array([0.3, 2.0, -1.0, 1.2, 0.0, -0.5], np.float32)
ARGMAX = 1


def _draws(sampler: Sampler, n: int, logits=LOGITS) -> np.ndarray:
  return np.array([sampler(logits, step) for step in range(n)])


def test_greedy_is_argmax():
  rng = np.random.RandomState(0)
  for _ in range(20):
    logits = rng.standard_normal(50).astype(np.float32)
    assert Sampler()(logits, 0) == int(np.argmax(logits))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0, 100.0])
def test_top_k_1_is_argmax_at_any_temperature(temperature):
  assert set(_draws(Sampler(temperature, top_k=1, seed=3), 40)) == {ARGMAX}


def test_tiny_top_p_is_argmax():
  assert set(_draws(Sampler(2.0, top_p=1e-6, seed=4), 40)) == {ARGMAX}


def test_top_k_keeps_only_the_k_most_likely():
  assert set(_draws(Sampler(5.0, top_k=2, seed=5), 200)) == {1, 3}


def test_reproducible_by_seed_and_step():
  s = Sampler(1.0, seed=7)
  assert [s(LOGITS, t) for t in range(30)] == [Sampler(1.0, seed=7)(LOGITS, t) for t in range(30)]
  a, b = _draws(Sampler(1.0, seed=1), 200), _draws(Sampler(1.0, seed=2), 200)
  # independent draws agree with probability sum(p^2) ~ 0.35 per step: 200 cannot all agree
  assert (a != b).sum() > 50


def test_draws_follow_the_softmax_at_temperature_1():
  """Pearson chi-square of 6000 draws against the softmax: with 5 degrees of freedom the
  statistic exceeds 35 with probability < 2e-6 when the sampler is right; a sampler at
  temperature 1.2 scores above 35 on the same draws."""
  n = 6000
  counts = np.bincount(_draws(Sampler(1.0, seed=11), n), minlength=len(LOGITS))
  p = np.exp(LOGITS - LOGITS.max())
  p /= p.sum()
  chi2 = float((((counts - n * p) ** 2) / (n * p)).sum())
  assert chi2 < 35, (chi2, counts, n * p)
  # the bound has power: the wrong distribution scores far above it on the same draws
  q = np.exp(LOGITS / 1.2 - (LOGITS / 1.2).max())
  q /= q.sum()
  assert float((((counts - n * q) ** 2) / (n * q)).sum()) > 35


@pytest.mark.parametrize("kwargs, flag", [
    (dict(temperature=math.nan), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(temperature=-0.1), "temperature"), (dict(top_p=math.nan), "top_p"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-math.inf), "top_p"),
    (dict(top_k=-1), "top_k")])
def test_bad_settings_are_refused(kwargs, flag):
  with pytest.raises(ValueError, match=flag):
    Sampler(**kwargs)
