"""Intervals for scores on a labeled set, by resampling whole studies (a cluster bootstrap).

The slices of one study share a patient, a scanner and usually a bleed, so they are not independent
draws: resampling slices would make an interval far too narrow. Each replicate draws as many studies
as were scored, with replacement, and counts every slice as often as its study was drawn. The
weighted log loss and the ROC AUC of a replicate are computed from those counts, which is the same as
scoring the replicated rows (both tested against scoring them). An interval holds the middle
``LEVEL`` of the replicates (percentiles). A replicate that draws one class only has no AUC and is
left out of the AUC's interval; how many were is reported. Studies of one patient are drawn apart,
as if independent.

From few studies (fewer than a few dozen), and for an AUC from few studies with a bleed, a percentile
bootstrap tends to be too narrow: its intervals hold the truth less often than their level says.
"""
from __future__ import annotations

import numpy as np

from ihd.labels import ANY
from ihd.metrics import row_log_loss

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0
FEW_STUDIES = 30  # fewer studies with (or without) a bleed than this, and the intervals are called likely too narrow


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
        return float(np.einsum("i,i->", positive, negatives_below + 0.5 * negative) / pairs)


def study_draws(studies: int, resamples: int, seed: int):
    """Yields ``resamples`` times how often each of ``studies`` studies was drawn, as many draws as studies, with
    replacement."""
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield np.bincount(rng.integers(studies, size=studies), minlength=studies).astype(np.float64)


def _percentiles(values: np.ndarray, level: float) -> list[float] | None:
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    tail = (1.0 - level) / 2.0
    return np.quantile(values, [tail, 1.0 - tail]).tolist()


def study_intervals(y_true, predictions: dict[str, np.ndarray], study_ids, baselines: tuple[str, ...] = ("prior",),
                    resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> dict | None:
    """Intervals, over the same replicates, of each model's weighted log loss, its slice AUC for ``any`` (None for a
    model whose ``any`` is one value everywhere: it ranks nothing), and its loss minus each baseline's
    (``loss_minus_<baseline>``, the paired difference). ``baselines`` are in order: a model that is not one is
    compared with each, a baseline with those before it.

    ``y_true`` and every prediction are (N, 6) over the same rows; ``study_ids`` names each row's study (compared
    as text). None with fewer than two studies: there is nothing to resample.
    """
    names, study_of_row = np.unique(np.asarray(study_ids, dtype=str), return_inverse=True)
    if len(names) < 2:
        return None
    y_true = np.asarray(y_true, np.float64)
    study_size = np.bincount(study_of_row, minlength=len(names)).astype(np.float64)
    study_loss = {name: np.bincount(study_of_row, row_log_loss(y_true, p), minlength=len(names))
                  for name, p in predictions.items()}
    ranked = {name: RankedScores(y_true[:, ANY], np.asarray(p)[:, ANY]) for name, p in predictions.items()
              if np.ptp(np.asarray(p)[:, ANY]) > 0}
    models = list(predictions)
    loss = np.empty((resamples, len(models)))
    auc = np.full((resamples, len(models)), np.nan)
    without_auc = 0
    for r, drawn in enumerate(study_draws(len(names), resamples, seed)):
        weights = drawn[study_of_row]
        bleeding = np.einsum("i,i->", weights, y_true[:, ANY])
        without_auc += bleeding == 0 or bleeding == weights.sum()
        for m, name in enumerate(models):
            loss[r, m] = np.einsum("i,i->", drawn, study_loss[name]) / np.einsum("i,i->", drawn, study_size)
            if name in ranked:
                auc[r, m] = ranked[name].auc(weights)
    intervals = {}
    for m, name in enumerate(models):
        intervals[name] = {"weighted_log_loss": _percentiles(loss[:, m], level),
                           "slice_auc_any": _percentiles(auc[:, m], level)}
        compared = baselines[:baselines.index(name)] if name in baselines else baselines
        for baseline in compared:
            if baseline in predictions:
                intervals[name][f"loss_minus_{baseline}"] = _percentiles(loss[:, m] - loss[:, models.index(baseline)],
                                                                         level)
    bleeding_studies = int((np.bincount(study_of_row, y_true[:, ANY], minlength=len(names)) > 0).sum())
    return {"level": level, "resamples": resamples, "seed": seed, "baselines": list(baselines), "studies": len(names),
            "studies_with_bleed": bleeding_studies, "resamples_without_auc": int(without_auc), "models": intervals}
