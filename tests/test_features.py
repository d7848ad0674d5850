import numpy as np
import pandas as pd
import pytest

import ihd.features as features_module
from ihd.cnn import build_cnn
from ihd.features import (
    fit_selection,
    extract_features,
    load_features,
    load_selection,
    parse_selection,
    rows_done,
    selected_features,
)
from ihd.inputs import fold_rows, neighbour_rows, stack_hu
from ihd.io import write_json
from ihd.slices import SliceStore

IMAGE_SIZE = 32


def _embeddings_with_wild_holdout(n_train=200, n_other=100, dim=16, seed=0):
    """Training rows ~ N(0, 1) with a variance ramp over dims; other rows far away and wild."""
    rng = np.random.default_rng(seed)
    train = rng.normal(0, 1, (n_train, dim)) * np.geomspace(0.05, 4.0, dim)
    other = rng.normal(500, 300, (n_other, dim)) * np.linspace(2.0, 0.1, dim)
    embeddings = np.concatenate([train, other]).astype(np.float16)
    rows = rng.permutation(len(embeddings))
    shuffled = np.empty_like(embeddings)
    shuffled[rows] = embeddings
    return shuffled, rows[:n_train]


def test_parse_selection_names_and_errors():
    assert parse_selection("pca:120") == ("pca", 120)
    assert parse_selection("all") == ("all", None)
    for bad in ("pca", "pca:0", "pca:x", "lasso:5", "all:3"):
        with pytest.raises(ValueError, match="feature selection"):
            parse_selection(bad)
    with pytest.raises(ValueError, match="asks for 17 dimensions but the embedding has 16"):
        fit_selection("variance:17", np.zeros((4, 16)), np.arange(4))


def test_selections_are_fitted_on_training_rows_only():
    embeddings, train = _embeddings_with_wild_holdout()
    x_train = embeddings[train].astype(np.float64)
    pca = fit_selection("pca:3", embeddings, train)
    np.testing.assert_allclose(pca.mean, x_train.mean(axis=0), atol=1e-4)
    assert np.abs(pca.components[0]).argmax() == 15, "first axis follows the training variance ramp"
    assert fit_selection("variance:4", embeddings, train).columns.tolist() == [12, 13, 14, 15]
    projected = pca.transform(embeddings[train])
    assert projected.shape == (200, 3) and projected.dtype == np.float32
    np.testing.assert_allclose(projected.mean(axis=0), 0, atol=1e-3)
    mask = np.zeros(len(embeddings), bool)
    mask[train] = True
    np.testing.assert_allclose(fit_selection("pca:3", embeddings, mask).mean, pca.mean)


def test_weights_random_mi_and_all():
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(300, 12)).astype(np.float16)
    kernel = np.zeros((12, 6))
    kernel[[3, 7], :] = 1.0
    assert fit_selection("weights:2", embeddings, np.arange(300), dense_kernel=kernel).columns.tolist() == [3, 7]
    first = fit_selection("random:5", embeddings, np.arange(300), seed=3).columns
    assert len(set(first.tolist())) == 5
    np.testing.assert_array_equal(first, fit_selection("random:5", embeddings, np.arange(300), seed=3).columns)
    assert not np.array_equal(first, fit_selection("random:5", embeddings, np.arange(300), seed=4).columns)
    labels = np.zeros((300, 6), np.float32)
    labels[:, 5] = labels[:, 1] = embeddings[:, 9] > 0.5
    labels[200:, 5] = labels[200:, 1] = embeddings[200:, 2] > 0.5
    assert fit_selection("mi:1", embeddings, np.arange(200), labels=labels).columns.tolist() == [9]
    everything = fit_selection("all", embeddings, np.arange(300))
    np.testing.assert_array_equal(everything.transform(embeddings[:4]), embeddings[:4].astype(np.float32))


def test_saved_selection_gives_the_same_transform(tmp_path):
    embeddings, train = _embeddings_with_wild_holdout()
    for name in ("pca:4", "variance:3", "random:2"):
        selection = fit_selection(name, embeddings, train)
        selection.save(tmp_path / "s.npz")
        loaded = load_selection(tmp_path / "s.npz")
        assert loaded.name == name
        np.testing.assert_array_equal(loaded.transform(embeddings), selection.transform(embeddings))


