"""Training augmentation of HU stacks (H, W, C float32), as in the paper: flip, shift-scale-rotate,
brightness/contrast.

Inputs are Hounsfield units, not display values: the windows are applied inside the model, so
augmentation must keep HU meaning. Geometry comes from albumentations (`Affine`, filling uncovered
corners with air, -1024 HU). albumentations' own `RandomBrightnessContrast` clips float images to
[0, 1], so brightness and contrast are done by `RandomBrightnessContrastHU`, which works in HU:
a brightness shift of b HU moves every window's centre by -b, and a contrast factor 1 + c about
the brain window's centre narrows or widens every window by that factor. Used for training only.
"""

from typing import Any

import albumentations as A
import numpy as np
from albumentations.core.transforms_interface import ImageOnlyTransform

from ihd.windows import WINDOWS

AIR_HU = -1024.0


class RandomBrightnessContrastHU(ImageOnlyTransform):
    """Random `hu -> pivot + (hu - pivot) * (1 + c) + b`, with b in HU and c a relative contrast change."""

    def __init__(
        self,
        brightness_hu: float = 10.0,
        contrast: float = 0.1,
        pivot_hu: float = WINDOWS["brain"].center_hu,
        p: float = 0.5,
    ):
        super().__init__(p=p)
        self.brightness_hu = brightness_hu
        self.contrast = contrast
        self.pivot_hu = pivot_hu

    def get_params(self) -> dict[str, float]:
        """Draw the brightness shift (HU) and the contrast factor."""
        return {
            "shift_hu": self.py_random.uniform(-self.brightness_hu, self.brightness_hu),
            "factor": 1.0 + self.py_random.uniform(-self.contrast, self.contrast),
        }

    def apply(self, img: np.ndarray, shift_hu: float = 0.0, factor: float = 1.0, **params: Any) -> np.ndarray:
        """Apply the drawn shift and factor to an HU image."""
        pivot = np.float32(self.pivot_hu)
        return ((img - pivot) * np.float32(factor) + pivot + np.float32(shift_hu)).astype(np.float32)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Arguments albumentations needs to describe or serialise this transform."""
        return ("brightness_hu", "contrast", "pivot_hu")


def training_augmentation(
    seed: int = 0,
    flip_p: float = 0.5,
    shift_fraction: float = 0.0625,
    scale_fraction: float = 0.1,
    rotate_deg: float = 15.0,
    brightness_hu: float = 10.0,
    contrast: float = 0.1,
) -> A.Compose:
    """The seeded training pipeline for HU stacks: horizontal flip, shift-scale-rotate, brightness/contrast.

    ``shift_fraction`` is a fraction of the image side, ``scale_fraction`` a relative zoom range,
    ``rotate_deg`` the largest rotation either way; see `RandomBrightnessContrastHU` for the last two.
    """
    return A.Compose(
        [
            A.HorizontalFlip(p=flip_p),
            A.Affine(
                translate_percent=(-shift_fraction, shift_fraction),
                scale=(1.0 - scale_fraction, 1.0 + scale_fraction),
                rotate=(-rotate_deg, rotate_deg),
                fill=AIR_HU,
                p=0.5,
            ),
            RandomBrightnessContrastHU(brightness_hu=brightness_hu, contrast=contrast, p=0.5),
        ],
        seed=seed,
    )


def augment_hu(transform: A.Compose, stack_hu: np.ndarray) -> np.ndarray:
    """Run ``transform`` on one HU stack (H, W, C) and return float32 of the same shape."""
    return np.ascontiguousarray(transform(image=stack_hu)["image"], dtype=np.float32)
