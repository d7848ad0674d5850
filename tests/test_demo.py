"""demo.py's stages: every flag it passes is one its stage accepts, with the value it means."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import demo
import prepare_data
import train_cnn
import train_lstm


def test_every_stage_accepts_the_flags_the_demo_passes(tmp_path):
    settings = demo.parse_args(["--root", str(tmp_path), "--seed", "7", "--selection", "random:8"])
    parsed = {module.__name__: module.parse_args(flags) for module, flags in demo.stages(settings)}
    assert list(parsed) == ["prepare_data", "train_cnn", "train_lstm", "predict"]
    assert parsed["prepare_data"].seed == 7 and parsed["prepare_data"].backgrounds is None
    assert parsed["prepare_data"].data_dir == str(tmp_path / "data")
    assert parsed["train_cnn"].fold == "all" and parsed["train_cnn"].backbone == "tiny"
    assert parsed["train_lstm"].selections == ["random:8"]
    assert parsed["predict"].submissions_dir == str(tmp_path / "submissions")


def test_backgrounds_make_the_dataset_of_inserted_bleeds(tmp_path):
    backgrounds = tmp_path / "normal"
    backgrounds.mkdir()
    settings = demo.parse_args(["--root", str(tmp_path), "--backgrounds", str(backgrounds)])
    (prepare, flags), *rest = demo.stages(settings)
    assert prepare is prepare_data
    assert Path(prepare_data.parse_args(flags).backgrounds) == backgrounds
    assert all("--backgrounds" not in other_flags for _, other_flags in rest)


def test_the_cnn_trains_for_the_epochs_chosen_for_its_data(tmp_path):
    backgrounds = tmp_path / "normal"
    backgrounds.mkdir()
    for extra, mode in (([], "phantom"), (["--backgrounds", str(backgrounds)], "inserted")):
        stages = dict(demo.stages(demo.parse_args(["--root", str(tmp_path), *extra])))
        assert train_cnn.parse_args(stages[train_cnn]).epochs == demo.CNN_EPOCHS[mode]
    assert demo.CNN_EPOCHS["phantom"] != demo.CNN_EPOCHS["inserted"]


def test_the_demo_trains_every_fold_and_an_lstm_per_selection(tmp_path):
    stages = dict((module, flags) for module, flags in demo.stages(demo.parse_args(["--root", str(tmp_path)])))
    assert train_cnn.parse_args(stages[train_cnn]).run == train_lstm.parse_args(stages[train_lstm]).run == demo.RUN
    assert train_lstm.parse_args(stages[train_lstm]).selections == demo.SELECTIONS


def test_score_real_adds_a_last_stage_that_scores_the_labeled_series(tmp_path):
    labeled = tmp_path / "labeled"
    with pytest.raises(SystemExit):
        demo.parse_args(["--root", str(tmp_path), "--score-real", str(labeled)])  # refused before anything trains
    (labeled / "stage_2_train").mkdir(parents=True)
    (labeled / "stage_2_train" / "ID_1.dcm").write_bytes(b"")
    (labeled / "stage_2_train.csv").write_text("ID,Label\n")
    plain = demo.stages(demo.parse_args(["--root", str(tmp_path)]))
    scored = demo.stages(demo.parse_args(["--root", str(tmp_path), "--score-real", str(labeled)]))
    assert scored[:-1] == plain
    module, flags = scored[-1]
    settings = module.parse_args(flags)
    assert settings.dicom_dir == str(labeled / "stage_2_train")
    assert settings.labels == str(labeled / "stage_2_train.csv")
    assert settings.out == str(tmp_path / "real") and settings.run == demo.RUN


def test_saved_choice_scores_of_other_demo_settings_are_scored_again(tmp_path, monkeypatch):
    from bench import demo_choices

    path = tmp_path / "choices.json"
    row = {"seed": 1, "candidate": "--layers 1", "pca:32": 0.1, "cnn": 0.2}
    path.write_text(json.dumps([row | {"chain": demo_choices.CHAIN}, row | {"seed": 2}]))
    assert [r["seed"] for r in demo_choices.saved_rows(path)] == [1]
    monkeypatch.setattr(demo_choices, "CHAIN", demo.chain_record("folds") | {"cnn": [*demo.cnn_flags(), "--epochs", "1"]})
    assert demo_choices.saved_rows(path) == []


def test_a_stage_whose_folder_holds_other_work_tells_how_to_start_the_demo_afresh(tmp_path, monkeypatch):
    from ihd.io import FolderTaken

    def refusing(flags):
        raise FolderTaken("data/synthetic/raw holds a synthetic dataset made with other settings: choose another "
                          "--dataset or delete that folder")

    monkeypatch.setattr(prepare_data, "main", refusing)
    with pytest.raises(SystemExit) as stop:
        demo.main(["--root", str(tmp_path)])
    message = str(stop.value.code)
    assert message.startswith("data/synthetic/raw holds a synthetic dataset made with other settings")
    assert f"under --root {tmp_path}: another --root starts afresh" in message

    def other_refusal(flags):  # say, a malformed labels file: a fresh --root would fail again
        raise SystemExit("--labels labels.csv: row 3: no label")

    monkeypatch.setattr(prepare_data, "main", other_refusal)
    with pytest.raises(SystemExit) as stop:
        demo.main(["--root", str(tmp_path)])
    assert stop.value.code == "--labels labels.csv: row 3: no label"
