"""The whole chain on the small synthetic dataset: train_cnn -> train_lstm (two selections) -> predict."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

import predict
import train_cnn
import train_lstm
from ihd.labels import SUBTYPES

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
    scores = json.loads(chain["submission"].with_name(chain["submission"].stem + "-scores.json").read_text())["scores"]
    assert set(scores) == {"prior", "cnn", "cnn+lstm"}
    index = pd.read_parquet(chain["dataset"] / "index.parquet")
    studies = index.loc[index["split"] == "test", "study_id"].unique()
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
    with pytest.raises(SystemExit, match="written but not sent.*needs credentials"):
        predict.main(["--run", "small", "--submit", "--submissions-dir", str(tmp_path / "out"), *chain["common"]])
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
    assert 0 <= scores["models"]["cnn+lstm"]["study_auc"]["any"] <= 1
    with pytest.raises(SystemExit, match="--labels scores a --dicom-dir folder"):
        predict.main(["--run", "small", "--labels", str(tmp_path / "labels.csv"), *chain["common"]])
