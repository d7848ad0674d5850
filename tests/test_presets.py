"""ihd.presets: the paper's recipe as named settings of every stage, and the README's table of it."""
from pathlib import Path

import pytest

import prepare_data
import train_cnn
import train_lstm
from ihd.presets import PRESETS, kit_defaults, recipe_table, stage_values

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_shows_the_papers_recipe_as_the_code_defines_it():
    assert recipe_table("paper", kit_defaults()) in README.read_text(), (
        "README.md's table of the paper's recipe differs from ihd.presets: paste `python -m ihd.presets` into it")


def test_every_preset_setting_is_a_setting_of_its_stage():
    defaults = kit_defaults()
    for choice in PRESETS["paper"]:
        assert choice.setting in defaults[choice.stage], f"{choice.stage} has no setting {choice.setting}"


def test_a_preset_sets_the_defaults_and_flags_still_win():
    settings = train_cnn.parse_args(["--preset", "paper", "--dataset", "rsna"])
    assert (settings.backbone, settings.weights, settings.learning_rate, settings.loss, settings.keep, settings.fold,
            settings.preset) == ("ResNeXt101_32x8d_WSL", "wsl", 1e-5, "bce", "last", 1, "paper")
    assert train_cnn.parse_args(["--preset", "paper", "--epochs", "1"]).epochs == 1
    assert train_cnn.parse_args([]).preset == "" and train_cnn.parse_args([]).loss == "weighted"


def test_the_lstm_preset_gives_its_selection_unless_one_is_named():
    assert train_lstm.parse_args(["--run", "r", "--preset", "paper"]).selections == ["pca:120"]
    assert train_lstm.parse_args(["--run", "r", "--preset", "paper", "--selection", "all"]).selections == ["all"]
    settings = train_lstm.parse_args(["--run", "r", "--preset", "paper"])
    assert (settings.head, settings.batch_size, settings.dropout, settings.selection_sample_rows,
            settings.standardize, settings.clipnorm) == ("paper", 1, 0.3, 32000, "none", 0.0)


def test_the_prepare_preset_splits_by_series_order():
    assert prepare_data.parse_args(["--preset", "paper", "--synthetic"]).train_series == 21000
    assert stage_values("paper", "prepare") == {"train_series": 21000, "size": 256}
    with pytest.raises(ValueError, match="unknown preset 'kaggle'"):
        stage_values("kaggle", "cnn")
