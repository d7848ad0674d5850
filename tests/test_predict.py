"""The whole chain on the small synthetic dataset: train_cnn -> train_lstm (two selections) -> predict."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

import predict
import train_cnn
import train_lstm
from ihd.dicom import AIR_HU, read_hu
from ihd.inference import read_model_hu
from ihd.labels import SUBTYPES
from ihd.slices import SliceStore, to_model_hu

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def chain(prepared_synthetic, tmp_path_factory):
    workspace = tmp_path_factory.mktemp("chain")
    dirs = {"--data-dir": str(prepared_synthetic.parent), "--models-dir": str(workspace / "models"),
            "--features-dir": str(workspace / "features")}
    common = [item for pair in dirs.items() for item in pair]
    train_cnn.main(["--dataset", prepared_synthetic.name, "--run", "small", "--backbone", "tiny", "--weights", "none",
                    "--image-size", str(IMAGE_SIZE), "--epochs", "2", "--batch-size", "16", *common[:6]])
    table = train_lstm.main(["--run", "small", "--selection", "pca:8", "--selection", "variance:8", "--layers", "1",
                             "--units", "8", "--epochs", "3", *common[2:6]])
    submissions = workspace / "submissions"
    submission = predict.main(["--run", "small", "--gradcam", "1", "--submissions-dir", str(submissions), *common])
    return {"workspace": workspace, "common": common, "table": table, "submission": submission,
            "dataset": prepared_synthetic}


def test_submission_matches_the_sample_submission(chain):
    written = pd.read_csv(chain["submission"])
    sample = pd.read_csv(chain["dataset"] / "raw" / "stage_2_sample_submission.csv")
    assert written["ID"].tolist() == sample["ID"].tolist()
    assert written["Label"].between(0, 1).all() and written["Label"].notna().all()
    images = written["ID"].str.rpartition("_")[0]
    assert (images.value_counts() == len(SUBTYPES)).all()
    assert not np.allclose(written["Label"], 0.5)


def test_ablation_lists_the_cnn_and_both_selections(chain):
    models = chain["workspace"] / "models" / "small"
    assert chain["table"].index.tolist() == ["cnn", "cnn+lstm pca:8", "cnn+lstm variance:8"]
    assert (chain["table"]["weighted_log_loss"] > 0).all()
    for suffix in ("csv", "md", "png"):
        assert (models / f"ablation.{suffix}").stat().st_size > 100
    record = json.loads((models / "lstm-pca8.json").read_text())
    assert record["input_dim"] == 8 + len(SUBTYPES) and record["best_epoch"] >= 1
    assert (models / "lstm-pca8.keras").is_file() and (models / "lstm-variance8.keras").is_file()


def test_scores_report_and_gradcam_pictures(chain):
    report = json.loads(chain["submission"].with_name(chain["submission"].stem + "-scores.json").read_text())
    scores = report["scores"]
    assert set(scores) == {"prior", "cnn", "cnn+lstm"}
    index = pd.read_parquet(chain["dataset"] / "index.parquet")
    studies = index.loc[index["split"] == "test", "study_id"].unique()
    assert report["intervals"]["studies"] == len(studies)  # the test split's studies, resampled with their slices
    low, high = report["intervals"]["models"]["cnn+lstm"]["loss_minus_cnn"]
    assert low <= scores["cnn+lstm"] - scores["cnn"] <= high
    pictures = sorted(p.name for p in (chain["submission"].parent / "small-gradcam").glob("*.png"))
    assert len(pictures) == 2 * len(studies)
    assert {f"{study}_montage.png" for study in studies} <= set(pictures)


def test_dicom_folder_gives_the_same_probabilities_as_the_dataset_route(chain, tmp_path):
    folder = chain["dataset"] / "raw" / "stage_2_test"
    csv_path = predict.main(["--run", "small", "--dicom-dir", str(folder), "--out", str(tmp_path / "out"),
                             "--gradcam", "1", *chain["common"]])
    table = pd.read_csv(csv_path).set_index("image_id")
    assert len(table) == len(list(folder.glob("*.dcm")))
    submitted = pd.read_csv(chain["submission"])
    submitted_any = submitted[submitted["ID"].str.endswith("_any")]
    by_image = pd.Series(submitted_any["Label"].to_numpy(), index=submitted_any["ID"].str.rpartition("_")[0])
    np.testing.assert_allclose(table["any"], by_image.reindex(table.index), atol=0.02)
    assert len(list((tmp_path / "out").glob("*_montage.png"))) == table["study_id"].nunique()


def test_incomplete_feature_cache_is_extracted_again(chain, tmp_path):
    features = chain["workspace"] / "features" / "small"
    (features / "progress.json").unlink()
    submission = predict.main(["--run", "small", "--submissions-dir", str(tmp_path), *chain["common"]])
    assert (features / "progress.json").is_file()
    pd.testing.assert_frame_equal(pd.read_csv(submission), pd.read_csv(chain["submission"]), atol=1e-4)


def test_submit_offline_keeps_the_file_and_says_what_is_missing(chain, tmp_path, monkeypatch):
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit, match="written but not sent.*needs credentials") as stop:
        predict.main(["--run", "small", "--submit", "--submissions-dir", str(tmp_path / "out"), *chain["common"]])
    assert "--synthetic" not in str(stop.value)  # a submission is sent from the real data's run: no detour to phantoms
    assert len(list((tmp_path / "out").glob("small-*.csv"))) == 1


def test_dicom_folder_with_truncated_pixels_predicts_the_rest(chain, tmp_path):
    folder = tmp_path / "study"
    shutil.copytree(chain["dataset"] / "raw" / "stage_2_test", folder)
    files = sorted(folder.glob("*.dcm"))
    damaged = files[len(files) // 2]
    damaged.write_bytes(damaged.read_bytes()[:-20_000])
    csv_path = predict.main(["--run", "small", "--dicom-dir", str(folder), "--out", str(tmp_path / "out"),
                             *chain["common"]])
    table = pd.read_csv(csv_path)
    assert len(table) == len(files) - 1 and damaged.stem not in set(table["image_id"])
    assert table.groupby("series_id")["position"].apply(lambda p: sorted(p) == list(range(len(p)))).all()
    assert "truncated" in (tmp_path / "out" / "bad_files.csv").read_text()


def test_a_segmentation_run_that_does_not_exist_is_refused_before_the_folder_is_read(chain, tmp_path):
    with pytest.raises(SystemExit, match=r"seg-absent/unet.keras does not exist: train the U-Net first"):
        predict.main(["--run", "small", "--dicom-dir", str(chain["dataset"] / "raw" / "stage_2_test"), "--out",
                      str(tmp_path / "out"), "--segment", "seg-absent", *chain["common"]])
    assert not (tmp_path / "out").exists()


def test_dicom_folder_with_odd_files_names_them_and_predicts_the_rest(chain, odd_dicom_folder, tmp_path):
    folder, expected = odd_dicom_folder
    series = sorted(str(p) for p in (folder / "series").glob("*.dcm"))
    out = tmp_path / "out"
    table = pd.read_csv(predict.main(["--run", "small", "--dicom-dir", str(folder), "--out", str(out), *chain["common"]]))
    assert sorted(table["path"]) == series and table["position"].tolist() == list(range(32))
    bad = pd.read_csv(out / "bad_files.csv")
    reasons = dict(zip(bad["path"].map(lambda p: Path(p).stem), bad["reason"]))
    assert sorted(reasons) == sorted(expected)
    assert all(words in reasons[name] for name, words in expected.items())

    as_hu = tmp_path / "as_hu"
    table = pd.read_csv(predict.main(["--run", "small", "--dicom-dir", str(folder), "--out", str(as_hu),
                                      "--read-non-ct-as-hu", *chain["common"]]))
    assert sorted(table["path"]) == sorted(series + [str(folder / "ctich.dcm"), str(folder / "mr.dcm")])
    assert json.loads((as_hu / "config.json").read_text())["settings"]["read_non_ct_as_hu"] is True


def test_folder_reading_takes_non_ct_files_as_hu_only_when_asked(odd_dicom_folder):
    folder, _ = odd_dicom_folder
    index = pd.DataFrame({"path": [str(folder / "ctich.dcm"), str(folder / "series_copy.dcm")]})
    hu, failures = read_model_hu(index, IMAGE_SIZE, IMAGE_SIZE)
    assert hu.shape == (1, IMAGE_SIZE, IMAGE_SIZE) and [path for path, _ in failures] == [str(folder / "ctich.dcm")]
    assert failures[0][1].startswith("modality OT, not CT")
    hu, failures = read_model_hu(index, IMAGE_SIZE, IMAGE_SIZE, non_ct_as_hu=True)
    assert not failures
    for slot, path in enumerate(index["path"]):
        ds = pydicom.dcmread(path)
        expected = to_model_hu(np.maximum(apply_modality_lut(ds.pixel_array, ds), AIR_HU), IMAGE_SIZE)
        np.testing.assert_allclose(hu[slot], expected, atol=0.5)  # kept as the store keeps it: whole HU


def test_a_dicom_folder_is_read_as_training_read_the_store_at_sizes_that_are_no_multiples(real_data, tmp_path):
    from ihd.inputs import inference_dataset
    from ihd.slices import write_slices
    from ihd.windows import RECIPES

    paths = sorted((real_data / "rsna_series").glob("*.dcm"))[:3]
    index = pd.DataFrame({"image_id": [p.stem for p in paths], "path": [str(p) for p in paths], "series_id": "s",
                          "position": range(3)})
    write_slices(index, tmp_path / "slices", size=96, workers=1)
    trained_on = next(iter(inference_dataset(index, SliceStore(tmp_path / "slices"), RECIPES["windows"], np.arange(3),
                                             64, 3))).numpy()[..., 0]
    read, _ = read_model_hu(index, 64, 96)
    np.testing.assert_allclose(read, trained_on, atol=0.01)
    once = np.stack([to_model_hu(read_hu(p), 64) for p in index["path"]])  # straight to the model's size
    assert np.abs(once - trained_on).max() > 50  # what the folder route read before, at the edge of bone

def _models_copy(chain, tmp_path):
    """A copy of the run's models folder, for tests that damage it; features stay shared."""
    models = tmp_path / "models"
    shutil.copytree(chain["workspace"] / "models" / "small", models / "small")
    flags = list(chain["common"])
    flags[flags.index("--models-dir") + 1] = str(models)
    return models / "small", flags


