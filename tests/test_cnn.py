"""The slice CNN: its layers, backbones and weights; training whose every epoch is committed as one unit."""
import os
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from keras.src.utils import file_utils

from ihd.backbones import backbone_names, input_affine
from ihd.cnn import build_cnn, compile_cnn, epochs_done, fit_cnn, load_cnn, publish_committed
from ihd.io import read_json, write_json
from ihd.metrics import weighted_log_loss
from ihd.windows import RECIPES, window


def _hu_batch(n=2, size=32, seed=0):
    return np.random.default_rng(seed).uniform(-1100, 1500, (n, size, size, 3)).astype(np.float32)


def test_tiny_model_is_flat_with_the_named_layers():
    model = build_cnn("tiny", image_size=32, recipe="windows")
    names = [layer.name for layer in model.layers]
    assert names[1] == "windowing" and names[-3:] == ["embedding", "dropout", "pred"]
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    assert model.output.shape[-1] == 6 and model.get_layer("embedding").output.shape[-1] == 64


def test_windowing_applies_the_recipe_windows_then_the_backbone_scaling():
    hu = _hu_batch()
    for backbone, scale, offset in (("tiny", 1.0, 0.0), ("MobileNetV2", 2.0, -1.0)):
        model = build_cnn(backbone, image_size=32, recipe="windows")
        windowing = keras.Model(model.input, model.get_layer("windowing").output)
        got = windowing.predict(hu, verbose=0)
        for channel, w in enumerate(RECIPES["windows"].windows):
            expected = window(hu[..., channel], w.center_hu, w.width_hu) * scale + offset
            np.testing.assert_allclose(got[..., channel], expected, atol=1e-5)


def test_backbone_is_built_flat_on_the_windowing_output():
    model = build_cnn("MobileNetV2", image_size=32, recipe="adjacent")
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    assert len(model.layers) > 100
    assert model.get_layer("embedding").output.shape[-1] == 1280


def test_input_affine_reads_each_family_off_preprocess_input():
    scale, offset = input_affine(keras.applications.resnet50.preprocess_input)
    np.testing.assert_allclose(scale, [255, 255, 255])
    np.testing.assert_allclose(sorted(offset), sorted([-103.939, -116.779, -123.68]), atol=1e-3)
    scale, offset = input_affine(keras.applications.efficientnet.preprocess_input)
    np.testing.assert_allclose([scale, offset], [[255] * 3, [0] * 3])


def test_model_saves_and_loads_with_the_custom_layer(tmp_path):
    model = build_cnn("tiny", image_size=32, recipe="0:40/80,0:80/200,0:600/2800")
    hu = _hu_batch()
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_allclose(loaded.predict(hu, verbose=0), model.predict(hu, verbose=0), atol=1e-6)
    assert loaded.get_layer("windowing").widths_hu == [80.0, 200.0, 2800.0]


def test_bad_backbones_and_weights_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone 'ResNet5'.*MobileNetV2"):
        build_cnn("ResNet5")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_cnn("preprocess_input")
    with pytest.raises(ValueError, match="--weights none"):
        build_cnn("tiny", weights="imagenet")
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        build_cnn("MobileNetV2", image_size=32, weights=str(tmp_path / "missing.h5"))
    assert {"tiny", "MobileNetV2", "EfficientNetB0", "ConvNeXtTiny"} <= set(backbone_names())


def test_imagenet_download_failure_tells_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/x.h5: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(RuntimeError, match="--weights none.*--weights PATH"):
        build_cnn("MobileNetV2", image_size=96, weights="imagenet")


def _fit_tiny(run_dir, epochs, seed=0, learning_rate=3e-2, keep="best", **compile_options):
    """A tiny CNN fitted on 32 random 16x16 slices; returns the validation batches and labels."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(0)
    hu = rng.uniform(-100, 200, (48, 16, 16, 3)).astype(np.float32)
    labels = (rng.random((48, 6)) < 0.4).astype(np.float32)
    train = tf.data.Dataset.from_tensor_slices((hu[:32], labels[:32])).batch(8)
    val = tf.data.Dataset.from_tensor_slices(hu[32:]).batch(8)
    model = build_cnn("tiny", image_size=16, recipe="windows", weights=None)
    compile_cnn(model, learning_rate=learning_rate, total_steps=4 * epochs, warmup_steps=0, **compile_options)
    fit_cnn(model, lambda context: train, 4, val, labels[32:], run_dir, epochs, keep)
    return val, labels[32:]


def _assert_consistent(run_dir, epochs, val, val_labels):
    """One history row per epoch; best.json names the history's best epoch; cnn.keras scores what best.json says."""
    history = pd.read_csv(run_dir / "history.csv")
    best = read_json(run_dir / "best.json")
    assert history["epoch"].tolist() == list(range(epochs))
    assert best["val_weighted_log_loss"] == history["val_weighted_log_loss"].min()
    assert history["val_weighted_log_loss"].iloc[best["epoch"] - 1] == best["val_weighted_log_loss"]
    kept = keras.models.load_model(run_dir / "cnn.keras", compile=False)
    assert weighted_log_loss(val_labels, kept.predict(val, verbose=0)) == pytest.approx(best["val_weighted_log_loss"],
                                                                                       rel=1e-5)
    assert epochs_done(run_dir) == epochs and [p.name for p in (run_dir / "checkpoint").iterdir()] == [f"epoch-{epochs}"]


