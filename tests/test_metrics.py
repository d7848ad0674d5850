import math

import numpy as np
import pytest
from sklearn.metrics import log_loss

from ihd.labels import LABEL_WEIGHTS, SUBTYPES
from ihd.metrics import (
    per_subtype_auc,
    per_subtype_log_loss,
    prior_baseline,
    summary,
    weighted_log_loss,
)


def _random_case(n_images=40, seed=0):
    rng = np.random.default_rng(seed)
    y_true = (rng.random((n_images, len(SUBTYPES))) < 0.3).astype(np.float32)
    y_pred = rng.uniform(0.02, 0.98, size=(n_images, len(SUBTYPES)))
    return y_true, y_pred


def test_weighted_log_loss_matches_sklearn_on_the_long_table():
    y_true, y_pred = _random_case()
    long_weights = np.tile(LABEL_WEIGHTS, len(y_true))
    expected = log_loss(y_true.ravel(), y_pred.ravel(), sample_weight=long_weights, labels=[0, 1])
    assert weighted_log_loss(y_true, y_pred) == pytest.approx(expected, rel=1e-9)


def test_any_counts_twice():
    y_true = np.zeros((1, 6))
    y_pred = np.full((1, 6), 0.5)
    y_pred[0, SUBTYPES.index("any")] = 0.9
    costly_any = -math.log(0.1)
    expected = (5 * math.log(2) + 2 * costly_any) / 7
    assert weighted_log_loss(y_true, y_pred) == pytest.approx(expected)


def test_certain_mistakes_are_clipped_to_a_finite_loss():
    y_true = np.eye(6)
    loss = weighted_log_loss(y_true, 1.0 - y_true)
    assert math.isfinite(loss) and loss > 10
    assert weighted_log_loss(y_true, y_true) == pytest.approx(0.0, abs=1e-5)


def test_per_subtype_log_loss_matches_sklearn_per_column():
    y_true, y_pred = _random_case(seed=1)
    losses = per_subtype_log_loss(y_true, y_pred)
    assert list(losses) == list(SUBTYPES)
    for column, name in enumerate(SUBTYPES):
        expected = log_loss(y_true[:, column], y_pred[:, column], labels=[0, 1])
        assert losses[name] == pytest.approx(expected, rel=1e-9)


def test_auc_is_nan_where_a_subtype_has_one_class():
    y_true, y_pred = _random_case(seed=2)
    y_true[:, 0] = 0
    y_pred[:, 1] = y_true[:, 1]
    aucs = per_subtype_auc(y_true, y_pred)
    assert math.isnan(aucs["epidural"])
    assert aucs["intraparenchymal"] == pytest.approx(1.0)


def test_prior_baseline_predicts_the_training_means_and_ignores_nan():
    train = np.array([[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0], [np.nan] * 6, [1, 0, 1, 0, 0, 1]])
    baseline = prior_baseline(train, n_rows=5)
    assert baseline.shape == (5, 6)
    np.testing.assert_allclose(baseline[3], [2 / 3, 0, 1 / 3, 0, 0, 2 / 3])


def test_summary_and_bad_shapes():
    y_true, y_pred = _random_case(seed=3)
    report = summary(y_true, y_pred)
    assert report["weighted_log_loss"] == weighted_log_loss(y_true, y_pred)
    assert {f"auc_{name}" for name in SUBTYPES} <= set(report)
    with pytest.raises(ValueError, match="must both be"):
        weighted_log_loss(y_true[:, :5], y_pred[:, :5])
    with pytest.raises(ValueError, match="must both be"):
        weighted_log_loss(y_true, y_pred[:-1])


@pytest.mark.parametrize("where, value, message", [
    ("truth", 2.0, "labels must be 0 or 1, found 2"),
    ("truth", 0.5, "labels must be 0 or 1, found 0.5"),
    ("prediction", -3.0, r"predictions must be probabilities in \[0, 1\], found -3"),
    ("prediction", 1.7, r"predictions must be probabilities in \[0, 1\], found 1.7"),
    ("prediction", np.inf, r"found inf"),
])
def test_labels_that_are_not_0_or_1_and_predictions_outside_0_1_are_refused(where, value, message):
    y_true, y_pred = _random_case(seed=4)
    (y_true if where == "truth" else y_pred)[2, 1] = value
    with pytest.raises(ValueError, match=message):
        weighted_log_loss(y_true, y_pred)
