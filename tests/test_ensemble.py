"""A fold ensemble through every stage: train_cnn --fold all -> train_lstm on its members -> predict averaging them."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

import predict
import train_cnn
import train_lstm
from ihd.features import load_features
from ihd.inference import ChainError, load_chains
from ihd.inputs import fold_rows, label_array
from ihd.intervals import study_intervals
from ihd.labels import SUBTYPES, read_long_labels
from ihd.metrics import summary
from ihd.report import span_text


@pytest.fixture(scope="module")
def ensemble(prepared_synthetic, tmp_path_factory):
    """The small synthetic dataset dealt into two folds, a tiny CNN per fold, a pca:4 LSTM per member, predictions."""
    workspace = tmp_path_factory.mktemp("ensemble")
    dataset = workspace / "data" / "twofolds"
    shutil.copytree(prepared_synthetic, dataset)
    index = pd.read_parquet(dataset / "index.parquet")
    index["fold"] = np.where(index["fold"] >= 0, index["fold"] % 2, -1).astype(np.int8)
    index.to_parquet(dataset / "index.parquet", index=False)
    dirs = ["--models-dir", str(workspace / "models"), "--features-dir", str(workspace / "features")]
    train_cnn.main(["--dataset", "twofolds", "--data-dir", str(workspace / "data"), "--run", "tiny", "--fold", "all",
                    "--backbone", "tiny", "--weights", "none", "--image-size", "32", "--epochs", "1",
                    "--batch-size", "16", *dirs])
    table = train_lstm.main(["--run", "tiny", "--selection", "pca:4", "--layers", "1", "--units", "4", "--epochs", "2",
                             *dirs])
    submission = predict.main(["--run", "tiny", "--data-dir", str(workspace / "data"), "--submissions-dir",
                               str(workspace / "submissions"), *dirs])
    return {"workspace": workspace, "dirs": dirs, "table": table, "submission": submission, "dataset": dataset}


def _members(ensemble):
    return [load_features(ensemble["workspace"] / "features" / f"tiny-fold{fold}") for fold in (0, 1)]


def test_every_member_trains_its_own_lstm_and_the_ensemble_is_scored_out_of_fold(ensemble):
    models = ensemble["workspace"] / "models"
    for fold in (0, 1):
        record = json.loads((models / f"tiny-fold{fold}" / "lstm-pca4.json").read_text())
        assert record["fold"] == fold
    pooled = json.loads((models / "tiny" / "lstm-pca4.json").read_text())
    assert sorted(pooled["members"]) == ["tiny-fold0", "tiny-fold1"]
    parts = [(features, fold_rows(features.index, fold)[1]) for fold, features in enumerate(_members(ensemble))]
    labels = np.concatenate([label_array(f.index)[rows] for f, rows in parts])
    cnn = np.concatenate([np.asarray(f.probabilities[rows], np.float32) for f, rows in parts])
    assert pooled["validation_cnn"]["weighted_log_loss"] == pytest.approx(summary(labels, cnn)["weighted_log_loss"])
    assert ensemble["table"].index.tolist() == ["cnn", "cnn+lstm pca:4"]
    assert len(labels) == int((label_array(parts[0][0].index)[:, 0] >= 0).sum()), "every labeled row scored once"
    # beneath the ablation, intervals from resampling the out-of-fold studies: the CNN's, computed here apart
    studies = np.concatenate([f.index["study_id"].to_numpy()[rows] for f, rows in parts])
    expected = study_intervals(labels, {"cnn": cnn.astype(np.float64)}, studies)["models"]["cnn"]
    ablation = (models / "tiny" / "ablation.md").read_text()
    assert f"| cnn | {span_text(expected['weighted_log_loss'], 4)} |" in ablation
    assert "| model | weighted log loss | loss minus the cnn's | slice AUC any |" in ablation


def test_the_ensembles_cnn_scores_are_the_mean_of_its_members(ensemble):
    scores = json.loads(ensemble["submission"].with_name(ensemble["submission"].stem + "-scores.json").read_text())
    assert scores["members"] == ["tiny-fold0", "tiny-fold1"]
    members = _members(ensemble)
    test = np.flatnonzero(members[0].index["split"].to_numpy() == "test")
    mean = np.mean([np.asarray(m.probabilities[test], np.float32) for m in members], axis=0)
    truth = read_long_labels(ensemble["dataset"] / "raw" / "truth" / "stage_2_test_labels.csv")
    images = members[0].index["image_id"].iloc[test]
    from ihd.metrics import weighted_log_loss

    expected = weighted_log_loss(truth.loc[images, list(SUBTYPES)].to_numpy(), mean)
    assert scores["scores"]["cnn"] == pytest.approx(expected, rel=1e-4)
    written = pd.read_csv(ensemble["submission"])
    assert written["Label"].between(0, 1).all() and len(written) == len(test) * len(SUBTYPES)


def test_a_member_retrained_alone_is_refused_until_the_ensemble_is_scored_again(ensemble, tmp_path, capsys):
    models = tmp_path / "models"
    shutil.copytree(ensemble["workspace"] / "models", models)
    train_lstm.main(["--run", "tiny-fold1", "--selection", "pca:4", "--layers", "1", "--units", "4", "--epochs", "1",
                     "--models-dir", str(models), "--features-dir", str(ensemble["workspace"] / "features")])
    with pytest.raises(ChainError, match="tiny-fold1 .*not the one the ensemble tiny was scored with"):
        load_chains("tiny", "pca:4", models, ensemble["workspace"] / "features")
    with pytest.raises(ChainError, match="has no LSTMs of selection all"):
        load_chains("tiny", "all", models, ensemble["workspace"] / "features")
    dirs = ["--models-dir", str(models), "--features-dir", str(ensemble["workspace"] / "features")]
    train_lstm.main(["--run", "tiny", "--ablation-only", "--selection-sample-rows", "50", *dirs])
    assert "pca:4: not scored, its LSTMs were trained on a selection fitted otherwise than these flags ask " \
           "(sample_rows: None -> 50)" in capsys.readouterr().out  # and the members' pca:4 is not fitted again
    train_lstm.main(["--run", "tiny", "--ablation-only", *dirs])  # fold1's LSTM trained 1 epoch, fold0's 2: not pooled
    assert "pca:4: not pooled, its members were made differently (epochs: 2 -> 1)" in capsys.readouterr().out
    with pytest.raises(ChainError, match="tiny-fold1 .*not the one the ensemble tiny was scored with"):
        load_chains("tiny", "pca:4", models, ensemble["workspace"] / "features")


def test_the_best_selection_is_chosen_among_those_scored_with_the_members_lstms_of_now(ensemble, tmp_path):
    models, features = tmp_path / "models", ensemble["workspace"] / "features"
    shutil.copytree(ensemble["workspace"] / "models", models)
    lstm = ["--layers", "1", "--units", "4", "--epochs", "1", "--models-dir", str(models),
            "--features-dir", str(features)]
    train_lstm.main(["--run", "tiny", "--selection", "pca:2", *lstm])
    pooled = models / "tiny" / "lstm-pca4.json"
    record = json.loads(pooled.read_text())
    record["validation"]["weighted_log_loss"] = 0.0  # the best on paper
    pooled.write_text(json.dumps(record))
    assert [chain.selection_name for chain in load_chains("tiny", None, models, features)] == ["pca:4", "pca:4"]
    older_features = tmp_path / "older-features"
    shutil.copytree(models, older_features)  # fold0's pca:4 as if trained on features extracted before these
    member = older_features / "tiny-fold0" / "lstm-pca4.json"
    member.write_text(json.dumps({**json.loads(member.read_text()), "inputs": {"features": "0" * 64}}))
    assert [chain.selection_name for chain in load_chains("tiny", None, older_features, features)] == ["pca:2", "pca:2"]
    train_lstm.main(["--run", "tiny-fold1", "--selection", "pca:4", *lstm])  # pca:4's pooled score is now stale
    assert [chain.selection_name for chain in load_chains("tiny", None, models, features)] == ["pca:2", "pca:2"]


def test_an_ensembles_gradcam_is_the_mean_of_its_members_heatmaps(ensemble, tmp_path, monkeypatch):
    import ihd.inference as inference
    from ihd.slices import SliceStore

    chains = load_chains("tiny", "pca:4", ensemble["workspace"] / "models", ensemble["workspace"] / "features")
    level = {id(chains[0].cnn): 0.2, id(chains[1].cnn): 0.6}
    monkeypatch.setattr(inference, "gradcam_heatmaps",
                        lambda model, stacks, method="gradcam": np.full(stacks.shape[:3], level[id(model)], np.float32))
    drawn = []
    monkeypatch.setattr(inference, "draw_overlay", lambda hu, heatmap, *args: drawn.append(heatmap) or tmp_path / "o.png")
    monkeypatch.setattr(inference, "draw_montage", lambda *args: tmp_path / "m.png")
    features = [inference.cached_test_features(c, ensemble["workspace"] / "data", ensemble["workspace"] / "features",
                                               ensemble["workspace"] / "models") for c in chains]
    predictions = inference.average_predictions([inference.predict_test_split(c, f) for c, f in zip(chains, features)])
    reader = inference.store_hu_reader(predictions.index, SliceStore(ensemble["dataset"] / "slices"), 32)
    inference.draw_study_pictures(chains, predictions, reader, tmp_path, 1, max_studies=2)
    assert len(drawn) == 2 and all(np.allclose(heatmap, 0.4) for heatmap in drawn)


def test_a_study_model_is_asked_of_a_member_not_of_the_ensemble(ensemble):
    with pytest.raises(SystemExit, match="tiny is a fold ensemble, and study models train on one run: give --run one of "
                                         "its members \\(tiny-fold0, tiny-fold1\\)"):
        predict.main(["--run", "tiny", "--study", "best", "--data-dir", str(ensemble["workspace"] / "data"),
                      *ensemble["dirs"]])


def test_out_of_fold_intervals_line_up_each_members_rows_and_compare_with_the_best_selection():
    from types import SimpleNamespace

    rng = np.random.default_rng(8)
    members, truth = [], {}
    for member in range(2):
        index = pd.DataFrame({"study_id": np.repeat([f"m{member}s{k}" for k in range(10)], 6)})
        labels = (rng.random((60, len(SUBTYPES))) < 0.25).astype(np.float32)
        index[list(SUBTYPES)] = labels
        members.append(SimpleNamespace(index=index))
        truth[member] = labels
    scores = {name: [np.clip(0.5 * truth[m] + rng.random((60, len(SUBTYPES))) * spread, 0.01, 0.99) for m in range(2)]
              for name, spread in (("cnn", 0.6), ("cnn+lstm a", 0.4), ("cnn+lstm b", 0.5))}
    out_of_fold = {}
    for name, per_member in scores.items():
        parts = []
        for member, features in enumerate(members):
            rows = np.arange(60) if name == "cnn" else rng.permutation(60)  # an LSTM's rows come in its own order
            parts.append((features, rows, per_member[member][rows]))
        out_of_fold[name] = parts
    y_true = np.concatenate([truth[0], truth[1]])
    predictions = {name: np.concatenate(per_member) for name, per_member in scores.items()}
    table = pd.DataFrame({"weighted_log_loss": [summary(y_true, p)["weighted_log_loss"] for p in predictions.values()]},
                         index=list(predictions))
    best = table.drop(index="cnn")["weighted_log_loss"].idxmin()
    result = train_lstm.out_of_fold_intervals(out_of_fold, table)
    studies = np.concatenate([m.index["study_id"].to_numpy() for m in members])
    assert result == study_intervals(y_true, predictions, studies, ("cnn", best))
    assert result["baselines"] == ["cnn", best] and result["studies"] == 20
    other = ({"cnn+lstm a", "cnn+lstm b"} - {best}).pop()
    assert set(result["models"][other]) >= {"loss_minus_cnn", f"loss_minus_{best}"}
