"""Metrics on hand-checkable cases: AUC, AP, accuracies, TPR at low FPR, per-generator pairing, CLIP score."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from semspai.pipeline.metrics import binary_metrics, clip_scores, evaluate_scores, rank_auc, tpr_at_fpr


def test_perfect_separation():
    m = binary_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], threshold=0.5)
    assert m["auc"] == m["ap"] == m["acc_at_0_5"] == m["acc_at_threshold"] == 1.0
    assert m["tpr_at_1_fpr"] == m["tpr_at_5_fpr"] == 1.0
    assert (m["n_real"], m["n_fake"], m["threshold"]) == (2, 2, 0.5)
    assert m["auc_ci"] == [1.0, 1.0]


def test_hand_computed_auc_ap_and_accuracy():
    # reals 0.1, 0.4, 0.35; fakes 0.8, 0.35(tie), 0.2. Pairs (fake > real): 0.8 beats 3; 0.35 beats 0.1,
    # ties 0.35 (half); 0.2 beats 0.1 -> (3 + 1.5 + 1) / 9
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8, 0.35, 0.2]
    m = binary_metrics(y, s, threshold=0.3)
    assert m["auc"] == pytest.approx(5.5 / 9)
    # at 0.5 only 0.8 is called fake: correct = 3 reals + 1 fake
    assert m["acc_at_0_5"] == pytest.approx(4 / 6)
    # at 0.3: called fake 0.4, 0.35, 0.8, 0.35 -> correct: real 0.1, fakes 0.8 and 0.35 -> 3/6
    assert m["acc_at_threshold"] == pytest.approx(3 / 6)
    # AP: ranking 0.8(F) 0.4(R) 0.35(R,F tie) 0.2(F) 0.1(R); sklearn steps at each distinct score:
    # precision@0.8=1 recall 1/3; @0.4: recall unchanged; @0.35: 2/4, recall 2/3; @0.2: 3/5, recall 1
    assert m["ap"] == pytest.approx(1 / 3 * 1 + 1 / 3 * 0.5 + 1 / 3 * 0.6)


def test_tpr_at_low_fpr():
    # 100 reals at 0..0.99 spread; fakes: 50 above every real, 50 below every real
    reals = np.linspace(0.2, 0.7, 100)
    fakes = np.concatenate([np.full(50, 0.9), np.full(50, 0.1)])
    y = np.r_[np.zeros(100), np.ones(100)]
    s = np.r_[reals, fakes]
    assert tpr_at_fpr(y, s, 0.01) == 0.5
    # 5% FPR lets 5 reals through, still no more fakes until all reals pass
    assert tpr_at_fpr(y, s, 0.05) == 0.5
    m = binary_metrics(y, s, 0.5)
    assert m["tpr_at_1_fpr"] == m["tpr_at_5_fpr"] == 0.5


def test_one_class_gives_none_not_nan():
    m = binary_metrics([1, 1], [0.7, 0.2], threshold=0.5)
    assert m["auc"] is None and m["ap"] is None and m["auc_ci"] is None and m["tpr_at_1_fpr"] is None
    assert m["acc_at_0_5"] == 0.5 and m["n_real"] == 0 and m["n_fake"] == 2


def test_bootstrap_ci_is_seeded_and_brackets_auc():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(60), np.ones(60)]
    s = np.r_[rng.normal(0, 1, 60), rng.normal(1, 1, 60)]
    a, b = binary_metrics(y, s, 0.5, seed=3), binary_metrics(y, s, 0.5, seed=3)
    assert a["auc_ci"] == b["auc_ci"]
    lo, hi = a["auc_ci"]
    assert lo < a["auc"] < hi and hi - lo < 0.3
    assert binary_metrics(y, s, 0.5, seed=4)["auc_ci"] != a["auc_ci"]


def test_per_generator_pairs_each_generator_with_all_reals():
    # reals 0.3, 0.5; gan_a fakes all above every real, gan_b fakes all below
    y = [0, 0, 1, 1, 1]
    s = [0.3, 0.5, 0.9, 0.1, 0.2]
    g = ["camera", "camera", "gan_a", "gan_b", "gan_b"]
    out = evaluate_scores(y, s, g, threshold=0.5, rounds=50)
    assert set(out["per_generator"]) == {"gan_a", "gan_b"}
    a, b = out["per_generator"]["gan_a"], out["per_generator"]["gan_b"]
    assert (a["n_real"], a["n_fake"], b["n_real"], b["n_fake"]) == (2, 1, 2, 2)
    assert a["auc"] == 1.0 and b["auc"] == 0.0
    assert out["overall"]["auc"] == pytest.approx(2 / 6)
    assert out["overall"]["n_fake"] == 3


def test_clip_score_per_class_and_generator():
    img = np.array([[1.0, 0], [0, 2.0], [1.0, 1.0], [1.0, 0]])
    cap = np.array([[1.0, 0], [1.0, 0], [1.0, 0], [np.nan, np.nan]])  # last image has no caption
    out = clip_scores(img, cap, [0, 1, 1, 1], ["cam", "gan_a", "gan_b", "gan_b"])
    assert out["real"] == {"clip_score": 100.0, "n": 1}
    assert out["fake"]["n"] == 2
    assert out["fake"]["clip_score"] == pytest.approx((0 + 100 / math.sqrt(2)) / 2)
    assert out["fake/gan_a"]["clip_score"] == pytest.approx(0.0)
    assert out["fake/gan_b"] == {"clip_score": pytest.approx(100 / math.sqrt(2)), "n": 1}


def test_rank_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 40)
    s = rng.integers(0, 6, (5, 40)).astype(float)  # many ties
    np.testing.assert_allclose(rank_auc(y, s), [roc_auc_score(y, row) for row in s])
