"""Synthetic head CT studies with intracranial bleeds, written in the Kaggle layout of the RSNA 2019 challenge.

    python -m ihd.synthetic --out data/synthetic/raw --train-studies 80 --test-studies 30
    python -m ihd.synthetic --out /tmp/ihd-small --small --no-quirks
    python -m ihd.synthetic --bench

A study is one axial series from below the skull base to the vertex. The phantom is analytic: the
skull, brain, ventricles and bleeds are implicit shapes in head coordinates (mm), evaluated on each
slice's pixel grid; ``h`` is the height above the skull base (floor of the middle cranial fossa).
Tissue in Hounsfield units: air -1000, scalp ~45 with a layer of fat (-60 to -110), skull 700-1500
(densest at the base, with petrous ridges and the clivus), grey matter ~38, white matter ~27, CSF ~6,
fresh blood 50-90. What is dense but no bleed is there too, as in real scans: the scanner's head
holder and table behind the head, and calcifications of the pineal, the choroid plexus and the falx.
So is what is as dense as blood and no bleed: the temporal and neck muscles (45-65) outside the
skull, muscle and fat between the bones below the skull base, the falx, and the blood of the dural
venous sinuses (45-70) against the inner table. Against the inner table the brain is brighter, as
measured on real bleed-free slices (partial volume of the bone, beam hardening): 60 to 200 HU more
half a millimetre in, fading within about 2 mm in the middle of the head and more slowly towards the
vertex (down to 1/e every 3 mm), where the table crosses the slice obliquely. A slice has a
thickness: it is the mean of ``SECTION_SAMPLES`` sections through it, so a surface it crosses
obliquely (the skull at the vertex and the base) spreads into values between bone and brain, as in
a real scan. A phantom without those lets a model learn "blood-dense outside a bleed never happens",
which real heads contradict on every slice (BENCHMARKS.md, "Trained on synthetic, scored on real").

Bleeds are 3D: each has a centre height and a half-height, and on a slice at distance ``u`` (in
half-heights) from its centre its cross-section is scaled by ``sqrt(1 - u**2)``. Its contrast
tapers too (partial volume of a ~5 mm slice), over the last ``TAPER_SLICES`` slices of each end,
down to ``END_CONTRAST``: at the ends of a bleed a slice alone is ambiguous, its neighbours are
not. A slice is labeled with a subtype when that subtype's mask covers at least
``MIN_LABEL_AREA_MM2`` on it; ``any`` is the union. The masks are kept in ``truth/masks``.

Layout written (the private parts of the challenge under ``truth/``)::

    stage_2_train/ID_<9 hex>.dcm  stage_2_test/ID_<9 hex>.dcm
    stage_2_train.csv  stage_2_train_study_labels.csv  stage_2_sample_submission.csv  config.json
    truth/stage_2_test_labels.csv  truth/stage_2_test_study_labels.csv  truth/masks/<series_id>.npz

Study labels (``ihd.study_labels``) hold both label sets; a study may also hold a non-hemorrhagic
finding (``ihd.synthetic_findings``), which makes its exam class "other" when it does not bleed.

While it is being written, ``.progress/`` holds the settings and one record per finished study, so
that a rerun after a kill finishes the dataset; ``config.json`` comes last and marks it complete.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import io
import math
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from ihd import synthetic_findings
from ihd.flags import int_in
from ihd.io import atomic_path, is_temporary, read_json, run_header, write_json
from ihd.labels import SUBTYPES, write_long
from ihd.parallel import parallel_map
from ihd.study_labels import write_study_labels
from ihd.synthetic_findings import OTHER_FINDING_FRACTION, draw_finding, paint_finding, study_label_table

BLEEDS = SUBTYPES[:-1]
PIXELS = 512
BLEED_STUDY_FRACTION = 0.4
# Share of bleeding studies whose main finding is each subtype (epidural is rare and short).
PRIMARY_SHARES = {"subdural": 0.30, "intraparenchymal": 0.27, "subarachnoid": 0.25,
                  "intraventricular": 0.11, "epidural": 0.07}
# Chance of a second finding given the main one, as in real studies (IPH spills into the
# ventricles, trauma gives SDH with SAH, ...).
CO_OCCURRENCE = {
    "epidural": {"subdural": 0.3, "subarachnoid": 0.4},
    "subdural": {"subarachnoid": 0.35, "intraparenchymal": 0.15},
    "intraparenchymal": {"intraventricular": 0.5, "subarachnoid": 0.3, "subdural": 0.1},
    "subarachnoid": {"intraparenchymal": 0.25, "subdural": 0.25, "intraventricular": 0.25},
    "intraventricular": {"intraparenchymal": 0.5, "subarachnoid": 0.3},
}
MIN_LABEL_AREA_MM2 = 10.0
SKIN_HU = 45.0  # skin and galea; the scalp's fat between them is drawn per head
GALEA_MM = 1.2  # dense layer of the scalp against the skull, under the fat
# The rim against the inner table (Cues.rim_hu, Cues.rim_mm) fades more slowly where the table crosses the slice
# obliquely: its fading length grows by this share of how far the table moves inwards across the slice's thickness.
RIM_WIDENING = 0.15
RIM_MAX_MM = 3.0  # up to this fading length (reached near the vertex)
RIM_REACH = 9.0  # fading lengths drawn; beyond, the rim would add under 0.06 HU (rim_hu at most 450, draw_cues)
SECTION_SAMPLES = 3  # sections averaged through a slice's thickness (its step); odd: the middle one is at its height
TAPER_SLICES = 1.5
END_CONTRAST = 0.3
SMALL = dict(train_studies=4, test_studies=2)
DEFAULT_SIZE = dict(train_studies=80, test_studies=30)
MAX_HU = 3071
QUIRK_NAMES = ("wrap12", "unsigned12", "padding", "multi_window", "implicit_vr", "compressed")
CONFIG_FILE = "config.json"  # written last: its presence marks a complete dataset
PROGRESS_DIR = ".progress"  # while writing: the settings and one record per finished study; removed at the end
PROGRESS_SETTINGS = "settings.json"
REQUESTED_SETTINGS = ("train_studies", "test_studies", "seed", "quirks")  # what a caller chooses
WINDOW_TAGS = [("30", "80"), ("40", "80"), ("35.000000", "135.000000"), ("40", "150"), ("50", "100")]


@dataclass
class QuirkRates:
    """Fractions of files written with each quirk of the real data; 0 (or False) turns one off."""

    wrap12: float = 0.01  # RSNA 12-bit wrap: unsigned 12-bit, intercept 0, values wrapped modulo 4096
    multi_window: float = 0.15  # WindowCenter/WindowWidth written as two values ("00040\00040")
    implicit_vr: float = 0.1  # Implicit VR Little Endian instead of Explicit
    unsigned12: float = 0.2  # BitsStored 12, PixelRepresentation 0 (stored = HU + 1024)
    padding: float = 0.1  # -2000 stored outside the circular field of view
    compressed: float = 0.02  # RLE Lossless or JPEG 2000 Lossless pixel data
    truncated_file: bool = True  # exactly one training file cut short (unreadable)
    duplicate_label_row: bool = True  # one training image's label rows written twice

    @classmethod
    def off(cls) -> "QuirkRates":
        """No quirks: every file plain 16-bit signed Explicit VR."""
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, False, False)


@dataclass(frozen=True)
class Anatomy:
    """One study's head and acquisition, all lengths in mm."""

    pixel_spacing_mm: float
    slice_step_mm: float
    n_slices: int
    h_start_mm: float  # height of the first slice above the skull base
    h_vertex_mm: float
    half_width_mm: float  # outer skull, left-right
    half_length_mm: float  # outer skull, front-back
    shape_phase: float
    rotation_deg: float
    centre_mm: tuple[float, float]
    skull_mm: float  # vault thickness
    skull_hu: float
    scalp_mm: float
    csf_rim_mm: float  # subarachnoid space over the convexity (wider with atrophy)
    ventricle_scale: float
    grey_hu: float
    white_hu: float
    csf_hu: float
    noise_hu: float
    gantry_tilt_deg: float
    z_first_mm: float
    window: tuple[str, str]


@dataclass(frozen=True)
class Bleed:
    """One bleed: a 3D shape between ``h_centre_mm - h_half_mm`` and ``h_centre_mm + h_half_mm``."""

    subtype: str
    h_centre_mm: float
    h_half_mm: float
    hu: float
    angle_rad: float = 0.0  # direction in the slice (0 = patient's left, pi/2 = posterior)
    half_angle_rad: float = 0.0
    thickness_mm: float = 0.0
    x_mm: float = 0.0
    y_mm: float = 0.0
    radius_mm: float = 0.0


@dataclass(frozen=True)
class StudyPlan:
    """What the dataset-level draw fixes for one study; the rest comes from its own seed."""

    number: int
    split: str
    patient_id: str
    study_id: str
    series_id: str
    image_ids: tuple[str, ...]
    subtypes: tuple[str, ...]
    truncated_image: str = ""


# ---------------------------------------------------------------- dataset-level plan

