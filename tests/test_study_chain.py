"""Study mode end to end on a small synthetic dataset: slice CNN -> per-slice LSTM -> study models
(attention pretrained and from scratch, the paper-000 volume model, the paper-002 end-to-end model)
-> predict.py --study on the test split and on a real DICOM series."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

import predict
import prepare_data
import train_cnn
import train_lstm
from ihd.labels import SUBTYPES
from ihd.study_labels import read_study_labels

STUDY = "study-attention-subtypes-pca8-pretrained"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("study_chain")
    dataset = prepare_data.main(["--synthetic", "--train-studies", "14", "--test-studies", "6", "--folds", "2",
                                 "--dataset", "studies", "--size", "32", "--data-dir", str(workspace / "data")])
    dirs = ["--models-dir", str(workspace / "models"), "--features-dir", str(workspace / "features")]
    train_cnn.main(["--dataset", "studies", "--run", "r", "--backbone", "tiny", "--weights", "none", "--image-size", "32",
                    "--epochs", "2", "--batch-size", "32", "--data-dir", str(workspace / "data"), *dirs])
    lstm = ["--run", "r", "--selection", "pca:8", "--layers", "1", "--units", "8", "--epochs", "2", *dirs]
    train_lstm.main(lstm)
    train_lstm.main([*lstm, "--study-labels", "derive", "--init", "pretrained"])
    train_lstm.main([*lstm, "--study-labels", "derive", "--init", "scratch"])
    study_file = str(dataset / "raw" / "stage_2_train_study_labels.csv")
    table = train_lstm.main([*lstm, "--study-labels", study_file, "--label-set", "exam", "--study-model", "volume",
                     "--frames", "8"])
    return {"workspace": workspace, "dataset": dataset, "dirs": dirs, "table": table, "study_file": study_file}


def test_study_records_hold_validation_scores_and_pretraining(chain):
    models = chain["workspace"] / "models" / "r"
    pretrained = json.loads((models / f"{STUDY}.json").read_text())
    scratch = json.loads((models / "study-attention-subtypes-pca8-scratch.json").read_text())
    assert pretrained["pretrained_from"].endswith("lstm-pca8.keras") and scratch["pretrained_from"] is None
    for record in (pretrained, scratch):
        assert 0.0 <= record["thresholds"]["any"] <= 1.0
        assert set(record["validation"]["any"]) >= {"auc", "sensitivity", "specificity", "ppv"}
        assert record["validation_localization"]["exams"] >= 1
        assert record["validation_slice_model"]["localization"]["exams"] >= 1
    volume = json.loads((models / "study-volume-exam-pca8-frames8.json").read_text())
    assert volume["columns"] == ["hemorrhage", "no_finding", "other"] and volume["frames"] == 8
    assert STUDY in chain["table"].index and "lstm-pca8 (slice labels)" in chain["table"].index
    assert (models / "study.md").read_text().count("\n") == len(chain["table"]) + 2


def test_pretraining_refuses_a_per_slice_lstm_that_is_not_finished_or_not_its_record(chain, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(chain["workspace"] / "models", models)
    with open(models / "r" / "lstm-pca8.keras", "ab") as lstm:
        lstm.write(b"\0")
    study = ["--run", "r", "--layers", "1", "--units", "8", "--epochs", "1", "--study-labels", "derive", "--init",
             "pretrained", "--models-dir", str(models), "--features-dir", str(chain["workspace"] / "features")]
    with pytest.raises(SystemExit, match=r"lstm-pca8.keras is not the model its record .* describes .*or use --init scratch"):
        train_lstm.main([*study, "--selection", "pca:8"])
    with pytest.raises(SystemExit, match=r"lstm-pca4.json not found: run train_lstm.py --run r --selection pca:4"):
        train_lstm.main([*study, "--selection", "pca:4"])
    assert not list((models / "r").glob("study-*-pca4-*"))


def test_a_pretrained_study_model_standardises_its_inputs_as_the_per_slice_lstm_it_starts_from(chain, tmp_path):
    import keras

    from ihd.sequence import load_lstm

    for part in ("models", "features"):
        shutil.copytree(chain["workspace"] / part, tmp_path / part)
    (tmp_path / "data").symlink_to(chain["workspace"] / "data")
    lstm = ["--run", "r", "--selection", "pca:8", "--layers", "1", "--units", "8", "--epochs", "1", "--standardize",
            "shared", "--models-dir", str(tmp_path / "models"), "--features-dir", str(tmp_path / "features")]
    train_lstm.main(lstm)  # the per-slice LSTM again, its features scaled by one shared variance
    train_lstm.main([*lstm, "--study-labels", "derive", "--init", "pretrained"])
    models = tmp_path / "models" / "r"
    slice_layer = load_lstm(models / "lstm-pca8.keras").get_layer("standardise")
    study_layer = keras.models.load_model(models / f"{STUDY}.keras", compile=False).get_layer("standardise")
    for name in ("mean", "variance"):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(getattr(study_layer, name)),
                                      keras.ops.convert_to_numpy(getattr(slice_layer, name)))
    variance = keras.ops.convert_to_numpy(slice_layer.variance).reshape(-1)
    assert np.unique(variance[:8]).size == 1 and np.unique(variance).size > 1  # shared, not per feature
    assert json.loads((models / f"{STUDY}.json").read_text())["standardised_as"] == "the per-slice LSTM's inputs"


def test_a_study_model_whose_validation_exams_hold_one_class_is_flagged_when_trained(chain, tmp_path):
    for part in ("models", "features"):
        shutil.copytree(chain["workspace"] / part, tmp_path / part)
    (tmp_path / "data").symlink_to(chain["workspace"] / "data")
    index = pd.read_parquet(chain["dataset"] / "index.parquet")
    fold_of = index[index["split"] == "train"].groupby("study_id")["fold"].first()
    labels = pd.DataFrame(0, index=fold_of.index.rename("study_id"), columns=list(SUBTYPES))
    labels.loc[fold_of[fold_of == 1].index[:2], ["intraparenchymal", "any"]] = 1  # bleeds in training exams only
    labels.to_csv(tmp_path / "study_labels.csv")
    with pytest.warns(UserWarning, match="the validation exams of fold 0 hold one class of any only"):
        train_lstm.main(["--run", "r", "--selection", "pca:8", "--layers", "1", "--units", "8", "--epochs", "1",
                         "--study-labels", str(tmp_path / "study_labels.csv"), "--init", "scratch",
                         "--models-dir", str(tmp_path / "models"), "--features-dir", str(tmp_path / "features")])


def test_a_volume_model_of_inputs_as_they_come_keeps_the_layer_its_evidence_is_read_at(chain, tmp_path):
    for part in ("models", "features"):
        shutil.copytree(chain["workspace"] / part, tmp_path / part)
    (tmp_path / "data").symlink_to(chain["workspace"] / "data")
    train_lstm.main(["--run", "r", "--selection", "pca:8", "--epochs", "1", "--standardize", "none", "--study-labels",
                     chain["study_file"], "--label-set", "exam", "--study-model", "volume", "--frames", "8",
                     "--models-dir", str(tmp_path / "models"), "--features-dir", str(tmp_path / "features")])
    record = json.loads((tmp_path / "models" / "r" / "study-volume-exam-pca8-frames8.json").read_text())
    assert record["standardised_as"] == "none" and record["validation_localization"]["exams"] >= 1


def test_a_study_model_is_refused_with_a_selection_fitted_again_on_other_rows(chain, tmp_path):
    for part in ("models", "features"):
        shutil.copytree(chain["workspace"] / part, tmp_path / part)
    (tmp_path / "data").symlink_to(chain["workspace"] / "data")  # where the features' index lies, relative to them
    dirs = ["--models-dir", str(tmp_path / "models"), "--features-dir", str(tmp_path / "features")]
    train_lstm.main(["--run", "r", "--selection", "pca:8", "--selection-sample-rows", "60", "--layers", "1", "--units",
                     "8", "--epochs", "1", *dirs])  # pca:8 and its LSTM again, on a sample of the rows
    with pytest.raises(SystemExit, match=f"study model {STUDY} was trained on another fit of pca:8 than the chain's"):
        predict.main(["--run", "r", "--study", STUDY, "--data-dir", str(chain["dataset"].parent), "--submissions-dir",
                      str(tmp_path / "submissions"), *dirs])


def test_predict_study_mode_scores_the_test_studies(chain, capsys):
    out = predict.main(["--run", "r", "--study", STUDY, "--gradcam", "2", "--data-dir", str(chain["dataset"].parent),
                        "--submissions-dir", str(chain["workspace"] / "submissions"), *chain["dirs"]])
    table = pd.read_csv(out)
    truth, _ = read_study_labels(chain["dataset"] / "raw" / "truth" / "stage_2_test_study_labels.csv", "subtypes")
    assert sorted(table["study_id"]) == sorted(truth.index)
    called = table["p_any"] >= table["threshold"]
    assert (table["verdict"] == np.where(called, "hemorrhage", "no_hemorrhage")).all()
    scores = json.loads(out.with_name(out.stem + "-scores.json").read_text())["scores"]
    assert scores["exam"]["any"]["exams"] == len(truth)
    assert scores["exam"]["any"]["tp"] + scores["exam"]["any"]["fn"] == int(truth["any"].sum())
    assert {"localization", "slice_model"} <= set(scores)
    printed = capsys.readouterr().out.split("test study scores:\n", 1)[1].splitlines()
    assert printed[0].split() == ["exams", "auc", "sensitivity", "specificity", "ppv", "localization_f1"]
    row = printed[2].split()  # after the index's name: the study model's exams, AUC, ..., at four decimals
    assert row[0] == STUDY and int(row[1]) == len(truth) and row[2] == f"{scores['exam']['any']['auc']:.4f}"
    assert printed[3].startswith("per-slice lstm (slice labels)")
    montages = list((chain["workspace"] / "submissions").glob(f"r-{STUDY}-best-slices/*_best_slices.png"))
    assert len(montages) == int(called.sum())


def test_predict_dicom_folder_writes_one_row_per_study_and_scores_real_studies(chain, real_data, tmp_path):
    labeled = real_data / "rsna_labeled"
    predict.main(["--run", "r", "--study", STUDY, "--dicom-dir", str(labeled / "stage_2_train"), "--out", str(tmp_path),
                  "--labels", str(labeled / "stage_2_train.csv"), *chain["dirs"]])
    slices = pd.read_csv(tmp_path / "probabilities.csv")
    studies = pd.read_csv(tmp_path / "studies.csv", keep_default_na=False)
    assert len(studies) == 7 and studies["slices"].sum() == len(slices) == 249
    for _, study in studies.iterrows():
        flagged = [int(p) for p in str(study["flagged_positions"]).split(";") if p]
        assert set(flagged) <= set(slices.loc[slices["study_id"] == study["study_id"], "position"])
        assert study["verdict"] == "hemorrhage" or not flagged  # a study not called hemorrhage flags no slice
    assert 0 < (studies["verdict"] == "hemorrhage").sum() < len(studies), studies["verdict"].tolist()
    scores = json.loads((tmp_path / "studies-scores.json").read_text())["scores"]
    assert scores["exam"]["any"]["exams"] == 7 and scores["exam"]["any"]["positives"] == 4  # the folder's truth
    assert scores["localization"]["exams"] == 4 and scores["slice_model"]["localization"]["exams"] == 4


def test_an_exam_label_study_model_on_a_labeled_folder_scores_the_slices_not_the_studies(chain, real_data, tmp_path,
                                                                                          capsys):
    labeled = real_data / "rsna_labeled"
    predict.main(["--run", "r", "--study", "study-volume-exam-pca8-frames8", "--dicom-dir", str(labeled / "stage_2_train"),
                  "--out", str(tmp_path), "--labels", str(labeled / "stage_2_train.csv"), "--gradcam", "0", *chain["dirs"]])
    assert "do not give the exam label set's study labels (hemorrhage, no_finding, other)" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "studies.csv")) == 6 and (tmp_path / "scores.json").is_file()  # one series:
    # real pairs of slices at one position, which the volume model cannot reslice (left out with a warning)
    assert not (tmp_path / "studies-scores.json").exists()


def test_end_to_end_mode_of_the_cnn_stage(chain):
    run_dir = train_cnn.main(["--dataset", "studies", "--run", "e2e", "--backbone", "tiny", "--weights", "none",
                              "--image-size", "32", "--recipe", "brain_blood_bone", "--study-labels", chain["study_file"],
                              "--label-set", "exam", "--frames", "6", "--epochs", "1", "--batch-size", "4",
                              "--data-dir", str(chain["dataset"].parent), *chain["dirs"]])
    record = json.loads((run_dir / "end_to_end.json").read_text())
    assert (run_dir / "end_to_end.keras").is_file() and record["frames"] == 6
    assert record["test"]["exams"] == 6 and "hemorrhage" in record["test"]["exam"]
    assert record["test"]["localization"]["exams"] >= 1


def test_a_study_model_of_other_features_is_refused(chain, tmp_path):
    models = chain["workspace"] / "models" / "r"
    record = json.loads((models / f"{STUDY}.json").read_text())
    stale = "study-attention-subtypes-pca8-stale"
    (models / f"{stale}.keras").write_bytes((models / f"{STUDY}.keras").read_bytes())
    (models / f"{stale}.json").write_text(json.dumps({**record, "features_fingerprint": "0" * 64}))
    with pytest.raises(SystemExit, match=f"{stale} was trained on other features"):
        predict.main(["--run", "r", "--study", stale, "--data-dir", str(chain["dataset"].parent),
                      "--submissions-dir", str(tmp_path), *chain["dirs"]])


def test_study_labels_that_cannot_be_used_and_a_best_study_model_that_cannot_be_chosen_are_refused(chain, tmp_path):
    lstm = ["--run", "r", "--selection", "pca:8", "--layers", "1", "--units", "8", "--epochs", "1", *chain["dirs"]]
    with pytest.raises(SystemExit, match="absent.csv: cannot be read as CSV"):
        train_lstm.main([*lstm, "--study-labels", str(tmp_path / "absent.csv")])
    with pytest.raises(SystemExit, match="derive gives the subtypes label set; exam needs a study-label file"):
        train_lstm.main([*lstm, "--study-labels", "derive", "--label-set", "exam"])
    with pytest.raises(SystemExit, match=r"--init pretrained starts from .*lstm-pca8.keras, of 1 layers of 8 units: "
                                         r"pass --layers 1 --units 8 \(not 2 and 8\), or use --init scratch"):
        train_lstm.main([*lstm, "--layers", "2", "--study-labels", "derive", "--init", "pretrained"])
    with pytest.raises(SystemExit, match="holds study models of the label sets exam, subtypes, whose losses do not "
                                         "compare: name one with --study"):
        predict.main(["--run", "r", "--study", "best", "--data-dir", str(chain["dataset"].parent), "--submissions-dir",
                      str(tmp_path), *chain["dirs"]])
