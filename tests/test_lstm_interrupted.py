"""Sequence-model training cut short: the model file is written once, at the end, or not at all."""
import keras
import numpy as np
import pandas as pd
import pytest

from ihd.metrics import weighted_log_loss
from ihd.sequence import BestEpoch, build_lstm, compile_lstm, fit_lstm, load_lstm, predict_series, series_set


def _sets():
    """24 series of 6 slices with 8 random inputs and random labels, split 18 to 6."""
    rng = np.random.default_rng(0)
    index = pd.DataFrame({"series_id": np.repeat([f"S{n:02d}" for n in range(24)], 6),
                          "position": np.tile(np.arange(6), 24)})
    inputs = rng.normal(size=(len(index), 8)).astype(np.float32)
    labels = (rng.random((len(index), 6)) < 0.3).astype(np.float32)
    val_rows = np.repeat(np.arange(24) % 4 == 0, 6)
    return series_set(inputs, index, ~val_rows, labels), series_set(inputs, index, val_rows, labels)


def _model():
    return compile_lstm(build_lstm(8, layers=1, units=8, dropout=0.0, head="plain"), learning_rate=0.01)


def test_a_killed_training_leaves_the_earlier_model_untouched(tmp_path, monkeypatch):
    train, val = _sets()
    path = tmp_path / "lstm.keras"
    first = fit_lstm(_model(), train, val, path, epochs=1, batch_size=6)
    kept = path.read_bytes()
    real_epoch_end = BestEpoch.on_epoch_end

    def killed_after_a_better_first_epoch(self, epoch, logs=None):
        real_epoch_end(self, epoch, logs)  # the first epoch is always the best so far
        raise KeyboardInterrupt

    monkeypatch.setattr(BestEpoch, "on_epoch_end", killed_after_a_better_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        fit_lstm(_model(), train, val, path, epochs=3, batch_size=6, seed=1)
    assert path.read_bytes() == kept
    rows = val.rows
    score = weighted_log_loss(val.labels[rows], predict_series(load_lstm(path), val)[rows])
    assert score == pytest.approx(first.best, rel=1e-5)


def test_the_saved_model_is_the_best_epoch_even_when_later_epochs_are_worse(tmp_path):
    train, val = _sets()
    path = tmp_path / "lstm.keras"
    model = _model()
    model.optimizer.learning_rate.assign(0.5)  # large steps: later epochs get worse on random labels
    best = fit_lstm(model, train, val, path, epochs=4, batch_size=6)
    scores = [h["val_weighted_log_loss"] for h in best.history]
    assert best.best_epoch == int(np.argmin(scores)) + 1 < len(scores), scores
    rows = val.rows
    score = weighted_log_loss(val.labels[rows], predict_series(load_lstm(path), val)[rows])
    assert score == pytest.approx(min(scores), rel=1e-5)
    assert keras.models.load_model(path, compile=False).count_params() == model.count_params()