def hex_ids(rng: np.random.Generator, count: int, digits: int, taken: set[str]) -> list[str]:
    """``count`` new unique ``ID_<digits hex>`` identifiers."""
    out: list[str] = []
    while len(out) < count:
        value = f"ID_{int(rng.integers(0, 16 ** digits)):0{digits}x}"
        if value not in taken:
            taken.add(value)
            out.append(value)
    return out


def allocate_primaries(n_bleeding: int, rng: np.random.Generator) -> list[str]:
    """Main subtypes for ``n_bleeding`` studies: proportional, every subtype once when there are 5+."""
    shares = np.array([PRIMARY_SHARES[s] for s in BLEEDS])
    counts = np.floor(shares * n_bleeding).astype(int)
    if n_bleeding >= len(BLEEDS):
        counts = np.maximum(counts, 1)
    while counts.sum() > n_bleeding:
        counts[np.argmax(counts)] -= 1
    remainder = shares * n_bleeding - counts
    for index in np.argsort(-remainder, kind="stable")[: n_bleeding - counts.sum()]:
        counts[index] += 1
    primaries = [s for s, c in zip(BLEEDS, counts) for _ in range(c)]
    return [primaries[i] for i in rng.permutation(len(primaries))]


def study_subtypes(primary: str, rng: np.random.Generator) -> tuple[str, ...]:
    """The main subtype plus co-occurring ones."""
    found = {primary} | {s for s, p in CO_OCCURRENCE[primary].items() if rng.random() < p}
    return tuple(s for s in BLEEDS if s in found)


def _n_slices(rng: np.random.Generator) -> int:
    """Slices per series: mostly 32-44, between 24 and 60."""
    return int(np.clip(round(rng.normal(38, 6)), 24, 60))


def plan_dataset(train_studies: int, test_studies: int, seed: int = 0, quirks: QuirkRates | None = None
                 ) -> list[StudyPlan]:
    """Identifiers, slice counts and bleed subtypes of every study; cheap, deterministic for a seed."""
    quirks = QuirkRates() if quirks is None else quirks
    rng = np.random.default_rng([seed, 0xD1A])
    taken: set[str] = set()
    plans: list[StudyPlan] = []
    for split, count in (("train", train_studies), ("test", test_studies)):
        n_bleeding = int(round(BLEED_STUDY_FRACTION * count))
        primaries = allocate_primaries(n_bleeding, rng) + [""] * (count - n_bleeding)
        primaries = [primaries[i] for i in rng.permutation(count)]
        patient = ""
        for primary in primaries:
            number = len(plans)
            if not patient or rng.random() > 0.1:
                patient = hex_ids(rng, 1, 8, taken)[0]
            study_id, series_id = hex_ids(rng, 2, 10, taken)
            images = tuple(hex_ids(rng, _n_slices(rng), 9, taken))
            subtypes = study_subtypes(primary, rng) if primary else ()
            plans.append(StudyPlan(number, split, patient, study_id, series_id, images, subtypes))
    if quirks.truncated_file and train_studies:
        victim = plans[int(rng.integers(0, train_studies))]
        image = victim.image_ids[int(rng.integers(0, len(victim.image_ids)))]
        plans[victim.number] = dataclasses.replace(victim, truncated_image=image)
    return plans


# ---------------------------------------------------------------- per-study draws

def draw_anatomy(rng: np.random.Generator, n_slices: int) -> Anatomy:
    """A random head and acquisition: size, shape, position, tilt, tissue values, noise."""
    step = float(rng.uniform(4.6, 5.2)) if n_slices <= 36 else 175.0 / n_slices
    vertex = float(rng.uniform(140, 160))
    coverage = step * (n_slices - 1)
    start = float(np.clip(vertex + rng.uniform(0, 8) - coverage, -25, rng.uniform(-15, 0)))
    atrophy = float(rng.beta(2, 5))
    return Anatomy(
        pixel_spacing_mm=float(rng.choice([0.4609375, 0.48828125, 0.488281, 0.494863, 0.46484375])),
        slice_step_mm=step,
        n_slices=n_slices,
        h_start_mm=start,
        h_vertex_mm=vertex,
        half_width_mm=float(rng.uniform(70, 79)),
        half_length_mm=float(rng.uniform(88, 98)),
        shape_phase=float(rng.uniform(-0.3, 0.3)),
        rotation_deg=float(rng.normal(0, 6)),
        centre_mm=(float(rng.uniform(-12, 12)), float(rng.uniform(-15, 10))),
        skull_mm=float(rng.uniform(5.0, 7.5)),
        skull_hu=float(rng.uniform(1250, 1500)),
        scalp_mm=float(rng.uniform(4, 7)),
        csf_rim_mm=0.8 + 3.0 * atrophy,
        ventricle_scale=0.75 + 0.9 * atrophy,
        grey_hu=float(rng.uniform(36, 42)),
        white_hu=float(rng.uniform(24, 30)),
        csf_hu=float(rng.uniform(3, 10)),
        noise_hu=float(rng.uniform(2.0, 4.0)),
        gantry_tilt_deg=float(rng.choice([0.0, rng.uniform(5, 25)])),
        z_first_mm=float(rng.uniform(-60, 160)),
        window=WINDOW_TAGS[int(rng.integers(0, len(WINDOW_TAGS)))],
    )


def wrap_angle(angle: np.ndarray | float) -> np.ndarray | float:
    """An angle (radians) in [-pi, pi)."""
    return (angle + np.pi) % (2 * np.pi) - np.pi


def lateral_angle(rng: np.random.Generator) -> float:
    """A direction over a convexity: mostly lateral (temporo-parietal), sometimes frontal."""
    side = 0.0 if rng.random() < 0.5 else np.pi
    if rng.random() < 0.2:
        return float(-np.pi / 2 + rng.normal(0, 0.4))
    return float(wrap_angle(side + rng.normal(0, 0.5)))


def draw_bleeds(subtypes: tuple[str, ...], anatomy: Anatomy, rng: np.random.Generator) -> list[Bleed]:
    """The 3D bleeds of a study, one or two per subtype, each with its own shape and place."""
    bleeds: list[Bleed] = []
    for subtype in subtypes:
        if subtype == "epidural":
            bleeds.append(Bleed(subtype, rng.uniform(30, 100), rng.uniform(8, 14), rng.uniform(65, 90),
                                lateral_angle(rng), rng.uniform(0.25, 0.45), rng.uniform(9, 20)))
        elif subtype == "subdural":
            for _ in range(1 + int(rng.random() < 0.15)):
                bleeds.append(Bleed(subtype, rng.uniform(45, 100), rng.uniform(18, 40), rng.uniform(55, 85),
                                    lateral_angle(rng), rng.uniform(0.6, 1.2), rng.uniform(3, 12)))
        elif subtype == "intraparenchymal":
            for _ in range(1 + int(rng.random() < 0.25)):
                radius = float(rng.uniform(4, 20))
                angle = float(rng.uniform(-np.pi, np.pi))
                reach = float(rng.uniform(0.1, 0.55))
                bleeds.append(Bleed(subtype, rng.uniform(30, 105), radius * rng.uniform(0.8, 1.3),
                                    rng.uniform(60, 88), radius_mm=radius,
                                    x_mm=reach * anatomy.half_width_mm * math.cos(angle),
                                    y_mm=reach * anatomy.half_length_mm * math.sin(angle)))
        elif subtype == "intraventricular":
            bleeds.append(Bleed(subtype, rng.uniform(50, 70), rng.uniform(12, 24), rng.uniform(55, 80),
                                thickness_mm=rng.uniform(0.5, 1.0)))
        elif subtype == "subarachnoid":
            bleeds.append(Bleed(subtype, rng.uniform(25, 95), rng.uniform(12, 30), rng.uniform(50, 68),
                                float(rng.uniform(-np.pi, np.pi)), rng.uniform(0.5, 1.4)))
    return bleeds


@dataclass(frozen=True)
class Cues:
    """Real-anatomy cues without a bleed: scalp layers, the head holder, physiological calcifications (0 HU: absent)."""

    skin_mm: float
    fat_hu: float  # subcutaneous fat between the skin and the galea
    holder_gap_mm: float  # foam between the back of the head and the holder's shell
    holder_mm: float  # shell thickness
    holder_hu: float
    holder_half_angle_rad: float  # how far the shell wraps around the head from straight behind it
    table_gap_mm: float  # from the shell down to the table top
    table_hu: float
    pineal_hu: float
    pineal_mm: float
    choroid_hu: float
    falx_hu: float
    falx_y_mm: float  # anterior end of the falx plaque (negative: frontal)
    falx_h_mm: float
    temporalis_mm: float  # temporal muscle over the squama, thickest at the temporal fossa
    neck_mm: float  # muscles behind and beside the skull base, thickest at the bottom of the series
    muscle_hu: float
    venous_sinus_hu: float  # blood in the dural venous sinuses: as dense as a fresh bleed, and no bleed
    venous_sinus_mm: float
    falx_dura_hu: float  # the falx
    rim_hu: float  # brightening of what lies against the inner table, fading inwards (beam hardening, partial volume)
    rim_mm: float  # how fast it fades: 1/e every rim_mm


