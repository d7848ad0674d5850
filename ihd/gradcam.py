"""Where the slice CNN looks: Grad-CAM and Grad-CAM++ heatmaps (tf-keras-vis), overlays, montages.

The heatmap is the gradient-weighted activation of the backbone's last feature map for one output
(by default `any`), taken on the output's logit (`ReplaceToLinear` turns the sigmoid off on a clone
of the model), rescaled to the input size and normalised to [0, 1]. Pictures show it over the
brain window (40/80 HU), where bleeds are easiest to see.
"""
from __future__ import annotations

import weakref
from pathlib import Path

import cv2
import keras
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from tf_keras_vis.gradcam import Gradcam
from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
from tf_keras_vis.utils.scores import CategoricalScore

from ihd.io import atomic_path
from ihd.labels import ANY, SUBTYPES
from ihd.windows import WINDOWS, window

METHODS = {"gradcam": Gradcam, "gradcam++": GradcamPlusPlus}
HEATMAP_ALPHA = 0.45
SHORT_NAMES = {"epidural": "EDH", "intraparenchymal": "IPH", "intraventricular": "IVH",
               "subarachnoid": "SAH", "subdural": "SDH", "any": "any"}

_visualizers: "weakref.WeakKeyDictionary[keras.Model, dict]" = weakref.WeakKeyDictionary()


def last_feature_map_layer(model: keras.Model) -> str:
    """Name of the last layer with a 4-D output (batch, rows, cols, channels): the backbone's last convolution block."""
    for layer in reversed(model.layers):
        if not isinstance(layer, keras.layers.InputLayer) and len(layer.output.shape) == 4:
            return layer.name
    raise ValueError(f"model {model.name} has no convolutional feature map for Grad-CAM")


def _visualizer(model: keras.Model, method: str):
    """The tf-keras-vis object for `model` and `method`, built once (it clones the model)."""
    if method not in METHODS:
        raise ValueError(f"unknown Grad-CAM method {method!r}: use one of {', '.join(METHODS)}")
    per_model = _visualizers.setdefault(model, {})
    if method not in per_model:
        per_model[method] = METHODS[method](model, model_modifier=ReplaceToLinear(), clone=True)
    return per_model[method]


def gradcam_heatmaps(model: keras.Model, hu_stacks: np.ndarray, method: str = "gradcam", class_index: int = ANY) -> np.ndarray:
    """Heatmaps float32 (N, H, W) in [0, 1] of output `class_index` for model inputs `hu_stacks` (N, H, W, C)
    in HU, in one forward and backward pass: each is normalised on its own, as if computed alone."""
    hu_stacks = np.asarray(hu_stacks, np.float32)
    if len(hu_stacks) == 0:
        return np.zeros(hu_stacks.shape[:3], np.float32)
    cam = _visualizer(model, method)(
        CategoricalScore([class_index] * len(hu_stacks)),
        hu_stacks,
        penultimate_layer=last_feature_map_layer(model),
        seek_penultimate_conv_layer=False,
        expand_cam=True,
        normalize_cam=True,
    )
    return np.clip(np.nan_to_num(np.asarray(cam, np.float32)), 0.0, 1.0).reshape(hu_stacks.shape[:3])


def gradcam_heatmap(model: keras.Model, hu_stack: np.ndarray, method: str = "gradcam", class_index: int = ANY) -> np.ndarray:
    """Heatmap float32 (H, W) in [0, 1] of output `class_index` for one model input `hu_stack` (H, W, C) in HU."""
    return gradcam_heatmaps(model, np.asarray(hu_stack)[None], method, class_index)[0]


def best_slices(probabilities: np.ndarray, n: int, class_index: int = ANY) -> np.ndarray:
    """Row numbers of the `n` slices with the highest probability of `class_index`, highest first."""
    scores = np.asarray(probabilities)[:, class_index]
    return np.argsort(-scores, kind="stable")[:n]


def probability_title(probabilities: np.ndarray) -> str:
    """The six probabilities in one short line, subtypes abbreviated."""
    return "  ".join(f"{SHORT_NAMES[name]} {p:.2f}" for name, p in zip(SUBTYPES, probabilities))


def overlay_rgb(hu: np.ndarray, heatmap: np.ndarray | None = None) -> np.ndarray:
    """RGB float (H, W, 3) in [0, 1]: the slice in the brain window, the heatmap blended on top in jet colours."""
    brain = WINDOWS["brain"]
    gray = window(np.asarray(hu, np.float32), brain.center_hu, brain.width_hu)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    if heatmap is None:
        return np.clip(rgb, 0.0, 1.0)
    heat = cv2.resize(np.asarray(heatmap, np.float32), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    colours = plt.get_cmap("jet")(heat)[..., :3]
    alpha = HEATMAP_ALPHA * heat[..., None]
    return np.clip((1 - alpha) * rgb + alpha * colours, 0.0, 1.0)


def _save(figure, path: Path) -> Path:
    """Save a figure atomically and close it, its images released now: a closed figure waits for the
    cyclic garbage collector, and a run of montages held about 12 MB each until it came."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100, bbox_inches="tight")
    figure.clear()
    plt.close(figure)
    return Path(path)


def draw_overlay(hu: np.ndarray, heatmap: np.ndarray, probabilities: np.ndarray, path: str | Path, caption: str = "") -> Path:
    """Write a PNG of the heatmap over the brain-windowed slice, titled with the six probabilities."""
    figure, axis = plt.subplots(figsize=(5.5, 6))
    axis.imshow(overlay_rgb(hu, heatmap))
    axis.set_title(f"{caption}\n{probability_title(probabilities)}" if caption else probability_title(probabilities), fontsize=9)
    axis.axis("off")
    return _save(figure, Path(path))


def draw_montage(
    hu_slices: list[np.ndarray],
    probabilities: np.ndarray,
    path: str | Path,
    heatmaps: dict[int, np.ndarray] | None = None,
    caption: str = "",
    columns: int = 8,
    tile_pixels: int = 128,
) -> Path:
    """Write a PNG grid of a study's slices in z order, each labelled with its `any` probability, heatmaps on those given."""
    heatmaps = heatmaps or {}
    rows = max(1, -(-len(hu_slices) // columns))
    grid = np.ones((rows * tile_pixels, columns * tile_pixels, 3))
    for slot, hu in enumerate(hu_slices):
        tile = cv2.resize(overlay_rgb(hu, heatmaps.get(slot)), (tile_pixels, tile_pixels), interpolation=cv2.INTER_AREA)
        row, column = divmod(slot, columns)
        grid[row * tile_pixels : (row + 1) * tile_pixels, column * tile_pixels : (column + 1) * tile_pixels] = tile
    figure, axis = plt.subplots(figsize=(columns * 1.5, rows * 1.5 + 0.5))
    axis.imshow(grid)
    for slot in range(len(hu_slices)):
        row, column = divmod(slot, columns)
        p_any = float(probabilities[slot, ANY])
        axis.text(column * tile_pixels + 3, row * tile_pixels + 3, f"{slot}: any {p_any:.2f}", fontsize=7, va="top",
                  color="#ff6060" if p_any >= 0.5 else "white", bbox=dict(facecolor="black", alpha=0.5, pad=1, lw=0))
    axis.axis("off")
    if caption:
        axis.set_title(caption, fontsize=10)
    return _save(figure, Path(path))
