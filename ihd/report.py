"""Scores on a test set with known truth (the synthetic datasets ship it), or on a labeled folder of DICOM files:
prior, CNN alone, CNN + LSTM.

The truth is `raw/truth/stage_2_test_labels.csv` in the challenge's long format. Every model is
scored by the challenge's weighted log loss over the truth's images; an image a model has no
prediction for (unreadable file) gets the training prior, as in the submission. A labeled folder
(`predict.py --dicom-dir DIR --labels FILE`) is scored on the images that have both a prediction
and a label, with AUCs at slice and study level and intervals from resampling its studies; the others are
listed, not guessed.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ihd.intervals import FEW_STUDIES, study_intervals
from ihd.labels import SUBTYPES
from ihd.metrics import per_subtype_auc, weighted_log_loss

TRUTH_FILE = Path("truth") / "stage_2_test_labels.csv"
BASELINES = ("prior", "cnn")  # every model's loss is compared with theirs, in intervals of the paired difference


def truth_path(dataset_dir: str | Path) -> Path:
    """Where a prepared dataset's test truth would be (data/<dataset>/raw/truth/...)."""
    return Path(dataset_dir) / "raw" / TRUTH_FILE


def aligned(predictions: pd.DataFrame, truth: pd.DataFrame, prior: np.ndarray) -> np.ndarray:
    """Predictions (index image_id, columns SUBTYPES) in the truth's image order, prior where missing."""
    table = predictions[list(SUBTYPES)].reindex(truth.index)
    return table.fillna(pd.Series(np.asarray(prior, np.float64), index=list(SUBTYPES))).to_numpy(np.float64)