def draw_cues(rng: np.random.Generator) -> Cues:
    """Random scalp, holder and calcifications: the pineal in 60% of heads, choroid plexus in 50%, falx in 20%."""
    return Cues(
        skin_mm=float(rng.uniform(1.0, 2.0)), fat_hu=float(rng.uniform(-110, -60)),
        holder_gap_mm=float(rng.uniform(3, 15)), holder_mm=float(rng.uniform(1.5, 3.5)),
        holder_hu=float(rng.uniform(150, 700)), holder_half_angle_rad=float(rng.uniform(1.0, 1.7)),
        table_gap_mm=float(rng.uniform(2, 12)), table_hu=float(rng.uniform(100, 400)),
        pineal_hu=float(rng.uniform(150, 600)) if rng.random() < 0.6 else 0.0, pineal_mm=float(rng.uniform(2, 4)),
        choroid_hu=float(rng.uniform(100, 350)) if rng.random() < 0.5 else 0.0,
        falx_hu=float(rng.uniform(200, 600)) if rng.random() < 0.2 else 0.0,
        falx_y_mm=float(rng.uniform(-55, -10)), falx_h_mm=float(rng.uniform(55, 95)),
        temporalis_mm=float(rng.uniform(4, 12)), neck_mm=float(rng.uniform(10, 25)),
        muscle_hu=float(rng.uniform(45, 65)), venous_sinus_hu=float(rng.uniform(45, 70)),
        venous_sinus_mm=float(rng.uniform(5, 9)),
        falx_dura_hu=float(rng.uniform(45, 65)),
        rim_hu=float(rng.uniform(250, 450)), rim_mm=float(rng.uniform(0.35, 0.65)),
    )


def _sphere_section(x: np.ndarray, y: np.ndarray, centre: tuple[float, float, float], radius_mm: float,
                    h_mm: float) -> np.ndarray:
    """Where a sphere (x, y, height; mm) cuts the slice at height ``h_mm``."""
    half = radius_mm ** 2 - (h_mm - centre[2]) ** 2
    if half <= 0:
        return np.zeros(x.shape, bool)
    return (x - centre[0]) ** 2 + (y - centre[1]) ** 2 < half


def bleed_section(bleed: Bleed, h_mm: float, slice_step_mm: float) -> tuple[float, float] | None:
    """A bleed's cross-section on the slice at height ``h_mm``: (size, contrast), or None off the bleed.

    ``size`` scales the cross-section by ``sqrt(1 - u**2)`` at ``u`` half-heights from the centre;
    ``contrast`` (partial volume of a thick slice) tapers over the last ``TAPER_SLICES`` slices of each
    end down to ``END_CONTRAST``.
    """
    offset = abs(h_mm - bleed.h_centre_mm)
    if offset >= bleed.h_half_mm:
        return None
    size = math.sqrt(1 - (offset / bleed.h_half_mm) ** 2)
    contrast = float(np.clip((bleed.h_half_mm - offset) / (TAPER_SLICES * slice_step_mm), END_CONTRAST, 1.0))
    return size, contrast


def extra_axial_mask(bleed: Bleed, size: float, theta: np.ndarray, inner_depth_mm: np.ndarray) -> np.ndarray:
    """An epidural lens or a subdural crescent against the inner table, centred on ``bleed.angle_rad``.

    ``theta`` is each pixel's direction from the head's centre, ``inner_depth_mm`` its depth inside
    the inner table (<= 0 outside the cranial cavity).
    """
    spread = np.abs(wrap_angle(theta - bleed.angle_rad)) / (bleed.half_angle_rad * size ** 0.5)
    profile = np.clip(1 - spread ** 2, 0, 1)
    profile = np.sqrt(profile) if bleed.subtype == "epidural" else profile ** 0.7
    return (inner_depth_mm > 0) & (inner_depth_mm < bleed.thickness_mm * size * profile)


class Field:
    """A smooth random field in [-1, 1]-ish: coarse 3D noise, linear in height, cubic in the plane."""

    def __init__(self, rng: np.random.Generator, cells: int, h_step_mm: float, h_range_mm: tuple[float, float],
                 interpolation: int = cv2.INTER_LINEAR):
        self.h0, self.step, self.interpolation = h_range_mm[0], h_step_mm, interpolation
        layers = int((h_range_mm[1] - h_range_mm[0]) / h_step_mm) + 2
        self.coarse = rng.standard_normal((layers, cells, cells)).astype(np.float32) * 0.8

    def at(self, h_mm: float, pixels: int | tuple[int, int], box: tuple[slice, slice] = (slice(None), slice(None))
           ) -> np.ndarray:
        """The field on a square grid of ``pixels`` (or a (rows, cols) grid) at height ``h_mm``, cut to ``box``."""
        position = np.clip((h_mm - self.h0) / self.step, 0, len(self.coarse) - 1.001)
        below = int(position)
        weight = np.float32(position - below)
        layer = self.coarse[below] * (1 - weight) + self.coarse[below + 1] * weight
        rows, cols = (pixels, pixels) if isinstance(pixels, int) else pixels
        return cv2.resize(layer, (cols, rows), interpolation=self.interpolation)[box]


def _ellipse(x: np.ndarray, y: np.ndarray, centre: tuple[float, float], half: tuple[float, float],
             angle_rad: float = 0.0) -> np.ndarray:
    """Squared normalised radius of an ellipse: < 1 inside."""
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    u = (x - centre[0]) * c + (y - centre[1]) * s
    v = -(x - centre[0]) * s + (y - centre[1]) * c
    return (u / half[0]) ** 2 + (v / half[1]) ** 2