def test_an_lstm_without_its_finished_record_is_never_used(chain, tmp_path):
    run_dir, flags = _models_copy(chain, tmp_path)
    (run_dir / "lstm-pca8.json").unlink()
    with pytest.raises(SystemExit, match=r"lstm-pca8.json exists but training never finished: run train_lstm.py "
                                         r"--run small --selection pca:8 --models-dir "):
        predict.main(["--run", "small", "--selection", "pca:8", "--submissions-dir", str(tmp_path), *flags])
    shutil.copy(run_dir / "lstm-variance8.keras", run_dir / "lstm-pca8.keras")
    shutil.copy(chain["workspace"] / "models" / "small" / "lstm-pca8.json", run_dir)
    with pytest.raises(SystemExit, match="lstm-pca8.keras is not the model its record .* describes"):
        predict.main(["--run", "small", "--selection", "pca:8", "--submissions-dir", str(tmp_path), *flags])
    assert not list(tmp_path.glob("*.csv"))


def test_a_retrained_cnn_is_refused_until_features_and_lstm_follow(chain, tmp_path):
    import keras

    run_dir, flags = _models_copy(chain, tmp_path)
    retrained = keras.models.load_model(run_dir / "cnn.keras", compile=False)
    kernel, bias = retrained.get_layer("pred").get_weights()
    retrained.get_layer("pred").set_weights([kernel * 2, bias])
    retrained.save(run_dir / "cnn.keras")
    with pytest.raises(SystemExit, match=r"was extracted from another .*cnn.keras \(cnn_sha256: .*\): run train_cnn.py "
                                         r"--dataset small --run small --extract-only --models-dir .*, then train_lstm.py"):
        predict.main(["--run", "small", "--submissions-dir", str(tmp_path), *flags])