def _truth_arrays(truth: pd.DataFrame, models: dict[str, pd.DataFrame],
                  prior: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The truth's labels and the prior's and each model's predictions, in the truth's image order."""
    y_true = truth[list(SUBTYPES)].to_numpy(np.float64)
    predictions = {"prior": np.broadcast_to(np.asarray(prior, np.float64), y_true.shape)}
    predictions.update({name: aligned(table, truth, prior) for name, table in models.items()})
    return y_true, predictions


def scores_on_truth(truth: pd.DataFrame, models: dict[str, pd.DataFrame], prior: np.ndarray) -> dict[str, float]:
    """Weighted log loss of the prior and of each named model's predictions on the truth's images.

    A truth image a model did not predict is scored at the prior, as the submission gives it, with a
    warning; a truth sharing no image with a model's predictions (another test set's) raises ValueError.
    """
    for name, predictions in models.items():
        missing = truth.index.difference(predictions.index)
        if len(missing) == len(truth):
            raise ValueError(f"none of the truth's {len(truth)} images has a {name} prediction: "
                             "it labels another test set")
        if len(missing):
            warnings.warn(f"{len(missing)} of the truth's {len(truth)} images have no {name} prediction and are scored "
                          f"at the prior, as the submission gives them")
    y_true, predictions = _truth_arrays(truth, models, prior)
    return {name: weighted_log_loss(y_true, values) for name, values in predictions.items()}


def intervals_on_truth(truth: pd.DataFrame, models: dict[str, pd.DataFrame], prior: np.ndarray,
                       study_of_image: pd.Series) -> dict | None:
    """`ihd.intervals.study_intervals` of ``scores_on_truth``'s scores, each model against the prior and the CNN.

    ``study_of_image`` maps image ids to study ids; a truth image it does not name (one whose header was not
    read) is resampled as a study of its own.
    """
    y_true, predictions = _truth_arrays(truth, models, prior)
    studies = study_of_image.reindex(truth.index)
    unknown = int(studies.isna().sum())
    studies = studies.where(studies.notna(), truth.index.to_series()).astype(str).to_numpy()
    intervals = study_intervals(y_true, predictions, studies, BASELINES)
    if intervals is not None and unknown:
        intervals["images_without_study"] = unknown
    return intervals


def format_scores(scores: dict[str, float], reference: str = "cnn", intervals: dict | None = None) -> str:
    """A Markdown table of the scores, each with its change against `reference`, and their intervals if given."""
    lines = ["| model | test weighted log loss | vs " + reference + " |", "|---|---|---|"]
    for name, value in scores.items():
        change = f"{100 * (value / scores[reference] - 1):+.1f}%" if reference in scores else ""
        lines.append(f"| {name} | {value:.5f} | {change} |")
    return "\n".join(lines + format_intervals(intervals))


def _finite_or_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def folder_scores(probabilities: pd.DataFrame, truth: pd.DataFrame, prior: np.ndarray) -> dict:
    """Scores of per-slice probabilities against known labels (a ``predict.py --dicom-dir`` folder).

    ``probabilities`` has ``image_id``, ``study_id``, the six CNN+LSTM columns (SUBTYPES) and the CNN's
    (``cnn_<subtype>``); ``truth`` is a wide label table. Only images with both a prediction and a
    label are scored; the others are listed, never guessed. For CNN+LSTM, the CNN alone and the
    training ``prior``: the weighted log loss, the slice-level AUC of every subtype and ``any``, and
    the study-level AUC of every column (a study's score is its highest slice probability, its label
    whether any slice is positive), over the studies whose every slice is labeled: a study with an
    unlabeled slice is listed, its label unknown. An AUC is None where the scored set holds one class only.
    ``intervals`` holds `ihd.intervals.study_intervals` over the scored slices (their studies resampled, a study
    with an unlabeled slice included), each model against the prior and the CNN; None below two studies.
    """
    table = probabilities.set_index("image_id")
    scored = table.index.intersection(truth.index, sort=False)
    y_true = truth.loc[scored, list(SUBTYPES)].to_numpy(np.float64)
    models = {"cnn+lstm": table[list(SUBTYPES)].to_numpy(np.float64),
              "cnn": table[[f"cnn_{s}" for s in SUBTYPES]].to_numpy(np.float64),
              "prior": np.broadcast_to(np.asarray(prior, np.float64), (len(table), len(SUBTYPES)))}
    labeled = table.index.isin(truth.index)
    complete = pd.Series(labeled).groupby(table["study_id"].to_numpy()).all()
    study_truth = (truth.reindex(table.index)[list(SUBTYPES)].set_axis(table["study_id"].to_numpy())
                   .groupby(level=0).max().loc[complete[complete].index])
    report = {"images_scored": len(scored), "studies_scored": len(study_truth),
              "positive_images": dict(zip(SUBTYPES, y_true.sum(axis=0).astype(int).tolist())),
              "studies_with_bleed": int(study_truth["any"].sum()),
              "unlabeled_images": sorted(set(table.index) - set(truth.index)),
              "partly_labeled_studies": sorted(complete[~complete].index),
              "labels_without_prediction": sorted(set(truth.index) - set(table.index)), "models": {},
              "intervals": None}
    if not len(scored):
        return report
    rows = table.index.get_indexer(scored)
    report["intervals"] = study_intervals(y_true, {name: every_row[rows] for name, every_row in models.items()},
                                          table["study_id"].to_numpy()[rows], BASELINES)
    for name, every_row in models.items():
        y_pred = every_row[rows]
        study_pred = (pd.DataFrame(every_row, columns=list(SUBTYPES)).groupby(table["study_id"].to_numpy()).max()
                      .loc[study_truth.index])
        report["models"][name] = {
            "weighted_log_loss": weighted_log_loss(y_true, y_pred),
            "slice_auc": {k: _finite_or_none(v) for k, v in per_subtype_auc(y_true, y_pred).items()},
            "study_auc": ({k: _finite_or_none(v) for k, v in
                           per_subtype_auc(study_truth.to_numpy(), study_pred.to_numpy()).items()}
                          if len(study_truth) else dict.fromkeys(SUBTYPES)),  # no study labeled throughout
        }
    return report


def score_text(value: float | None, digits: int = 3) -> str:
    """A score (an AUC, a Dice) to ``digits`` decimals, or n/a where it is undefined (None or NaN: an AUC of
    one class only, a Dice with no blood in the truth nor in the prediction)."""
    return "n/a" if value is None or np.isnan(value) else f"{value:.{digits}f}"


def span_text(bounds: list[float] | None, digits: int) -> str:
    """An interval's two ends, or n/a."""
    return "n/a" if bounds is None else f"{bounds[0]:.{digits}f} to {bounds[1]:.{digits}f}"