class StudyPhantom:
    """Renders the slices of one study in HU, with its bleed masks, on a ``pixels`` square grid."""

    def __init__(self, anatomy: Anatomy, bleeds: list[Bleed], rng: np.random.Generator, pixels: int = PIXELS):
        self.anatomy, self.bleeds, self.pixels = anatomy, bleeds, pixels
        self.mm_per_pixel = anatomy.pixel_spacing_mm * PIXELS / pixels
        a = anatomy
        axis = ((np.arange(pixels, dtype=np.float32) - (pixels - 1) / 2) * self.mm_per_pixel)
        col, row = np.meshgrid(axis - a.centre_mm[0], axis - a.centre_mm[1])
        c, s = math.cos(math.radians(a.rotation_deg)), math.sin(math.radians(a.rotation_deg))
        self.x = (c * col + s * row).astype(np.float32)
        self.y = (-s * col + c * row).astype(np.float32)
        self.r = np.hypot(self.x, self.y)
        self.theta = np.arctan2(self.y, self.x)
        ellipse = a.half_width_mm * a.half_length_mm / np.hypot(
            a.half_length_mm * np.cos(self.theta), a.half_width_mm * np.sin(self.theta))
        egg = 1 + 0.04 * np.sin(self.theta) + 0.025 * np.cos(2 * self.theta + a.shape_phase)
        self.boundary = (ellipse * egg).astype(np.float32)
        v = a.ventricle_scale
        self.ventricles = np.minimum(
            _ellipse(self.x, self.y, (-(1.5 + 5 * v), 0), (5 * v, 28 * v), math.radians(14)),
            _ellipse(self.x, self.y, (1.5 + 5 * v, 0), (5 * v, 28 * v), math.radians(-14))).astype(np.float32)
        self.nuclei = np.minimum(_ellipse(self.x, self.y, (-17, 2), (8, 15), math.radians(-15)),
                                 _ellipse(self.x, self.y, (17, 2), (8, 15), math.radians(15))).astype(np.float32)
        self.fourth = _ellipse(self.x, self.y, (0, 30), (6, 4)).astype(np.float32)
        self.third = _ellipse(self.x, self.y, (0, 2), (1.5 * v, 12)).astype(np.float32)
        w, l = a.half_width_mm, a.half_length_mm
        self.posterior_fossa = _ellipse(self.x, self.y, (0, 0.42 * l), (0.72 * w, 0.45 * l)).astype(np.float32)
        self.temporal_fossae = np.minimum(
            _ellipse(self.x, self.y, (-0.5 * w, -0.12 * l), (0.3 * w, 0.38 * l), math.radians(-15)),
            _ellipse(self.x, self.y, (0.5 * w, -0.12 * l), (0.3 * w, 0.38 * l), math.radians(15))).astype(np.float32)
        self.frontal_fossa = _ellipse(self.x, self.y, (0, -0.55 * l), (0.75 * w, 0.4 * l)).astype(np.float32)
        self.orbits = np.minimum(_ellipse(self.x, self.y, (-0.4 * w, -0.78 * l), (12, 13)),
                                 _ellipse(self.x, self.y, (0.4 * w, -0.78 * l), (12, 13))).astype(np.float32)
        self.sinus = _ellipse(self.x, self.y, (0, -0.6 * l), (14, 24)).astype(np.float32)
        self.petrous_offset_mm = self._petrous_offset_mm()
        self.arc = (self.theta / (2 * np.pi)).astype(np.float32)
        self.lateral = np.clip(1.6 * np.abs(np.cos(self.theta)) - 0.6, 0, 1).astype(np.float32)  # temporal muscles
        self.behind = np.clip(1.5 * np.sin(self.theta) - 0.3, 0, 1).astype(np.float32)  # neck muscles
        self.transverse_sinuses = np.minimum(np.abs(wrap_angle(self.theta - (np.pi / 2 - 0.8))),
                                             np.abs(wrap_angle(self.theta - (np.pi / 2 + 0.8)))) < 0.45
        h_range = (a.h_start_mm - 10, a.h_start_mm + a.slice_step_mm * a.n_slices + 10)
        self.gyri = Field(rng, 40, 6.0, h_range, cv2.INTER_CUBIC)
        self.warp = Field(rng, 8, 12.0, h_range)
        self.texture = Field(rng, 60, 4.0, h_range)
        self.sulcus_mm = float(rng.uniform(11, 14))
        self.cues = draw_cues(rng)
        self.holder = self._holder(axis)
        self.box = (slice(None), slice(None))
        self.finding = None  # a non-hemorrhagic finding (ihd.synthetic_findings), set by build_phantom

    def _holder(self, axis: np.ndarray) -> np.ndarray:
        """HU of the scanner's head holder and table (air elsewhere), fixed to the scanner, the same on every slice.

        A curved shell cradles the back of the head (image rows grow towards the patient's back)
        over foam (air-like on CT), and the flat table top lies further down.
        """
        a, cues = self.anatomy, self.cues
        col, row = np.meshgrid(axis - a.centre_mm[0], axis - a.centre_mm[1])
        radius = max(a.half_width_mm, a.half_length_mm) + a.scalp_mm + cues.holder_gap_mm
        distance = np.hypot(col, row)
        behind = np.abs(wrap_angle(np.arctan2(row, col) - np.pi / 2)) < cues.holder_half_angle_rad
        shell = behind & (distance > radius) & (distance < radius + cues.holder_mm)
        table_top = radius + cues.holder_mm + cues.table_gap_mm
        table = ((row > table_top) & (row < table_top + 2)) | ((row > table_top + 12) & (row < table_top + 14))
        holder = np.where(shell, np.float32(cues.holder_hu), np.float32(-1000))
        return np.where(table, np.float32(cues.table_hu), holder).astype(np.float32)

    def heights_mm(self) -> np.ndarray:
        """Height above the skull base of every slice, first (lowest) to last."""
        return self.anatomy.h_start_mm + self.anatomy.slice_step_mm * np.arange(self.anatomy.n_slices)

    @staticmethod
    def _scale(h: float, vertex: float) -> float:
        """Cross-section of the skull (outer table, or inner table with a lowered vertex) relative to its widest."""
        equator = 45.0
        if h >= equator:
            u = min(1.0, (h - equator) / (vertex - equator))
            return (1 - u ** 2.2) ** (1 / 2.2)
        return 1 - 0.10 * ((equator - h) / 60) ** 2 - 0.2 * np.clip(-h / 30, 0, 1)

    def _skull(self, h: float) -> float:
        """Vault thickness (mm) at height h: thick at the base, thinner towards the vertex."""
        a = self.anatomy
        base = np.clip((25 - h) / 35, 0, 1)
        top = np.clip((h - 60) / (a.h_vertex_mm - 60), 0, 1)
        return float(a.skull_mm * (1 + 0.8 * base) * (1 - 0.3 * top))

    def render(self, index: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Slice ``index`` in HU (float32) and its bleed masks (bool, 5 x pixels x pixels, BLEEDS order).

        A slice has a thickness: its HU are the mean of ``SECTION_SAMPLES`` sections through it, so that
        a surface crossed obliquely (the skull at the vertex and the base) blurs over its partial volume
        as in a real scan. The masks are those of the middle section. Without ``rng`` no acquisition
        noise is added (the masks do not depend on it).
        """
        a = self.anatomy
        h = float(self.heights_mm()[index])
        masks = np.zeros((len(BLEEDS), self.pixels, self.pixels), bool)
        heights = h + a.slice_step_mm * ((np.arange(SECTION_SAMPLES) + 0.5) / SECTION_SAMPLES - 0.5)
        scales = [self._scale(float(z), a.h_vertex_mm) for z in heights]
        hu = np.full((self.pixels, self.pixels), -1000.0, np.float32)
        if max(scales) > 0.02:
            box = self._head_box(max(scales))
            view = self._cropped(box)
            middle = SECTION_SAMPLES // 2
            # the middle section first, head or not: its cavity (and only its bleeds, labeled) fills every section's
            head, tissue = view._render_head(h, scales[middle], masks[(slice(None),) + box])
            if scales[middle] <= 0.02:
                head = np.full(head.shape, -1000.0, np.float32)
            for section in (k for k in range(SECTION_SAMPLES) if k != middle):
                if scales[section] > 0.02:
                    scratch = np.zeros_like(masks[(slice(None),) + box])
                    head += view._render_head(float(heights[section]), scales[section], scratch, tissue)[0]
                else:
                    head -= 1000
            hu[box] = head / SECTION_SAMPLES
        if self.finding is not None:
            hu = paint_finding(hu, self.finding, h, self.x, self.y, masks.any(axis=0))
        hu = np.where(hu < -500, np.maximum(hu, self.holder), hu)
        return self._finish(hu, rng), masks

    def _head_box(self, scale: float) -> tuple[slice, slice]:
        """Rows and columns that hold the head at this scale (the rest of the slice is air)."""
        a = self.anatomy
        muscle_mm = self.cues.temporalis_mm + self.cues.neck_mm
        reach_mm = 1.1 * scale * max(a.half_width_mm, a.half_length_mm) + a.scalp_mm + muscle_mm + 3
        reach_px = reach_mm / self.mm_per_pixel
        middle = (self.pixels - 1) / 2
        col, row = middle + a.centre_mm[0] / self.mm_per_pixel, middle + a.centre_mm[1] / self.mm_per_pixel
        return (slice(max(0, int(row - reach_px)), min(self.pixels, int(row + reach_px) + 2)),
                slice(max(0, int(col - reach_px)), min(self.pixels, int(col + reach_px) + 2)))

    def _cropped(self, box: tuple[slice, slice]) -> "StudyPhantom":
        """A shallow copy whose pixel maps are views of ``box``."""
        view = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, np.ndarray) and value.shape == (self.pixels, self.pixels):
                setattr(view, name, value[box])
        view.box = box
        return view

    def _render_head(self, h: float, scale: float, masks: np.ndarray, tissue: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """HU inside the head box at height ``h``, and the cranial cavity's tissue it used; fills ``masks`` (a
        view of the same box). Skull, scalp and skull base are drawn at ``h``; the cavity's content is
        ``tissue`` (another section's through the same slice) when given, else drawn at ``h`` too."""
        a = self.anatomy
        skull = self._skull(h)
        inner_scale = self._scale(h, a.h_vertex_mm - skull)
        depth = scale * self.boundary - self.r  # mm inside the outer table
        inner = inner_scale * self.boundary - skull - self.r  # mm inside the inner table
        over_muscle = depth + self._muscle_mm(h)  # mm inside the muscles' outer surface (or the outer table's)
        hu = np.where(over_muscle > -a.scalp_mm, np.float32(SKIN_HU), np.float32(-1000))
        hu[(over_muscle < -GALEA_MM) & (over_muscle > -(a.scalp_mm - self.cues.skin_mm))] = self.cues.fat_hu
        hu[(over_muscle > 0) & (depth <= 0)] = self.cues.muscle_hu
        bone = depth > 0
        bone_depth, bone_inner = depth[bone], inner[bone]
        diploe = np.clip(1 - ((bone_depth - bone_inner) / (bone_depth + 1e-3) - 0.5) ** 2 * 6, 0, 1)
        skull_hu = a.skull_hu * (1 - 0.35 * np.clip((h - 20) / (a.h_vertex_mm - 20), 0, 1))
        hu[bone] = (skull_hu * (1 - 0.35 * diploe)).astype(np.float32)
        if tissue is None:
            tissue = self._cavity(h, inner_scale, inner, masks)
        cavity = inner > 0
        hu[cavity] = tissue[cavity]
        rim_mm = np.float32(self._rim_mm(h, a.h_vertex_mm - skull))
        band = cavity & (inner < RIM_REACH * rim_mm)
        hu[band] += np.float32(self.cues.rim_hu) * np.exp(-inner[band] / rim_mm)
        if h < 25:
            hu = self._skull_base(hu, h, inner, masks)
        masks &= cavity[None]
        return hu, tissue

    def _rim_mm(self, h: float, inner_vertex: float) -> float:
        """How fast the inner table's rim fades at height ``h`` (the inner table's top at ``inner_vertex``): wider
        where the table runs obliquely through the slice (towards the vertex), by how far it moves inwards across
        the slice's thickness."""
        a = self.anatomy
        above, below = (self._scale(h + sign * a.slice_step_mm / 2, inner_vertex) for sign in (1, -1))
        moved_mm = abs(above - below) * a.half_width_mm
        return min(self.cues.rim_mm + RIM_WIDENING * moved_mm, RIM_MAX_MM)

    def _cavity(self, h: float, inner_scale: float, inner: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """HU of the cranial cavity's content at height ``h`` (brain, CSF, dura, calcifications, bleeds), over
        the whole box; fills ``masks``."""
        a = self.anatomy
        brain_depth = inner - a.csf_rim_mm
        gyri = self.gyri.at(h, self.pixels, self.box)
        perimeter_mm = 2 * np.pi * inner_scale * (a.half_width_mm + a.half_length_mm) / 2
        folds = max(6, round(perimeter_mm / self.sulcus_mm))
        phase = self.arc * folds + 1.2 * self.warp.at(h, self.pixels, self.box) + 0.25 * gyri
        to_sulcus_mm = np.abs(phase - np.floor(phase) - 0.5) * self.sulcus_mm
        sulcus_depth_mm = 4 + 6 * gyri + 8 * np.clip((h - 40) / 80, 0, 1)
        in_fold = (to_sulcus_mm < 0.4 + 0.6 * a.ventricle_scale) & (brain_depth < sulcus_depth_mm)
        grey = (brain_depth < 2.5) | ((to_sulcus_mm < 3.0) & (brain_depth < sulcus_depth_mm + 2.5))
        tissue = np.where(grey, np.float32(a.grey_hu), np.float32(a.white_hu))
        tissue += 1.5 * self.texture.at(h, self.pixels, self.box)
        tissue = np.where(in_fold, np.float32((a.csf_hu + a.grey_hu) / 2), tissue)
        sulci = in_fold | (brain_depth < 0)
        csf = brain_depth < 0
        if h < 22:
            tissue = np.where(self.y > 8, np.float32(a.grey_hu - 3), tissue)
            csf |= self.fourth < 1
        if 25 < h < 62:
            tissue = np.where(self.nuclei < 1, np.float32(a.grey_hu - 2), tissue)
        if 20 < h < 45:
            csf |= self.third < 1
        ventricle_profile = math.sin(math.pi * np.clip((h - 35) / 50, 0, 1)) ** 0.6
        ventricles = self.ventricles < ventricle_profile ** 2 if ventricle_profile > 0 else None
        if ventricles is not None:
            csf |= ventricles
        if h > 35:
            fissure = np.abs(self.x) < 1.2 + 0.8 * a.ventricle_scale
            csf |= fissure & (np.abs(self.y) > 32)
        tissue = np.where(csf, np.float32(a.csf_hu), tissue)
        if h > 35:
            falx = (np.abs(self.x) < 0.7) & (np.abs(self.y) > 32)
            tissue = np.where(falx, np.float32(self.cues.falx_dura_hu), tissue)
        tissue = self._add_calcifications(tissue, h)
        tissue = self._add_venous_sinuses(tissue, h, inner)
        return self._add_bleeds(tissue, masks, h, inner, brain_depth, gyri, sulci, ventricles)

    def _add_calcifications(self, tissue: np.ndarray, h: float) -> np.ndarray:
        """Physiological calcifications, dense but no bleed: pineal, choroid plexus in the atria, a falx plaque."""
        cues, v = self.cues, self.anatomy.ventricle_scale
        if cues.pineal_hu:
            tissue = np.where(_sphere_section(self.x, self.y, (0.0, 14.0, 38.0), cues.pineal_mm, h),
                              np.float32(cues.pineal_hu), tissue)
        if cues.choroid_hu:
            for side in (-1, 1):
                spot = _sphere_section(self.x, self.y, (side * (1.5 + 12 * v), 22 * v, 52.0), 3.0, h)
                tissue = np.where(spot, np.float32(cues.choroid_hu), tissue)
        if cues.falx_hu and abs(h - cues.falx_h_mm) < 8:
            plaque = (np.abs(self.x) < 0.8) & (self.y > cues.falx_y_mm) & (self.y < cues.falx_y_mm + 15)
            tissue = np.where(plaque, np.float32(cues.falx_hu), tissue)
        return tissue

    def _muscle_mm(self, h: float) -> np.ndarray:
        """Thickness of muscle on the outer table: the temporal muscles at the sides, the neck's behind the base."""
        cues = self.cues
        temporal = np.float32(cues.temporalis_mm * max(0.0, 1 - ((h - 20) / 50) ** 2))
        neck = np.float32(cues.neck_mm * float(np.clip((15 - h) / 35, 0, 1)))
        return temporal * self.lateral + neck * self.behind

    def _add_venous_sinuses(self, tissue: np.ndarray, h: float, inner: np.ndarray) -> np.ndarray:
        """Blood in the dural venous sinuses against the inner table, as dense as a bleed: the superior sagittal
        sinus at the midline front and back, the transverse sinuses along the back of the posterior fossa."""
        cues = self.cues
        if h > 40:
            wedge = np.abs(self.x) < 0.6 * (cues.venous_sinus_mm - inner)
            sagittal = (inner < cues.venous_sinus_mm) & wedge & (np.abs(self.y) > 30)
            tissue = np.where(sagittal, np.float32(cues.venous_sinus_hu), tissue)
        if 0 < h < 28:
            depth_mm = 0.7 * cues.venous_sinus_mm * math.sin(math.pi * h / 28) ** 0.5
            transverse = (inner < depth_mm) & self.transverse_sinuses
            tissue = np.where(transverse, np.float32(cues.venous_sinus_hu), tissue)
        return tissue

    def _skull_base(self, hu: np.ndarray, h: float, inner: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """Below the cerebrum the cranial cavity narrows to the anterior, middle and posterior fossae.

        What lies outside the fossae is the skull base: bone, with air cells (sinuses, mastoids),
        and the orbits in front. Bleeds do not extend into it.
        """
        a = self.anatomy
        frontal = np.clip((h - 5) / 20, 0, 1) ** 0.7
        temporal = np.clip((h + 15) / 25, 0, 1) ** 0.7
        posterior = 0.35 + 0.65 * np.clip((h + 25) / 25, 0, 1)
        cavity = ((self.frontal_fossa < frontal ** 2) | (self.temporal_fossae < temporal ** 2)
                  | (self.posterior_fossa < posterior ** 2))
        bone = (inner > 0) & (~cavity | self._petrous_and_clivus(h))
        masks &= ~bone[None]
        texture = self.texture.at(h, self.pixels, self.box)
        air_cells = (texture > 0.3) & ((self.sinus < 1) | ((self.posterior_fossa < 1.5) & (np.abs(self.x) > 0.6 * a.half_width_mm)))
        base_hu = np.where(air_cells, np.float32(-850), (a.skull_hu * (0.75 + 0.15 * texture)).astype(np.float32))
        # below the fossae's floor, muscle and fat between the bones (the face, the neck), more of it lower down
        soft_share = float(np.clip((10 - h) / 30, 0, 1))
        if soft_share > 0:
            soft_field = self.warp.at(h, self.pixels, self.box)
            soft = ~air_cells & (soft_field < -0.6 + 1.1 * soft_share)
            fat = soft & (soft_field < -0.9 + 0.6 * soft_share)
            soft_hu = np.where(fat, np.float32(self.cues.fat_hu), np.float32(self.cues.muscle_hu))
            base_hu = np.where(soft, soft_hu, base_hu)
        hu = np.where(bone, base_hu, hu)
        if -20 < h < 8:
            hu = np.where(bone & (self.orbits < 1), np.where(self.orbits < 0.45, np.float32(12), np.float32(-90)), hu)
        return hu

    def _petrous_offset_mm(self) -> np.ndarray:
        """Distance (mm) from the nearer petrous ridge's axis, where a pixel lies beside one (infinite elsewhere);
        the same at every height."""
        w, l = self.anatomy.half_width_mm, self.anatomy.half_length_mm
        start, end = np.array([10.0, 0.02 * l]), np.array([0.8 * w, 0.3 * l])
        direction = (end - start) / np.linalg.norm(end - start)
        offset = np.full(self.x.shape, np.inf)
        for side in (-1, 1):
            along = (side * self.x - start[0]) * direction[0] + (self.y - start[1]) * direction[1]
            across = -(side * self.x - start[0]) * direction[1] + (self.y - start[1]) * direction[0]
            beside = (along > 0) & (along < np.linalg.norm(end - start))
            offset = np.where(beside, np.minimum(offset, np.abs(across)), offset)
        return offset

    def _petrous_and_clivus(self, h: float) -> np.ndarray:
        """The dense ridges between the middle and posterior fossae, and the clivus in front of the brainstem."""
        l = self.anatomy.half_length_mm
        ridges = np.zeros(self.x.shape, bool)
        if -20 < h < 12:
            ridges |= self.petrous_offset_mm < 4.0 * (1 - (h + 4) ** 2 / 16 ** 2) + 1.0
        if -25 < h < 8:
            ridges |= (np.abs(self.x) < 7) & (self.y > -0.02 * l - 6) & (self.y < -0.02 * l + 4)
        return ridges

    def _add_bleeds(self, tissue, masks, h, inner, brain_depth, gyri, csf_spaces, ventricles):
        """Paint every bleed active at height ``h`` into ``tissue`` and its mask."""
        for bleed in self.bleeds:
            section = bleed_section(bleed, h, self.anatomy.slice_step_mm)
            if section is None:
                continue
            size, contrast = section
            mask = self._bleed_mask(bleed, size, inner, brain_depth, gyri, csf_spaces, ventricles)
            if mask is None:
                continue
            masks[BLEEDS.index(bleed.subtype)] |= mask
            blend = np.float32(contrast)
            tissue = np.where(mask, tissue * (1 - blend) + np.float32(bleed.hu) * blend, tissue)
        return tissue

    def _bleed_mask(self, bleed, size, inner, brain_depth, gyri, csf_spaces, ventricles):
        if bleed.subtype in ("epidural", "subdural"):
            return extra_axial_mask(bleed, size, self.theta, inner)
        if bleed.subtype == "intraparenchymal":
            radius = bleed.radius_mm * size
            blob = ((self.x - bleed.x_mm) ** 2 + (self.y - bleed.y_mm) ** 2) / radius ** 2 + 0.25 * gyri
            return (blob < 1) & (brain_depth > 2)
        if bleed.subtype == "intraventricular":
            if ventricles is None:
                return None
            level = 30 * self.anatomy.ventricle_scale * (1 - 2 * bleed.thickness_mm * size)
            return ventricles & (self.y > level)
        spread = np.abs(wrap_angle(self.theta - bleed.angle_rad)) < bleed.half_angle_rad * size
        wider = (np.abs(gyri) < 0.09) & (brain_depth < 18) & (brain_depth > -0.5)
        return (csf_spaces | wider) & spread & (inner > 0)

    def _finish(self, hu: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        hu = cv2.GaussianBlur(hu, (0, 0), 0.6 * self.pixels / PIXELS)
        if rng is not None:
            half = self.pixels // 2
            grain = rng.standard_normal((half, half), dtype=np.float32) * np.float32(1.6 * self.anatomy.noise_hu)
            hu += cv2.resize(grain, (self.pixels, self.pixels), interpolation=cv2.INTER_LINEAR)
        return hu


def study_pixel_area_mm2(plan: StudyPlan, seed: int) -> float:
    """Area of one 512x512 pixel of a planned study (mm^2)."""
    return draw_anatomy(study_rng(seed, plan.number), len(plan.image_ids)).pixel_spacing_mm ** 2


def labels_from_masks(masks: np.ndarray, pixel_area_mm2: float) -> np.ndarray:
    """Per-slice labels (n, 6) from masks (n, 5, rows, cols): area >= MIN_LABEL_AREA_MM2; ``any`` the union."""
    areas = masks.reshape(masks.shape[0], masks.shape[1], -1).sum(axis=2) * pixel_area_mm2
    positive = areas >= MIN_LABEL_AREA_MM2
    return np.concatenate([positive, positive.any(axis=1, keepdims=True)], axis=1).astype(np.float32)


def study_rng(seed: int, number: int) -> np.random.Generator:
    """The random stream of study ``number``: independent of the other studies and of the workers."""
    return np.random.default_rng([seed, number])


def build_phantom(plan: StudyPlan, seed: int, pixels: int = PIXELS) -> StudyPhantom:
    """The phantom of one planned study (same anatomy and bleeds at every ``pixels``)."""
    rng = study_rng(seed, plan.number)
    anatomy = draw_anatomy(rng, len(plan.image_ids))
    bleeds = draw_bleeds(plan.subtypes, anatomy, rng)
    phantom = StudyPhantom(anatomy, bleeds, rng, pixels)
    phantom.finding = draw_finding(seed, plan.number, anatomy.half_width_mm, anatomy.half_length_mm)
    return phantom


def has_other_finding(plan: StudyPlan, seed: int) -> bool:
    """Whether a planned study holds a non-hemorrhagic finding (its exam class is other unless it bleeds)."""
    anatomy = draw_anatomy(study_rng(seed, plan.number), len(plan.image_ids))
    return draw_finding(seed, plan.number, anatomy.half_width_mm, anatomy.half_length_mm) is not None


def study_labels(plan: StudyPlan, seed: int, pixels: int = 128) -> np.ndarray:
    """Labels (n, 6) of a study's slices computed on a coarse grid, without noise or files (fast)."""
    phantom = build_phantom(plan, seed, pixels)
    masks = np.stack([phantom.render(i)[1] for i in range(len(plan.image_ids))])
    return labels_from_masks(masks, phantom.mm_per_pixel ** 2)


# ---------------------------------------------------------------- DICOM writing

def _ds(value: float) -> str:
    return f"{value:.6f}"


def _element(ds: Dataset, tag: int, vr: str, value) -> None:
    ds.add(DataElement(tag, vr, value, validation_mode=pydicom.config.IGNORE))


def _dicom_bytes(plan: StudyPlan, anatomy: Anatomy, index: int, hu: np.ndarray, quirks: dict[str, bool],
                 instance_uid: str, compression) -> bytes:
    """One phantom slice as a DICOM file like the RSNA ones (same tags, VRs and identifier style)."""
    tilt = math.radians(anatomy.gantry_tilt_deg)
    spacing = anatomy.pixel_spacing_mm
    z = anatomy.z_first_mm + index * anatomy.slice_step_mm
    origin = -(PIXELS / 2) * spacing
    geometry = SliceGeometry(position=(_ds(origin), _ds(origin + 10.0 * math.sin(tilt) - 5.0), _ds(z)),
                             orientation=("1", "0", "0", "0", _ds(math.cos(tilt)), _ds(-math.sin(tilt))),
                             spacing=(repr(spacing), repr(spacing)), window=anatomy.window)
    return dicom_slice_bytes(plan, plan.image_ids[index], geometry, hu, quirks, instance_uid, compression)


@dataclass(frozen=True)
class SliceGeometry:
    """A slice's place and display tags as the DICOM decimal strings to write (mm)."""

    position: tuple[str, str, str]  # ImagePositionPatient
    orientation: tuple[str, ...]  # ImageOrientationPatient, six direction cosines
    spacing: tuple[str, str]  # PixelSpacing, row then column
    window: tuple[str, str]  # WindowCenter, WindowWidth


def dicom_slice_bytes(ids, image_id: str, geometry: SliceGeometry, hu: np.ndarray, quirks: dict[str, bool],
                      instance_uid: str, compression=None) -> bytes:
    """One CT slice of HU as a DICOM file in the RSNA style; ``ids`` has patient_id, study_id and series_id.

    ``quirks`` (see ``QUIRK_NAMES``; all False for a plain file) choose the storage, ``compression`` a
    compressed transfer syntax or None.
    """
    meta = FileMetaDataset()
    _element(meta, 0x00020002, "UI", CTImageStorage)
    _element(meta, 0x00020003, "UI", instance_uid)
    _element(meta, 0x00020010, "UI", ImplicitVRLittleEndian if quirks["implicit_vr"] else ExplicitVRLittleEndian)
    _element(meta, 0x00020012, "UI", "1.2.40.0.13.1.1.1")
    _element(meta, 0x00020013, "SH", "dcm4che-1.4.35")
    ds = Dataset()
    ds.file_meta = meta
    _element(ds, 0x00080018, "UI", image_id)
    _element(ds, 0x00080060, "CS", "CT")
    _element(ds, 0x00100020, "LO", ids.patient_id)
    _element(ds, 0x0020000D, "UI", ids.study_id)
    _element(ds, 0x0020000E, "UI", ids.series_id)
    _element(ds, 0x00200010, "SH", "")
    _element(ds, 0x00200032, "DS", list(geometry.position))
    _element(ds, 0x00200037, "DS", list(geometry.orientation))
    _element(ds, 0x00280002, "US", 1)
    _element(ds, 0x00280004, "CS", "MONOCHROME2")
    _element(ds, 0x00280010, "US", hu.shape[0])
    _element(ds, 0x00280011, "US", hu.shape[1])
    _element(ds, 0x00280030, "DS", list(geometry.spacing))
    hu_int = np.rint(hu)
    if quirks["wrap12"]:
        bits, signed, intercept = 12, 0, "0"
        stored = (np.clip(hu_int, -1000, 3095).astype(np.int32) % 4096).astype(np.uint16)
    elif quirks["unsigned12"]:
        bits, signed, intercept = 12, 0, "-1024"
        stored = (np.clip(hu_int, -1024, 3071) + 1024).astype(np.uint16)
    else:
        bits, signed, intercept = 16, 1, "-1024"
        stored = (np.clip(hu_int, -1024, MAX_HU) + 1024).astype(np.int16)
        if quirks["padding"]:
            stored[_outside_field_of_view(stored.shape)] = -2000
    _element(ds, 0x00280100, "US", 16)
    _element(ds, 0x00280101, "US", bits)
    _element(ds, 0x00280102, "US", bits - 1)
    _element(ds, 0x00280103, "US", signed)
    centre, width = geometry.window
    if quirks["multi_window"]:
        centre, width = [f"{round(float(centre)):05d}"] * 2, [f"{round(float(width)):05d}"] * 2
    _element(ds, 0x00281050, "DS", centre)
    _element(ds, 0x00281051, "DS", width)
    _element(ds, 0x00281052, "DS", intercept)
    _element(ds, 0x00281053, "DS", "1")
    _element(ds, 0x7FE00010, "OW", stored.tobytes())
    if compression is not None:
        ds.compress(compression, stored, generate_instance_uid=False)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


PLAIN_FILE = {name: False for name in QUIRK_NAMES}


def _outside_field_of_view(shape: tuple[int, int]) -> np.ndarray:
    rows, cols = (np.arange(n) - (n - 1) / 2 for n in shape)
    return np.hypot(cols[None, :], rows[:, None]) > min(shape) / 2


def _draw_quirks(rng: np.random.Generator, rates: QuirkRates) -> tuple[dict[str, bool], object]:
    """Which quirks one file gets (the storage quirks exclude each other) and its compression."""
    chosen = {name: bool(rng.random() < getattr(rates, name)) for name in QUIRK_NAMES}
    if chosen["wrap12"]:
        chosen["unsigned12"] = chosen["padding"] = False
    if chosen["unsigned12"]:
        chosen["padding"] = False
    if chosen["compressed"]:
        chosen["implicit_vr"] = False
    codec = RLELossless if rng.random() < 0.5 else JPEG2000Lossless
    compression = codec if chosen["compressed"] else None
    return chosen, compression


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_masks(path: Path, image_ids: tuple[str, ...], masks: np.ndarray) -> None:
    """Write a series' masks (n, 5, rows, cols) as a compressed npz, bit-packed, byte-stable."""
    arrays = {"image_ids": np.asarray(image_ids), "subtypes": np.asarray(BLEEDS),
              "shape": np.asarray(masks.shape), "packed": np.packbits(masks, axis=-1)}
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)),
                             buffer.getvalue(), compress_type=zipfile.ZIP_DEFLATED)


def load_masks(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read a series' masks: image ids (slices in z order) and bool masks (n, 5, rows, cols), BLEEDS order."""
    with np.load(path) as archive:
        shape = tuple(archive["shape"])
        masks = np.unpackbits(archive["packed"], axis=-1, count=shape[-1]).astype(bool)
        return [str(i) for i in archive["image_ids"]], masks.reshape(shape)


def series_slices(plan: StudyPlan, seed: int, quirks: QuirkRates):
    """Yield (image_id, HU slice, bleed masks, chosen quirks, file bytes) for a study's slices, base to vertex."""
    phantom = build_phantom(plan, seed)
    rng = np.random.default_rng([seed, plan.number, 1])
    for index, image_id in enumerate(plan.image_ids):
        hu, masks = phantom.render(index, rng)
        chosen, compression = _draw_quirks(rng, quirks)
        instance_uid = f"1.2.840.4267.32.{int(rng.integers(0, 2 ** 62))}{int(rng.integers(0, 2 ** 62))}"
        data = _dicom_bytes(plan, phantom.anatomy, index, hu, chosen, instance_uid, compression)
        if image_id == plan.truncated_image:
            data = data[: len(data) * 3 // 5]
        yield image_id, hu, masks, chosen, data


def study_files(out_dir: Path, plan: StudyPlan) -> tuple[list[Path], Path]:
    """Where a study's slices (in z order) and its masks are written under ``out_dir``."""
    folder = out_dir / f"stage_2_{plan.split}"
    return [folder / f"{i}.dcm" for i in plan.image_ids], out_dir / "truth" / "masks" / f"{plan.series_id}.npz"


def write_study(plan: StudyPlan, out_dir: Path, seed: int, quirks: QuirkRates) -> dict:
    """Render and write one study's files and masks; return its labels and quirk counts."""
    slice_paths, mask_path = study_files(out_dir, plan)
    all_masks = np.zeros((len(plan.image_ids), len(BLEEDS), PIXELS, PIXELS), bool)
    counts = {name: 0 for name in QUIRK_NAMES}
    for index, (_, _, masks, chosen, data) in enumerate(series_slices(plan, seed, quirks)):
        all_masks[index] = masks
        _write_bytes(slice_paths[index], data)
        for name, value in chosen.items():
            counts[name] += value
    save_masks(mask_path, plan.image_ids, all_masks)
    labels = labels_from_masks(all_masks, study_pixel_area_mm2(plan, seed))
    return {"number": plan.number, "labels": labels, "quirks": counts}


# ---------------------------------------------------------------- the dataset

def _wide(plans: list[StudyPlan], labels: dict[int, np.ndarray]) -> pd.DataFrame:
    ids = [i for p in plans for i in p.image_ids]
    values = np.concatenate([labels[p.number] for p in plans]) if plans else np.zeros((0, len(SUBTYPES)))
    return pd.DataFrame(values.astype(int), index=pd.Index(ids, name="image_id"), columns=list(SUBTYPES))


def _write_train_csv(wide: pd.DataFrame, path: Path, rng: np.random.Generator, duplicate: bool) -> str:
    """Kaggle's training CSV: images in no particular order, optionally one image's rows twice."""
    wide = wide.iloc[rng.permutation(len(wide))]
    repeated = ""
    if duplicate and len(wide):
        position = int(rng.integers(0, len(wide)))
        repeated = wide.index[position]
        wide = pd.concat([wide.iloc[: position + 1], wide.iloc[[position]], wide.iloc[position + 1:]])
    write_long(wide, path)
    return repeated


def write_label_tables(out_dir: Path, plans: list, labels: dict[int, np.ndarray], rng: np.random.Generator,
                       duplicate_label_row: bool) -> str:
    """The Kaggle CSVs of a dataset: training labels, the test truth (under ``truth/``), the sample submission.

    ``plans`` need ``number``, ``split`` and ``image_ids``; ``labels`` maps a plan's number to its
    (n, 6) labels. Returns the image whose training rows were written twice ('' for none).
    """
    train = [p for p in plans if p.split == "train"]
    test = [p for p in plans if p.split == "test"]
    repeated = _write_train_csv(_wide(train, labels), out_dir / "stage_2_train.csv", rng, duplicate_label_row)
    test_wide = _wide(test, labels).sort_index()
    write_long(test_wide, out_dir / "truth" / "stage_2_test_labels.csv")
    write_long(test_wide * 0 + 0.5, out_dir / "stage_2_sample_submission.csv")
    return repeated


def summarize(plans: list[StudyPlan], labels: dict[int, np.ndarray]) -> dict:
    """Counts and proportions per split: studies with a bleed, slices per subtype."""
    summary = {}
    for split in ("train", "test"):
        chosen = [p for p in plans if p.split == split]
        if not chosen:
            continue
        stacked = np.concatenate([labels[p.number] for p in chosen])
        summary[split] = {
            "studies": len(chosen),
            "patients": len({p.patient_id for p in chosen}),
            "images": int(len(stacked)),
            "studies_with_bleed": int(sum(labels[p.number][:, -1].any() for p in chosen)),
            "slices_positive": {s: int(stacked[:, k].sum()) for k, s in enumerate(SUBTYPES)},
            "slice_fraction": {s: round(float(stacked[:, k].mean()), 4) for k, s in enumerate(SUBTYPES)},
        }
        summary[split]["study_fraction_with_bleed"] = round(summary[split]["studies_with_bleed"] / len(chosen), 4)
    return summary


def dataset_settings(train_studies: int, test_studies: int, seed: int = 0, quirks: QuirkRates | None = None) -> dict:
    """Everything a dataset is made from, as written to its ``config.json`` (JSON types only)."""
    quirks = QuirkRates() if quirks is None else quirks
    return {"train_studies": train_studies, "test_studies": test_studies, "seed": seed,
            "quirks": dataclasses.asdict(quirks), "bleed_study_fraction": BLEED_STUDY_FRACTION,
            "primary_shares": PRIMARY_SHARES, "co_occurrence": CO_OCCURRENCE,
            "min_label_area_mm2": MIN_LABEL_AREA_MM2, "taper_slices": TAPER_SLICES,
            "end_contrast": END_CONTRAST, "subtypes": list(SUBTYPES), "other_finding_fraction": OTHER_FINDING_FRACTION}


def source_version(*modules) -> dict:
    """The code of ``modules`` (a SHA-256 of their sources) and the versions of the libraries studies are drawn
    and written with: what decides a synthetic dataset's bytes besides its settings."""
    sources = b"".join(Path(module.__file__).read_bytes() for module in modules)
    return {"source_sha256": hashlib.sha256(sources).hexdigest(), "numpy": np.__version__,
            "opencv": cv2.__version__, "pydicom": pydicom.__version__}


def generator_version() -> dict:
    """What decides the bytes of a phantom study besides the settings: this module's code, its findings', and
    the libraries."""
    return source_version(sys.modules[__name__], synthetic_findings)


class DatasetMismatch(ValueError):
    """The output folder holds something other than the dataset asked for: ``found`` holds the settings
    it was made with (None when it holds no synthetic dataset) and ``different`` the names of those that differ."""

    def __init__(self, message: str, found: dict | None = None, different: tuple[str, ...] = ()):
        super().__init__(message)
        self.found, self.different = found, different


def check_generator(out_dir: Path, what: str, found: dict | None, wanted: dict, settings: dict) -> None:
    """Raise DatasetMismatch when ``found`` (the generator version a dataset recorded, or None) is not ``wanted``,
    naming what differs; ``settings`` are the dataset's, for the error."""
    found = found or {}
    if found != wanted:
        parts = ", ".join(f"{key} {found.get(key, 'unrecorded')} (this one: {wanted[key]})"
                          for key in wanted if found.get(key) != wanted[key])
        raise DatasetMismatch(f"{out_dir} holds {what} made by another version of the generator: {parts}",
                              settings, ("generator",))


def _check_same(out_dir: Path, what: str, found: dict, wanted: dict) -> None:
    """Raise DatasetMismatch naming every setting in ``wanted`` that ``found`` has otherwise."""
    different = tuple(key for key in wanted if found.get(key) != wanted[key])
    if different:
        details = ", ".join(f"{key} {found.get(key)!r} (asked for {wanted[key]!r})" for key in different)
        raise DatasetMismatch(f"{out_dir} holds {what} made with {details}", found, different)


def dataset_state(out_dir: str | Path, settings: dict) -> str:
    """``"complete"``, ``"partial"`` (a generation of the same dataset was interrupted) or ``"absent"``.

    Raises DatasetMismatch when ``out_dir`` holds another dataset (a complete one made with other
    ``train_studies``, ``test_studies``, ``seed`` or quirks, a partial one made with any other
    setting, either made by another version of the generator), or files that are no synthetic dataset.
    Writes nothing.
    """
    out_dir = Path(out_dir)
    config_path, progress_path = out_dir / CONFIG_FILE, out_dir / PROGRESS_DIR / PROGRESS_SETTINGS
    if config_path.is_file():
        config = read_json(config_path)
        if config["settings"].get("backgrounds"):
            raise DatasetMismatch(f"{out_dir} holds bleeds inserted into the series of {config['settings']['backgrounds']}, "
                                  "not phantoms: pass that folder as --backgrounds to use it")
        requested = {key: settings[key] for key in REQUESTED_SETTINGS}
        _check_same(out_dir, "a synthetic dataset", config["settings"], requested)
        check_generator(out_dir, "a synthetic dataset", config.get("generator"), generator_version(),
                        config["settings"])
        return "complete"
    if progress_path.is_file():
        progress = read_json(progress_path)
        _check_same(out_dir, "a partly written synthetic dataset", progress, settings)
        check_generator(out_dir, "a partly written synthetic dataset", progress.get("generator"), generator_version(),
                        progress)
        return "partial"
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise DatasetMismatch(f"{out_dir} is not empty and holds no synthetic dataset")
    return "absent"


def _record_path(out_dir: Path, plan: StudyPlan) -> Path:
    return out_dir / PROGRESS_DIR / f"study-{plan.number:05d}.json"


def write_recorded_study(plan: StudyPlan, out_dir: Path, seed: int, quirks: QuirkRates) -> dict:
    """``write_study``, then its result recorded in the progress folder: the study is done."""
    result = write_study(plan, out_dir, seed, quirks)
    write_json(_record_path(out_dir, plan), result)
    return result


def _finished_result(out_dir: Path, plan: StudyPlan) -> dict | None:
    """The recorded result of a study whose files are all there, else None (the study is to be written)."""
    record_path = _record_path(out_dir, plan)
    slice_paths, mask_path = study_files(out_dir, plan)
    if not record_path.is_file() or not all(path.is_file() for path in [*slice_paths, mask_path]):
        return None
    record = read_json(record_path)
    return {**record, "labels": np.asarray(record["labels"], np.float32)}


def _remove_interrupted_writes(out_dir: Path) -> None:
    """Delete the temporary files a killed run left half-written."""
    for path in out_dir.rglob("*"):
        if is_temporary(path) and path.is_file():
            path.unlink()


def write_dataset(out_dir: str | Path, train_studies: int, test_studies: int, seed: int = 0,
                  quirks: QuirkRates | None = None, workers: int | None = None) -> dict:
    """Write a synthetic dataset in the Kaggle layout (with ``truth/``) and return its summary.

    Deterministic for a seed whatever ``workers`` is: every study draws from its own seed.
    Resumable: each finished study is recorded in ``PROGRESS_DIR``, so a rerun after a kill writes
    only the studies not finished or missing a file (files half-written are deleted) and ends with the same bytes as
    an uninterrupted run; ``config.json``, written last, marks the dataset complete, and a rerun on
    a complete dataset writes nothing. Another dataset in ``out_dir`` raises DatasetMismatch.
    """
    out_dir = Path(out_dir)
    quirks = QuirkRates() if quirks is None else quirks
    settings = dataset_settings(train_studies, test_studies, seed, quirks)
    progress = out_dir / PROGRESS_DIR
    state = dataset_state(out_dir, settings)
    if state == "complete":
        shutil.rmtree(progress, ignore_errors=True)
        print(f"{out_dir} already holds this synthetic dataset")
        return read_json(out_dir / CONFIG_FILE)["summary"]
    if state == "absent":
        write_json(progress / PROGRESS_SETTINGS, {**settings, "generator": generator_version()})
    _remove_interrupted_writes(out_dir)
    plans = plan_dataset(train_studies, test_studies, seed, quirks)
    finished = {p.number: _finished_result(out_dir, p) for p in plans}
    results = {number: result for number, result in finished.items() if result is not None}
    if results:
        print(f"{out_dir}: {len(results)} of {len(plans)} studies already written, writing the rest")
    job = partial(write_recorded_study, out_dir=out_dir, seed=seed, quirks=quirks)
    todo = [p for p in plans if p.number not in results]
    results.update((r["number"], r) for r in parallel_map(job, todo, workers=workers, desc="synthetic studies",
                                                          unit="study", chunksize=1))
    labels = {n: r["labels"] for n, r in results.items()}
    repeated = write_label_tables(out_dir, plans, labels, np.random.default_rng([seed, 0xC5F]),
                                  quirks.duplicate_label_row)
    for split, path in (("train", out_dir / "stage_2_train_study_labels.csv"),
                        ("test", out_dir / "truth" / "stage_2_test_study_labels.csv")):
        chosen = [p for p in plans if p.split == split]
        write_study_labels(study_label_table([p.study_id for p in chosen], [labels[p.number] for p in chosen],
                                             [has_other_finding(p, seed) for p in chosen]), path)
    summary = summarize(plans, labels)
    counts = [r["quirks"] for r in results.values()]
    summary["quirks"] = {name: sum(c[name] for c in counts) for name in QUIRK_NAMES} if counts else {}
    summary["truncated_file"] = next((f"stage_2_train/{p.truncated_image}.dcm" for p in plans
                                      if p.truncated_image), "")
    summary["duplicated_label_image"] = repeated
    write_json(out_dir / CONFIG_FILE, {"settings": settings, "generator": generator_version(), "summary": summary})
    shutil.rmtree(progress)
    return summary


# ---------------------------------------------------------------- command line

@dataclass
class Settings:
    """Command-line settings of ``python -m ihd.synthetic``."""

    out: str = "data/synthetic/raw"  # Kaggle layout goes here
    train_studies: int = DEFAULT_SIZE["train_studies"]  # ~40 slices each: ~3,200 training slices
    test_studies: int = DEFAULT_SIZE["test_studies"]  # enough bleeding studies for every subtype in test
    seed: int = 0  # the whole dataset follows from it
    workers: int | None = None  # None: every core
    quirks: bool = True  # real-data quirks at their default rates
    bench: bool = False  # measure slices/s on one core instead of writing a dataset


def bench(slices: int = 80, seed: int = 0) -> dict:
    """Slices per second on one core (CPU time, and wall time): rendering alone, and rendering plus the DICOM write."""
    import tempfile
    plans = plan_dataset(4, 0, seed, QuirkRates.off())
    plan = max(plans, key=lambda p: len(p.subtypes))
    phantom = build_phantom(plan, seed)
    rng = np.random.default_rng(0)
    n = len(plan.image_ids)
    start = time.process_time()
    for i in range(slices):
        phantom.render(i % n, rng)
    render_rate = slices / (time.process_time() - start)
    with tempfile.TemporaryDirectory() as folder:
        start, start_cpu = time.perf_counter(), time.process_time()
        written = 0
        for p in plans:
            write_study(p, Path(folder), seed, QuirkRates())
            written += len(p.image_ids)
        wall_rate = written / (time.perf_counter() - start)
        cpu_rate = written / (time.process_time() - start_cpu)
    return {"render_slices_per_cpu_s": round(render_rate, 1), "write_slices_per_cpu_s": round(cpu_rate, 1),
            "write_slices_per_wall_s": round(wall_rate, 1), "slices_written": written}


def main(argv: list[str] | None = None) -> dict:
    """Write a synthetic dataset (or benchmark the generator) from the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=Settings.out)
    studies = int_in(0, meaning=" studies")
    parser.add_argument("--train-studies", type=studies, default=Settings.train_studies)
    parser.add_argument("--test-studies", type=studies, default=Settings.test_studies)
    parser.add_argument("--small", action="store_true", help=f"the test preset {SMALL}")
    parser.add_argument("--seed", type=int_in(0, meaning=" (random seeds are not negative)"), default=Settings.seed)
    parser.add_argument("--workers", type=int_in(1, meaning=" (worker processes)"), default=None)
    parser.add_argument("--no-quirks", action="store_true")
    parser.add_argument("--bench", action="store_true")
    args = parser.parse_args(argv)
    size = SMALL if args.small else dict(train_studies=args.train_studies, test_studies=args.test_studies)
    settings = Settings(out=args.out, seed=args.seed, workers=args.workers, quirks=not args.no_quirks,
                        bench=args.bench, **size)
    run_header(argv, settings)
    if settings.bench:
        result = bench(seed=settings.seed)
        print(result)
        return result
    try:
        summary = write_dataset(settings.out, settings.train_studies, settings.test_studies, settings.seed,
                                QuirkRates() if settings.quirks else QuirkRates.off(), settings.workers)
    except DatasetMismatch as error:
        raise SystemExit(f"{error}: choose another --out, or delete that folder") from None
    print(summary)
    return summary


if __name__ == "__main__":
    main()
