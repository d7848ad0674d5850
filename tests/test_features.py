import errno
import os
import shutil
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import ihd.features as features_module
import ihd.row_files as row_files
from ihd.cnn import build_cnn, embedding_extractor
from ihd.features import (
    FeaturesNotReady,
    embed_batch,
    extract_features,
    extraction_command,
    fit_selection,
    fitted_selection,
    load_features,
    load_selection,
    parse_selection,
    rows_done,
    selected_features,
    selection_fits,
)
from ihd.inputs import fold_rows, neighbour_rows, stack_hu
from ihd.io import write_json
from ihd.slices import SliceStore, encode_uint16_png, read_manifest, stored_values, write_manifest

IMAGE_SIZE = 32
CNN_SHA = "0" * 64  # stands for the sha256 of the untrained CNN's weights file


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
    with pytest.raises(ValueError, match="asks for 17 dimensions but the embedding has 16: choose --selection with at "
                                         "most 16, or all"):
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
    config = {"dataset": "small", "image_size": IMAGE_SIZE, "recipe": "-1:40/80,0:40/80,1:40/80", "fold": 0}
    index_path = prepared_synthetic / "index.parquet"
    return model, config, pd.read_parquet(index_path), index_path, SliceStore(prepared_synthetic / "slices")


@pytest.fixture(scope="module")
def extracted(cnn_run, tmp_path_factory):
    model, config, index, index_path, store = cnn_run
    out_dir = tmp_path_factory.mktemp("features") / "run"
    extract_features(model, config, CNN_SHA, index, index_path, store, out_dir, batch_size=16, chunk_rows=32)
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
        if obj.get("rows_done") == 32:
            raise KeyboardInterrupt

    monkeypatch.setattr(features_module, "write_json", killed_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        extract_features(model, config, CNN_SHA, index, index_path, store, tmp_path, batch_size=16, chunk_rows=32)
    assert rows_done(tmp_path) == 32
    with pytest.raises(RuntimeError, match="row 32 of"):
        load_features(tmp_path)
    monkeypatch.setattr(features_module, "write_json", real_write_json)
    real_dataset = features_module.inference_dataset

    def recording_dataset(index, store, recipe, rows, *args):
        starts.append(int(rows[0]))
        return real_dataset(index, store, recipe, rows, *args)

    monkeypatch.setattr(features_module, "inference_dataset", recording_dataset)
    extract_features(model, config, CNN_SHA, index, index_path, store, tmp_path, batch_size=16, chunk_rows=32)
    assert starts == [32]
    resumed, reference = load_features(tmp_path), load_features(extracted)
    np.testing.assert_array_equal(resumed.embeddings, reference.embeddings)
    np.testing.assert_array_equal(resumed.probabilities, reference.probabilities)
    written = {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()}
    extract_features(model, config, CNN_SHA, index, index_path, store, tmp_path, batch_size=16, chunk_rows=32)
    assert starts == [32] and {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()} == written


def test_selected_features_fit_on_the_run_fold_and_are_saved(cnn_run, extracted):
    _, _, index, _, _ = cnn_run
    features = load_features(extracted)
    selection = fitted_selection(features, "pca:5")
    selected = selected_features(selection, features.embeddings)
    assert selected.shape == (len(index), 5) and selected.dtype == np.float32
    saved = extracted / "selection-pca5.npz"
    train_rows, _ = fold_rows(index, 0)
    np.testing.assert_allclose(load_selection(saved).mean, features.embeddings[train_rows].astype(np.float64).mean(axis=0), atol=1e-3)
    before = saved.stat().st_mtime_ns
    np.testing.assert_array_equal(selected_features(fitted_selection(features, "pca:5"), features.embeddings), selected)
    assert saved.stat().st_mtime_ns == before
    assert selected_features(fitted_selection(features, "weights:3"), features.embeddings).shape == (len(index), 3)


def test_extraction_restarts_when_the_settings_changed(cnn_run, extracted, tmp_path):
    model, config, index, index_path, store = cnn_run
    write_json(tmp_path / "progress.json", {"rows_done": 16})
    write_json(tmp_path / "config.json", {**config, "image_size": 999})
    extract_features(model, config, CNN_SHA, index, index_path, store, tmp_path, batch_size=16, chunk_rows=32)
    np.testing.assert_array_equal(load_features(tmp_path).embeddings, load_features(extracted).embeddings)


def test_a_selection_is_fitted_again_on_features_extracted_again(cnn_run, tmp_path, capsys):
    # train_cnn.py --epochs 8 resuming a 5-epoch run gives a new cnn.keras, hence new embeddings
    model, config, index, index_path, store = cnn_run
    extract_features(model, config, CNN_SHA, index, index_path, store, tmp_path, batch_size=64)
    first = fitted_selection(load_features(tmp_path), "pca:4")
    retrained = build_cnn("tiny", image_size=IMAGE_SIZE, recipe="adjacent")
    capsys.readouterr()
    extract_features(retrained, config, "1" * 64, index, index_path, store, tmp_path, batch_size=64)
    assert "other inputs (cnn_sha256: 000000000000… -> 111111111111…): extracting again from the first row" in capsys.readouterr().out
    features = load_features(tmp_path)
    refitted = fitted_selection(features, "pca:4")
    assert "selection-pca4.npz was fitted on other inputs (features: " in capsys.readouterr().out
    train_rows, _ = fold_rows(index, 0)
    new_mean = features.embeddings[train_rows].astype(np.float64).mean(axis=0)
    assert np.abs(new_mean - first.mean).max() > 0.05, "the two CNNs must give different embeddings"
    np.testing.assert_allclose(refitted.mean, new_mean, atol=1e-3)
    np.testing.assert_array_equal(load_selection(tmp_path / "selection-pca4.npz").mean, refitted.mean)
    assert refitted.inputs["features"] == features.fingerprint != first.inputs["features"]


def test_random_selection_follows_the_seed(extracted):
    features = load_features(extracted)
    seeded = {seed: fitted_selection(features, "random:5", seed=seed) for seed in (0, 1)}
    assert seeded[1].inputs["seed"] == 1 and load_selection(extracted / "selection-random5.npz").inputs["seed"] == 1
    np.testing.assert_array_equal(seeded[1].columns, fit_selection("random:5", features.embeddings, [0], seed=1).columns)
    assert not np.array_equal(seeded[0].columns, seeded[1].columns)
    assert "seed" not in fitted_selection(features, "pca:3", seed=7).inputs, "PCA draws nothing at random"


def test_damaged_feature_files_are_found_and_written_again(cnn_run, extracted, tmp_path, capsys):
    model, config, index, index_path, store = cnn_run
    extract_features(model, config, CNN_SHA, index, index_path, store, tmp_path, batch_size=16, chunk_rows=32)
    reference = load_features(extracted)
    embeddings_path = tmp_path / "embeddings.npy"

    overwritten = np.load(embeddings_path, mmap_mode="r+")
    overwritten[40:50] = 0
    overwritten.flush()
    del overwritten
    with pytest.raises(FeaturesNotReady, match="embeddings.npy rows 32 to 63 differ from what was written"):
        load_features(tmp_path)
    capsys.readouterr()
    extract_features(model, config, CNN_SHA, index, index_path, store, tmp_path, batch_size=16, chunk_rows=32)
    assert "extracting again from row 32" in capsys.readouterr().out
    np.testing.assert_array_equal(load_features(tmp_path).embeddings, reference.embeddings)

    size = embeddings_path.stat().st_size
    with open(embeddings_path, "r+b") as handle:
        handle.truncate(size - 1000)
    with pytest.raises(FeaturesNotReady, match=f"embeddings.npy has {size - 1000} bytes, {size} were written"):
        load_features(tmp_path)
    extract_features(model, config, CNN_SHA, index, index_path, store, tmp_path, batch_size=16, chunk_rows=32)
    assert "extracting again from row 0" in capsys.readouterr().out
    assert embeddings_path.stat().st_size == size
    np.testing.assert_array_equal(load_features(tmp_path).embeddings, reference.embeddings)


@pytest.mark.parametrize("full_at", ["free space check", "allocation"])
def test_a_full_disk_is_named_before_any_row_is_written(cnn_run, tmp_path, monkeypatch, full_at):
    model, config, index, index_path, store = cnn_run
    if full_at == "free space check":
        monkeypatch.setattr(row_files.shutil, "disk_usage", lambda path: SimpleNamespace(free=4096))
    else:
        def no_space(fd, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(row_files.os, "posix_fallocate", no_space)
    with pytest.raises(OSError, match=r"embeddings.npy needs 0\.00 GiB more disk space .* has .* free"):
        extract_features(model, config, CNN_SHA, index, index_path, store, tmp_path, batch_size=16)
    assert rows_done(tmp_path) == 0


def test_the_cache_finds_its_index_from_any_working_directory(cnn_run, tmp_path, monkeypatch):
    model, config, index, index_path, store = cnn_run
    monkeypatch.chdir(index_path.parent.parent)
    relative_index = Path(index_path.parent.name) / index_path.name
    out_dir = Path(os.path.relpath(tmp_path / "features", Path.cwd()))
    extract_features(model, config, CNN_SHA, index, relative_index, store, out_dir, batch_size=64)
    monkeypatch.chdir(tmp_path)
    features = load_features(tmp_path / "features")
    assert not Path(features.config["index_path"]).is_absolute()
    pd.testing.assert_frame_equal(features.index, index)
    moved = tmp_path / "elsewhere" / "features"  # a cache moved: the rerun that follows writes where its index is
    moved.parent.mkdir()
    shutil.move(tmp_path / "features", moved)
    extract_features(model, config, CNN_SHA, index, index_path, store, moved, batch_size=64)
    pd.testing.assert_frame_equal(load_features(moved).index, index)


def test_a_slice_stored_again_with_other_pixels_makes_the_cache_stale(cnn_run, tmp_path):
    model, config, index, index_path, store = cnn_run
    dataset = tmp_path / "dataset"
    shutil.copytree(index_path.parent / "slices", dataset / "slices")
    shutil.copy(index_path, dataset / "index.parquet")
    extract_features(model, config, CNN_SHA, index, dataset / "index.parquet", SliceStore(dataset / "slices"),
                     tmp_path / "run", batch_size=64)
    load_features(tmp_path / "run")
    image_id = index["image_id"][5]  # stored again, 100 HU brighter, as write_slices does after its DICOM changed
    png = encode_uint16_png(stored_values(SliceStore(dataset / "slices").read_hu(image_id) + 100))
    (dataset / "slices" / "again.pack").write_bytes(png)
    manifest = read_manifest(dataset / "slices", sources=True)
    manifest.loc[manifest["image_id"] == image_id, ["pack", "offset", "length", "crc32"]] = [
        "again.pack", 0, len(png), zlib.crc32(png)]
    write_manifest(dataset / "slices", manifest)
    with pytest.raises(FeaturesNotReady, match="holds other pixels for the index's slices"):
        load_features(tmp_path / "run")
    before = np.load(tmp_path / "run" / "embeddings.npy", mmap_mode="r")[5].copy()
    extract_features(model, config, CNN_SHA, index, dataset / "index.parquet", SliceStore(dataset / "slices"),
                     tmp_path / "run", batch_size=64)
    assert not np.array_equal(load_features(tmp_path / "run").embeddings[5], before)


def test_flip_tta_averages_each_stack_with_its_mirror(cnn_run):
    model = cnn_run[0]
    extractor = embedding_extractor(model)
    rng = np.random.default_rng(0)
    batch = rng.uniform(-100, 200, (3, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    plain, plain_p = embed_batch(extractor, batch)
    mirrored, mirrored_p = embed_batch(extractor, batch[:, :, ::-1].copy())
    assert np.abs(plain - mirrored).max() > 1e-3, "the untrained CNN must not be mirror-symmetric for this test"
    flipped, flipped_p = embed_batch(extractor, batch, tta="flip")
    np.testing.assert_allclose(flipped, (plain + mirrored) / 2, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(flipped_p, (plain_p + mirrored_p) / 2, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="unknown test-time augmentation 'rot90'"):
        embed_batch(extractor, batch, tta="rot90")


def test_a_selection_on_a_sample_of_rows_records_it_and_differs(extracted):
    features = load_features(extracted)
    whole = fitted_selection(features, "pca:3")
    sampled = fitted_selection(features, "pca:3", seed=1, sample_rows=40)
    assert sampled.inputs["sample_rows"] == 40 and sampled.inputs["seed"] == 1 and "sample_rows" not in whole.inputs
    train_rows, _ = fold_rows(features.index, 0)
    chosen = np.sort(np.random.default_rng(1).choice(train_rows, size=40, replace=False))
    np.testing.assert_allclose(sampled.mean, features.embeddings[chosen].astype(np.float64).mean(axis=0), atol=1e-3)
    assert np.abs(sampled.mean - whole.mean).max() > 1e-3


def test_the_extraction_command_repeats_the_test_time_augmentation_and_the_folders():
    flipped = {"dataset": "rsna", "tta": "flip"}
    assert extraction_command(flipped, "r") == "train_cnn.py --dataset rsna --run r --extract-only --tta flip"
    assert extraction_command({"dataset": "rsna", "tta": "none"}, "r", features_dir="f", tta="flip") == (
        "train_cnn.py --dataset rsna --run r --extract-only --tta flip --features-dir f")
    assert extraction_command(flipped, "r", models_dir="m", tta="none") == (
        "train_cnn.py --dataset rsna --run r --extract-only --models-dir m")


def test_a_selection_fits_a_model_only_when_fitted_on_the_same_sample_of_rows():
    whole = {"selection": "pca:120", "features": "f", "fold": 0}
    sampled = {**whole, "seed": 0, "sample_rows": 32000}
    trained_on_sample = {**sampled, "units": 256, "input_dtype": "float16"}
    trained_on_all = {**whole, "seed": 0, "units": 256, "input_dtype": "float16"}  # the LSTM's own seed
    assert selection_fits(sampled, trained_on_sample) and selection_fits(whole, trained_on_all)
    assert not selection_fits(whole, trained_on_sample)  # a refit on every row, where the model saw a sample
    assert not selection_fits(sampled, trained_on_all)
    assert not selection_fits({**sampled, "seed": 1}, trained_on_sample)
    mi = {"selection": "mi:64", "features": "f", "fold": 0, "seed": 0, "mi_sample_rows": 5000}
    assert not selection_fits(mi, {**mi, "mi_sample_rows": 9000})
