"""ihd.study_models and ihd.study_training: attention over masked series, pretraining, learning from study labels."""
import os

import keras
import numpy as np
import pandas as pd
import pytest

from ihd.sequence import PAD_VALUE, build_lstm, input_moments
from ihd.study_labels import LABEL_SETS
from ihd.study_metrics import flag_slices, localization_scores
from ihd.study_models import (
    attention_view,
    build_attention_lstm,
    build_volume_lstm,
    compile_study_model,
    copy_slice_lstm_weights,
    temporal_gradcam,
)
from ihd.study_training import fit_study_model, predict_studies, slice_weights, study_series

SEED = int(os.environ.get("IHD_TEST_SEED", "0"))  # another seed checks the result does not hang on one
EXAM = LABEL_SETS["exam"]
SUBTYPES_SET = LABEL_SETS["subtypes"]


def test_attention_ignores_padding_and_sums_to_one():
    model = attention_view(build_attention_lstm(8, SUBTYPES_SET, layers=1, units=4, dropout=0.0))
    rng = np.random.default_rng(0)
    short = rng.normal(size=(1, 5, 8)).astype(np.float32)
    padded = np.full((1, 9, 8), PAD_VALUE, np.float32)
    padded[0, :5] = short[0]
    alone, alone_weights = model.predict_on_batch(short)
    together, weights = model.predict_on_batch(padded)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(weights[0, :5], alone_weights[0], atol=1e-5)
    assert np.all(weights[0, 5:] == 0) and weights[0].sum() == pytest.approx(1.0, abs=1e-5)


def test_pretraining_copies_the_per_slice_lstm_layers_and_refuses_other_shapes():
    slice_lstm = build_lstm(10, layers=2, units=4, head="plain")
    study = build_attention_lstm(10, EXAM, layers=2, units=4)
    assert copy_slice_lstm_weights(study, slice_lstm) == ["bilstm1", "bilstm2"]
    for name in ("bilstm1", "bilstm2"):
        for mine, theirs in zip(study.get_layer(name).get_weights(), slice_lstm.get_layer(name).get_weights()):
            np.testing.assert_array_equal(mine, theirs)
    with pytest.raises(ValueError, match="bilstm1.*--units"):
        copy_slice_lstm_weights(build_attention_lstm(10, EXAM, layers=1, units=8), slice_lstm)
    with pytest.raises(ValueError, match="no layer bilstm3"):
        copy_slice_lstm_weights(build_attention_lstm(10, EXAM, layers=3, units=4), slice_lstm)


def _toy(series_count=48, seed=0):
    """Series of 6-10 slices; in a bleeding series a run of 3 identical slices carries a raised first
    feature (the other slices hold noise), so that attention has no reason to prefer one of the three."""
    rng = np.random.default_rng(seed)
    rows, features, truth, labels = [], [], [], {}
    for number in range(series_count):
        length = int(rng.integers(6, 11))
        bleeding = number % 2 == 0
        first = int(rng.integers(0, length - 3))
        for position in range(length):
            hot = bleeding and first <= position < first + 3
            rows.append({"study_id": f"S{number}", "series_id": f"S{number}", "position": position,
                         "z": 5.0 * position, "fold": (number // 2) % 4})
            features.append(np.r_[3.0, 0.0, 0.0, 0.0] if hot else np.r_[0.0, rng.normal(size=3)])
            truth.append(hot)
        labels[f"S{number}"] = [1.0, 0.0, 0.0] if bleeding else [0.0, 1.0, 0.0]
    table = pd.DataFrame.from_dict(labels, orient="index", columns=list(EXAM.columns))
    return pd.DataFrame(rows), np.asarray(features, np.float32), np.asarray(truth), table


def test_attention_model_learns_from_study_labels_and_points_at_the_bleeding_slices(tmp_path):
    index, features, truth, labels = _toy()
    train = study_series(features, index, (index["fold"] != 0).to_numpy(), labels)
    val = study_series(features, index, (index["fold"] == 0).to_numpy(), labels)
    # no LSTM layer: attention reads the slices themselves, so only the raised slices can carry the verdict
    keras.utils.set_random_seed(SEED)
    model = compile_study_model(build_attention_lstm(4, EXAM, layers=0, units=8, dropout=0.0,
                                                     moments=input_moments(train.data)), EXAM, 1e-2)
    best = fit_study_model(model, train, val, EXAM, tmp_path / "m.keras", epochs=40, batch_size=4)
    assert best.best_epoch >= 1 and (tmp_path / "m.keras").is_file()
    predicted = predict_studies(model, val)
    hemorrhage = val.labels[:, 0] == 1
    assert predicted[hemorrhage, 0].min() > predicted[~hemorrhage, 0].max()  # every exam ranked right
    weights = slice_weights(model, val)
    flags = [flag_slices(w) for w in weights]
    found = localization_scores(flags, [truth[val.slice_rows(n)] for n in range(len(val))])
    assert found["exams"] == hemorrhage.sum() and found["recall"] > 0.8 and found["precision"] > 0.6


def test_a_series_with_two_slices_at_one_position_is_left_out_by_name_where_it_is_resliced():
    index, features, _, labels = _toy(8)
    index.loc[(index["series_id"] == "S3") & (index["position"] == 2), "z"] = 5.0  # where position 1 is
    everything = np.ones(len(index), bool)
    assert len(study_series(features, index, everything, labels)) == 8  # read in order, not resliced: kept
    with pytest.warns(UserWarning, match=r"1 series have two slices at one position, .*cannot order; left out: S3$"):
        resliced = study_series(features, index, everything, labels, frames=5)
    kept = index["series_id"].to_numpy()[resliced.data.starts].tolist()
    assert kept == ["S0", "S1", "S2", "S4", "S5", "S6", "S7"]
    np.testing.assert_array_equal(resliced.labels, labels.loc[kept].to_numpy())


def test_volume_model_reads_resliced_frames_and_grad_cam_maps_back_to_slices():
    index, features, truth, labels = _toy(8)
    series = study_series(features, index, np.ones(len(index), bool), labels, frames=5)
    assert series.inputs(np.array([0, 1])).shape == (2, 5, 4)
    model = build_volume_lstm(4, EXAM, frames=5, units=4, moments=input_moments(series.data))
    weights = slice_weights(model, series, evidence_layer="standardise", class_index=0)
    assert [len(w) for w in weights] == series.data.lengths.tolist()
    assert all(w.sum() == pytest.approx(1.0) for w in weights)
    cam = temporal_gradcam(model, series.inputs(np.array([0])), 0, "standardise")
    assert cam.shape == (1, 5) and (cam >= 0).all()
