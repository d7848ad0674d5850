"""The challenge's metric: weighted multi-label log loss, plus per-subtype loss and ROC AUC.

Arrays are (N, 6) with columns in `ihd.labels.SUBTYPES` order. The weighted log loss averages
over images the weighted mean of the six binary log losses, `any` weighing twice
(`ihd.labels.LABEL_WEIGHTS`); that equals the weighted mean over the challenge's long table.
Predictions are clipped to [EPS, 1 - EPS] so that a confident mistake costs a finite amount.
"""

import numpy as np
from sklearn.metrics import roc_auc_score

from ihd.labels import LABEL_WEIGHTS, SUBTYPES

EPS = 1e-7


def _checked(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as float64 (N, 6), after checking their shapes agree, the labels are 0 or 1 and the predictions
    probabilities (a prediction outside [0, 1] would be clipped into a perfect score)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    expected = (len(SUBTYPES),)
    if y_true.ndim != 2 or y_true.shape[1:] != expected or y_true.shape != y_pred.shape:
        raise ValueError(
            f"labels {y_true.shape} and predictions {y_pred.shape} must both be (N, {len(SUBTYPES)})"
        )
    if len(y_true) == 0:
        raise ValueError("no rows to score")
    if np.isnan(y_true).any() or np.isnan(y_pred).any():
        raise ValueError("labels or predictions contain NaN")
    if not np.isin(y_true, (0.0, 1.0)).all():
        raise ValueError(f"labels must be 0 or 1, found {y_true[~np.isin(y_true, (0.0, 1.0))][0]:g}")
    if ((y_pred < 0) | (y_pred > 1)).any():
        raise ValueError(f"predictions must be probabilities in [0, 1], found {y_pred[(y_pred < 0) | (y_pred > 1)][0]:g}")
    return y_true, y_pred


def _elementwise_log_loss(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Binary log loss of every cell, predictions clipped away from 0 and 1."""
    p = np.clip(y_pred, EPS, 1.0 - EPS)
    return -(y_true * np.log(p) + (1.0 - y_true) * np.log1p(-p))


def per_subtype_log_loss(y_true, y_pred) -> dict[str, float]:
    """Mean binary log loss of each subtype column, keyed by subtype name."""
    y_true, y_pred = _checked(y_true, y_pred)
    losses = _elementwise_log_loss(y_true, y_pred).mean(axis=0)
    return dict(zip(SUBTYPES, losses.tolist()))


def row_log_loss(y_true, y_pred) -> np.ndarray:
    """Each image's weighted mean of its six binary log losses: the challenge's loss is their mean."""
    y_true, y_pred = _checked(y_true, y_pred)
    return _elementwise_log_loss(y_true, y_pred) @ LABEL_WEIGHTS / LABEL_WEIGHTS.sum()


def weighted_log_loss(y_true, y_pred) -> float:
    """The challenge's weighted log loss over (N, 6) arrays in SUBTYPES order."""
    return float(row_log_loss(y_true, y_pred).mean())


def per_subtype_auc(y_true, y_pred) -> dict[str, float]:
    """ROC AUC of each subtype; NaN where that column holds only one class."""
    y_true, y_pred = _checked(y_true, y_pred)
    aucs = {}
    for column, name in enumerate(SUBTYPES):
        labels = y_true[:, column] >= 0.5
        has_both = labels.any() and not labels.all()
        aucs[name] = float(roc_auc_score(labels, y_pred[:, column])) if has_both else float("nan")
    return aucs


def prior_baseline(train_labels, n_rows: int) -> np.ndarray:
    """Predictions (n_rows, 6) that give every row the training label means."""
    train_labels = np.asarray(train_labels, dtype=np.float64)
    means = np.nanmean(train_labels, axis=0)
    return np.broadcast_to(means, (n_rows, len(SUBTYPES))).copy()


def summary(y_true, y_pred) -> dict[str, float]:
    """Weighted log loss plus per-subtype loss and AUC in one flat dict (for logs and JSON)."""
    result = {"weighted_log_loss": weighted_log_loss(y_true, y_pred)}
    result.update({f"loss_{k}": v for k, v in per_subtype_log_loss(y_true, y_pred).items()})
    result.update({f"auc_{k}": v for k, v in per_subtype_auc(y_true, y_pred).items()})
    return result