@pytest.mark.parametrize("flags, message", [
    (["--selection", "lasso:5"], "unknown feature selection 'lasso:5'"),
    (["--gradcam", "-1"], "-1 is out of range: it must be at least 0"),
])
def test_bad_flags_are_refused_when_parsed(flags, message, capsys):
    with pytest.raises(SystemExit):
        predict.parse_args(["--run", "small", *flags])
    assert message in capsys.readouterr().err


def test_a_run_without_a_cnn_names_the_training_commands(tmp_path):
    with pytest.raises(SystemExit, match=r"cnn.keras not found \(give --models-dir the folder that holds nothing/ if "
                                         r"it is elsewhere\): train the CNN first \(train_cnn.py --dataset DATASET "
                                         r"--run nothing --models-dir .*models\), then its LSTMs \(train_lstm.py --run "
                                         r"nothing --models-dir .*models --features-dir .*features\)"):
        predict.main(["--run", "nothing", "--models-dir", str(tmp_path / "models"),
                      "--features-dir", str(tmp_path / "features")])

def test_dicom_folder_scored_against_labels_reports_unlabeled_images(chain, tmp_path):
    from ihd.labels import read_long_labels, write_long
    from ihd.metrics import weighted_log_loss

    raw = chain["dataset"] / "raw"
    truth = read_long_labels(raw / "truth" / "stage_2_test_labels.csv")
    unlabeled = truth.index[0]
    write_long(truth.drop(index=unlabeled), tmp_path / "labels.csv")
    csv_path = predict.main(["--run", "small", "--dicom-dir", str(raw / "stage_2_test"), "--labels",
                             str(tmp_path / "labels.csv"), "--out", str(tmp_path / "out"), *chain["common"]])
    scores = json.loads((csv_path.parent / "scores.json").read_text())["scores"]
    assert scores["unlabeled_images"] == [unlabeled] and scores["images_scored"] == len(truth) - 1
    table = pd.read_csv(csv_path).set_index("image_id").drop(index=unlabeled)
    expected = weighted_log_loss(truth.loc[table.index, list(SUBTYPES)], table[list(SUBTYPES)])
    assert scores["models"]["cnn+lstm"]["weighted_log_loss"] == pytest.approx(expected, rel=1e-4)
    assert set(scores["models"]) == {"cnn+lstm", "cnn", "prior"}
    study_of = pd.read_csv(csv_path).set_index("image_id")["study_id"]
    assert scores["partly_labeled_studies"] == [study_of[unlabeled]]  # no study label: its unlabeled slice may bleed
    assert scores["studies_scored"] == study_of.nunique() - 1
    with pytest.raises(SystemExit, match="--labels scores a --dicom-dir folder"):
        predict.main(["--run", "small", "--labels", str(tmp_path / "labels.csv"), *chain["common"]])
    with pytest.raises(SystemExit, match="a --dicom-dir folder is scored with --labels"):
        predict.main(["--run", "small", "--dicom-dir", str(raw / "stage_2_test"), "--truth", str(tmp_path / "labels.csv"),
                      *chain["common"]])
    broken = tmp_path / "broken.csv"
    broken.write_text((tmp_path / "labels.csv").read_text() + "ID_x_any,1,extra\n")
    with pytest.raises(SystemExit, match=f"--labels {broken}: cannot be read as the challenge's ID,Label CSV"):
        predict.main(["--run", "small", "--dicom-dir", str(raw / "stage_2_test"), "--labels", str(broken),
                      "--out", str(tmp_path / "refused"), *chain["common"]])
    assert not (tmp_path / "refused").exists()  # refused before a slice was read or predicted


