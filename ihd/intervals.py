"""Intervals for scores on a labeled set, by resampling whole studies (a cluster bootstrap).

The slices of one study share a patient, a scanner and usually a bleed, so they are not independent
draws: resampling slices would make an interval far too narrow. Each replicate draws as many studies
as were scored, with replacement, and counts every slice as often as its study was drawn. The
weighted log loss and the ROC AUC of a replicate are computed from those counts, which is the same as
scoring the replicated rows (tested against scikit-learn on them). An interval holds the middle
``LEVEL`` of the replicates (percentiles). A replicate that draws one class only has no AUC and is
left out of the AUC's interval; how many were is reported.

With few studies a percentile bootstrap is too narrow (its coverage falls short of its level when
there are fewer than a few dozen clusters): read such an interval as the least uncertainty the set
carries, not as its bounds.
"""
from __future__ import annotations

import numpy as np

from ihd.labels import ANY
from ihd.metrics import row_log_loss

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0
FEW_STUDIES = 30  # below this many studies, a percentile interval is said to be too narrow


class RankedScores:
    """One score column ranked once, so that its ROC AUC under any row weights costs one pass over the rows."""

    def __init__(self, labels: np.ndarray, scores: np.ndarray):
        values, tie_group = np.unique(np.asarray(scores, np.float64), return_inverse=True)
        positive = np.asarray(labels) >= 0.5
        self.groups = len(values)
        self.positive_rows, self.negative_rows = np.flatnonzero(positive), np.flatnonzero(~positive)
        self.positive_group, self.negative_group = tie_group[positive], tie_group[~positive]

    def auc(self, weights: np.ndarray) -> float:
        """The AUC with row i counted weights[i] times (ties count one half); NaN without both classes."""
        positive = np.bincount(self.positive_group, weights[self.positive_rows], minlength=self.groups)
        negative = np.bincount(self.negative_group, weights[self.negative_rows], minlength=self.groups)
        pairs = positive.sum() * negative.sum()
        if pairs == 0:
            return float("nan")
        negatives_below = np.cumsum(negative) - negative
        return float(positive @ (negatives_below + 0.5 * negative) / pairs)


def study_weights(study_ids, resamples: int, seed: int):
    """Yields ``resamples`` row weights: each row counted as often as its study was drawn, the studies drawn
    with replacement, as many as there are."""
    studies, study_of_row = np.unique(np.asarray(study_ids), return_inverse=True)
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        drawn = np.bincount(rng.integers(len(studies), size=len(studies)), minlength=len(studies))
        yield drawn[study_of_row].astype(np.float64)


def _percentiles(values: np.ndarray, level: float) -> list[float] | None:
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    tail = (1.0 - level) / 2.0
    return np.quantile(values, [tail, 1.0 - tail]).tolist()


def study_intervals(y_true, predictions: dict[str, np.ndarray], study_ids, baselines: tuple[str, ...] = ("prior",),
                    resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> dict | None:
    """Intervals, over the same replicates, of each model's weighted log loss, its slice AUC for ``any``, and its
    loss minus each of ``baselines``' (``loss_minus_<baseline>``, the paired difference; a model is not compared
    with itself).

    ``y_true`` and every prediction are (N, 6) over the same rows; ``study_ids`` names each row's study.
    None with fewer than two studies: there is nothing to resample.
    """
    study_ids = np.asarray(study_ids)
    studies = len(np.unique(study_ids))
    if studies < 2:
        return None
    y_true = np.asarray(y_true, np.float64)
    losses = {name: row_log_loss(y_true, p) for name, p in predictions.items()}
    ranked = {name: RankedScores(y_true[:, ANY], np.asarray(p)[:, ANY]) for name, p in predictions.items()}
    names = list(predictions)
    loss = np.empty((resamples, len(names)))
    auc = np.empty((resamples, len(names)))
    for r, weights in enumerate(study_weights(study_ids, resamples, seed)):
        total = weights.sum()
        for m, name in enumerate(names):
            loss[r, m] = weights @ losses[name] / total
            auc[r, m] = ranked[name].auc(weights)
    models = {}
    for m, name in enumerate(names):
        models[name] = {"weighted_log_loss": _percentiles(loss[:, m], level),
                        "slice_auc_any": _percentiles(auc[:, m], level)}
        for baseline in baselines:
            if baseline in predictions and name != baseline:
                models[name][f"loss_minus_{baseline}"] = _percentiles(loss[:, m] - loss[:, names.index(baseline)],
                                                                      level)
    return {"level": level, "resamples": resamples, "seed": seed, "studies": studies,
            "resamples_without_auc": int(np.isnan(auc[:, 0]).sum()), "models": models}
