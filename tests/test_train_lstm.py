"""train_lstm.py on features cached from an untrained tiny CNN: which rows it learns from, reruns, seeds."""
import re
import shutil

import keras
import numpy as np
import pandas as pd
import pytest

import train_lstm
from ihd.cnn import MODEL_FILE, build_cnn
from ihd.features import extract_features, fitted_selection, load_features, selected_features
from ihd.fingerprint import file_sha256
from ihd.inputs import fold_rows
from ihd.io import read_json, write_json
from ihd.sequence import load_lstm, sequence_inputs
from ihd.slices import SliceStore
from ihd.windows import parse_recipe

IMAGE_SIZE = 32
RUN = "run"


def _save_cnn(run_dir, config, seed):
    keras.utils.set_random_seed(seed)
    model = build_cnn("tiny", image_size=IMAGE_SIZE, recipe=config["recipe"])
    run_dir.mkdir(parents=True, exist_ok=True)
    model.save(run_dir / MODEL_FILE)
    write_json(run_dir / "config.json", config)
    return model


@pytest.fixture(scope="module")
def workspace(prepared_synthetic, tmp_path_factory):
    """models/run/ with a saved untrained CNN and features/run/ extracted from it."""
    root = tmp_path_factory.mktemp("lstm")
    config = {"dataset": prepared_synthetic.name, "image_size": IMAGE_SIZE, "recipe": parse_recipe("windows").spec,
              "fold": 0}
    model = _save_cnn(root / "models" / RUN, config, seed=0)
    index_path = prepared_synthetic / "index.parquet"
    extract_features(model, config, file_sha256(root / "models" / RUN / MODEL_FILE), pd.read_parquet(index_path),
                     index_path, SliceStore(prepared_synthetic / "slices"), root / "features" / RUN, batch_size=64)
    return root


def _flags(root, models="models", *extra):
    return ["--run", RUN, "--features-dir", str(root / "features"), "--models-dir", str(root / models),
            "--selection", "pca:4", "--layers", "1", "--units", "4", "--epochs", "2", "--dropout", "0.3", *extra]


@pytest.fixture(scope="module")
def trained(workspace):
    """One training of pca:4, with the series fit_lstm was given."""
    seen = {}
    real_fit = train_lstm.fit_lstm

    def recording_fit(model, train, val, *args, **kwargs):
        seen.update(train_rows=train.rows, val_rows=val.rows)
        return real_fit(model, train, val, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_lstm, "fit_lstm", recording_fit)
        train_lstm.main(_flags(workspace))
    return seen


def test_the_lstm_learns_and_standardises_on_training_rows_only(workspace, trained):
    features = load_features(workspace / "features" / RUN)
    train_rows, val_rows = fold_rows(features.index, 0)
    assert sorted(trained["train_rows"]) == train_rows.tolist()
    assert sorted(trained["val_rows"]) == val_rows.tolist()
    selection = fitted_selection(features, "pca:4")
    inputs = sequence_inputs(selected_features(selection, features.embeddings), features.probabilities)
    train_mean = inputs[train_rows].astype(np.float64).mean(axis=0)
    all_mean = inputs.astype(np.float64).mean(axis=0)
    assert np.abs(all_mean - train_mean).max() > 1e-3, "the check below must tell the two apart"
    standardise = load_lstm(workspace / "models" / RUN / "lstm-pca4.keras").get_layer("standardise")
    np.testing.assert_allclose(np.ravel(standardise.mean), train_mean, atol=1e-5)


def test_the_same_command_gives_the_same_lstm(workspace, trained):
    shutil.copytree(workspace / "models" / RUN, workspace / "again" / RUN,
                    ignore=shutil.ignore_patterns("lstm-*", "ablation*"))
    train_lstm.main(_flags(workspace, "again"))
    first = load_lstm(workspace / "models" / RUN / "lstm-pca4.keras").get_weights()
    second = load_lstm(workspace / "again" / RUN / "lstm-pca4.keras").get_weights()
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_a_rerun_skips_what_is_trained_and_retrains_what_changed(workspace, trained, capsys):
    model_path = workspace / "models" / RUN / "lstm-pca4.keras"
    before = model_path.stat().st_mtime_ns
    capsys.readouterr()
    train_lstm.main(_flags(workspace))
    assert "pca:4: already trained with these inputs" in capsys.readouterr().out
    assert model_path.stat().st_mtime_ns == before
    train_lstm.main(_flags(workspace, "models", "--units", "5"))
    assert "was trained on other inputs (units: 4 -> 5): training again" in capsys.readouterr().out
    assert read_json(model_path.with_suffix(".json"))["inputs"]["units"] == 5


