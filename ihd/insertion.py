"""Synthetic bleeds painted in 3D into real bleed-free head CT series, written like the synthetic dataset.

    python prepare_data.py --synthetic --backgrounds ../shared/data/real/rsna_normal --dataset inserted

Each output study is one real background series (any folder of bleed-free axial head CT series)
with zero, one or several bleeds painted into it, in the Kaggle layout of ``ihd.synthetic``: the
same DICOM files, slice label CSVs, ``truth/`` test labels and ``truth/masks``; labels follow from
the masks by the same rule. There are no study-label files: the phantom's exam labels come from its
non-bleed findings, which inserted studies do not have (``--study-labels derive`` gives subtype
study labels from the slice labels). Backgrounds must be bleed-free: a bleed already in one cannot be known from the
pixels and would be labeled negative.

Where a bleed goes is found from the background's own anatomy (``ihd.anatomy``): epidural lenses
and subdural crescents against the inner table, intraparenchymal bleeds inside brain tissue,
intraventricular blood layering in the dependent part of the ventricles, subarachnoid blood in the
sulci, fissures and cisterns. Each bleed's blood is drawn at 50-90 HU, its pixels uneven about that
as a real clot's are (a smooth field over a few millimetres); the edges blend with what they cover
(partial volume) and contrast tapers at the ends in z as in the phantom. Blood replaces the local
mean of the tissue it covers and keeps the background's own pixel noise, so its noise is the scan's.
Sizes and co-occurrence follow the phantom's draws.

Every study augments its background first (left-right flip, a small rotation and shift, a small
gain and offset in HU, applied before any window), so that a few heads give many studies. Training
and test studies never share a background patient, and all studies made from one patient share
its new patient id, so folds grouped by patient keep them together.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom

from ihd.anatomy import HeadAnatomy, enclosed_cavity, find_anatomy
from ihd.dicom import MAX_AXIAL_TILT_DEG, DicomError, read_hu, slice_normals, tilt_degrees
from ihd.index import order_series, place_slices, scan_headers
from ihd.io import atomic_path, write_json
from ihd.labels import SUBTYPES, read_long_labels
from ihd.parallel import parallel_map
from ihd.synthetic import (
    BLEED_STUDY_FRACTION,
    BLEEDS,
    CO_OCCURRENCE,
    PLAIN_FILE,
    PRIMARY_SHARES,
    Bleed,
    SliceGeometry,
    allocate_primaries,
    bleed_section,
    dicom_slice_bytes,
    extra_axial_mask,
    hex_ids,
    labels_from_masks,
    lateral_angle,
    save_masks,
    source_version,
    study_rng,
    study_subtypes,
    summarize,
    wrap_angle,
    write_label_tables,
)

LABEL_FILE = "stage_2_train.csv"  # the challenge's slice labels, where a background folder has them
MIN_SLICES = 12
MIN_COVERAGE_MM = 100.0  # skull base to vertex is ~150 mm; less is a partial head
MIN_GAP_MM = 0.1  # closer slices are repeats
MAX_GAP_MM = 10.0  # uneven gaps are fine (real series are thinner through the posterior fossa), holes are not
MIN_HEAD_CAVITY_MM2 = 5000.0  # the bone-enclosed brain on a slice of the upper half of a head series
HEAD_CHECK_HEIGHTS = (0.5, 0.65, 0.8)  # where along the series that slice is looked for
TEST_PATIENT_SHARE = 0.2
PLACEMENT_AREA_SHARE = 0.35  # bleeds are centred on slices whose cranial cavity is at least this share of the largest
EDGE_MM = 0.7  # partial volume at a bleed's edge (Gaussian blur of its mask)
# A clot is not of one density: smoothed over 3.5 mm, real blood under radiologists' masks varies by 4.8-8.3 HU
# (quartiles over CT-ICH's bleeds, bench/blood_appearance.py), one-density blood by 0.9-2.1 (the pixel noise). Each
# bleed's HU varies about its own by a smooth field of this grain, its spread drawn in this range: 4.2-8.8 HU by the
# same measure.
UNEVENNESS_HU = (6.0, 14.0)
UNEVENNESS_GRAIN_MM = 2.0
STUDIES_PER_TASK = 4  # studies handed to a worker at once (consecutive ones share a background)
FLIP_PROBABILITY = 0.5
ROTATION_DEG = 10.0
SHIFT_MM = 10.0
GAIN = 0.03  # HU scale jitter, applied before any window
OFFSET_HU = 3.0


class BackgroundError(ValueError):
    """A folder of backgrounds, or one series in it, that cannot serve as bleed-free head CT."""


@dataclass(frozen=True)
class Background:
    """One usable background series: its files base to vertex and what the writer keeps of their headers."""

    series_id: str
    patient_id: str
    paths: tuple[str, ...]
    heights_mm: tuple[float, ...]  # position along the slice normal, from the first slice
    spacing_mm: float
    geometries: tuple[SliceGeometry, ...]

    @property
    def slice_step_mm(self) -> float:
        """The median distance between neighbouring slices."""
        return float(np.median(np.diff(self.heights_mm)))


@dataclass(frozen=True)
class InsertionPlan:
    """What the dataset-level draw fixes for one study: identifiers, split, subtypes, background."""

    number: int
    split: str
    patient_id: str
    study_id: str
    series_id: str
    image_ids: tuple[str, ...]
    subtypes: tuple[str, ...]
    background: Background


@dataclass(frozen=True)
class Augmentation:
    """How a background is changed before bleeds go in."""

    flip: bool
    rotation_deg: float
    shift_mm: tuple[float, float]  # (right, down) in the image
    gain: float
    offset_hu: float


# ---------------------------------------------------------------- backgrounds

def _text(values) -> tuple[str, ...]:
    return tuple(str(v) for v in values)


def _first(value) -> str:
    return str(value[0]) if isinstance(value, pydicom.multival.MultiValue) else str(value)


def _series_background(series_id: str, rows) -> Background:
    """Check one series' headers and middle slice; raise BackgroundError saying why it cannot serve."""
    datasets = [pydicom.dcmread(path, stop_before_pixels=True) for path in rows["path"]]
    first = datasets[0]
    if str(first.get("Modality", "CT")) != "CT":
        raise BackgroundError(f"modality {first.Modality}, not CT")
    part = str(first.get("BodyPartExamined", "")).upper()
    if part and not any(word in part for word in ("HEAD", "BRAIN", "SKULL", "CRAN")):
        raise BackgroundError(f"body part {part}, not a head")
    lacking = sum("ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds for ds in datasets)
    if lacking:
        raise BackgroundError(f"{lacking} of {len(datasets)} slices lack ImagePositionPatient or "
                              "ImageOrientationPatient: slices cannot be placed in 3D")
    if len({_text(ds.ImageOrientationPatient) for ds in datasets}) > 1:
        raise BackgroundError("slices of different orientations")
    tilt = float(tilt_degrees(slice_normals(np.asarray(first.ImageOrientationPatient, float))))
    if not tilt <= MAX_AXIAL_TILT_DEG:
        raise BackgroundError(f"not axial: slice normal {tilt:.0f} degrees from the body axis (at most "
                              f"{MAX_AXIAL_TILT_DEG:.0f})")
    spacings = {_text(ds.PixelSpacing) for ds in datasets if "PixelSpacing" in ds}
    if len(spacings) != 1 or len({(ds.Rows, ds.Columns) for ds in datasets}) != 1:
        raise BackgroundError("PixelSpacing missing, or spacing or size differing between slices")
    spacing = tuple(float(v) for v in next(iter(spacings)))
    if abs(spacing[0] - spacing[1]) > 1e-3 * spacing[0]:
        raise BackgroundError(f"pixels not square ({spacing[0]} x {spacing[1]} mm)")
    heights = rows["z"].to_numpy(float) - float(rows["z"].iloc[0])
    gaps = np.diff(heights)
    if len(datasets) < MIN_SLICES or heights[-1] < MIN_COVERAGE_MM:
        raise BackgroundError(f"too short: {len(datasets)} slices over {heights[-1]:.0f} mm (a head needs "
                              f"{MIN_SLICES} slices over {MIN_COVERAGE_MM:.0f} mm)")
    if gaps.min() < MIN_GAP_MM or gaps.max() > MAX_GAP_MM:
        raise BackgroundError(f"slice gaps from {gaps.min():.2f} to {gaps.max():.2f} mm: repeated positions or "
                              f"gaps over {MAX_GAP_MM:.0f} mm")
    if not any(enclosed_cavity(read_hu(rows["path"].iloc[int(share * (len(rows) - 1))]), spacing[0]).sum()
               * spacing[0] ** 2 >= MIN_HEAD_CAVITY_MM2 for share in HEAD_CHECK_HEIGHTS):
        raise BackgroundError("no bone-enclosed brain on its middle and upper slices: not a head CT")
    geometries = tuple(SliceGeometry(position=_text(ds.ImagePositionPatient), orientation=_text(ds.ImageOrientationPatient),
                                     spacing=_text(ds.PixelSpacing),
                                     window=(_first(ds.get("WindowCenter", "40")), _first(ds.get("WindowWidth", "80"))))
                       for ds in datasets)
    return Background(series_id, str(rows["patient_id"].iloc[0]), tuple(rows["path"]), tuple(heights.tolist()),
                      spacing[0], geometries)


def find_backgrounds(folder: str | Path, workers: int | None = 1) -> tuple[list[Background], list[str]]:
    """The usable background series under ``folder`` (searched recursively) and a message for each one skipped.

    A series is skipped when it is not CT of a head, too short, without positions, not axial, has
    repeated positions or holes, or is unreadable; damaged DICOM files are skipped too (other files
    are ignored). Where the folder holds the challenge's label file (``stage_2_train.csv`` in the
    Kaggle layout), a series any of whose slices it labels as bleeding is skipped: a bleed already there
    could not be told from the pixels. Each message names the series (or file) and the reason.
    """
    if not Path(folder).is_dir():
        raise BackgroundError(f"{folder}: no such folder of background series")
    headers, unreadable = scan_headers([(folder, "test")], workers=workers)
    headers, unplaced, _ = place_slices(headers)
    bad = pd.concat([unreadable, unplaced], ignore_index=True)
    dicom_like = ~bad["reason"].str.startswith("not a DICOM file") | bad["path"].str.lower().str.endswith(".dcm")
    skipped = [f"{row.path}: {row.reason}, skipped" for row in bad[dicom_like].itertuples()]
    bleeding = _bleeding_images(Path(folder))
    usable = []
    for series_id, rows in order_series(headers).groupby("series_id", sort=True):
        labeled_bleeding = rows["image_id"].isin(bleeding)
        if labeled_bleeding.any():
            skipped.append(f"series {series_id} ({Path(rows['path'].iloc[0]).parent}): {int(labeled_bleeding.sum())} of "
                           f"its slices are labeled as bleeding in {Path(folder) / LABEL_FILE}, not bleed-free, skipped")
            continue
        try:
            usable.append(_series_background(series_id, rows))
        except (BackgroundError, DicomError) as error:
            skipped.append(f"series {series_id} ({Path(rows['path'].iloc[0]).parent}): {error}, skipped")
    return usable, skipped


def _bleeding_images(folder: Path) -> set[str]:
    """The image ids the folder's label file (the Kaggle layout's ``stage_2_train.csv``) says bleed; none without one."""
    path = folder / LABEL_FILE
    if not path.is_file():
        return set()
    labels = read_long_labels(path)
    return set(labels.index[labels["any"] > 0])


# ---------------------------------------------------------------- dataset-level plan

def plan_insertions(backgrounds: list[Background], train_studies: int, test_studies: int, seed: int = 0,
                    folder: str | Path = "") -> list[InsertionPlan]:
    """Identifiers, backgrounds and bleed subtypes of every study; training and test backgrounds from different patients."""
    patients = sorted({b.patient_id for b in backgrounds})
    needed = int(train_studies > 0) + int(test_studies > 0)
    if len(patients) < needed:
        raise BackgroundError(f"{folder}: {len(backgrounds)} usable background series from {len(patients)} patients; "
                              f"{needed} patients are needed (training and test studies never share one)")
    rng = np.random.default_rng([seed, 0x1A5])
    patients = [patients[i] for i in rng.permutation(len(patients))]
    n_test = 0 if not test_studies else max(1, round(TEST_PATIENT_SHARE * len(patients)))
    if train_studies:
        n_test = min(n_test, len(patients) - 1)
    split_patients = {"test": set(patients[:n_test]), "train": set(patients[n_test:])}
    taken: set[str] = set()
    new_patient = dict(zip(patients, hex_ids(rng, len(patients), 8, taken)))
    plans: list[InsertionPlan] = []
    for split, count in (("train", train_studies), ("test", test_studies)):
        pool = [b for b in backgrounds if b.patient_id in split_patients[split]]
        pool = [pool[i] for i in rng.permutation(len(pool))]
        n_bleeding = int(round(BLEED_STUDY_FRACTION * count))
        primaries = allocate_primaries(n_bleeding, rng) + [""] * (count - n_bleeding)
        primaries = [primaries[i] for i in rng.permutation(count)]
        for position, primary in enumerate(primaries):
            background = pool[position % len(pool)]
            study_id, series_id = hex_ids(rng, 2, 10, taken)
            images = tuple(hex_ids(rng, len(background.paths), 9, taken))
            subtypes = study_subtypes(primary, rng) if primary else ()
            plans.append(InsertionPlan(len(plans), split, new_patient[background.patient_id], study_id, series_id,
                                       images, subtypes, background))
    return plans


# ---------------------------------------------------------------- one study

def draw_augmentation(rng: np.random.Generator) -> Augmentation:
    """A random flip, rotation, shift and HU gain and offset."""
    return Augmentation(flip=bool(rng.random() < FLIP_PROBABILITY),
                        rotation_deg=float(rng.uniform(-ROTATION_DEG, ROTATION_DEG)),
                        shift_mm=(float(rng.uniform(-SHIFT_MM, SHIFT_MM)), float(rng.uniform(-SHIFT_MM, SHIFT_MM))),
                        gain=float(rng.uniform(-GAIN, GAIN)), offset_hu=float(rng.uniform(-OFFSET_HU, OFFSET_HU)))


def augment(hu: np.ndarray, augmentation: Augmentation, spacing_mm: float) -> np.ndarray:
    """The series ``hu`` (n, rows, cols) flipped, rotated and shifted in plane (air fills in) and jittered in HU."""
    a = augmentation
    out = hu[:, :, ::-1] if a.flip else hu
    rows, cols = hu.shape[1:]
    matrix = cv2.getRotationMatrix2D(((cols - 1) / 2, (rows - 1) / 2), a.rotation_deg, 1.0)
    matrix[:, 2] += np.asarray(a.shift_mm) / spacing_mm
    out = np.stack([cv2.warpAffine(np.ascontiguousarray(s), matrix, (cols, rows), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=float(hu.min())) for s in out])
    tissue = out > -500
    out[tissue] = out[tissue] * np.float32(1 + a.gain) + np.float32(a.offset_hu)
    return out


def _placement_slices(anatomy: HeadAnatomy, share: float = PLACEMENT_AREA_SHARE) -> np.ndarray:
    areas = anatomy.cavity_areas_mm2()
    return np.flatnonzero(areas >= share * areas.max()) if areas.max() > 0 else np.zeros(0, int)


def draw_bleeds(subtypes: tuple[str, ...], anatomy: HeadAnatomy, heights_mm: np.ndarray,
                rng: np.random.Generator) -> list[Bleed]:
    """The 3D bleeds of a study placed in its background's anatomy (phantom sizes); heights along the series.

    Intraparenchymal centres are brain voxels deep enough for the bleed; ``x_mm``/``y_mm`` are then
    image coordinates (column, row) in mm. Intraventricular ``thickness_mm`` is the depth of the
    layer of blood in the dependent (posterior) part of the ventricles. Subarachnoid blood spreads
    from a sulcus or cistern through the CSF spaces of a sector. A subtype with no place in this
    head (no ventricles found, say) is left out.
    """
    spacing = anatomy.spacing_mm
    step = float(np.median(np.diff(heights_mm)))

    def centre_height(candidates: np.ndarray) -> float:
        return float(heights_mm[int(rng.choice(candidates))] + rng.uniform(-step / 3, step / 3))

    wide_slices = _placement_slices(anatomy, 0.6)
    centres = anatomy.centres_px()
    slices = _placement_slices(anatomy)
    bleeds: list[Bleed] = []
    for subtype in subtypes:
        if subtype == "epidural":
            bleeds.append(Bleed(subtype, centre_height(wide_slices), rng.uniform(8, 14), rng.uniform(65, 90),
                                lateral_angle(rng), rng.uniform(0.25, 0.45), rng.uniform(9, 20)))
        elif subtype == "subdural":
            for _ in range(1 + int(rng.random() < 0.15)):
                bleeds.append(Bleed(subtype, centre_height(slices), rng.uniform(18, 40), rng.uniform(55, 85),
                                    lateral_angle(rng), rng.uniform(0.6, 1.2), rng.uniform(3, 12)))
        elif subtype == "intraparenchymal":
            for _ in range(1 + int(rng.random() < 0.25)):
                radius = float(rng.uniform(4, 20))
                room = anatomy.brain & ~anatomy.ventricles & (anatomy.depth_mm > 0.7 * radius + 4)
                room[np.setdiff1d(np.arange(len(room)), slices)] = False
                voxels = np.argwhere(room)
                if len(voxels) == 0:
                    continue
                index, row, col = voxels[int(rng.integers(0, len(voxels)))]
                bleeds.append(Bleed(subtype, float(heights_mm[index]), radius * rng.uniform(0.8, 1.3),
                                    rng.uniform(60, 88), x_mm=float(col * spacing), y_mm=float(row * spacing),
                                    radius_mm=radius))
        elif subtype == "intraventricular":
            volumes = anatomy.ventricles.sum(axis=(1, 2))
            if volumes.max() == 0:
                continue
            bleeds.append(Bleed(subtype, centre_height(np.flatnonzero(volumes >= 0.5 * volumes.max())),
                                rng.uniform(12, 24), rng.uniform(55, 80), thickness_mm=rng.uniform(4, 20)))
        elif subtype == "subarachnoid":
            spaces = anatomy.sulci.copy()
            spaces[np.setdiff1d(np.arange(len(spaces)), slices)] = False
            voxels = np.argwhere(spaces)
            if len(voxels) == 0:
                continue
            index, row, col = voxels[int(rng.integers(0, len(voxels)))]
            centre = centres[index]
            bleeds.append(Bleed(subtype, float(heights_mm[index]), rng.uniform(12, 30), rng.uniform(50, 68),
                                float(math.atan2(row - centre[0], col - centre[1])), rng.uniform(0.5, 1.4)))
    return bleeds


def _dependent_layer(ventricles: np.ndarray, centre_col: float, layer_px: float) -> np.ndarray:
    """The posterior ``layer_px`` rows of the ventricles on each side of the midline (blood sinks)."""
    out = np.zeros_like(ventricles)
    rows, cols = np.nonzero(ventricles)
    for side in (cols < centre_col, cols >= centre_col):
        if side.any():
            deepest = rows[side].max()
            keep = side & (rows > deepest - layer_px)
            out[rows[keep], cols[keep]] = True
    return out


def bleed_mask(bleed: Bleed, size: float, anatomy: HeadAnatomy, index: int, theta: np.ndarray,
               row_mm: np.ndarray, col_mm: np.ndarray, dz_mm: float, centre_px: np.ndarray) -> np.ndarray:
    """A bleed's cross-section on slice ``index``: where its subtype occurs in this anatomy."""
    cavity, depth = anatomy.cavity[index], anatomy.depth_mm[index]
    if bleed.subtype in ("epidural", "subdural"):
        return extra_axial_mask(bleed, size, theta, depth)
    if bleed.subtype == "intraparenchymal":
        radius = bleed.radius_mm
        blob = ((col_mm - bleed.x_mm) ** 2 + (row_mm - bleed.y_mm) ** 2 + dz_mm ** 2 * (radius / bleed.h_half_mm) ** 2)
        irregular = 1 + 0.15 * np.sin(3 * np.arctan2(row_mm - bleed.y_mm, col_mm - bleed.x_mm) + radius)
        return (blob < (radius * irregular) ** 2) & cavity & (depth > 2) & ~anatomy.ventricles[index]
    if bleed.subtype == "intraventricular":
        return _dependent_layer(anatomy.ventricles[index], centre_px[1], bleed.thickness_mm * size / anatomy.spacing_mm)
    sector = np.abs(wrap_angle(theta - bleed.angle_rad)) < bleed.half_angle_rad * size
    spaces = cv2.dilate(anatomy.sulci[index].astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    return spaces & sector & cavity & ~anatomy.ventricles[index]


def insert_bleeds(hu: np.ndarray, anatomy: HeadAnatomy, bleeds: list[Bleed], heights_mm: np.ndarray,
                  unevenness_hu: list[float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint ``bleeds`` into the series ``hu``: (HU, masks (n, 5, rows, cols) in BLEEDS order).

    Inside a bleed the tissue's local mean gives way to blood; the pixel noise stays. The blood's HU is
    the bleed's own plus a smooth random field (grain ``UNEVENNESS_GRAIN_MM``, spread ``unevenness_hu``
    per bleed, drawn from ``rng`` slice by slice). The blend weight is the mask blurred over ``EDGE_MM``
    (partial volume at the edges) times the bleed's contrast on that slice (partial volume at its ends
    in z), and never reaches outside the cavity.
    """
    out = hu.astype(np.float32).copy()
    masks = np.zeros((len(hu), len(BLEEDS)) + hu.shape[1:], bool)
    step = float(np.median(np.diff(heights_mm)))
    centres = anatomy.centres_px()
    rows, cols = np.mgrid[: hu.shape[1], : hu.shape[2]].astype(np.float32)
    row_mm, col_mm = rows * anatomy.spacing_mm, cols * anatomy.spacing_mm
    edge_px = EDGE_MM / anatomy.spacing_mm
    for index, height in enumerate(heights_mm):
        theta = np.arctan2(rows - centres[index][0], cols - centres[index][1])
        weight = np.zeros(hu.shape[1:], np.float32)
        blood = np.zeros(hu.shape[1:], np.float32)
        for bleed, spread in zip(bleeds, unevenness_hu, strict=True):
            section = bleed_section(bleed, float(height), step)
            if section is None:
                continue
            size, contrast = section
            mask = bleed_mask(bleed, size, anatomy, index, theta, row_mm, col_mm, float(height - bleed.h_centre_mm),
                              centres[index]) & anatomy.cavity[index]
            if not mask.any():
                continue
            masks[index, BLEEDS.index(bleed.subtype)] |= mask
            soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), edge_px) * np.float32(contrast)
            soft = np.maximum(soft, mask * np.float32(contrast)) * anatomy.cavity[index]
            uneven = spread * uneven_field(hu.shape[1:], anatomy.spacing_mm, rng)
            blood = np.where(soft > weight, np.float32(bleed.hu) + uneven, blood)
            weight = np.maximum(weight, soft)
        out[index] += weight * (blood - anatomy.local_mean_hu[index])
    return out, masks


def uneven_field(shape: tuple[int, int], spacing_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth random field of unit spread, float32 ``shape``: white noise blurred over ``UNEVENNESS_GRAIN_MM``.

    Drawn afresh on each slice: smooth in plane only, which suits slices thicker than the grain (RSNA's are
    about 5 mm); on thin slices the blood would flicker from one to the next."""
    field = cv2.GaussianBlur(rng.standard_normal(shape, dtype=np.float32), (0, 0), UNEVENNESS_GRAIN_MM / spacing_mm)
    return field / np.float32(max(float(field.std()), 1e-6))


@lru_cache(maxsize=1)
def read_series_hu(paths: tuple[str, ...]) -> np.ndarray:
    """A background's slices in HU (n, rows, cols), read-only; kept for the next study of the same background."""
    hu = np.stack([read_hu(path) for path in paths])
    hu.flags.writeable = False
    return hu


def render_study(plan: InsertionPlan, seed: int) -> dict:
    """One study's HU (n, rows, cols), masks, labels and the record of what was done to its background."""
    background = plan.background
    rng = study_rng(seed, plan.number)
    augmentation = draw_augmentation(rng)
    hu = augment(read_series_hu(background.paths), augmentation, background.spacing_mm)
    heights = np.asarray(background.heights_mm)
    anatomy = find_anatomy(hu, background.spacing_mm, background.slice_step_mm)
    bleeds = draw_bleeds(plan.subtypes, anatomy, heights, rng)
    texture_rng = np.random.default_rng([seed, plan.number, 2])  # its own stream: the draws above stay as they were
    unevenness = [float(texture_rng.uniform(*UNEVENNESS_HU)) for _ in bleeds]
    painted, masks = insert_bleeds(hu, anatomy, bleeds, heights, unevenness, texture_rng)
    labels = labels_from_masks(masks, background.spacing_mm ** 2)
    record = {"study_id": plan.study_id, "series_id": plan.series_id, "split": plan.split,
              "background_series": background.series_id, "background_patient": background.patient_id,
              "augmentation": dataclasses.asdict(augmentation), "noise_hu": round(anatomy.noise_hu, 2),
              "planned_subtypes": list(plan.subtypes),
              "bleeds": [{**dataclasses.asdict(b), "unevenness_hu": u} for b, u in zip(bleeds, unevenness)],
              "labeled_subtypes": [s for k, s in enumerate(BLEEDS) if labels[:, k].any()]}
    return {"hu": painted, "masks": masks, "labels": labels, "record": record, "anatomy": anatomy}


def write_study(plan: InsertionPlan, out_dir: Path, seed: int) -> dict:
    """Render and write one study's files (plain 16-bit DICOM) and masks; return its labels and record."""
    study = render_study(plan, seed)
    rng = np.random.default_rng([seed, plan.number, 1])
    folder = out_dir / f"stage_2_{plan.split}"
    for index, image_id in enumerate(plan.image_ids):
        instance_uid = f"1.2.840.4267.32.{int(rng.integers(0, 2 ** 62))}{int(rng.integers(0, 2 ** 62))}"
        data = dicom_slice_bytes(plan, image_id, plan.background.geometries[index], study["hu"][index], PLAIN_FILE,
                                 instance_uid)
        with atomic_path(folder / f"{image_id}.dcm") as tmp:
            tmp.write_bytes(data)
    save_masks(out_dir / "truth" / "masks" / f"{plan.series_id}.npz", plan.image_ids, study["masks"])
    return {"number": plan.number, "labels": study["labels"], "record": study["record"]}


# ---------------------------------------------------------------- the dataset

def write_dataset(out_dir: str | Path, backgrounds_dir: str | Path, train_studies: int, test_studies: int,
                  seed: int = 0, workers: int | None = None) -> dict:
    """Write a dataset of bleeds inserted into the backgrounds, in the Kaggle layout; return its summary.

    Skipped backgrounds are printed with the reason; too few usable ones raise ``BackgroundError``
    naming the folder. Deterministic for a seed whatever ``workers`` is.
    """
    out_dir = Path(out_dir)
    backgrounds, skipped = find_backgrounds(backgrounds_dir)
    for message in skipped:
        print(f"background {message}")
    plans = plan_insertions(backgrounds, train_studies, test_studies, seed, backgrounds_dir)
    job = partial(write_study, out_dir=out_dir, seed=seed)
    by_background = sorted(plans, key=lambda p: (p.background.series_id, p.number))  # each worker reads a background once
    results = {r["number"]: r for r in parallel_map(job, by_background, workers=workers, desc="inserted studies",
                                                    unit="study", chunksize=STUDIES_PER_TASK)}
    labels = {n: r["labels"] for n, r in results.items()}
    write_label_tables(out_dir, plans, labels, np.random.default_rng([seed, 0xC5F]), duplicate_label_row=False)
    summary = summarize(plans, labels)
    summary["backgrounds"] = {split: sorted({p.background.series_id for p in plans if p.split == split})
                              for split in ("train", "test")}
    summary["skipped_backgrounds"] = skipped
    write_json(out_dir / "truth" / "insertions.json", [results[n]["record"] for n in sorted(results)])
    settings = {"backgrounds": str(Path(backgrounds_dir).resolve()), "train_studies": train_studies,
                "test_studies": test_studies, "seed": seed, "bleed_study_fraction": BLEED_STUDY_FRACTION,
                "primary_shares": PRIMARY_SHARES, "co_occurrence": CO_OCCURRENCE, "subtypes": SUBTYPES,
                "augmentation": {"flip_probability": FLIP_PROBABILITY, "rotation_deg": ROTATION_DEG,
                                 "shift_mm": SHIFT_MM, "gain": GAIN, "offset_hu": OFFSET_HU}}
    write_json(out_dir / "config.json", {"settings": settings, "generator": generator_version(), "summary": summary})
    return summary


def generator_version() -> dict:
    """What decides the bytes of an inserted dataset besides its settings and backgrounds: the code that reads and
    orders the backgrounds, finds the anatomy, draws the bleeds and writes the files, and the libraries."""
    return source_version(sys.modules[__name__], sys.modules["ihd.anatomy"], sys.modules["ihd.synthetic"],
                          sys.modules["ihd.dicom"], sys.modules["ihd.index"])
