"""Stage 1 in study mode (paper 002): the slice CNN and a bidirectional LSTM trained together on whole
volumes, from one label per volume.

``train_cnn.py --study-labels FILE`` checks its labels and fold (``end_to_end_labels``) before it writes
anything, then calls ``train_end_to_end``: each series is read from the slice
store, resliced to ``frames`` images along its normal (``ihd.reslice``), and the CNN (any backbone,
the recipe's windows in its first layer) encodes every image before the LSTM reads them in order.
On the CPU use a small backbone and image size; the same command runs at full size on a GPU.
The record ``end_to_end.json`` holds the validation thresholds (Youden's J) and scores, and, when the
dataset ships its test truth, the test exam scores and the localization of temporal Grad-CAM on the
per-frame embeddings (mapped back to slices) against the slice truth.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ihd.io import write_json
from ihd.labels import read_long_labels
from ihd.report import score_text, truth_path
from ihd.slices import SliceStore
from ihd.study_labels import LabelSet
from ihd.study_inference import held_out_study_truth
from ihd.study_metrics import exam_scores, flag_slices, localization_scores, validation_thresholds
from ihd.study_models import EVIDENCE_LAYERS, build_end_to_end, compile_study_model
from ihd.study_stage import load_labels, study_folds
from ihd.study_training import fit_study_model, load_study_model, predict_studies, slice_weights, volume_series
from ihd.windows import parse_recipe

MODEL_FILE = "end_to_end.keras"
RECORD_FILE = "end_to_end.json"


@dataclass(frozen=True)
class EndToEndLabels:
    """What the end-to-end model learns from: the study labels read from ``source``, their label set, every
    index row's study fold (-1: no study label) and the validation ``fold``."""

    source: str
    labels: pd.DataFrame
    chosen: LabelSet
    folds: np.ndarray
    fold: int


def end_to_end_labels(index: pd.DataFrame, source: str, set_name: str, fold: int, recipe: str) -> EndToEndLabels:
    """The study labels and folds the end-to-end model would train on, checked before anything is built.

    Refuses (ValueError) a recipe of neighbouring slices, labels that cannot be read or name no study of
    the index, and a ``fold`` that leaves no study-labeled training series to validate or to train on.
    """
    if parse_recipe(recipe).uses_neighbours:
        raise ValueError(f"recipe {recipe!r} reads neighbouring slices: the end-to-end model windows each "
                         "resliced image three ways, so use a recipe of one slice (windows, brain_blood_bone)")
    labels, chosen = load_labels(source, index, set_name)
    folds = study_folds(index, labels, chosen)
    known = sorted(set(folds[folds >= 0].tolist()))
    if fold not in known or len(known) < 2:
        missing = "validate" if fold not in known else "train"
        raise ValueError(f"--fold {fold} leaves no study-labeled series to {missing} on: the study-labeled training "
                         f"series lie in folds {known}")
    return EndToEndLabels(source, labels, chosen, folds, fold)


def train_end_to_end(index: pd.DataFrame, store: SliceStore, dataset_dir: Path, run_dir: Path, targets: EndToEndLabels,
                     backbone: str, image_size: int, recipe: str, weights: str | None,
                     frames: int, units: int, dropout: float, learning_rate: float, epochs: int, batch_size: int,
                     patience: int, seed: int, config: dict) -> dict:
    """Train the end-to-end model on the fold's training volumes (``end_to_end_labels``), keep its best
    validation epoch, score validation and (where known) test; returns the record written to
    ``run_dir/end_to_end.json``."""
    labels, chosen, folds, fold = targets.labels, targets.chosen, targets.folds, targets.fold
    train = volume_series(index, (folds >= 0) & (folds != fold), store, frames, image_size, labels)
    val = volume_series(index, folds == fold, store, frames, image_size, labels)
    print(f"end to end ({chosen.name}): {len(train)} training and {len(val)} validation volumes of {frames} "
          f"images at {image_size}x{image_size} (fold {fold})", flush=True)
    model = build_end_to_end(chosen, frames, backbone, image_size, recipe, weights, units, dropout)
    compile_study_model(model, chosen, learning_rate)
    model_path = Path(run_dir) / MODEL_FILE
    best = fit_study_model(model, train, val, chosen, model_path, epochs, batch_size, patience, seed)
    model = load_study_model(model_path)
    predicted = predict_studies(model, val, batch_size)
    thresholds = validation_thresholds(val.labels, predicted, chosen.columns)
    record = {"model": "end_to_end", "label_set": chosen.name, "columns": list(chosen.columns), "frames": frames,
              "fold": fold, "study_labels": targets.source, "config": config, "best_epoch": best.best_epoch,
              "history": best.history, "thresholds": thresholds,
              "threshold_rule": "Youden's J on the validation exams (highest threshold among ties)",
              "validation": exam_scores(val.labels, predicted, chosen.columns, thresholds)}
    truth_file = truth_path(dataset_dir)
    slice_truth = read_long_labels(truth_file) if truth_file.is_file() else None
    test_rows = (index["split"] == "test").to_numpy()
    truth = held_out_study_truth(dataset_dir, index[test_rows], slice_truth, chosen)
    if truth is not None and test_rows.any():
        test = volume_series(index, test_rows, store, frames, image_size, truth)
        p = predict_studies(model, test, batch_size)
        record["test"] = {"exams": len(test), "exam": exam_scores(test.labels, p, chosen.columns, thresholds)}
        if slice_truth is not None:
            weights = slice_weights(model, test, EVIDENCE_LAYERS["end_to_end"], batch_size, chosen.positive_column)
            truth_any = slice_truth["any"].reindex(index["image_id"]).to_numpy()
            record["test"]["localization"] = localization_scores(
                [flag_slices(w) for w in weights], [truth_any[test.slice_rows(n)] for n in range(len(test))])
    write_json(Path(run_dir) / RECORD_FILE, record)
    positive = record["validation"].get(chosen.positive, {})
    print(f"end to end: best epoch {best.best_epoch}, validation {chosen.positive} AUC "
          f"{score_text(positive.get('auc'), 4)} over {len(val)} series "
          f"({int(val.labels[:, chosen.positive_column].sum())} with a bleed); "
          f"record {Path(run_dir) / RECORD_FILE}")
    return record