def test_the_ablation_names_the_rows_trained_with_other_lstm_settings(workspace, trained, capsys):
    shutil.copytree(workspace / "models" / RUN, workspace / "mixed" / RUN)
    capsys.readouterr()
    flags = [arg if arg != "pca:4" else "random:4" for arg in _flags(workspace, "mixed")]
    train_lstm.main([*flags, "--epochs", "1"])  # pca:4 was trained for 2
    note = r"trained with other LSTM settings than cnn\+lstm pca:4: cnn\+lstm random:4 \(.*epochs: 2 -> 1"
    assert re.search(note, capsys.readouterr().out)
    assert re.search(note, (workspace / "mixed" / RUN / "ablation.md").read_text())
    alike = {"batch_size": 1, "inputs": {"layers": 1, "units": 4, "epochs": 2, "batch_size": 128, "selection": "pca:4"}}
    same_batch = {"batch_size": 1, "inputs": {**alike["inputs"], "batch_size": 64, "selection": "all"}}
    assert train_lstm.settings_note({"a": alike, "b": same_batch}) == ""  # both shrunk to the batch they used
    odd = {"batch_size": 1, "inputs": {**alike["inputs"], "units": 8}}
    assert train_lstm.settings_note({"odd": odd, "a": alike, "b": same_batch}) == (
        "trained with other LSTM settings than a, b: odd (units: 4 -> 8)")  # against most rows, not the first


def test_features_of_another_cnn_are_refused_with_the_command_that_extracts_them(workspace, trained):
    run_dir = workspace / "other" / RUN
    shutil.copytree(workspace / "models" / RUN, run_dir)
    _save_cnn(run_dir, read_json(run_dir / "config.json"), seed=1)
    with pytest.raises(SystemExit, match=r"extracted from an earlier .*cnn.keras \(cnn_sha256: .*: run train_cnn.py "
                                         r"--dataset small --run run --extract-only --models-dir .*other"):
        train_lstm.main(_flags(workspace, "other"))


def _models_of_the_cnn_alone(workspace, models):
    """A models folder holding the workspace's CNN and its config, no LSTM."""
    (models / RUN).mkdir(parents=True)
    for name in ("cnn.keras", "config.json"):
        shutil.copy(workspace / "models" / RUN / name, models / RUN)


def test_selections_wider_than_the_embedding_are_refused_before_any_is_trained(workspace, tmp_path):
    width = read_json(workspace / "features" / RUN / "config.json")["embedding_dim"]
    _models_of_the_cnn_alone(workspace, tmp_path / "models")
    flags = ["--run", RUN, "--features-dir", str(workspace / "features"), "--models-dir", str(tmp_path / "models"),
             "--selection", "pca:4", "--selection", f"pca:{width + 1}", "--selection", "all"]
    with pytest.raises(SystemExit, match=f"--selection pca:{width + 1}: the CNN of run {RUN} embeds a slice in {width} "
                                         f"dimensions; choose --selection with at most {width}, or all"):
        train_lstm.main(flags)
    assert not list(tmp_path.rglob("lstm-*"))
    assert width < 120  # so the default selection, pca:120, is too wide too; scoring alone trains nothing and goes on
    table = train_lstm.main(["--run", RUN, "--features-dir", str(workspace / "features"), "--models-dir",
                             str(tmp_path / "models"), "--ablation-only"])
    assert table.index.tolist() == ["cnn"]


def test_a_chain_without_lstms_names_the_command_that_trains_them_with_its_folders(workspace, tmp_path):
    from ihd.inference import ChainError, load_chain

    _models_of_the_cnn_alone(workspace, tmp_path / "models")
    with pytest.raises(ChainError, match=f"no LSTM in .* was trained on the current features .*: run train_lstm.py "
                                         f"--run {RUN} --models-dir {tmp_path / 'models'} --features-dir "
                                         f"{workspace / 'features'} first"):
        load_chain(RUN, None, tmp_path / "models", workspace / "features")


@pytest.mark.parametrize("flag, value, message", [
    ("--selection", "pca:0", "needs a positive size"),
    ("--epochs", "0", "0 is out of range: it must be at least 1"),
    ("--dropout", "1.5", "not in [0, 1)"),
    ("--units", "x", "'x' is not a whole number"),
])
def test_bad_flags_are_refused_when_parsed(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        train_lstm.parse_args(["--run", RUN, flag, value])
    assert message in capsys.readouterr().err