def test_the_streamed_folder_route_gives_what_the_whole_folder_in_memory_gave(chain, tmp_path, monkeypatch):
    import dataclasses

    import keras

    import ihd.inference as inference
    from ihd.index import read_index
    from ihd.inputs import neighbour_rows, stack_hu

    folder = tmp_path / "folder"
    shutil.copytree(chain["dataset"] / "raw" / "stage_2_test", folder)
    files = sorted(folder.glob("*.dcm"))
    files[7].write_bytes(files[7].read_bytes()[:-20_000])  # an unreadable slice inside a series
    rows_per_read = []
    real_read = inference.read_model_hu
    monkeypatch.setattr(inference, "read_model_hu", lambda rows, *args: rows_per_read.append(len(rows)) or real_read(rows, *args))
    out = tmp_path / "streamed"
    csv_path = predict.main(["--run", "small", "--dicom-dir", str(folder), "--out", str(out), "--gradcam", "2",
                             "--gradcam-studies", "0", *chain["common"]])
    monkeypatch.undo()
    index = read_index(out)
    assert len(index) == len(files) - 1
    largest_study = index.groupby("study_id").size().max() + 1  # the unreadable file was read too
    assert max(rows_per_read) <= largest_study < len(files)

    # the route before streaming: every slice of the folder in memory, the CNN over all their stacks at once
    loaded = inference.load_chain("small", None, chain["common"][3], chain["common"][5])
    hu, failures = real_read(index, IMAGE_SIZE, loaded.store_size)
    assert not failures
    stacks = stack_hu(hu, neighbour_rows(index, loaded.offsets))
    for batch_size in (5, inference.CNN_BATCH):  # batches that cut series apart, and the route's own
        embeddings, cnn = inference.cnn_outputs(loaded, stacks, batch_size)
        [(streamed_embeddings, streamed_cnn)], _ = inference.folder_cnn_outputs([loaded], index, batch_size=batch_size)
        np.testing.assert_array_equal(streamed_embeddings, embeddings)
        np.testing.assert_array_equal(streamed_cnn, cnn)
    other_cnn = keras.models.clone_model(loaded.cnn)
    other_cnn.set_weights([weights * 1.1 for weights in loaded.cnn.get_weights()])
    other = dataclasses.replace(loaded, cnn=other_cnn)
    members, _ = inference.folder_cnn_outputs([loaded, other], index)  # a fold ensemble reads the folder once
    [(other_embeddings, _)], _ = inference.folder_cnn_outputs([other], index)
    np.testing.assert_array_equal(members[0][0], embeddings)
    np.testing.assert_array_equal(members[1][0], other_embeddings)
    assert not np.allclose(other_embeddings, embeddings)
    lstm = inference.lstm_probabilities(loaded, embeddings, cnn, index)
    table = pd.read_csv(csv_path)
    assert table["image_id"].tolist() == index["image_id"].tolist()
    np.testing.assert_allclose(table[list(SUBTYPES)], lstm, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(table[[f"cnn_{s}" for s in SUBTYPES]], cnn, rtol=1e-5, atol=1e-7)

    in_memory = tmp_path / "in_memory"
    predictions = inference.Predictions(index, cnn, lstm, embeddings)
    pictures = inference.draw_study_pictures(loaded, predictions, lambda rows: hu[rows], in_memory, 2)
    streamed = sorted(p.name for p in out.glob("*.png"))
    assert streamed == sorted(p.name for p in pictures) and len(streamed) == 3 * index["study_id"].nunique()
    for name in streamed:
        assert (out / name).read_bytes() == (in_memory / name).read_bytes(), name


def test_pictures_are_capped_to_the_studies_most_likely_to_bleed(chain, tmp_path, capsys):
    folder = chain["dataset"] / "raw" / "stage_2_test"
    csv_path = predict.main(["--run", "small", "--dicom-dir", str(folder), "--out", str(tmp_path / "out"),
                             "--gradcam", "1", "--gradcam-studies", "1", *chain["common"]])
    table = pd.read_csv(csv_path)
    highest = table.groupby("study_id")["any"].max().sort_values(ascending=False)
    assert len(highest) > 1 and highest.iloc[0] > highest.iloc[1], "the check below must tell the studies apart"
    montages = {p.name.removesuffix("_montage.png") for p in (tmp_path / "out").glob("*_montage.png")}
    assert montages == {highest.index[0]}
    assert f"(the 1 of {len(highest)} studies most likely to bleed; --gradcam-studies 0 draws every study)" in \
        capsys.readouterr().out
