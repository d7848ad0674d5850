"""Stage 2: train a bidirectional LSTM over each series' cached CNN features, once per feature selection,
then tabulate the ablation (the CNN alone against every selection trained in that run).

    python train_lstm.py --run synthetic-tiny-128-windows-fold0 --selection pca:32 --selection weights:32 --units 64 --layers 2
    python train_lstm.py --run rsna-efficientnetb0-256-windows-fold0 --selection pca:120 --selection all --selection random:120
    python train_lstm.py --run rsna-efficientnetb0-256-windows-fold0 --ablation-only
    python train_lstm.py --run demo-fold0 --selection weights:32 --study-labels derive --init pretrained
    python train_lstm.py --run demo-fold0 --selection weights:32 --study-labels data/synthetic/raw/stage_2_train_study_labels.csv \\
        --label-set exam --study-model volume --frames 25

Reads features/<run>/ (embeddings, probabilities, the index they follow); writes, per selection,
models/<run>/lstm-<slug>.keras (best validation epoch) and lstm-<slug>.json (its inputs, settings and
scores, written when training has finished), and models/<run>/ablation.{csv,md,png}: validation
weighted log loss and per-subtype AUC of each model trained on the current features. Rerunning a
command skips every selection already trained with the same fingerprint (features, selection, settings).
With --study-labels (a study-label CSV, or "derive" for the highest slice label of each study) it trains
study models instead (ihd.study_stage): models/<run>/study-<model>-<label set>-<selection>-<init>.{keras,json}
(-frames<N> in place of -<init> for the volume model) and models/<run>/study.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import keras
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ihd.cli import run_command
from ihd.cnn import KEEPS, MODEL_FILE
from ihd.ensemble import read_ensemble
from ihd.features import (
    FeaturesNotReady,
    Selection,
    extraction_command,
    fitted_selection,
    load_features,
    parse_selection,
    selection_fits,
    selection_inputs,
    selection_slug,
)
from ihd.fingerprint import SHORT, file_sha256, fingerprint, what_changed
from ihd.flags import fraction, non_negative_float, non_negative_int, positive_float, positive_int, selection_spec
from ihd.inference import ChainError
from ihd.inputs import fold_rows, label_array
from ihd.intervals import study_intervals
from ihd.io import atomic_path, read_json, run_header, write_json
from ihd.labels import SUBTYPES
from ihd.losses import LOSSES
from ihd.metrics import summary
from ihd.presets import apply_preset, stage_values
from ihd.report import format_intervals, score_text
from ihd.sequence import (
    HEADS,
    INPUT_DTYPE,
    STANDARDIZATIONS,
    build_lstm,
    compile_lstm,
    epoch_batch,
    fit_lstm,
    standardizing_moments,
    load_lstm,
    predict_series,
    series_set,
)
from ihd.row_files import RowFile
from ihd.series_inputs import stored_inputs
from ihd.study_labels import StudyLabelError
from ihd.study_stage import (
    INITS,
    STUDY_MODELS,
    StudyOptions,
    score_table_text,
    study_summary,
    train_study,
    write_study_summary,
)

CNN_ROW = "cnn"
# The settings that shape a trained LSTM; with its selection's inputs they make its fingerprint.
LSTM_DEFINED_BY = ("layers", "units", "dropout", "head", "standardize", "neighbour_differences", "loss", "clipnorm",
                   "epochs", "batch_size", "min_steps", "learning_rate", "patience", "keep", "seed")


@dataclass
class Settings:
    """How the sequence models are trained; every field is a command-line flag."""

    run: str = ""  # features/<run>/ to read and models/<run>/ to write (the CNN run's name)
    selections: list[str] = field(default_factory=lambda: ["pca:120"])  # the paper's choice; repeat --selection to compare
    selection_sample_rows: int = 0  # fit each selection on a seeded sample of this many training rows; 0: all
    layers: int = 3  # the paper's depth
    units: int = 256  # per direction, the paper's width
    dropout: float = 0.5  # after every LSTM layer: a fold's few series are easily overfit
    head: str = "residual"  # learn a change to the CNN's logits (starts from its answer); paper: the paper's head
    standardize: str = "per-feature"  # inputs standardised by their training moments; shared / none (ihd.sequence)
    neighbour_differences: bool = False  # each slice's inputs joined by their differences to its neighbours'
    loss: str = "weighted"  # cross-entropy weighted like the metric; bce: the six labels alike
    clipnorm: float = 1.0  # gradients clipped at this norm; 0: not clipped
    epochs: int = 20  # series are few (about 21,000 on the real data, dozens on the synthetic one)
    batch_size: int = 128  # series per batch (of similar length): 164 steps an epoch on the real data, fast on CPU
    min_steps: int = 8  # batches shrink so that an epoch has at least this many steps: few series still train
    learning_rate: float = 1e-3  # Adam's usual rate
    patience: int = 5  # stop after this many epochs without a better validation loss
    keep: str = "best"  # the best validation epoch; last: the last epoch (the paper's code)
    seed: int = 0  # weights and batch order are reproducible
    preset: str = ""  # a named set of settings (ihd.presets): paper runs the paper's recipe
    ablation_only: bool = False  # only rebuild the ablation table from the models already trained
    features_dir: str = "features"  # where the CNN run's cached features are
    models_dir: str = "models"  # where the CNN run's folder is
    study_labels: str | None = None  # a study-label CSV or "derive": train study models (one output per study)
    label_set: str = "subtypes"  # study labels: subtypes (six sigmoids) or exam (hemorrhage/no_finding/other)
    study_model: str = "attention"  # attention (paper 001) or volume (paper 000, resliced frames)
    init: str = "pretrained"  # attention: LSTM layers from this selection's per-slice LSTM, or scratch
    frames: int = 25  # volume model: resliced positions per series (paper 000)


def parse_args(argv: list[str] | None) -> Settings:
    """Command-line flags into Settings; sizes, rates and selections are checked as they are parsed."""
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--selection", dest="selections", action="append", type=selection_spec,
                        help="repeatable; default pca:120")
    parser.add_argument("--selection-sample-rows", type=non_negative_int, default=defaults.selection_sample_rows)
    for name in ("layers", "units", "epochs", "batch_size", "min_steps", "patience"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=positive_int, default=getattr(defaults, name))
    parser.add_argument("--seed", type=non_negative_int, default=defaults.seed)
    parser.add_argument("--dropout", type=fraction, default=defaults.dropout)
    parser.add_argument("--learning-rate", type=positive_float, default=defaults.learning_rate)
    parser.add_argument("--clipnorm", type=non_negative_float, default=defaults.clipnorm)
    parser.add_argument("--head", choices=HEADS, default=defaults.head)
    parser.add_argument("--standardize", choices=STANDARDIZATIONS, default=defaults.standardize)
    parser.add_argument("--neighbour-differences", action=argparse.BooleanOptionalAction,
                        default=defaults.neighbour_differences)
    parser.add_argument("--loss", choices=tuple(LOSSES), default=defaults.loss)
    parser.add_argument("--keep", choices=KEEPS, default=defaults.keep)
    parser.add_argument("--ablation-only", action="store_true")
    parser.add_argument("--features-dir", default=defaults.features_dir)
    parser.add_argument("--models-dir", default=defaults.models_dir)
    parser.add_argument("--study-labels", default=None, help="study-label CSV, or 'derive'")
    parser.add_argument("--label-set", choices=("subtypes", "exam"), default=defaults.label_set)
    parser.add_argument("--study-model", choices=STUDY_MODELS, default=defaults.study_model)
    parser.add_argument("--init", choices=INITS, default=defaults.init)
    parser.add_argument("--frames", type=positive_int, default=defaults.frames)
    preset = apply_preset(parser, "lstm", argv, leave=("selections",))
    args = vars(parser.parse_args(argv))
    args["selections"] = args["selections"] or (stage_values(preset, "lstm") if preset else {}).get(
        "selections", defaults.selections)
    return Settings(**args)


def lstm_paths(models_dir: str | Path, run: str, selection: str) -> tuple[Path, Path]:
    """The model file and the JSON record of one selection's LSTM."""
    stem = Path(models_dir) / run / f"lstm-{selection_slug(selection)}"
    return stem.with_suffix(".keras"), stem.with_suffix(".json")