def format_folder_scores(report: dict) -> str:
    """A Markdown table of ``folder_scores``: loss, slice AUC per column, study AUC of ``any``; then the intervals."""
    header = ["model", "weighted log loss", *[f"AUC {s}" for s in SUBTYPES], "study AUC any"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, scores in report["models"].items():
        cells = [name, f"{scores['weighted_log_loss']:.4f}", *[score_text(scores["slice_auc"][s]) for s in SUBTYPES],
                 score_text(scores["study_auc"]["any"])]
        lines.append("| " + " | ".join(cells) + " |")
    counts = (f"{report['images_scored']} labeled images; {report['studies_scored']} studies labeled throughout "
              f"({report['positive_images']['any']} images and {report['studies_with_bleed']} studies with a bleed)")
    notes = [counts]
    if report["unlabeled_images"]:
        notes.append(f"{len(report['unlabeled_images'])} images have no label and are not scored")
    if report["partly_labeled_studies"]:
        notes.append(f"{len(report['partly_labeled_studies'])} studies with an unlabeled slice have no study label "
                     "and no study score")
    if report["labels_without_prediction"]:
        notes.append(f"{len(report['labels_without_prediction'])} labeled images have no prediction "
                     "(absent or unreadable) and are not scored")
    if report["intervals"] is None:
        notes.append("no intervals: they resample studies, and the scored images come from one")
    return "\n".join(lines + ["", "; ".join(notes)] + format_intervals(report["intervals"]))


def format_intervals(intervals: dict | None) -> list[str]:
    """`ihd.intervals.study_intervals` as the lines of a Markdown table, with a warning where the studies are too
    few to trust them; none for None."""
    if intervals is None:
        return []
    baselines = [name for name in intervals["baselines"] if name in intervals["models"]]
    header = ["model", "weighted log loss", *[f"loss minus the {name}'s" for name in baselines], "slice AUC any"]
    studies, bleeding = intervals["studies"], intervals["studies_with_bleed"]
    lines = ["", f"{intervals['level']:.0%} intervals over {intervals['resamples']:,} resamples of the {studies} "
             f"studies with a scored slice ({bleeding} with a bleed), each study's slices drawn together:",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, bounds in intervals["models"].items():
        differences = [span_text(bounds[f"loss_minus_{b}"], 4) if f"loss_minus_{b}" in bounds else ""
                       for b in baselines]
        cells = [name, span_text(bounds["weighted_log_loss"], 4), *differences, span_text(bounds["slice_auc_any"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = interval_notes(intervals)
    lines += ["", "; ".join(notes)] if notes else []
    return lines


def interval_notes(intervals: dict) -> list[str]:
    """What a reader of ``intervals`` must know beside them: the resamples that have no AUC, and why the
    intervals are likely too narrow where they are (too few studies on one side, images of unknown study)."""
    notes = []
    if intervals["resamples_without_auc"]:
        notes.append(f"{intervals['resamples_without_auc']} of the {intervals['resamples']:,} resamples drew one "
                     "class only: the AUC's interval is over the others")
    bleeding = intervals["studies_with_bleed"]
    fewer, which = min((bleeding, "with"), (intervals["studies"] - bleeding, "without"))
    if fewer < FEW_STUDIES:
        notes.append(f"from {fewer} studies {which} a bleed (under {FEW_STUDIES}) such intervals are likely too narrow")
    if intervals.get("images_without_study"):
        notes.append(f"{intervals['images_without_study']} of the studies are single images whose study is unknown "
                     "(header not read): each drawn alone, they make the intervals narrower than they should be")
    return notes
