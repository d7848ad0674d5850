import numpy as np
import pandas as pd
import pytest

from ihd.labels import SUBTYPES
from ihd.metrics import weighted_log_loss
from ihd.report import aligned, format_scores, scores_on_truth


def _wide(values, images):
    return pd.DataFrame(np.asarray(values, np.float64), index=pd.Index(images, name="image_id"), columns=list(SUBTYPES))


def test_scores_use_the_prior_for_images_without_prediction():
    truth = _wide([[0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 1]], ["ID_a", "ID_b"])
    prior = np.full(6, 0.2)
    model = _wide([[0.9] * 6], ["ID_b"])
    scores = scores_on_truth(truth, {"cnn": model}, prior)
    expected_cnn = weighted_log_loss(truth.to_numpy(), np.array([[0.2] * 6, [0.9] * 6]))
    assert scores["cnn"] == pytest.approx(expected_cnn)
    assert scores["prior"] == pytest.approx(weighted_log_loss(truth.to_numpy(), np.full((2, 6), 0.2)))


def test_aligned_follows_the_truth_order():
    truth = _wide(np.zeros((2, 6)), ["ID_b", "ID_a"])
    model = _wide([[0.1] * 6, [0.7] * 6], ["ID_a", "ID_b"])
    np.testing.assert_allclose(aligned(model, truth, np.zeros(6))[:, 0], [0.7, 0.1])


def test_format_scores_gives_changes_against_the_cnn():
    text = format_scores({"prior": 0.3, "cnn": 0.2, "cnn+lstm": 0.15})
    assert "| cnn+lstm | 0.15000 | -25.0% |" in text
    assert "| prior | 0.30000 | +50.0% |" in text
