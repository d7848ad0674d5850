"""Scores on a test set with known truth (the synthetic datasets ship it): prior, CNN alone, CNN + LSTM.

The truth is `raw/truth/stage_2_test_labels.csv` in the challenge's long format. Every model is
scored by the challenge's weighted log loss over the truth's images; an image a model has no
prediction for (unreadable file) gets the training prior, as in the submission.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ihd.labels import SUBTYPES
from ihd.metrics import weighted_log_loss

TRUTH_FILE = Path("truth") / "stage_2_test_labels.csv"


def truth_path(dataset_dir: str | Path) -> Path:
    """Where a prepared dataset's test truth would be (data/<dataset>/raw/truth/...)."""
    return Path(dataset_dir) / "raw" / TRUTH_FILE


def aligned(predictions: pd.DataFrame, truth: pd.DataFrame, prior: np.ndarray) -> np.ndarray:
    """Predictions (index image_id, columns SUBTYPES) in the truth's image order, prior where missing."""
    table = predictions[list(SUBTYPES)].reindex(truth.index)
    return table.fillna(pd.Series(np.asarray(prior, np.float64), index=list(SUBTYPES))).to_numpy(np.float64)


def scores_on_truth(truth: pd.DataFrame, models: dict[str, pd.DataFrame], prior: np.ndarray) -> dict[str, float]:
    """Weighted log loss of the prior and of each named model's predictions on the truth's images."""
    y_true = truth[list(SUBTYPES)].to_numpy(np.float64)
    scores = {"prior": weighted_log_loss(y_true, np.broadcast_to(prior, y_true.shape))}
    for name, predictions in models.items():
        scores[name] = weighted_log_loss(y_true, aligned(predictions, truth, prior))
    return scores


def format_scores(scores: dict[str, float], reference: str = "cnn") -> str:
    """A Markdown table of the scores, each with its change against `reference`."""
    lines = ["| model | test weighted log loss | vs " + reference + " |", "|---|---|---|"]
    for name, value in scores.items():
        change = f"{100 * (value / scores[reference] - 1):+.1f}%" if reference in scores else ""
        lines.append(f"| {name} | {value:.5f} | {change} |")
    return "\n".join(lines)
