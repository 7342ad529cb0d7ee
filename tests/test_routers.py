"""Routers on hand-written arrays (the parity tests check them against transformers)."""

import numpy as np

from lazymoe_jax.model import routers
from lazymoe_jax.model.routers import softmax_topk


def _logit(p):
  return np.log(np.asarray(p, np.float32) / (1 - np.asarray(p, np.float32)))


def test_sigmoid_group_topk_chooses_on_biased_scores_within_groups():
  # 6 experts in 3 groups of 2; sigmoid scores below, bias lifts expert 5
  scores = np.array([[0.9, 0.1, 0.6, 0.5, 0.2, 0.3]], np.float32)
  bias = np.array([0, 0, 0, 0, 0, 0.5], np.float32)
  # group scores (top-2 sums of biased scores): 1.0, 1.1, 1.0 -> with topk_group=1 only group 1
  ids, w = routers.sigmoid_group_topk(_logit(scores), 2, False, 3, 1, bias)
  assert sorted(np.asarray(ids)[0].tolist()) == [2, 3]
  np.testing.assert_allclose(np.sort(np.asarray(w)[0]), [0.5, 0.6], rtol=1e-6)
  # one group (no limit): chosen on biased scores, 0.9 (expert 0) and 0.3 + 0.5 (expert 5);
  # weights the unbiased 0.9 and 0.3, renormalised
  ids, w = routers.sigmoid_group_topk(_logit(scores), 2, True, 1, 1, bias)
  assert sorted(np.asarray(ids)[0].tolist()) == [0, 5]
  np.testing.assert_allclose(np.asarray(w)[0].sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.sort(np.asarray(w)[0]), [0.25, 0.75], rtol=1e-5)


def test_softmax_group_topk_zeroes_experts_outside_the_best_groups():
  # softmax probs proportional to these; groups of 2: maxima 0.30, 0.25, 0.20
  p = np.array([[0.30, 0.01, 0.25, 0.24, 0.20, 0.00]], np.float32) + 1e-6
  ids, w = routers.softmax_group_topk(np.log(p), 3, 3, 2)
  assert sorted(np.asarray(ids)[0].tolist()) == [0, 2, 3]
  ids, w = routers.softmax_group_topk(np.log(p), 3, 3, 1)  # only group 0: third pick is a zero
  got = dict(zip(np.asarray(ids)[0].tolist(), np.asarray(w)[0].tolist()))
  assert {0, 1} <= set(got) and min(got.values()) == 0.0


def test_router_softmax_topk_by_hand():
  logits = np.array([[0.0, 1.0, 2.0, 3.0], [3.0, 0.0, 0.0, 1.0]], np.float32)
  ids, w = softmax_topk(logits, 2, renormalize=False)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(ids), [[3, 2], [0, 3]])
  np.testing.assert_allclose(np.asarray(w), [[p[0, 3], p[0, 2]], [p[1, 0], p[1, 3]]], rtol=1e-6)
  ids, w = softmax_topk(logits, 2, renormalize=True)
  np.testing.assert_allclose(np.asarray(w).sum(-1), [1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(w)[0], [1 / (1 + np.exp(-1)), 1 - 1 / (1 + np.exp(-1))],
                             rtol=1e-6)