def lstm_inputs(settings: Settings, features, selection: str) -> dict:
    """What an LSTM trained now would be made of: its selection's inputs at their stored precision and
    the settings that shape it."""
    return {**selection_inputs(features, selection, settings.seed, sample_rows=settings.selection_sample_rows),
            "input_dtype": np.dtype(INPUT_DTYPE).name,
            **{name: getattr(settings, name) for name in LSTM_DEFINED_BY}}


def finished_record(model_path: Path, record_path: Path) -> dict | None:
    """The record of a finished training whose model file is the one it describes, else None."""
    if not (record_path.exists() and model_path.exists()):
        return None
    record = read_json(record_path)
    return record if record.get("model_sha256") == file_sha256(model_path) else None


def chosen_selection(settings: Settings, features, selection: str) -> Selection:
    """The selection named ``selection``, fitted on these features as the flags say (seed, row sample)."""
    return fitted_selection(features, selection, seed=settings.seed, sample_rows=settings.selection_sample_rows)


def per_slice_inputs(settings: Settings, features, selection: str) -> RowFile:
    """Per-slice inputs of the sequence models (the selection's features, then the CNN probabilities),
    read by rows from their float16 file beside the features, written there first if needed."""
    return stored_inputs(features, chosen_selection(settings, features, selection))


