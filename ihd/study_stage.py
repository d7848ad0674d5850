"""Study mode of stage 2: from the cached CNN features and one label per study, train and score a study model.

``train_lstm.py --study-labels FILE`` (or ``--study-labels derive`` for the highest slice label of
each study) calls ``train_study``. The model reads the same selected features as the per-slice LSTM:
- ``attention`` (paper 001): masked series, BiLSTM + gated attention; ``--init pretrained`` starts its
  LSTM layers from the per-slice LSTM of the same selection (trained on slice labels first),
  ``--init scratch`` learns from study labels alone;
- ``volume`` (paper 000): every series resliced to ``frames`` positions, one LSTM, softmax.

The record written beside the model (``study-<model>-<label set>-<selection>-<init>.json``) holds the
validation study loss per epoch, the thresholds chosen on the validation exams (Youden's J), the
validation exam scores at those thresholds (optimistic: chosen and scored on the same exams; the
test scores of ``predict.py`` are not), slice localization against the slice truth where the index
has it, and the same measures for the per-slice LSTM of the selection, for comparison.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from ihd.features import Features, Selection, selection_slug
from ihd.fingerprint import file_sha256
from ihd.index import assign_folds
from ihd.inference import ChainError, finished_lstm
from ihd.io import atomic_path, read_json, write_json
from ihd.labels import ANY
from ihd.report import score_text
from ihd.sequence import epoch_batch, load_lstm, predict_series, series_set, standardizing_moments
from ihd.series_inputs import transform_sha256
from ihd.study_labels import LABEL_SETS, STUDY_ID, LabelSet, StudyLabelError, derive_study_labels, read_study_labels
from ihd.study_metrics import (
    binary_scores,
    exam_scores,
    flag_slices,
    keep_runs,
    localization_scores,
    validation_thresholds,
    youden_threshold,
)
from ihd.study_models import (
    EVIDENCE_LAYERS,
    build_attention_lstm,
    build_volume_lstm,
    compile_study_model,
    copy_slice_lstm_weights,
)
from ihd.study_training import StudySeries, fit_study_model, load_study_model, predict_studies, slice_weights, study_series

STUDY_MODELS = ("attention", "volume")
INITS = ("pretrained", "scratch")
DERIVE = "derive"
DEFAULT_FOLDS = 5  # where the index has no folds of its own (no slice labels at all)
SLICE_FLAG_PROBABILITY = 0.5  # a per-slice model flags a slice at p(any) >= 0.5, its calibrated even odds


@dataclass(frozen=True)
class StudyOptions:
    """What a study model learns from and how it starts."""

    labels: str  # a study-label CSV, or "derive" (the highest slice label of each study)
    label_set: str = "subtypes"  # subtypes (six sigmoids) or exam (hemorrhage / no_finding / other, softmax)
    model: str = "attention"  # attention (paper 001) or volume (paper 000)
    init: str = "pretrained"  # pretrained (LSTM layers from the per-slice LSTM) or scratch
    frames: int = 25  # resliced positions per series for the volume model (paper 000: 25)
    attention_units: int = 64  # width of the gated attention
    volume_units: int = 128  # the volume model's LSTM width


def study_paths(models_dir: str | Path, run: str, options: StudyOptions, selection: str) -> tuple[Path, Path]:
    """The model file and JSON record of one study model."""
    init = options.init if options.model == "attention" else f"frames{options.frames}"
    stem = Path(models_dir) / run / f"study-{options.model}-{options.label_set}-{selection_slug(selection)}-{init}"
    return stem.with_suffix(".keras"), stem.with_suffix(".json")


def load_labels(source: str, index: pd.DataFrame, set_name: str) -> tuple[pd.DataFrame, LabelSet]:
    """Study labels from a file or derived from the index's slice labels; refuses (StudyLabelError) a file
    that cannot be read or matches no study, and a label set that ``derive`` cannot give."""
    if source == DERIVE:
        if set_name != "subtypes":
            raise StudyLabelError(f"--study-labels derive gives the subtypes label set; {set_name} needs a "
                                  "study-label file")
        return derive_study_labels(index), LABEL_SETS["subtypes"]
    labels, chosen = read_study_labels(source, set_name)
    known = labels.index.isin(index[STUDY_ID])
    if not known.any():
        raise StudyLabelError(f"{source}: none of its {len(labels)} studies is in the index")
    if not known.all():
        warnings.warn(f"{source}: {int((~known).sum())} of {len(labels)} studies are not in the index "
                      f"({', '.join(labels.index[~known][:5])})")
    return labels, chosen


def study_folds(index: pd.DataFrame, labels: pd.DataFrame, chosen: LabelSet) -> np.ndarray:
    """Fold of every row for study training: the index's folds, and for training rows of studies with a
    study label but no slice labels, folds dealt by patient the same way from the study labels (as many
    folds as the index has, else DEFAULT_FOLDS)."""
    folds = index["fold"].to_numpy().copy()
    study_labeled = (index["split"] == "train").to_numpy() & index[STUDY_ID].isin(labels.index).to_numpy()
    missing = study_labeled & (folds < 0)
    if missing.any():
        stand_in = index.copy()
        stand_in["any"] = np.where(study_labeled, labels[chosen.positive].reindex(index[STUDY_ID]).to_numpy(), np.nan)
        known = int(folds.max()) + 1
        dealt = assign_folds(stand_in, folds=known if known >= 2 else DEFAULT_FOLDS)
        folds[missing] = dealt[missing]
    return np.where(study_labeled, folds, -1)


def slice_truth(index: pd.DataFrame, series: StudySeries) -> list[np.ndarray] | None:
    """The `any` slice label of every slice of every series, or None where some are unknown."""
    values = index["any"].to_numpy(np.float64)
    truth = [values[series.slice_rows(n)] for n in range(len(series))]
    return None if any(np.isnan(t).any() for t in truth) else truth


def slice_model_study_outputs(slice_lstm, inputs: np.ndarray, index: pd.DataFrame, series: StudySeries
                              ) -> tuple[np.ndarray, list[np.ndarray]]:
    """A per-slice LSTM read at study level: its highest p(any) per series, and its slice flags
    (p(any) >= 0.5, in runs of two or more, the rule applied to the study models' weights)."""
    everything = series_set(inputs, index, np.isin(np.arange(len(inputs)), series.data.rows))
    probabilities = predict_series(slice_lstm, everything)
    per_series = [probabilities[series.slice_rows(n), ANY] for n in range(len(series))]
    return np.array([p.max() for p in per_series]), [keep_runs(p >= SLICE_FLAG_PROBABILITY) for p in per_series]


def study_moments(train: StudySeries, standardize: str, slice_lstm: keras.Model | None) -> tuple | None:
    """The (mean, variance) a study model standardises its inputs by. Started from a per-slice LSTM, that model's
    own: its LSTM layers learned on inputs scaled so. Otherwise ``standardize`` (`ihd.sequence`) over the
    training series' rows."""
    if slice_lstm is None:
        return standardizing_moments(train.data, standardize)
    if "standardise" not in [layer.name for layer in slice_lstm.layers]:
        return None
    layer = slice_lstm.get_layer("standardise")
    return tuple(keras.ops.convert_to_numpy(value).reshape(-1) for value in (layer.mean, layer.variance))


def build_study_model(options: StudyOptions, chosen: LabelSet, input_dim: int, moments: tuple | None, layers: int,
                      units: int, dropout: float):
    """The study model the options name, its inputs standardised by ``moments`` (None: as they come)."""
    if options.model == "attention":
        return build_attention_lstm(input_dim, chosen, layers, units, dropout, moments, options.attention_units)
    return build_volume_lstm(input_dim, chosen, options.frames, options.volume_units, dropout, moments)


def train_study(options: StudyOptions, features: Features, inputs: np.ndarray, fitted: Selection, fold: int,
                models_dir: str | Path, run: str, layers: int, units: int, dropout: float, standardize: str,
                learning_rate: float, epochs: int, batch_size: int, min_steps: int, patience: int, seed: int,
                settings: dict) -> dict:
    """Train one study model on the ``inputs`` (N, D) of the ``fitted`` selection and write its record (with
    what the selection does to a row, which prediction checks); returns the record. Its inputs are standardised
    as ``standardize`` says, or, started from the per-slice LSTM (``--init pretrained``), as that LSTM's were."""
    selection = fitted.name
    if options.model not in STUDY_MODELS or options.init not in INITS:
        raise ValueError(f"study model must be one of {STUDY_MODELS} and init one of {INITS}")
    index = features.index
    labels, chosen = load_labels(options.labels, index, options.label_set)
    folds = study_folds(index, labels, chosen)
    frames = options.frames if options.model == "volume" else None
    train = study_series(inputs, index, (folds >= 0) & (folds != fold), labels, frames)
    val = study_series(inputs, index, folds == fold, labels, frames)
    batch, batch_words = epoch_batch(batch_size, len(train), min_steps)
    start = options.init if options.model == "attention" else f"{frames} frames"
    print(f"study {options.model} ({chosen.name}, {start}): {len(train)} training and {len(val)} validation "
          f"series with study labels (fold {fold}); {batch_words}", flush=True)
    model_path, record_path = study_paths(models_dir, run, options, selection)
    keras.utils.set_random_seed(seed)
    pretrained = options.model == "attention" and options.init == "pretrained"
    command = f"train_lstm.py --run {run} --selection {selection}"
    if pretrained:
        command += " (--init pretrained starts from it) or use --init scratch"
    try:
        slice_lstm_path, slice_record = finished_lstm(Path(models_dir) / run, selection, features.fingerprint, command)
    except ChainError:
        if pretrained:
            raise
        slice_lstm_path = None  # no per-slice LSTM of these features to compare with at study level
    if pretrained:
        shape = {"layers": slice_record["inputs"].get("layers"), "units": slice_record["inputs"].get("units")}
        if shape != {"layers": layers, "units": units}:
            raise ChainError(f"--init pretrained starts from {slice_lstm_path}, of {shape['layers']} layers of "
                             f"{shape['units']} units: pass --layers {shape['layers']} --units {shape['units']} "
                             f"(not {layers} and {units}), or use --init scratch")
    slice_lstm = load_lstm(slice_lstm_path) if pretrained else None
    model = build_study_model(options, chosen, inputs.shape[1], study_moments(train, standardize, slice_lstm), layers,
                              units, dropout)
    pretrained_from = None
    if pretrained:
        copy_slice_lstm_weights(model, slice_lstm)
        pretrained_from = str(slice_lstm_path)
    compile_study_model(model, chosen, learning_rate)
    best = fit_study_model(model, train, val, chosen, model_path, epochs, batch, patience, seed)

    model = load_study_model(model_path)
    predicted = predict_studies(model, val)
    thresholds = validation_thresholds(val.labels, predicted, chosen.columns)
    record = {
        "model": options.model, "label_set": chosen.name, "columns": list(chosen.columns),
        "init": options.init if options.model == "attention" else None,
        "pretrained_from": pretrained_from,
        "standardised_as": "the per-slice LSTM's inputs" if pretrained else standardize,
        "selection": selection, "slug": selection_slug(selection),
        "selection_inputs": fitted.inputs, "selection_transform_sha256": transform_sha256(fitted),
        "input_dim": int(inputs.shape[1]), "frames": frames, "fold": fold, "batch_size": batch,
        "study_labels": options.labels, "options": options, "settings": settings, "cnn_config": features.config,
        "features_fingerprint": features.fingerprint, "model_sha256": file_sha256(model_path),
        "best_epoch": best.best_epoch, "history": best.history,
        "thresholds": thresholds,
        "threshold_rule": "Youden's J on the validation exams (highest threshold among ties)",
        "validation": exam_scores(val.labels, predicted, chosen.columns, thresholds),
    }
    truth = slice_truth(index, val)
    if truth is not None:
        weights = slice_weights(model, val, EVIDENCE_LAYERS[options.model], class_index=chosen.positive_column)
        record["validation_localization"] = localization_scores([flag_slices(w) for w in weights], truth)
    bleed = val.labels[:, chosen.positive_column]
    if slice_lstm_path is not None and truth is not None and 0 < bleed.sum() < len(bleed):
        exam_any, flags = slice_model_study_outputs(load_lstm(slice_lstm_path), inputs, index, val)
        record["validation_slice_model"] = {
            "exam": binary_scores(bleed, exam_any, youden_threshold(bleed, exam_any)),
            "localization": localization_scores(flags, truth),
        }
    write_json(record_path, record)
    if chosen.positive not in thresholds:
        warnings.warn(f"{record_path}: the validation exams of fold {fold} hold one class of {chosen.positive} "
                      "only, so no threshold was validated and predict.py --study will refuse this model: train it "
                      "on a fold whose exams hold both")
    positive = record["validation"].get(chosen.positive, {})
    print(f"study {options.model}: best epoch {best.best_epoch}, validation {chosen.positive} AUC "
          f"{score_text(positive.get('auc'), 4)} over {len(val)} series ({int(bleed.sum())} with a bleed); "
          f"record {record_path}")
    return record


def study_summary(models_dir: str | Path, run: str) -> pd.DataFrame:
    """One row per study model of a run (and its per-slice LSTM read at study level): validation AUC,
    sensitivity, specificity and PPV of the bleed label at its validation threshold, localization F1."""
    rows = {}
    for path in sorted((Path(models_dir) / run).glob("study-*.json")):
        record = read_json(path)
        positive = LABEL_SETS[record["label_set"]].positive
        rows[path.stem] = score_row(record["validation"].get(positive, {}), record.get("validation_localization"))
        slice_model = record.get("validation_slice_model")
        if slice_model:
            rows[f"lstm-{record['slug']} (slice labels)"] = score_row(slice_model["exam"], slice_model["localization"])
    return score_table(rows)


def score_row(exam: dict, localization: dict | None) -> dict:
    """A study model's row of a scores table: from the bleed label's exam scores (`binary_scores`) its exams, AUC,
    sensitivity, specificity and PPV at its threshold, and from ``localization`` (if any) its F1."""
    return {"exams": exam.get("exams"), **{k: exam.get(k) for k in ("auc", "sensitivity", "specificity", "ppv")},
            "localization_f1": (localization or {}).get("f1")}


def score_table(rows: dict[str, dict]) -> pd.DataFrame:
    """``score_row`` rows by model name as a table."""
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    return table


def held_out_score_table(study_name: str, positive: str, scores: dict) -> pd.DataFrame:
    """`ihd.study_inference.score_test`'s scores of study model ``study_name`` (bleed label ``positive``) as a
    table: the study model, and the per-slice LSTM read at study level where scored."""
    rows = {study_name: score_row(scores["exam"].get(positive, {}), scores.get("localization"))}
    if "slice_model" in scores:
        rows["per-slice lstm (slice labels)"] = score_row(scores["slice_model"]["exam"],
                                                          scores["slice_model"]["localization"])
    return score_table(rows)


def score_table_text(table: pd.DataFrame) -> str:
    """A scores table as printed: four decimals, n/a where a score has none."""
    return table.to_string(float_format="%.4f", na_rep="n/a")


def write_study_summary(table: pd.DataFrame, path: Path) -> Path:
    """The summary as a Markdown table, atomically."""
    lines = ["| model | " + " | ".join(table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join("" if pd.isna(v) else f"{v:.4g}" for v in row) + " |"
              for name, row in table.iterrows()]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
