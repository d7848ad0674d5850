import json

import keras
import numpy as np
import pandas as pd
import pytest

import ihd.cnn
from ihd.io import FolderTaken
import train_cnn
from ihd.cnn import EpochCheckpoint, ValidationScore, build_cnn, load_cnn
from ihd.features import load_features
from ihd.inputs import fold_rows, inference_dataset, label_array
from ihd.io import read_json
from ihd.metrics import weighted_log_loss
from ihd.slices import SliceStore
from ihd.windows import parse_recipe


def _flags(prepared_synthetic, tmp_path, *extra):
    return [
        "--dataset", prepared_synthetic.name, "--data-dir", str(prepared_synthetic.parent),
        "--models-dir", str(tmp_path / "models"), "--features-dir", str(tmp_path / "features"),
        "--backbone", "tiny", "--weights", "none", "--batch-size", "16", "--learning-rate", "3e-3",
        "--run", "tiny", *extra,
    ]


def _validation(prepared_synthetic, image_size):
    """The index, fold 0's validation rows, their batches in the default recipe, and all labels."""
    index = pd.read_parquet(prepared_synthetic / "index.parquet")
    _, val_rows = fold_rows(index, 0)
    data = inference_dataset(index, SliceStore(prepared_synthetic / "slices"), parse_recipe("windows"), val_rows,
                             image_size, 64)
    return index, val_rows, data, label_array(index)


