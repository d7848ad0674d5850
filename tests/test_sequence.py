import numpy as np
import pandas as pd
import pytest

from ihd.labels import SUBTYPES
from ihd.metrics import weighted_log_loss
from ihd.row_files import RowFile
from ihd.sequence import (
    PAD_VALUE,
    NeighbourDifferences,
    SeriesBatches,
    SeriesSet,
    build_lstm,
    compile_lstm,
    fit_lstm,
    input_moments,
    load_lstm,
    pad_batch,
    plan_batches,
    predict_series,
    row_runs,
    sequence_inputs,
    series_bounds,
    series_set,
    standardizing_moments,
)


def _index(lengths, folds=None):
    rows = []
    for number, length in enumerate(lengths):
        for position in range(length):
            rows.append({"image_id": f"ID_{number:03d}{position:03d}", "series_id": f"S{number:03d}",
                         "position": position, "fold": -1 if folds is None else folds[number]})
    return pd.DataFrame(rows)


def _data(lengths, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    index = _index(lengths)
    inputs = sequence_inputs(rng.normal(size=(len(index), dim - 6)), rng.uniform(0.01, 0.99, (len(index), 6)))
    labels = (rng.random((len(index), len(SUBTYPES))) < 0.3).astype(np.float32)
    return index, series_set(inputs, index, np.ones(len(index), bool), labels)


def test_series_bounds_finds_each_block():
    starts, lengths = series_bounds(_index([3, 1, 4]))
    assert starts.tolist() == [0, 3, 4]
    assert lengths.tolist() == [3, 1, 4]


def test_series_bounds_rejects_split_series_and_wrong_order():
    index = _index([2, 2])
    with pytest.raises(ValueError, match="S000"):
        series_bounds(index.iloc[[0, 2, 1, 3]].reset_index(drop=True))
    swapped = index.copy()
    swapped.loc[[0, 1], "position"] = [1, 0]
    with pytest.raises(ValueError, match="ID_000000"):
        series_bounds(swapped)


def test_series_set_keeps_whole_series_and_rejects_partial_ones():
    index = _index([2, 3, 2], folds=[0, 1, 0])
    chosen = series_set(np.zeros((7, 2)), index, (index["fold"] == 0).to_numpy())
    assert chosen.starts.tolist() == [0, 5]
    assert chosen.rows.tolist() == [0, 1, 5, 6]
    with pytest.raises(ValueError, match="S001"):
        series_set(np.zeros((7, 2)), index, np.arange(7) < 3)


def test_sequence_inputs_puts_probabilities_last_at_the_stored_precision():
    selected = np.full((4, 3), 1 / 3, np.float32)
    probabilities = np.full((4, 6), 0.25, np.float16)
    inputs = sequence_inputs(selected, probabilities)
    assert inputs.shape == (4, 9) and inputs.dtype == np.float32
    assert np.all(inputs[:, 3:] == 0.25)
    assert np.all(inputs[:, :3] == np.float32(np.float16(1 / 3))) and np.float16(1 / 3) != np.float32(1 / 3)
    selected[2, 1] = 1e6
    with pytest.raises(ValueError, match=r"row 2, input 1 is 1000000.0: not a finite float16"):
        sequence_inputs(selected, probabilities)


def test_row_runs_join_adjacent_blocks_and_cut_long_ones():
    assert row_runs(np.array([5, 0, 3, 10]), np.array([2, 3, 2, 4]), 4) == [(0, 4), (4, 7), (10, 14)]
    assert row_runs(np.array([0, 3]), np.array([3, 2]), 100) == [(0, 5)]


def test_batches_moments_and_predictions_read_from_a_row_file_as_from_memory(tmp_path):
    index, data = _data([3, 5, 1, 4, 4, 2])
    np.save(tmp_path / "inputs.npy", data.inputs.astype(np.float16))
    from_file = SeriesSet(RowFile(tmp_path / "inputs.npy", read_as=np.float32), data.starts[1:], data.lengths[1:],
                          data.labels)
    in_memory = SeriesSet(data.inputs, data.starts[1:], data.lengths[1:], data.labels)
    for got, expected in zip(input_moments(from_file), input_moments(in_memory)):
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert not np.allclose(input_moments(from_file)[0], input_moments(data)[0]), "the first series is left out"
    series = np.array([0, 2, 4])
    for got, expected in zip(pad_batch(from_file, series), pad_batch(in_memory, series)):
        np.testing.assert_array_equal(got, expected)
    model = build_lstm(8, layers=1, units=4, dropout=0.0)
    np.testing.assert_array_equal(predict_series(model, from_file, batch_size=2), predict_series(model, in_memory, batch_size=2))


def test_bucketing_keeps_every_series_exactly_once_and_groups_lengths():
    lengths = np.random.default_rng(1).integers(24, 61, size=203)
    for shuffle in (False, True):
        plan = plan_batches(lengths, batch_size=16, shuffle=shuffle, seed=3)
        assert sorted(np.concatenate(plan).tolist()) == list(range(203))
        spread = [lengths[b].max() - lengths[b].min() for b in plan]
        assert max(spread) <= 4
    assert [b.tolist() for b in plan_batches(lengths, 16, True, 3)] != [b.tolist() for b in plan_batches(lengths, 16, True, 4)]


def test_batches_rebuild_every_row_once():
    index, data = _data([3, 5, 1, 4, 4, 2])
    batches = SeriesBatches(data, batch_size=4, shuffle=True)
    seen = []
    for x, y in batches.dataset().as_numpy_iterator():
        assert x.shape[:2] == y.shape[:2]
        real = ~np.all(x == PAD_VALUE, axis=-1)
        seen.extend(map(tuple, x[real]))
        assert np.all(y[~real] == 0)
    assert sorted(seen) == sorted(map(tuple, data.inputs))
    assert len(batches) == 2


def test_padding_changes_neither_real_outputs_nor_loss():
    index, data = _data([3, 6])
    model = compile_lstm(build_lstm(8, layers=2, units=8, dropout=0.0, moments=input_moments(data)))
    short_x, short_y = pad_batch(data, np.array([0]))
    both_x, both_y = pad_batch(data, np.array([0, 1]))
    assert both_x.shape[1] == 6
    alone = model.predict_on_batch(short_x)[0]
    padded = model.predict_on_batch(both_x)[0, :3]
    np.testing.assert_allclose(padded, alone, atol=1e-5)

    predicted = model.predict_on_batch(both_x)
    expected = weighted_log_loss(np.concatenate([both_y[0, :3], both_y[1]]), np.concatenate([predicted[0, :3], predicted[1]]))
    assert model.evaluate(both_x, both_y, verbose=0) == pytest.approx(expected, rel=1e-4)
    garbage_y = both_y.copy()
    garbage_y[0, 3:] = 1.0
    assert model.evaluate(both_x, garbage_y, verbose=0) == pytest.approx(expected, rel=1e-4)


def test_input_moments_cover_the_set_rows_only():
    inputs = np.array([[1.0], [3.0], [100.0]], np.float32)
    index = _index([2, 1])
    mean, variance = input_moments(series_set(inputs, index, np.array([True, True, False])))
    assert mean.tolist() == [2.0] and variance.tolist() == [1.0]


def test_residual_lstm_starts_at_the_cnn_probabilities():
    index, data = _data([4, 7])
    model = build_lstm(8, layers=1, units=4, dropout=0.0)
    predicted = predict_series(model, data)
    np.testing.assert_allclose(predicted, data.inputs[:, -6:], atol=1e-5)
    with pytest.raises(ValueError, match="six CNN probabilities"):
        build_lstm(5)


def test_predict_series_returns_index_order():
    index, data = _data([2, 4, 3])
    model = build_lstm(8, layers=1, units=4, dropout=0.0, head="plain")
    bulk = predict_series(model, data, batch_size=2)
    one_by_one = np.concatenate(
        [model.predict_on_batch(data.inputs[None, s : s + n])[0] for s, n in zip(data.starts, data.lengths)]
    )
    np.testing.assert_allclose(bulk, one_by_one, atol=1e-5)


def test_fit_keeps_the_best_epoch_and_learns_a_sequence_rule(tmp_path):
    # a slice is positive when its neighbour in z is: only a model that reads the sequence can tell
    rng = np.random.default_rng(0)
    lengths = [8] * 48
    index = _index(lengths)
    signal = (rng.random(len(index)) < 0.3).astype(np.float32)
    neighbour = np.roll(signal, 1)
    neighbour[np.arange(0, len(index), 8)] = 0
    inputs = np.stack([signal, rng.normal(size=len(index))], axis=1).astype(np.float32)
    labels = np.repeat(neighbour[:, None], 6, axis=1)
    folds = np.repeat(np.arange(48) % 4 == 0, 8)
    train = series_set(inputs, index, ~folds, labels)
    val = series_set(inputs, index, folds, labels)
    model = compile_lstm(build_lstm(2, layers=1, units=16, dropout=0.0, head="plain"), learning_rate=0.02)
    best = fit_lstm(model, train, val, tmp_path / "lstm.keras", epochs=12, batch_size=8)
    scores = [h["val_weighted_log_loss"] for h in best.history]
    assert best.best == min(scores) and best.best_epoch == int(np.argmin(scores)) + 1
    reloaded = load_lstm(tmp_path / "lstm.keras")
    rows = val.rows
    assert weighted_log_loss(labels[rows], predict_series(reloaded, val)[rows]) == pytest.approx(best.best, rel=1e-5)
    assert best.best < 0.3


def test_neighbour_differences_are_zero_at_a_series_ends_and_ignore_padding():
    import keras

    inputs = keras.Input((None, 1))
    masked = keras.layers.Masking(mask_value=PAD_VALUE)(inputs)
    model = keras.Model(inputs, NeighbourDifferences()(masked))
    x = np.array([[[1.0], [2.0], [4.0], [PAD_VALUE]], [[5.0], [3.0], [6.0], [7.0]]], np.float32)
    out = model.predict_on_batch(x)
    np.testing.assert_allclose(out[0, :3], [[1, 0, -1], [2, 1, -2], [4, 2, 0]])
    np.testing.assert_allclose(out[1], [[5, 0, 2], [3, -2, -3], [6, 3, -1], [7, 1, 0]])


def test_the_papers_head_reads_the_lstm_output_beside_the_raw_cnn_probabilities():
    index, data = _data([4, 7])
    model = build_lstm(8, layers=2, units=4, dropout=0.3, head="paper")
    dense = model.get_layer("pred")
    assert dense.kernel.shape == (2 * 4 + 6, 6), "the last layer reads 2x4 LSTM outputs and the six probabilities"
    assert model.get_layer("head_dropout").rate == 0.5
    assert [layer.name for layer in model.layers if layer.name.startswith("dropout")] == ["dropout1"], (
        "dropout between the LSTM layers only, as PyTorch's LSTM(dropout=...) applies it")
    # the probabilities reach the last layer as they are: zero the LSTM's part of the kernel, and the
    # output is the sigmoid of the probabilities through the rest
    kernel = np.zeros((14, 6), np.float32)
    kernel[8:] = np.eye(6)
    dense.set_weights([kernel, np.zeros(6, np.float32)])
    predicted = predict_series(model, data)
    np.testing.assert_allclose(predicted, 1 / (1 + np.exp(-data.inputs[:, -6:])), atol=1e-5)


def test_shared_standardisation_keeps_the_features_relative_scales():
    index = _index([3, 3])
    rng = np.random.default_rng(0)
    features = rng.normal(size=(6, 3)) * [10.0, 1.0, 0.1]  # a PCA-like spectrum
    data = series_set(sequence_inputs(features, rng.uniform(0.01, 0.99, (6, 6))), index, np.ones(6, bool))
    mean, variance = standardizing_moments(data, "per-feature")
    np.testing.assert_allclose(variance, data.inputs.var(axis=0), rtol=1e-5)
    shared_mean, shared = standardizing_moments(data, "shared")
    np.testing.assert_allclose(shared_mean, mean)
    np.testing.assert_allclose(shared[:3], variance[:3].mean(), rtol=1e-6)
    np.testing.assert_allclose(shared[3:], variance[3:], rtol=1e-6), "the probabilities keep their own"
    assert standardizing_moments(data, "none") is None
    with pytest.raises(ValueError, match="unknown standardisation 'whiten'"):
        standardizing_moments(data, "whiten")


def test_an_epoch_batch_shrinks_only_where_min_steps_asks_and_says_so():
    from ihd.sequence import epoch_batch

    assert epoch_batch(128, 12, 8) == (1, "1 series per batch (--min-steps 8 a training epoch)")
    assert epoch_batch(128, 5000, 8) == (128, "128 series per batch")
    assert epoch_batch(128, 12, 1) == (12, "12 series per batch")  # fewer series than a batch: all in one
    assert epoch_batch(4, 3, 8) == (1, "1 series per batch (--min-steps 8 a training epoch)")