def test_a_kill_before_an_epoch_is_committed_resumes_without_a_duplicated_epoch(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_rename = os.rename

    def killed_at_the_second_commit(source, target):
        if Path(target).name == "epoch-2":
            raise KeyboardInterrupt
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", killed_at_the_second_commit)
    with pytest.raises(KeyboardInterrupt):
        _fit_tiny(run_dir, epochs=3)
    monkeypatch.undo()
    assert epochs_done(run_dir) == 1 and (run_dir / "checkpoint" / ".staging" / "history.csv").exists()
    first = pd.read_csv(run_dir / "history.csv")
    pd.concat([first, first]).to_csv(run_dir / "history.csv", index=False)  # as an appending logger would leave it

    val, val_labels = _fit_tiny(run_dir, epochs=3, seed=1, learning_rate=100.0)  # wrecks what epoch 1 learned
    _assert_consistent(run_dir, 3, val, val_labels)
    assert read_json(run_dir / "best.json")["epoch"] == 1
    assert pd.read_csv(run_dir / "history.csv").iloc[:1].equals(first)


def test_a_kill_while_publishing_the_last_epoch_is_finished_by_the_rerun(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_copy = shutil.copyfile

    def killed_publishing_epoch_2(source, target):
        if Path(source).parent.name == "epoch-2" and Path(target).parent == run_dir:
            raise KeyboardInterrupt
        return real_copy(source, target)

    monkeypatch.setattr(shutil, "copyfile", killed_publishing_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        _fit_tiny(run_dir, epochs=2)
    monkeypatch.undo()
    assert epochs_done(run_dir) == 2 and pd.read_csv(run_dir / "history.csv")["epoch"].tolist() == [0]

    assert publish_committed(run_dir) == 2
    val, val_labels = _fit_tiny(run_dir, epochs=2)
    _assert_consistent(run_dir, 2, val, val_labels)


def test_a_run_that_stopped_before_its_first_epoch_says_how_to_resume(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CNN was trained under that name.*--run nothing"):
        load_cnn(tmp_path / "models" / "nothing")
    config = {"dataset": "small", "data_dir": "data", "backbone": "tiny", "weights": "none", "image_size": 64,
              "recipe": "0:40/80,0:80/200,0:40/380", "augment": False, "epochs": 3, "store_size": 64}
    write_json(tmp_path / "models" / "cut" / "config.json", config)
    with pytest.raises(FileNotFoundError) as error:
        load_cnn(tmp_path / "models" / "cut")
    command = ("python train_cnn.py --dataset small --data-dir data --backbone tiny --weights none --image-size 64 "
               f"--recipe 0:40/80,0:80/200,0:40/380 --epochs 3 --no-augment --models-dir {tmp_path / 'models'} --run cut")
    assert str(error.value).endswith(f"stopped before its first epoch ended: resume it with the command that started it: "
                                     f"{command}")
    (tmp_path / "models" / "cut" / "checkpoint" / "epoch-2").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as error:
        load_cnn(tmp_path / "models" / "cut")
    assert str(error.value).endswith(f"which puts cnn.keras back: {command}") and "reached epoch 2" in str(error.value)


def test_keep_last_keeps_the_last_epoch_even_when_an_earlier_one_scored_better(tmp_path):
    val, val_labels = _fit_tiny(tmp_path, 3, learning_rate=0.3, keep="last", loss="bce", schedule="constant")
    history = pd.read_csv(tmp_path / "history.csv")
    assert read_json(tmp_path / "best.json")["epoch"] == 3
    kept = keras.models.load_model(tmp_path / "cnn.keras", compile=False)
    assert weighted_log_loss(val_labels, kept.predict(val, verbose=0)) == pytest.approx(
        history["val_weighted_log_loss"].iloc[-1], rel=1e-5)
    assert history["val_weighted_log_loss"].iloc[-1] > history["val_weighted_log_loss"].min(), (
        "this run's last epoch is not its best: keep=last must still keep it")


def test_constant_schedule_keeps_the_rate_and_cosine_warms_up():
    model = build_cnn("tiny", image_size=16, recipe="windows", weights=None)
    compile_cnn(model, learning_rate=1e-3, total_steps=100, warmup_steps=10, schedule="constant")
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-3)
    compile_cnn(model, learning_rate=1e-3, total_steps=100, warmup_steps=10, schedule="cosine")
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-4), "the warmup starts at a tenth of the rate"
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        compile_cnn(model, learning_rate=1e-3, total_steps=100, warmup_steps=10, schedule="step")


def test_input_scaling_replaces_the_backbone_range():
    hu = np.full((1, 16, 16, 3), 40.0, np.float32)  # every window's centre: 0.5 in [0, 1]
    model = build_cnn("tiny", image_size=16, recipe="windows", weights=None,
                      input_scaling=(np.array([2.0, 4.0, 10.0]), np.array([-1.0, -2.0, 0.0])))
    windowed = keras.Model(model.input, model.get_layer("windowing").output).predict(hu, verbose=0)
    np.testing.assert_allclose(windowed[0, 0, 0], [2 * 0.5 - 1, 4 * (40 + 20) / 200 - 2, 10 * (40 + 150) / 380],
                               rtol=1e-5, atol=1e-6)