@pytest.fixture(scope="module")
def trained(prepared_synthetic, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trained")
    features_dir = train_cnn.main(_flags(prepared_synthetic, tmp_path, "--image-size", "64", "--epochs", "8"))
    return tmp_path / "models" / "tiny", features_dir


def test_tiny_cnn_beats_the_prior_baseline(trained):
    run_dir, _ = trained
    config = read_json(run_dir / "config.json")
    best = read_json(run_dir / "best.json")
    assert best["val_weighted_log_loss"] < 0.8 * config["val_prior_baseline"]
    history = pd.read_csv(run_dir / "history.csv")
    assert history["epoch"].tolist() == list(range(8))
    assert best["val_weighted_log_loss"] == pytest.approx(history["val_weighted_log_loss"].min())
    assert config["recipe"] == "0:40/80,0:80/200,0:40/380" and config["backbone"] == "tiny"


def test_features_follow_training(trained, prepared_synthetic):
    _, features_dir = trained
    features = load_features(features_dir)
    index = pd.read_parquet(prepared_synthetic / "index.parquet")
    assert features.embeddings.shape == (len(index), 64)
    assert features.config["fold"] == 0 and features.config["embedding_dim"] == 64


def test_gradcam_gives_a_heatmap_on_the_trained_model(trained, prepared_synthetic):
    # Through global average pooling, the CAM of an output before its ReLU sums to that output's
    # logit minus the head's bias; on the (slice, output) pair where the logit most exceeds the bias,
    # the heatmap cannot be all zero.
    from ihd.gradcam import METHODS, gradcam_heatmap
    from ihd.inputs import inference_dataset
    from ihd.slices import SliceStore
    from ihd.windows import parse_recipe

    run_dir, features_dir = trained
    model, config = load_cnn(run_dir)
    index = pd.read_parquet(prepared_synthetic / "index.parquet")
    probabilities = np.clip(load_features(features_dir).probabilities.astype(np.float64), 1e-6, 1 - 1e-6)
    excess = np.log(probabilities / (1 - probabilities)) - model.get_layer("pred").get_weights()[1]
    row, output = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[row, output] > 0
    stack = next(iter(inference_dataset(
        index, SliceStore(prepared_synthetic / "slices"), parse_recipe(config["recipe"]), np.array([row]), 64, 1
    ))).numpy()[0]
    for method in METHODS:
        heatmap = gradcam_heatmap(model, stack, method=method, class_index=output)
        assert heatmap.shape == (64, 64) and np.isfinite(heatmap).all() and heatmap.max() > 0


def test_training_resumes_at_the_epoch_a_kill_reached(prepared_synthetic, tmp_path, monkeypatch, capsys):
    flags = _flags(prepared_synthetic, tmp_path, "--image-size", "32", "--epochs", "2", "--no-extract")
    real_epoch_end = ihd.cnn.ValidationScore.on_epoch_end

    def killed_in_second_epoch(self, epoch, logs=None):
        real_epoch_end(self, epoch, logs)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(ihd.cnn.ValidationScore, "on_epoch_end", killed_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_cnn.main(flags)
    assert ihd.cnn.epochs_done(tmp_path / "models" / "tiny") == 1
    monkeypatch.setattr(ihd.cnn.ValidationScore, "on_epoch_end", real_epoch_end)
    capsys.readouterr()
    run_dir = train_cnn.main(flags)
    assert "resuming at epoch 2 of 2" in capsys.readouterr().out
    assert pd.read_csv(run_dir / "history.csv")["epoch"].tolist() == [0, 1]
    assert not (tmp_path / "features").exists()
    train_cnn.main(flags)
    assert "already trained for 2 epochs" in capsys.readouterr().out
    started = tmp_path / "models" / "stopped-before-an-epoch"  # as a run whose weights could not be downloaded
    started.mkdir()
    (started / "config.json").write_text(json.dumps({**json.loads((run_dir / "config.json").read_text()),
                                                     "weights": "imagenet"}))
    train_cnn.main([*flags, "--run", started.name, "--epochs", "1"])  # it had trained nothing: new settings taken
    assert json.loads((started / "config.json").read_text())["weights"] == "none"
    in_first_epoch = tmp_path / "models" / "in-its-first-epoch"  # another process may be training it: refused
    (in_first_epoch / "tb").mkdir(parents=True)
    (in_first_epoch / "config.json").write_text((started / "config.json").read_text())
    with pytest.raises(FolderTaken, match="image_size: 32 -> 48"):
        train_cnn.main([*flags, "--run", in_first_epoch.name, "--image-size", "48"])
    with pytest.raises(FolderTaken, match="image_size: 32 -> 48"):
        train_cnn.main(_flags(prepared_synthetic, tmp_path, "--image-size", "48", "--epochs", "2"))
    with pytest.raises(FolderTaken, match="batch_size: 16 -> 8"):  # the restored step count would miss the schedule
        train_cnn.main([*_flags(prepared_synthetic, tmp_path, "--image-size", "32", "--epochs", "3", "--no-extract"),
                        "--batch-size", "8"])

    moved = tmp_path / "data" / prepared_synthetic.name  # the same slices, one patient dealt to another fold
    moved.mkdir(parents=True)
    (moved / "slices").symlink_to(prepared_synthetic / "slices")
    index = pd.read_parquet(prepared_synthetic / "index.parquet")
    patient = index.loc[index["fold"] == 2, "patient_id"].iloc[0]
    index.loc[index["patient_id"] == patient, "fold"] = 1
    index.to_parquet(moved / "index.parquet", index=False)
    elsewhere = [*flags, "--data-dir", str(tmp_path / "data")]
    with pytest.raises(FolderTaken, match="split_sha256"):
        train_cnn.main(elsewhere)
    with pytest.raises(SystemExit, match="gives training other labeled rows, folds or labels than .*tiny was trained on"):
        train_cnn.main([*elsewhere, "--extract-only"])


def test_a_run_scaled_by_the_datasets_moments_records_them_and_resumes(prepared_synthetic, tmp_path, capsys):
    # the paper's preset scales each window by the training slices' mean and std (--input-norm dataset)
    flags = _flags(prepared_synthetic, tmp_path, "--image-size", "32", "--epochs", "1", "--no-extract",
                   "--input-norm", "dataset")
    run_dir = train_cnn.main(flags)
    moments = json.loads((run_dir / "config.json").read_text())["input_moments"]
    assert len(moments["mean"]) == len(moments["std"]) == 3 and all(s > 0 for s in moments["std"])
    capsys.readouterr()
    train_cnn.main(flags)
    assert "already trained for 1 epochs" in capsys.readouterr().out


def test_cnn_keras_reloaded_scores_like_the_best_epochs_record(trained, prepared_synthetic):
    run_dir, _ = trained
    _, val_rows, val_data, labels = _validation(prepared_synthetic, 64)
    reloaded = keras.models.load_model(run_dir / "cnn.keras", compile=False)
    score = weighted_log_loss(labels[val_rows], reloaded.predict(val_data, verbose=0))
    assert score == pytest.approx(read_json(run_dir / "best.json")["val_weighted_log_loss"], rel=1e-5)


def test_a_worse_later_epoch_leaves_the_best_one_in_cnn_keras(prepared_synthetic, tmp_path):
    # two "epochs" of constant answers: the validation frequencies (the best constant), then their opposite
    _, val_rows, val_data, labels = _validation(prepared_synthetic, 32)
    frequencies = np.clip(labels[val_rows].mean(axis=0), 0.02, 0.98)
    model = build_cnn("tiny", 32, "windows")
    kernel, _ = model.get_layer("pred").get_weights()
    callbacks = [ValidationScore(val_data, labels[val_rows]), EpochCheckpoint(tmp_path)]
    for callback in callbacks:
        callback.set_model(model)
        callback.on_train_begin()
    for epoch, answer in enumerate([frequencies, 1 - frequencies]):
        model.get_layer("pred").set_weights([np.zeros_like(kernel), np.log(answer / (1 - answer)).astype(np.float32)])
        logs = {"loss": 0.5}
        for callback in callbacks:
            callback.on_epoch_end(epoch, logs)
    best = read_json(tmp_path / "best.json")
    reloaded = keras.models.load_model(tmp_path / "cnn.keras", compile=False)
    score = weighted_log_loss(labels[val_rows], reloaded.predict(val_data, verbose=0))
    assert best["epoch"] == 1 and score == pytest.approx(best["val_weighted_log_loss"], rel=1e-5)
    assert score < weighted_log_loss(labels[val_rows], model.predict(val_data, verbose=0)) - 0.1


@pytest.mark.parametrize("flag, value, message", [
    ("--image-size", "0", "0 is out of range: it must be at least 1"),
    ("--fold", "-1", "-1 is out of range: it must be at least 0"),
    ("--backbone", "MobileNetV9", "unknown backbone 'MobileNetV9'"),
    ("--recipe", "0:40/80", "three channels"),
    ("--learning-rate", "nan", "not a positive number"),
])
def test_bad_flags_are_refused_when_parsed(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        train_cnn.parse_args([flag, value])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--fold", "7"], r"index.parquet: fold 7 is not in the index \(its labeled training folds are \[0, "),
    (["--dataset", "absent"], r"absent/index.parquet not found: prepare the dataset first"),
    (["--study-labels", "derive", "--fold", "7"], r"--fold 7 leaves no study-labeled series to validate on: the "
                                                  r"study-labeled training series lie in folds \[0, 1, "),
    (["--study-labels", "derive", "--label-set", "exam"], "derive gives the subtypes label set; exam needs a"),
    (["--study-labels", "absent.csv"], "absent.csv: cannot be read as CSV"),
    (["--study-labels", "derive", "--recipe", "adjacent"], "recipe 'adjacent' reads neighbouring slices"),
    (["--image-size", "4096"], r"--image-size 4096 is larger than the slice store's \d+ .*: lower --image-size"),
])
def test_a_run_that_cannot_start_is_refused_by_message_before_it_writes_anything(prepared_synthetic, tmp_path, extra,
                                                                                  message):
    with pytest.raises(SystemExit, match=message):
        train_cnn.main(_flags(prepared_synthetic, tmp_path, "--epochs", "1", *extra))
    assert not (tmp_path / "models").exists()


def test_an_index_of_one_labeled_fold_is_refused_an_ensemble_and_an_end_to_end_run(prepared_synthetic, tmp_path):
    dataset = tmp_path / "data" / "onefold"
    dataset.mkdir(parents=True)
    index = pd.read_parquet(prepared_synthetic / "index.parquet")
    index["fold"] = np.where(index["fold"] >= 0, 0, -1).astype(index["fold"].dtype)
    index.to_parquet(dataset / "index.parquet", index=False)
    with pytest.raises(SystemExit, match=r"a fold ensemble needs at least two folds of labeled training rows; the "
                                         r"index has \[0\]"):
        train_cnn.main(_flags(dataset, tmp_path, "--fold", "all"))
    with pytest.raises(SystemExit, match=r"--fold 0 leaves no study-labeled series to train on: the study-labeled "
                                         r"training series lie in folds \[0\]"):
        train_cnn.main(_flags(dataset, tmp_path, "--study-labels", "derive"))
    assert not (tmp_path / "models").exists()


def test_fold_all_trains_one_run_per_fold_and_records_the_ensemble(prepared_synthetic, tmp_path):
    import shutil

    dataset = tmp_path / "data" / "twofolds"
    shutil.copytree(prepared_synthetic, dataset)
    index = pd.read_parquet(dataset / "index.parquet")
    index["fold"] = np.where(index["fold"] >= 0, index["fold"] % 2, -1).astype(np.int8)
    index.to_parquet(dataset / "index.parquet", index=False)
    flags = _flags(dataset, tmp_path, "--image-size", "32", "--epochs", "1", "--fold", "all", "--tta", "flip")
    ensemble_dir = train_cnn.main(flags)
    record = read_json(ensemble_dir / "ensemble.json")
    assert record["members"] == ["tiny-fold0", "tiny-fold1"] and record["folds"] == [0, 1]
    for fold, member in enumerate(record["members"]):
        assert read_json(tmp_path / "models" / member / "config.json")["fold"] == fold
        features = load_features(tmp_path / "features" / member)
        assert features.config["fold"] == fold and features.config["tta"] == "flip"
    with pytest.raises(SystemExit):
        train_cnn.parse_args(["--fold", "all", "--extract-only"])
