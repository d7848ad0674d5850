"""Exam-level scores and slice localization from study-level models.

Exam level: ROC AUC of the bleed probability, and at one threshold sensitivity, specificity and PPV.
The threshold is chosen on validation exams, never on test ones, by Youden's J (sensitivity +
specificity - 1, the highest such threshold among ties), then carried unchanged to the test set.
For exclusive classes every class is scored one against the rest.

Localization: a study model trained on exam labels still says which slices mattered, as attention
weights or Grad-CAM evidence per slice, normalised to sum to 1 over the series' N slices. A slice is
flagged when its weight is at least 1/N (more than an even share); only runs of two or more
consecutive flagged slices count, since a real bleed spans neighbouring slices and a lone peak is
noise. Against slice truth, per exam with a bleed: precision (flagged slices that bleed), recall
(bleeding slices flagged) and F1, averaged over those exams. A per-slice model is scored the same way
from its flags (probability of ``any`` at least 0.5), so both kinds of training meet on one measure.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

MIN_RUN = 2


def youden_threshold(y_true: np.ndarray, scores: np.ndarray) -> float:
    """The threshold with the highest sensitivity + specificity - 1 on these (validation) exams;
    among ties the highest threshold. Raises ValueError when one class is missing."""
    y_true = np.asarray(y_true) >= 0.5
    if y_true.all() or not y_true.any():
        raise ValueError("choosing a threshold needs exams of both classes")
    false_positive_rate, true_positive_rate, thresholds = roc_curve(y_true, np.asarray(scores, np.float64))
    j = true_positive_rate - false_positive_rate
    best = np.flatnonzero(np.isclose(j, j.max(), rtol=0, atol=1e-12))
    return float(min(thresholds[best].max(), 1.0))


def binary_scores(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, and at ``threshold`` (score >= threshold is positive) sensitivity, specificity, PPV and the counts.
    A measure whose denominator is empty is NaN, never a made-up 0 or 1."""
    y_true = np.asarray(y_true) >= 0.5
    scores = np.asarray(scores, np.float64)
    if len(y_true) != len(scores) or len(y_true) == 0:
        raise ValueError(f"{len(y_true)} labels and {len(scores)} scores: need as many, at least one")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    called = scores >= threshold
    tp, fp = int((called & y_true).sum()), int((called & ~y_true).sum())
    fn, tn = int((~called & y_true).sum()), int((~called & ~y_true).sum())

    def ratio(a, b):
        return a / b if b else float("nan")

    both = y_true.any() and not y_true.all()
    return {
        "auc": float(roc_auc_score(y_true, scores)) if both else float("nan"),
        "threshold": float(threshold),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "exams": len(y_true),
        "positives": int(y_true.sum()),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }


def exam_scores(y_true: np.ndarray, probabilities: np.ndarray, columns: tuple[str, ...],
                thresholds: dict[str, float]) -> dict[str, dict[str, float]]:
    """``binary_scores`` of every label column named in ``thresholds`` (y_true and probabilities (n, K))."""
    y_true, probabilities = np.asarray(y_true), np.asarray(probabilities)
    return {name: binary_scores(y_true[:, columns.index(name)], probabilities[:, columns.index(name)], threshold)
            for name, threshold in thresholds.items()}


def validation_thresholds(y_true: np.ndarray, probabilities: np.ndarray, columns: tuple[str, ...]) -> dict[str, float]:
    """Youden thresholds of every column with both classes among the validation exams."""
    y_true, probabilities = np.asarray(y_true), np.asarray(probabilities)
    chosen = {}
    for number, name in enumerate(columns):
        positive = y_true[:, number] >= 0.5
        if positive.any() and not positive.all():
            chosen[name] = youden_threshold(y_true[:, number], probabilities[:, number])
    return chosen


def flag_slices(weights: np.ndarray, min_run: int = MIN_RUN) -> np.ndarray:
    """Boolean flags of one series' slices: weight at least 1/N (weights normalised to sum 1), kept
    only within runs of at least ``min_run`` consecutive flagged slices."""
    weights = np.asarray(weights, np.float64)
    if len(weights) == 0:
        return np.zeros(0, bool)
    total = weights.sum()
    if not np.isfinite(total) or total <= 0 or (weights < 0).any():
        raise ValueError("slice weights must be non-negative with a positive sum")
    raw = weights / total >= 1.0 / len(weights) - 1e-12
    return keep_runs(raw, min_run)


def keep_runs(flags: np.ndarray, min_run: int = MIN_RUN) -> np.ndarray:
    """``flags`` with every run of consecutive True shorter than ``min_run`` cleared."""
    flags = np.asarray(flags, bool)
    edges = np.diff(np.r_[0, flags.astype(np.int8), 0])
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    kept = np.zeros_like(flags)
    for start, end in zip(starts, ends):
        if end - start >= min_run:
            kept[start:end] = True
    return kept


def localization_scores(flags: list[np.ndarray], truth: list[np.ndarray]) -> dict[str, float]:
    """Mean per-exam precision, recall and F1 of flagged slices against bleeding slices, over the exams
    whose truth holds a bleed (an exam with no flag has precision and F1 0)."""
    precisions, recalls, f1s = [], [], []
    for flagged, bleeding in zip(flags, truth):
        flagged, bleeding = np.asarray(flagged, bool), np.asarray(bleeding) >= 0.5
        if len(flagged) != len(bleeding):
            raise ValueError(f"{len(flagged)} flags but {len(bleeding)} truth slices in one exam")
        if not bleeding.any():
            continue
        hits = int((flagged & bleeding).sum())
        precision = hits / flagged.sum() if flagged.any() else 0.0
        recall = hits / bleeding.sum()
        precisions.append(precision)
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall) if hits else 0.0)
    if not precisions:
        return {"exams": 0, "precision": float("nan"), "recall": float("nan"), "f1": float("nan")}
    return {"exams": len(precisions), "precision": float(np.mean(precisions)), "recall": float(np.mean(recalls)),
            "f1": float(np.mean(f1s))}
