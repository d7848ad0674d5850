"""A finding other than hemorrhage in the synthetic phantom, and the study labels a synthetic dataset writes.

Paper 000 sorts exams into hemorrhage, no finding and other pathology; for the third class to be
learnable the phantom needs a non-hemorrhagic finding. A study has one with probability
``OTHER_FINDING_FRACTION``, drawn from its own random stream (so every other draw of the phantom, and
every dataset written before, stays the same for a seed), whether or not it also bleeds:

- ``infarct``: a hypodense region of brain, 8 to 14 HU below the tissue around it, a flattened
  ellipsoid 12 to 30 mm across reaching the cortex (territorial infarcts are wedge-like and peripheral);
- ``calcified_mass``: a round, densely calcified mass of 180 to 400 HU, 6 to 14 mm across, well above
  fresh blood (50-90 HU) so that it is not a bleed, as a calcified meningioma or granuloma is not.

Only brain parenchyma (15 to 45 HU) outside any bleed mask is painted. The study's exam class is
hemorrhage when it bleeds, else other when it holds a finding, else no finding (``ihd.study_labels``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ihd.labels import SUBTYPES
from ihd.study_labels import EXAM_CLASSES, STUDY_ID, exam_classes

OTHER_FINDING_FRACTION = 0.3
FINDINGS = ("infarct", "calcified_mass")
PARENCHYMA_HU = (15.0, 45.0)


@dataclass(frozen=True)
class Finding:
    """One non-hemorrhagic finding: an ellipsoid around (x, y, h) in head coordinates (mm)."""

    kind: str
    h_centre_mm: float
    h_half_mm: float
    x_mm: float
    y_mm: float
    radius_mm: float
    hu: float  # the HU change of an infarct (negative), the density of a calcified mass


def draw_finding(seed: int, number: int, half_width_mm: float, half_length_mm: float) -> Finding | None:
    """Study ``number``'s finding, or None; from the study's own stream ``[seed, number, 0x07E]``."""
    rng = np.random.default_rng([seed, number, 0x07E])
    if rng.random() >= OTHER_FINDING_FRACTION:
        return None
    kind = FINDINGS[int(rng.integers(0, len(FINDINGS)))]
    angle = float(rng.uniform(-math.pi, math.pi))
    if kind == "infarct":
        radius, reach, hu = float(rng.uniform(6, 15)), float(rng.uniform(0.55, 0.75)), -float(rng.uniform(8, 14))
        h_half = float(rng.uniform(10, 20))
    else:
        radius, reach, hu = float(rng.uniform(3, 7)), float(rng.uniform(0.3, 0.7)), float(rng.uniform(180, 400))
        h_half = radius * 1.2
    return Finding(kind, float(rng.uniform(45, 95)), h_half, reach * half_width_mm * math.cos(angle),
                   reach * half_length_mm * math.sin(angle), radius, hu)


def paint_finding(hu: np.ndarray, finding: Finding, h_mm: float, x_mm: np.ndarray, y_mm: np.ndarray,
                  bleeding: np.ndarray) -> np.ndarray:
    """The slice at height ``h_mm`` with the finding painted on its parenchyma outside ``bleeding``."""
    offset = abs(h_mm - finding.h_centre_mm)
    if offset >= finding.h_half_mm:
        return hu
    radius = finding.radius_mm * math.sqrt(1 - (offset / finding.h_half_mm) ** 2)
    inside = ((x_mm - finding.x_mm) ** 2 + (y_mm - finding.y_mm) ** 2) < radius ** 2
    region = inside & (hu >= PARENCHYMA_HU[0]) & (hu <= PARENCHYMA_HU[1]) & ~bleeding
    painted = hu + np.float32(finding.hu) if finding.kind == "infarct" else np.full_like(hu, finding.hu)
    return np.where(region, painted, hu).astype(np.float32)


def study_label_table(study_ids: list[str], slice_labels: list[np.ndarray], has_finding: list[bool]) -> pd.DataFrame:
    """Both label sets of every study: the highest slice label of each subtype, and the exam class."""
    subtypes = np.stack([np.asarray(labels).max(axis=0) for labels in slice_labels]) if study_ids else np.zeros((0, 6))
    classes = exam_classes(subtypes[:, SUBTYPES.index("any")], np.asarray(has_finding, bool))
    return pd.DataFrame(np.concatenate([subtypes, classes], axis=1), index=pd.Index(study_ids, name=STUDY_ID),
                        columns=[*SUBTYPES, *EXAM_CLASSES])
