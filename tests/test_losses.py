"""ihd.losses: the training loss is the challenge's metric, slice by slice."""
import keras
import numpy as np
import pytest

from ihd.losses import loss_function, mean_binary_crossentropy, weighted_binary_crossentropy
from ihd.metrics import weighted_log_loss


def test_loss_weighs_any_twice():
    wrong_on_any = np.array([[0.1, 0.1, 0.1, 0.1, 0.1, 0.9]], np.float32)
    expected = (5 * -np.log(0.9) + 2 * -np.log(0.1)) / 7
    loss = weighted_binary_crossentropy(np.zeros((1, 6), np.float32), wrong_on_any)
    assert float(loss[0]) == pytest.approx(expected, rel=1e-5)


def test_mean_loss_is_the_metric_on_a_batch():
    rng = np.random.default_rng(0)
    y_true = (rng.random((16, 6)) < 0.3).astype(np.float32)
    y_pred = rng.uniform(0.05, 0.95, (16, 6)).astype(np.float32)
    loss = float(keras.ops.mean(weighted_binary_crossentropy(y_true, y_pred)))
    assert loss == pytest.approx(weighted_log_loss(y_true, y_pred), rel=1e-4)


def test_plain_loss_weighs_the_six_labels_alike():
    wrong_on_any = np.array([[0.1, 0.1, 0.1, 0.1, 0.1, 0.9]], np.float32)
    expected = (5 * -np.log(0.9) + -np.log(0.1)) / 6
    loss = mean_binary_crossentropy(np.zeros((1, 6), np.float32), wrong_on_any)
    assert float(loss[0]) == pytest.approx(expected, rel=1e-5)


def test_losses_are_found_by_name_and_unknown_names_refused():
    assert loss_function("weighted") is weighted_binary_crossentropy
    assert loss_function("bce") is mean_binary_crossentropy
    with pytest.raises(ValueError, match="unknown loss 'focal'.*weighted or bce"):
        loss_function("focal")