def train_study_selection(settings: Settings, features, selection: str) -> dict:
    """Train one study model on the selection's inputs; returns its JSON record."""
    options = StudyOptions(settings.study_labels, settings.label_set, settings.study_model, settings.init,
                           settings.frames)
    chosen = chosen_selection(settings, features, selection)
    try:
        return train_study(options, features, stored_inputs(features, chosen), chosen,
                           int(features.config["fold"]), settings.models_dir, settings.run, settings.layers,
                           settings.units, settings.dropout, settings.standardize, settings.learning_rate,
                           settings.epochs,
                           settings.batch_size, settings.min_steps, settings.patience, settings.seed,
                           dataclasses.asdict(settings))
    except (ChainError, StudyLabelError) as error:  # --init pretrained without its per-slice LSTM; unusable labels
        raise SystemExit(str(error)) from None


def train_selection(settings: Settings, features, selection: str) -> dict:
    """Train one LSTM on the selection's features plus the CNN probabilities; returns its JSON record.

    A selection already trained on the same inputs (fingerprint) is skipped; any other record of the
    selection is removed before the model file is written, so a model without its record is unfinished.
    """
    model_path, record_path = lstm_paths(settings.models_dir, settings.run, selection)
    inputs = lstm_inputs(settings, features, selection)
    record = finished_record(model_path, record_path)
    if record is not None and record.get("fingerprint") == fingerprint(inputs):
        print(f"{selection}: already trained with these inputs ({record_path}, fingerprint "
              f"{record['fingerprint'][:SHORT]}): skipped")
        return record
    if record_path.exists():
        previous = read_json(record_path)
        reason = what_changed(previous.get("inputs", {}), inputs) if record else "its model file was replaced"
        print(f"{selection}: {record_path} was trained on other inputs ({reason}): training again")
        record_path.unlink()

    inputs_per_slice = per_slice_inputs(settings, features, selection)
    labels = label_array(features.index)
    fold = int(features.config["fold"])
    train_rows, val_rows = fold_rows(features.index, fold)
    train = series_set(inputs_per_slice, features.index, np.isin(np.arange(len(inputs_per_slice)), train_rows), labels)
    val = series_set(inputs_per_slice, features.index, np.isin(np.arange(len(inputs_per_slice)), val_rows), labels)
    batch_size, batch_words = epoch_batch(settings.batch_size, len(train.lengths), settings.min_steps)
    print(f"{selection}: {inputs_per_slice.shape[1]} inputs per slice; {len(train.lengths)} training and "
          f"{len(val.lengths)} validation series (fold {fold}); {batch_words}", flush=True)

    keras.utils.set_random_seed(settings.seed)  # before the weights are drawn: the same command, the same model
    model = build_lstm(inputs_per_slice.shape[1], settings.layers, settings.units, settings.dropout,
                       standardizing_moments(train, settings.standardize), head=settings.head,
                       neighbour_differences=settings.neighbour_differences)
    compile_lstm(model, settings.learning_rate, loss=settings.loss, clipnorm=settings.clipnorm)
    record_path.unlink(missing_ok=True)  # an earlier record must not outlive the model it describes
    best = fit_lstm(model, train, val, model_path, settings.epochs, batch_size, settings.patience, settings.seed,
                    settings.keep)

    rows, predicted = predicted_rows(load_lstm(model_path), val, settings.batch_size)
    record = {
        "selection": selection,
        "slug": selection_slug(selection),
        "input_dim": int(inputs_per_slice.shape[1]),
        "batch_size": batch_size,
        "fold": fold,
        "inputs": inputs,
        "fingerprint": fingerprint(inputs),
        "model_sha256": file_sha256(model_path),
        "features_config": features.config,
        "best_epoch": best.best_epoch,
        "history": best.history,
        "validation": summary(labels[rows], predicted),
        "validation_cnn": summary(labels[rows], features.probabilities[rows]),
    }
    write_json(record_path, record)
    print(f"{selection}: best epoch {best.best_epoch}, validation weighted log loss "
          f"{record['validation']['weighted_log_loss']:.5f} (CNN alone {record['validation_cnn']['weighted_log_loss']:.5f})")
    return record