@pytest.fixture(scope="module")
def cnn_run(prepared_synthetic, tmp_path_factory):
    """An untrained tiny CNN and a config like the one train_cnn.py writes."""
    model = build_cnn("tiny", image_size=IMAGE_SIZE, recipe="adjacent")
    config = {"image_size": IMAGE_SIZE, "recipe": "-1:40/80,0:40/80,1:40/80", "fold": 0, "backbone": "tiny"}
    index_path = prepared_synthetic / "index.parquet"
    return model, config, pd.read_parquet(index_path), index_path, SliceStore(prepared_synthetic / "slices")


@pytest.fixture(scope="module")
def extracted(cnn_run, tmp_path_factory):
    model, config, index, index_path, store = cnn_run
    out_dir = tmp_path_factory.mktemp("features") / "run"
    extract_features(model, config, index, index_path, store, out_dir, batch_size=16, chunk_rows=32)
    return out_dir


def test_feature_files_are_float16_in_index_order(cnn_run, extracted):
    model, config, index, _, store = cnn_run
    features = load_features(extracted)
    assert features.embeddings.shape == (len(index), 64) and features.embeddings.dtype == np.float16
    assert features.probabilities.shape == (len(index), 6) and features.probabilities.dtype == np.float16
    assert features.config["embedding_dim"] == 64 and features.config["rows"] == len(index)
    pd.testing.assert_frame_equal(features.index, index)
    rows = np.array([0, 1, len(index) // 2, len(index) - 1])
    hu = np.stack([store.read_hu(i) for i in index["image_id"]])
    import cv2

    small = np.stack([cv2.resize(s, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA) for s in hu])
    stacks = stack_hu(small, neighbour_rows(index, (-1, 0, 1))[rows])
    expected = model.predict(stacks, verbose=0)
    np.testing.assert_allclose(features.probabilities[rows], expected, atol=2e-2)
    assert rows_done(extracted) == len(index)


def test_extraction_resumes_after_a_kill(cnn_run, extracted, tmp_path, monkeypatch):
    model, config, index, index_path, store = cnn_run
    real_write_json, starts = features_module.write_json, []

    def killed_after_first_chunk(path, obj):
        real_write_json(path, obj)
        if obj == {"rows_done": 32}:
            raise KeyboardInterrupt

    monkeypatch.setattr(features_module, "write_json", killed_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        extract_features(model, config, index, index_path, store, tmp_path, batch_size=16, chunk_rows=32)
    assert rows_done(tmp_path) == 32
    with pytest.raises(RuntimeError, match="row 32 of"):
        load_features(tmp_path)
    monkeypatch.setattr(features_module, "write_json", real_write_json)
    real_dataset = features_module.inference_dataset

    def recording_dataset(index, store, recipe, rows, *args):
        starts.append(int(rows[0]))
        return real_dataset(index, store, recipe, rows, *args)

    monkeypatch.setattr(features_module, "inference_dataset", recording_dataset)
    extract_features(model, config, index, index_path, store, tmp_path, batch_size=16, chunk_rows=32)
    assert starts == [32]
    resumed, reference = load_features(tmp_path), load_features(extracted)
    np.testing.assert_array_equal(resumed.embeddings, reference.embeddings)
    np.testing.assert_array_equal(resumed.probabilities, reference.probabilities)


def test_selected_features_fit_on_the_run_fold_and_are_saved(cnn_run, extracted):
    _, _, index, _, _ = cnn_run
    selected = selected_features(extracted, "pca:5")
    assert selected.shape == (len(index), 5) and selected.dtype == np.float32
    saved = extracted / "selection-pca5.npz"
    train_rows, _ = fold_rows(index, 0)
    embeddings = load_features(extracted).embeddings
    np.testing.assert_allclose(load_selection(saved).mean, embeddings[train_rows].astype(np.float64).mean(axis=0), atol=1e-3)
    before = saved.stat().st_mtime_ns
    np.testing.assert_array_equal(selected_features(extracted, "pca:5"), selected)
    assert saved.stat().st_mtime_ns == before
    assert selected_features(extracted, "weights:3").shape == (len(index), 3)


def test_extraction_restarts_when_the_settings_changed(cnn_run, extracted, tmp_path):
    model, config, index, index_path, store = cnn_run
    write_json(tmp_path / "progress.json", {"rows_done": 16})
    write_json(tmp_path / "config.json", {**config, "image_size": 999})
    extract_features(model, config, index, index_path, store, tmp_path, batch_size=16, chunk_rows=32)
    np.testing.assert_array_equal(load_features(tmp_path).embeddings, load_features(extracted).embeddings)
