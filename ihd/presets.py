"""Named, saved sets of settings. ``--preset paper`` runs each stage as Burduja et al.'s released code ran it.

A preset is data, not a code path: for each stage (``prepare``, ``cnn``, ``lstm``), the values it gives
to that stage's settings, each with what the paper did in words and why the kit's own default
differs. Flags given on the command line still win; every stage records the preset's name and all
its resolved settings in its config. The source of ``paper`` is the paper (Sensors 2020, 20(19):5611)
and its released code (github.com/warchildmd/ihd: train_cnn.py, train_lstm.py, models.py,
datasets.py), read, not copied.

``python -m ihd.presets`` prints the README's table of the paper's recipe from these entries, so the
two cannot drift apart (a test compares them).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

STAGES = ("prepare", "cnn", "lstm")


@dataclass(frozen=True)
class Choice:
    """One setting of a preset: its stage, the Settings field, the value, what the paper did, and why
    the kit's default differs ("" where it does not)."""

    stage: str
    setting: str
    value: Any
    paper: str
    why: str = ""

    @property
    def flag(self) -> str:
        """The command-line flag of the setting."""
        return "--selection" if self.setting == "selections" else "--" + self.setting.replace("_", "-")


PAPER = (
    Choice("prepare", "train_series", 21000,
           "split by series: the first 21,000 series train, the rest validate; no cross-validation",
           "5 folds grouped by patient: no patient on both sides of a split, and every fold can validate, "
           "which fold ensembles and out-of-fold features need"),
    Choice("prepare", "size", 256, "slices resized to 256x256"),
    Choice("cnn", "fold", 1, "the validation part of that split", "fold 0 of the patient folds"),
    Choice("cnn", "backbone", "ResNeXt101_32x8d_WSL", "ResNeXt-101 32x8d (torch.hub, facebookresearch/WSL-Images)",
           "MobileNetV2: about 50 times fewer multiply-adds (0.3 against 16.5 G at 224x224) for a CPU or a small GPU"),
    Choice("cnn", "weights", "wsl", "Instagram weakly supervised pretraining, fine-tuned on ImageNet",
           "ImageNet weights of the chosen keras.applications backbone"),
    Choice("cnn", "image_size", 256, "256x256"),
    Choice("cnn", "recipe", "windows", "brain 40/80, subdural 80/200, soft tissue 40/380 of the same slice"),
    Choice("cnn", "input_norm", "dataset", "each window normalised by its mean and standard deviation over the data",
           "the backbone's own input range: what its pretrained weights were trained on"),
    Choice("cnn", "augment", True, "flip, shift-scale-rotate, brightness-contrast (albumentations)"),
    Choice("cnn", "loss", "bce", "binary cross-entropy, the six labels alike",
           "weighted like the challenge's metric (`any` twice): minimising it minimises the score"),
    Choice("cnn", "learning_rate", 1e-5, "Adam at 1e-5",
           "5e-4 after warmup: the constant 1e-5 needs the real data's 21,000 series to move in 3 epochs"),
    Choice("cnn", "schedule", "constant", "a constant rate",
           "warmup then cosine decay: pretrained weights are not wrecked by the first steps"),
    Choice("cnn", "epochs", 3, "3 epochs", "5, the best validation epoch kept"),
    Choice("cnn", "batch_size", 32, "32"),
    Choice("cnn", "dropout", 0.0, "none: a linear layer on the 2,048-wide pooled output",
           "0.2 before the head: light regularisation of the embedding"),
    Choice("cnn", "prior_bias", False, "the head's default initialisation",
           "the head starts at the training label frequencies: the first steps do not unlearn the prior"),
    Choice("cnn", "keep", "last", "the last epoch", "the best validation epoch, which the kit measures every epoch"),
    Choice("lstm", "selections", ["pca:120"], "PCA to 120 components of the 2,048-wide embedding"),
    Choice("lstm", "selection_sample_rows", 32000, "PCA fitted on about 32,000 training slices",
           "all training rows (a streamed covariance costs seconds)"),
    Choice("lstm", "layers", 3, "3 bidirectional layers"),
    Choice("lstm", "units", 256, "256 units per direction"),
    Choice("lstm", "dropout", 0.3, "0.3 between the LSTM layers",
           "0.5 after every LSTM layer: the sequence model overfits the few series of a fold"),
    Choice("lstm", "head", "paper",
           "a linear layer on the BiLSTM output concatenated with the CNN's six probabilities, after dropout 0.5",
           "residual: the last layer starts at zero and adds a change to the CNN's logits, so training starts "
           "from the CNN's answer"),
    Choice("lstm", "standardize", "none", "inputs as they come (PCA components, probabilities)",
           "inputs standardised by their training means and variances (the demo scales the selected features by "
           "one shared variance instead: better on its validation, BENCHMARKS.md)"),
    Choice("lstm", "loss", "bce", "binary cross-entropy, the six labels alike", "weighted like the metric"),
    Choice("lstm", "learning_rate", 3e-5, "Adam at 3e-5", "1e-3 with series of similar length batched together"),
    Choice("lstm", "clipnorm", 0.0, "no gradient clipping", "gradients clipped at norm 1"),
    Choice("lstm", "epochs", 5, "5 epochs", "up to 20, stopped 5 epochs after the best validation loss"),
    Choice("lstm", "batch_size", 1, "one series per step", "128 series of similar length per step: 100 times "
           "fewer steps"),
    Choice("lstm", "keep", "last", "the last epoch", "the best validation epoch"),
)

