"""Input normalisation measured on the data: each window's mean and standard deviation over training slices.

A backbone expects its inputs in the range it was trained on (`ihd.backbones.backbone_input_affine`).
The paper's code instead normalised each of its three windows by the mean and standard deviation
of that window over its training data (albumentations' ``Normalize``, on windows scaled to [0, 1]).
``--input-norm dataset`` does the same: the moments are measured here on a seeded sample of the
training slices, at the model's size, and become the ``windowing`` layer's scale and offset, so the
model carries them and every later stage feeds it plain Hounsfield units.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ihd.inputs import inference_dataset
from ihd.slices import SliceStore
from ihd.windows import ChannelRecipe, window

INPUT_NORMS = ("backbone", "dataset")


def window_moments(
    index: pd.DataFrame,
    store: SliceStore,
    recipe: ChannelRecipe,
    rows: np.ndarray,
    image_size: int,
    sample_rows: int = 2048,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of the windowed inputs (in [0, 1]) of a seeded sample of ``rows``."""
    rows = np.asarray(rows)
    if len(rows) == 0:
        raise ValueError("no training rows to measure the input normalisation on")
    sample = np.sort(np.random.default_rng(seed).choice(rows, size=min(sample_rows, len(rows)), replace=False))
    channels = len(recipe.windows)
    total, squares, count = np.zeros(channels), np.zeros(channels), 0
    for batch in inference_dataset(index, store, recipe, sample, image_size, batch_size=64):
        stacks = np.asarray(batch, np.float32)
        windowed = np.stack([window(stacks[..., c], w.center_hu, w.width_hu) for c, w in enumerate(recipe.windows)],
                            axis=-1).astype(np.float64)
        total += windowed.sum(axis=(0, 1, 2))
        squares += (windowed**2).sum(axis=(0, 1, 2))
        count += windowed[..., 0].size
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-12))
    return mean, std


def normalising_affine(mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (scale, offset) that maps a window value w to (w - mean) / std, per channel."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return 1.0 / std, -mean / std
