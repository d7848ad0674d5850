"""Segmentation scores: Dice, bleed volume and its error, and the pointing game for heatmaps.

Dice is ``2 |P and T| / (|P| + |T|)``; with neither a predicted nor a true voxel it is undefined
(NaN), never 1: an empty slice says nothing about how well bleeds are outlined. "Pooled" Dice counts
every voxel of a test set at once (big bleeds weigh more); "mean" Dice averages per case over the
cases where it is defined.
"""
from __future__ import annotations

import math

import cv2
import numpy as np


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean arrays of the same shape; NaN when both are empty."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted mask {predicted.shape} and true mask {truth.shape} differ in shape")
    total = int(predicted.sum()) + int(truth.sum())
    return math.nan if total == 0 else 2.0 * int((predicted & truth).sum()) / total


def volume_ml(mask: np.ndarray, voxel_mm: tuple[float, float, float]) -> float:
    """Volume in millilitres of a boolean mask whose voxels measure ``voxel_mm`` (three lengths in mm)."""
    return float(np.count_nonzero(mask)) * float(np.prod(voxel_mm)) / 1000.0


def volume_errors(predicted_ml: np.ndarray, true_ml: np.ndarray) -> dict:
    """Mean absolute and mean signed (predicted - true) volume error in mL, over cases with blood in either."""
    predicted_ml, true_ml = np.asarray(predicted_ml, float), np.asarray(true_ml, float)
    cases = (predicted_ml > 0) | (true_ml > 0)
    if not cases.any():
        return {"volume_mae_ml": math.nan, "volume_bias_ml": math.nan, "volume_cases": 0}
    difference = predicted_ml[cases] - true_ml[cases]
    return {"volume_mae_ml": float(np.abs(difference).mean()), "volume_bias_ml": float(difference.mean()),
            "volume_cases": int(cases.sum())}


def heatmap_peak(heatmap: np.ndarray, shape: tuple[int, int]) -> tuple[int, int]:
    """(row, col) of a heatmap's maximum, after resizing it to ``shape`` (rows, cols); first one on ties."""
    heat = cv2.resize(np.asarray(heatmap, np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return int(row), int(col)


def pointing_hit(heatmap: np.ndarray, mask: np.ndarray) -> bool:
    """The pointing game: does the heatmap's peak fall inside the mask?"""
    row, col = heatmap_peak(heatmap, mask.shape)
    return bool(mask[row, col])


def score_masks(predicted: np.ndarray, truth: np.ndarray, cases: np.ndarray, voxel_mm: np.ndarray,
                names: tuple[str, ...]) -> dict:
    """Per channel: pooled Dice, mean Dice over cases, and volume errors over cases.

    ``predicted`` bool and ``truth`` float (n, rows, cols, channels), truth below 0 meaning unknown
    (a channel is scored on the slices where it is known); ``cases`` (n,) groups slices into series;
    ``voxel_mm`` (n, 3) sizes voxels (volumes are skipped where it is NaN).
    """
    scores = {}
    for k, name in enumerate(names):
        known = (truth[..., k] >= 0).all(axis=(1, 2))
        if not known.any():
            continue
        p, t = predicted[known, ..., k], truth[known, ..., k] > 0.5
        case_of = np.asarray(cases)[known]
        per_case, predicted_ml, true_ml = [], [], []
        for case in np.unique(case_of):
            rows = case_of == case
            per_case.append(dice(p[rows], t[rows]))
            voxel = np.asarray(voxel_mm)[known][rows][0]
            if np.isfinite(voxel).all():
                predicted_ml.append(volume_ml(p[rows], voxel))
                true_ml.append(volume_ml(t[rows], voxel))
        defined = [d for d in per_case if not math.isnan(d)]
        scores[name] = {"dice_pooled": dice(p, t), "dice_mean": float(np.mean(defined)) if defined else math.nan,
                        "cases_with_dice": len(defined), "slices": int(known.sum()),
                        **volume_errors(np.array(predicted_ml), np.array(true_ml))}
    return scores
