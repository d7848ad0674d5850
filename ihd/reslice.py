"""Fixed-length reslicing: every series to the same number of images by interpolation along its normal.

Paper 000 feeds each exam as 25 images whatever its scanner wrote. Target positions are spread
evenly from the first to the last slice's position along the slice normal (the index's ``z``, in mm
for series ordered by position), so the new spacing follows the series' real extent; each target is
the linear interpolation of the two slices around it, weighted by distance. Uneven spacing (a gap,
a tilted second block) is therefore honoured, which resampling by slice number would not do.

The same weights apply to anything stacked per slice: HU images (the end-to-end model) or cached
CNN features (the stage-2 models, which keeps the CNN's single pass over the original slices).
"""
from __future__ import annotations

import numpy as np

DEFAULT_FRAMES = 25


def reslice_weights(z_mm: np.ndarray, frames: int = DEFAULT_FRAMES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of ``frames`` evenly spaced targets: the slice below, the slice above and the weight of the one above.

    ``z_mm`` holds the series' slice positions along its normal, strictly increasing; a single slice
    is repeated. Raises ValueError on positions that are not strictly increasing (two slices at one
    place cannot be told apart) or fewer than one frame.
    """
    z = np.asarray(z_mm, np.float64)
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    if len(z) == 0:
        raise ValueError("cannot reslice a series without slices")
    if not np.all(np.isfinite(z)) or np.any(np.diff(z) <= 0):
        step = int(np.argmax(~(np.diff(z) > 0))) if len(z) > 1 else 0
        raise ValueError(f"slice positions must be finite and strictly increasing; slices {step} and {step + 1} "
                         f"are at {z[step]:g} and {z[min(step + 1, len(z) - 1)]:g} mm")
    if len(z) == 1:
        zeros = np.zeros(frames, np.int64)
        return zeros, zeros, np.zeros(frames)
    targets = np.linspace(z[0], z[-1], frames)
    upper = np.clip(np.searchsorted(z, targets, side="right"), 1, len(z) - 1)
    lower = upper - 1
    weight = np.clip((targets - z[lower]) / (z[upper] - z[lower]), 0.0, 1.0)
    return lower, upper, weight


def reslice(values: np.ndarray, z_mm: np.ndarray, frames: int = DEFAULT_FRAMES) -> np.ndarray:
    """``values`` (n, ...) stacked per slice in z order -> (frames, ...) float32 at evenly spaced positions."""
    lower, upper, weight = reslice_weights(z_mm, frames)
    values = np.asarray(values, np.float32)
    if len(values) != len(np.asarray(z_mm)):
        raise ValueError(f"{len(values)} slices of values but {len(np.asarray(z_mm))} positions")
    shape = (frames,) + (1,) * (values.ndim - 1)
    w = weight.reshape(shape).astype(np.float32)
    return (1.0 - w) * values[lower] + w * values[upper]


def nearest_slice(z_mm: np.ndarray, frames: int = DEFAULT_FRAMES) -> np.ndarray:
    """For each frame, the original slice it lies closest to (to map frame scores back to slices)."""
    lower, upper, weight = reslice_weights(z_mm, frames)
    return np.where(weight > 0.5, upper, lower)


def slice_scores(frame_scores: np.ndarray, z_mm: np.ndarray) -> np.ndarray:
    """Per-slice scores from per-frame scores: each slice gets the sum of the frames nearest to it
    (so scores that sum to 1 over frames still sum to 1 over slices)."""
    frame_scores = np.asarray(frame_scores, np.float64)
    nearest = nearest_slice(z_mm, len(frame_scores))
    return np.bincount(nearest, weights=frame_scores, minlength=len(np.asarray(z_mm)))