def predicted_rows(model: keras.Model, data, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a series set and the model's probabilities for them, in that order."""
    rows = data.rows
    return rows, predict_series(model, data, batch_size)[rows]


def validation_predictions(settings: Settings, features, selection: str) -> tuple[np.ndarray, np.ndarray]:
    """The validation rows of the run's fold and its trained LSTM's probabilities for them."""
    model_path, _ = lstm_paths(settings.models_dir, settings.run, selection)
    inputs_per_slice = per_slice_inputs(settings, features, selection)
    _, val_rows = fold_rows(features.index, int(features.config["fold"]))
    val = series_set(inputs_per_slice, features.index, np.isin(np.arange(len(inputs_per_slice)), val_rows))
    return predicted_rows(load_lstm(model_path), val, settings.batch_size)


def train_ensemble(settings: Settings, members: list[str]) -> pd.DataFrame:
    """Train every selection's LSTM in each member run of a fold ensemble, each on its own run's features
    and fold, then score them together: every labeled slice predicted by the member that never trained
    on it (out of fold). Writes the ensemble's records and ablation table in models/<run>/."""
    out_dir = Path(settings.models_dir) / settings.run
    member_settings = [dataclasses.replace(settings, run=member) for member in members]
    member_features = [open_features(member) for member in member_settings]
    if not settings.ablation_only:
        for selection in settings.selections:
            for number, (member, features) in enumerate(zip(member_settings, member_features), start=1):
                print(f"{selection}: member {member.run} ({number} of {len(members)})", flush=True)
                train_selection(member, features, selection)
    cnn_parts = []
    for features in member_features:
        _, val_rows = fold_rows(features.index, int(features.config["fold"]))
        cnn_parts.append((features, val_rows, features.probabilities[val_rows]))
    rows = {CNN_ROW: pooled_summary(cnn_parts)}
    out_of_fold = {CNN_ROW: cnn_parts}
    lstm_records = {}  # a member's record of each scored row: the settings its members share
    for selection in trained_in_every_member(member_settings, member_features):
        records = [read_json(lstm_paths(member.models_dir, member.run, selection)[1]) for member in member_settings]
        asked = selection_inputs(member_features[0], selection, settings.seed, sample_rows=settings.selection_sample_rows)
        if not selection_fits(asked, records[0]["inputs"]):  # scoring would fit the selection again, as asked
            keys = {*asked, "sample_rows"}
            print(f"{selection}: not scored, its LSTMs were trained on a selection fitted otherwise than these flags ask "
                  f"({what_changed({k: records[0]['inputs'].get(k) for k in keys}, {k: asked.get(k) for k in keys})}): "
                  "give the flags they were trained with")
            continue
        differing = members_differ(records, member_features)
        if differing:
            print(f"{selection}: not pooled, its members were made differently ({differing}): train every member with "
                  f"the same flags (train_lstm.py --run {settings.run} --selection {selection} ...)")
            continue
        parts = [(features, *validation_predictions(member, features, selection))
                 for member, features in zip(member_settings, member_features)]
        record = {
            "selection": selection,
            "members": {member.run: {key: member_record[key] for key in ("fingerprint", "model_sha256")}
                        for member, member_record in zip(member_settings, records)},
            "validation": pooled_summary(parts),
            "validation_cnn": rows[CNN_ROW],
        }
        write_json(lstm_paths(settings.models_dir, settings.run, selection)[1], record)
        rows[f"cnn+lstm {selection}"] = record["validation"]
        out_of_fold[f"cnn+lstm {selection}"] = parts
        lstm_records[f"cnn+lstm {selection}"] = records[0]
    table = summary_table(rows)
    intervals = out_of_fold_intervals(out_of_fold, table)
    note = settings_note(lstm_records)
    write_ablation(table, out_dir, intervals, note)
    print("out of fold, every labeled series scored by the member that did not train on it:")
    print(table.to_string(float_format="%.4f"))
    print("\n".join(([note] if note else []) + format_intervals(intervals)))
    print(f"ablation: {out_dir / 'ablation.md'}, {out_dir / 'ablation.png'}")
    return table


def out_of_fold_intervals(out_of_fold: dict[str, list[tuple]], table: pd.DataFrame) -> dict | None:
    """`ihd.intervals.study_intervals` of the ensemble's out-of-fold scores: each model's parts (per member: its
    features, the rows it predicted, its probabilities for them) lined up row by row, every LSTM compared with the
    CNN and (where there are several) with the LSTM of the lowest loss: which differences its studies can tell."""
    y_true, studies, predictions = [], [], {name: [] for name in out_of_fold}
    for member, (features, cnn_rows, _) in enumerate(out_of_fold[CNN_ROW]):
        rows = np.sort(cnn_rows)
        y_true.append(label_array(features.index)[rows])
        studies.append(features.index["study_id"].to_numpy()[rows])
        for name, parts in out_of_fold.items():
            _, predicted_rows, predicted = parts[member]
            order = np.argsort(predicted_rows)
            if not np.array_equal(np.asarray(predicted_rows)[order], rows):
                raise ValueError(f"{name} predicted other out-of-fold rows than the CNN in member {member}")
            predictions[name].append(np.asarray(predicted, np.float64)[order])
    lstms = table.drop(index=CNN_ROW)["weighted_log_loss"]
    baselines = (CNN_ROW, lstms.idxmin()) if len(lstms) > 1 else (CNN_ROW,)
    return study_intervals(np.concatenate(y_true), {name: np.concatenate(parts) for name, parts in predictions.items()},
                           np.concatenate(studies), baselines)


def ablation_table(settings: Settings, features) -> tuple[pd.DataFrame, str]:
    """Validation weighted log loss and per-subtype AUC: the CNN alone, then every LSTM trained on these
    features (records of other features, extracted before, are left out and named); and the note that
    names the rows trained with other LSTM settings than the others (`settings_note`)."""
    _, val_rows = fold_rows(features.index, int(features.config["fold"]))
    labels = label_array(features.index)[val_rows]
    rows = {CNN_ROW: summary(labels, features.probabilities[val_rows])}
    lstm_records = {}
    for record_path in sorted((Path(settings.models_dir) / settings.run).glob("lstm-*.json")):
        record = read_json(record_path)
        if record.get("inputs", {}).get("features") != features.fingerprint:
            print(f"ablation: left out {record_path}, trained on other features: retrain it with "
                  f"--selection {record['selection']}")
            continue
        rows[f"cnn+lstm {record['selection']}"] = record["validation"]
        lstm_records[f"cnn+lstm {record['selection']}"] = record
    return summary_table(rows), settings_note(lstm_records)


def settings_note(records: dict[str, dict]) -> str:
    """A line naming the ablation rows whose LSTMs were trained otherwise than most rows, and what differs:
    rows trained unlike each other do not compare their selections alone. Compared: the settings that
    shape an LSTM (`LSTM_DEFINED_BY`) with the batch an epoch used in place of the one asked for, the
    inputs' precision and a selection's sample of rows. ``records``: each LSTM row's record, in table order.
    Empty when every row was trained alike."""
    def made(record: dict) -> dict:
        inputs = record.get("inputs", {})
        shaped = {key: inputs.get(key) for key in LSTM_DEFINED_BY if key not in ("batch_size", "min_steps")}
        return {**shaped, "batch_size": record.get("batch_size"), "input_dtype": inputs.get("input_dtype"),
                "sample_rows": inputs.get("sample_rows")}

    settings = {name: made(record) for name, record in records.items()}
    if not settings:
        return ""
    common = json.loads(Counter(json.dumps(s, sort_keys=True) for s in settings.values()).most_common(1)[0][0])
    alike = [name for name, s in settings.items() if s == common]
    changes = [f"{name} ({what_changed(common, s)})" for name, s in settings.items() if s != common]
    return f"trained with other LSTM settings than {', '.join(alike)}: {'; '.join(changes)}" if changes else ""


def summary_table(rows: dict[str, dict]) -> pd.DataFrame:
    """Scores by model name as the ablation table: weighted log loss and the AUC of each subtype."""
    columns = ["weighted_log_loss"] + [f"auc_{name}" for name in SUBTYPES]
    table = pd.DataFrame.from_dict(rows, orient="index")[columns]
    table.index.name = "model"
    return table


def pooled_summary(parts: list[tuple]) -> dict:
    """The scores of predictions pooled over the members of an ensemble: ``parts`` holds, per member,
    its features, the rows it predicted and its probabilities for them."""
    labels = np.concatenate([label_array(features.index)[rows] for features, rows, _ in parts])
    return summary(labels, np.concatenate([np.asarray(predicted, np.float32) for _, _, predicted in parts]))


def members_differ(records: list[dict], member_features: list) -> str:
    """What differs between the members' LSTMs of one selection beyond their own fold and features (their
    settings and selection inputs, and their features' test-time augmentation); empty when nothing does."""
    def made_with(record: dict, features) -> dict:
        own = ("features", "fold")
        return {**{k: v for k, v in record.get("inputs", {}).items() if k not in own}, "tta": features.config.get("tta")}

    first = made_with(records[0], member_features[0])
    changes = [what_changed(first, made_with(r, f)) for r, f in zip(records[1:], member_features[1:])]
    return "; ".join(change for change in changes if change)


def trained_in_every_member(member_settings: list[Settings], member_features: list) -> list[str]:
    """The selections whose LSTM finished training on the current features of every member run."""
    trained = None
    for member, features in zip(member_settings, member_features):
        names = set()
        for record_path in (Path(member.models_dir) / member.run).glob("lstm-*.json"):
            selection = read_json(record_path).get("selection")
            model_path, _ = lstm_paths(member.models_dir, member.run, selection)
            record = finished_record(model_path, record_path)
            if record is not None and record.get("inputs", {}).get("features") == features.fingerprint:
                names.add(selection)
        trained = names if trained is None else trained & names
    return sorted(trained or ())


def write_ablation(table: pd.DataFrame, out_dir: Path, intervals: dict | None = None, note: str = "") -> None:
    """The table as CSV and Markdown (with ``note`` and the intervals, if given, beneath), and a bar chart of both
    measures, in `out_dir/ablation.*`."""
    with atomic_path(out_dir / "ablation.csv") as tmp:
        table.to_csv(tmp, float_format="%.5f")
    header = "| model | " + " | ".join(table.columns) + " |"
    lines = [header, "|---" * (len(table.columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(score_text(v, 4) for v in row) + " |" for name, row in table.iterrows()]
    lines += (["", note] if note else []) + format_intervals(intervals)
    with atomic_path(out_dir / "ablation.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")

    figure, (loss_axis, auc_axis) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    names = list(table.index)
    loss_axis.bar(names, table["weighted_log_loss"], color=["tab:gray"] + ["tab:blue"] * (len(names) - 1))
    loss_axis.set_title("validation weighted log loss (lower is better)")
    loss_axis.tick_params(axis="x", rotation=30)
    width = 0.8 / len(names)
    for number, name in enumerate(names):
        positions = np.arange(len(SUBTYPES)) + number * width
        auc_axis.bar(positions, table.loc[name, [f"auc_{s}" for s in SUBTYPES]], width, label=name)
    auc_axis.set_xticks(np.arange(len(SUBTYPES)) + 0.4 - width / 2, SUBTYPES, rotation=20)
    auc_axis.set_ylim(0.5, 1.0)
    auc_axis.set_title("validation ROC AUC per subtype")
    auc_axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(out_dir / "ablation.png") as tmp:
        figure.savefig(tmp, dpi=100)
    plt.close(figure)


def open_features(settings: Settings):
    """The run's feature cache, checked against the CNN it must come from; exits naming the command
    that (re)extracts it when it is missing, unfinished, damaged or from another CNN or index, and,
    unless only scoring (--ablation-only), naming the selections that ask for more dimensions than its
    embeddings have (train_lstm.py's default among them)."""
    run_dir = Path(settings.models_dir) / settings.run
    cnn_path = run_dir / MODEL_FILE
    if not cnn_path.exists():
        models = "" if str(settings.models_dir) == "models" else f" --models-dir {settings.models_dir}"
        raise SystemExit(f"{cnn_path} not found: train the CNN of run {settings.run} first "
                         f"(train_cnn.py --dataset DATASET --run {settings.run}{models})")
    cnn_config = read_json(run_dir / "config.json")
    try:
        features = load_features(Path(settings.features_dir) / settings.run)
    except FeaturesNotReady as error:
        extract = extraction_command(cnn_config, settings.run, settings.models_dir, settings.features_dir)
        raise SystemExit(f"{error}: run {extract} first") from None
    cnn_sha256 = file_sha256(cnn_path)
    if features.config["cnn_sha256"] != cnn_sha256:
        changed = what_changed({"cnn_sha256": features.config["cnn_sha256"]}, {"cnn_sha256": cnn_sha256})
        extract = extraction_command(cnn_config, settings.run, settings.models_dir, settings.features_dir,
                                     features.config["tta"])
        raise SystemExit(f"{features.path} was extracted from an earlier {cnn_path} ({changed}): run {extract} first")
    width = features.config["embedding_dim"]
    too_wide = [selection for selection in settings.selections if (parse_selection(selection)[1] or 0) > width]
    if too_wide and not settings.ablation_only:  # --ablation-only scores what was trained, whatever --selection says
        raise SystemExit(f"--selection {', '.join(too_wide)}: the CNN of run {settings.run} embeds a slice in {width} "
                         f"dimensions; choose --selection with at most {width}, or all")
    return features


def main(argv: list[str] | None = None) -> pd.DataFrame:
    settings = parse_args(argv)
    run_header(argv, settings)
    ensemble = read_ensemble(settings.models_dir, settings.run)
    if ensemble is not None:
        if settings.study_labels:
            raise SystemExit(f"{settings.run} is a fold ensemble: study models train on one run, name one of its "
                             f"members ({', '.join(ensemble['members'])})")
        return train_ensemble(settings, ensemble["members"])
    features = open_features(settings)
    out_dir = Path(settings.models_dir) / settings.run
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings.study_labels:
        for selection in settings.selections:
            train_study_selection(settings, features, selection)
        table = study_summary(settings.models_dir, settings.run)
        print(score_table_text(table))
        print(f"study models: {write_study_summary(table, out_dir / 'study.md')}")
        return table
    if not settings.ablation_only:
        for selection in settings.selections:
            train_selection(settings, features, selection)
    table, note = ablation_table(settings, features)
    write_ablation(table, out_dir, note=note)
    print(table.to_string(float_format="%.4f"))
    if note:
        print(note)
    print(f"ablation: {out_dir / 'ablation.md'}, {out_dir / 'ablation.png'}")
    return table


if __name__ == "__main__":
    run_command(main, "rerun the same command: per-slice LSTMs already trained are skipped "
                      "(study models train again)")