PRESETS = {"paper": PAPER}


def stage_values(preset: str, stage: str) -> dict[str, Any]:
    """The settings ``preset`` gives to ``stage``, by field name."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: use {', '.join(PRESETS)}")
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: use {', '.join(STAGES)}")
    return {choice.setting: choice.value for choice in PRESETS[preset] if choice.stage == stage}


def requested_preset(argv: list[str] | None) -> str:
    """The value of ``--preset`` in ``argv`` ("" when absent), read before the stage's own flags are parsed."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--preset", choices=sorted(PRESETS), default="")
    known, _ = early.parse_known_args(argv)
    return known.preset


def apply_preset(parser: argparse.ArgumentParser, stage: str, argv: list[str] | None, leave: tuple[str, ...] = ()) -> str:
    """Add ``--preset`` to a stage's parser and, when ``argv`` names one, make its values the defaults
    (flags still win), except the settings in ``leave``, which the caller resolves itself (a repeatable
    flag would add to a default list instead of replacing it). Returns the preset's name, "" when none."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="",
                        help="a named set of settings: paper runs the stage as the paper's released code did")
    preset = requested_preset(argv)
    if preset:
        parser.set_defaults(**{k: v for k, v in stage_values(preset, stage).items() if k not in leave})
    return preset


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def recipe_table(preset: str, defaults: dict[str, dict[str, Any]]) -> str:
    """The preset as a Markdown table: stage, setting, the paper, the preset's value, the kit's default
    (``defaults[stage][setting]``) and why the default differs."""
    lines = ["| stage | setting | the paper | `--preset " + preset + "` | kit default | why the default differs |",
             "|---|---|---|---|---|---|"]
    for choice in PRESETS[preset]:
        default = defaults[choice.stage][choice.setting]
        why = choice.why if default != choice.value else "(same)"
        lines.append(f"| {choice.stage} | `{choice.flag}` | {choice.paper} | {_shown(choice.value)} | {_shown(default)} | {why} |")
    return "\n".join(lines)


def kit_defaults() -> dict[str, dict[str, Any]]:
    """Every stage's default settings, by stage and field (read off the entry points' Settings)."""
    import dataclasses

    import prepare_data
    import train_cnn
    import train_lstm

    return {stage: dataclasses.asdict(module.Settings())
            for stage, module in (("prepare", prepare_data), ("cnn", train_cnn), ("lstm", train_lstm))}


if __name__ == "__main__":
    print(recipe_table("paper", kit_defaults()))
