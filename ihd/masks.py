"""Bleed masks in: the synthetic truth, a folder of PNG masks beside DICOM slices, NIfTI label volumes.

Every source becomes a `MaskSet`: slices in HU at the model's size, their masks as (n, size, size, 6)
int8 in SUBTYPES order (1 blood, 0 none, `UNKNOWN` where the source does not say: a PNG mask
tells blood from no blood, not which subtype), the case each slice belongs to, and the size of its
voxels at the model's size (so volumes can be measured there).

What cannot be used is named, with the reason, in a list of `BadInput` and skipped; the rest is
kept: a mask whose size differs from its slice, a mask without a slice, a slice without a mask, a
label volume whose geometry differs from its series, a file that cannot be read.

Layouts read:

- synthetic (`ihd.synthetic`): ``truth/masks/<series>.npz`` beside ``stage_2_<split>/<image>.dcm``;
- a PNG mask folder (the CT-ICH layout): ``images/<name>.dcm`` and ``masks/<name>.png``, matched by
  name, any non-zero mask pixel being blood, and optionally ``labels.csv`` with each slice's subtypes;
- NIfTI label volumes: ``<SeriesInstanceUID>.nii[.gz]`` in one folder, matched to the series of a
  DICOM folder; voxel value ``LABEL_VALUES[subtype]`` (1 to 5, BLEEDS order), 0 for no blood, on the
  series' own voxels in any axis order and direction (`ihd.mask_export.write_nifti` writes them in
  (column, row, slice) order; converters such as dcm2niix flip rows).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
from tqdm.auto import tqdm

from ihd.dicom import DicomError, read_header, read_hu
from ihd.geometry import LPS_TO_RAS, GeometryError, SeriesGeometry, series_geometry
from ihd.index import list_files
from ihd.io import atomic_path
from ihd.labels import ANY, SUBTYPES
from ihd.slices import to_model_hu
from ihd.synthetic import BLEEDS, load_masks

UNKNOWN = -1
LABEL_VALUES = {subtype: k + 1 for k, subtype in enumerate(BLEEDS)}
GRID_TOLERANCE_MM = 0.05
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class BadInput:
    """One file that was skipped, and why."""

    path: str
    reason: str


@dataclass
class MaskSet:
    """Slices and their masks at the model's size; rows of every array are slices."""

    hu: np.ndarray  # (n, size, size) float32 HU
    masks: np.ndarray  # (n, size, size, 6) int8: 1 blood, 0 none, UNKNOWN not said, SUBTYPES order
    cases: np.ndarray  # (n,) str: the series (or lone slice) each slice belongs to: volumes and mean Dice are per case
    patients: np.ndarray  # (n,) str: the patient of each slice; training and validation never share one
    voxel_mm: np.ndarray  # (n, 3): row, column and slice spacing of a model-size voxel (NaN slice spacing if unknown)
    names: list[str] = field(default_factory=list)  # one source name per slice, for reports

    def __len__(self) -> int:
        return len(self.hu)

    def subset(self, rows: np.ndarray) -> "MaskSet":
        """The slices at ``rows``."""
        return MaskSet(self.hu[rows], self.masks[rows], self.cases[rows], self.patients[rows], self.voxel_mm[rows],
                       [self.names[i] for i in rows])


def empty_set(size: int) -> MaskSet:
    """A MaskSet with no slices."""
    return MaskSet(np.zeros((0, size, size), np.float32), np.zeros((0, size, size, len(SUBTYPES)), np.int8),
                   np.zeros(0, str), np.zeros(0, str), np.zeros((0, 3)), [])


def concatenate(sets: list[MaskSet], size: int) -> MaskSet:
    """One MaskSet holding the slices of ``sets`` in order."""
    sets = [s for s in sets if len(s)] or [empty_set(size)]
    return MaskSet(np.concatenate([s.hu for s in sets]), np.concatenate([s.masks for s in sets]),
                   np.concatenate([s.cases for s in sets]), np.concatenate([s.patients for s in sets]),
                   np.concatenate([s.voxel_mm for s in sets]),
                   [n for s in sets for n in s.names])


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A boolean (rows, cols) mask at ``size`` x ``size``: a pixel is blood when blood covers half of it or more."""
    mask = np.asarray(mask, bool)
    if mask.shape == (size, size):
        return mask
    return cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) >= 0.5


def model_voxel_mm(voxel_mm: tuple[float, float, float], rows: int, cols: int, size: int) -> tuple[float, float, float]:
    """The voxel of a (rows, cols) slice once resized to size x size."""
    return voxel_mm[0] * rows / size, voxel_mm[1] * cols / size, voxel_mm[2]


def write_bad_inputs(path: str | Path, bad: list[BadInput]) -> Path:
    """Write ``path,reason`` for every skipped input (a header only when there is none)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason"])
        writer.writerows([(b.path, b.reason) for b in bad])
    return Path(path)


def _subtype_truth(masks_5: np.ndarray, size: int) -> np.ndarray:
    """(5, rows, cols) bool subtype masks -> (size, size, 6) int8 with `any` their union."""
    out = np.zeros((size, size, len(SUBTYPES)), np.int8)
    for k in range(len(BLEEDS)):
        out[..., k] = resize_mask(masks_5[k], size)
    out[..., ANY] = resize_mask(masks_5.any(axis=0), size)
    return out


# ---------------------------------------------------------------- synthetic truth

def _header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def synthetic_set(raw_dir: str | Path, split: str, size: int, bad: list[BadInput],
                  cases: set[str] | None = None) -> MaskSet:
    """The slices of one split of a synthetic dataset (``raw_dir`` in the Kaggle layout) with their true masks;
    with ``cases``, only those series."""
    raw_dir = Path(raw_dir)
    folder = raw_dir / f"stage_2_{split}"
    mask_files = sorted((raw_dir / "truth" / "masks").glob("*.npz"))
    if not mask_files:
        raise FileNotFoundError(f"{raw_dir / 'truth' / 'masks'}: no mask files (write a synthetic dataset first)")
    if cases is not None:
        mask_files = [path for path in mask_files if path.stem in cases]
    parts = []
    for mask_path in tqdm(mask_files, desc=f"synthetic {split} masks", unit="series"):
        image_ids, masks = load_masks(mask_path)
        paths = [folder / f"{i}.dcm" for i in image_ids]
        if not paths[0].exists() and not paths[-1].exists():
            continue  # a series of the other split
        parts.append(_series_with_masks(mask_path.stem, paths, [m for m in masks], size, bad))
    return concatenate(parts, size)


def _series_with_masks(series: str, paths: list[Path], masks_5: list[np.ndarray], size: int,
                       bad: list[BadInput]) -> MaskSet:
    """One series' readable slices (with masks of the same size) at the model's size."""
    headers, hu, truth, names = [], [], [], []
    for path, mask in zip(paths, masks_5):
        try:
            slice_hu = read_hu(path)
        except DicomError as error:
            bad.append(BadInput(str(path), error.reason))
            continue
        if slice_hu.shape != mask.shape[-2:]:
            bad.append(BadInput(str(path), f"mask {mask.shape[-2:]} differs in size from its slice {slice_hu.shape}"))
            continue
        headers.append(_header(path))
        hu.append(to_model_hu(slice_hu, size))
        truth.append(_subtype_truth(mask, size))
        names.append(str(path))
    if not hu:
        return empty_set(size)
    try:
        geometry = series_geometry(headers, series)
        voxel = model_voxel_mm(geometry.voxel_mm, geometry.rows, geometry.cols, size)
    except GeometryError:  # say, a slice left out above: each slice still trains, volumes cannot be measured
        voxel = (math.nan, math.nan, math.nan)
    patient = str(headers[0].get("PatientID", "")) or series
    return MaskSet(np.stack(hu), np.stack(truth), np.full(len(hu), series), np.full(len(hu), patient),
                   np.tile(voxel, (len(hu), 1)), names)


# ---------------------------------------------------------------- PNG mask folders

def slice_labels(labels_csv: Path) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """Per slice name (file stem), the 0/1 subtypes of a CT-ICH style ``labels.csv`` (columns named like the
    subtypes, any case; a ``file`` column with the image file name), and its patient where a ``patient``
    column says; ({}, {}) when there is no such file."""
    if not labels_csv.is_file():
        return {}, {}
    table = pd.read_csv(labels_csv)
    columns = {c.lower(): c for c in table.columns}
    missing = [s for s in BLEEDS if s not in columns]
    if "file" not in columns or missing:
        raise ValueError(f"{labels_csv}: needs a file column and one column per subtype (missing {missing or 'file'})")
    values = table[[columns[s] for s in BLEEDS]].apply(pd.to_numeric, errors="coerce").to_numpy()
    bad = ~np.isin(values, (0, 1)).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(f"{labels_csv}: row {row + 2} ({table[columns['file']].iloc[row]}): every subtype must be 0 or 1")
    stems = [Path(str(f)).stem for f in table[columns["file"]]]
    subtypes = {stem: dict(zip(BLEEDS, map(int, row))) for stem, row in zip(stems, values)}
    patients = dict(zip(stems, table[columns["patient"]].astype(str))) if "patient" in columns else {}
    return subtypes, patients


def png_truth(blood: np.ndarray, subtypes: dict[str, int] | None) -> np.ndarray:
    """(size, size, 6) int8 truth of one PNG mask: `any` from the mask; a subtype the labels say is absent
    is known empty; the only subtype present (when the labels name exactly one) owns the whole mask;
    the rest is UNKNOWN."""
    labels = np.full((*blood.shape, len(SUBTYPES)), UNKNOWN, np.int8)
    labels[..., ANY] = blood
    if subtypes:
        present = [s for s in BLEEDS if subtypes[s]]
        for k, subtype in enumerate(BLEEDS):
            if not subtypes[subtype]:
                labels[..., k] = 0
            elif len(present) == 1:
                labels[..., k] = blood
    return labels


def png_mask_set(folder: str | Path, size: int, bad: list[BadInput], non_ct_as_hu: bool = False,
                 cases: set[str] | None = None) -> MaskSet:
    """Slices ``images/<name>.dcm`` and masks ``masks/<name>.png`` matched by name (with ``cases``, only those
    names; see `png_truth` for
    what ``labels.csv``, when present, adds to the blood-or-not of the mask; its ``patient`` column keeps a
    patient's slices on one side of the training/validation split). ``non_ct_as_hu`` reads
    slices of other modalities as HU (CT-ICH's exports are Modality OT holding raw HU); without it
    they are bad inputs, named with the reason.

    Pixel spacing is unknown in this layout (CT-ICH has none), so voxel sizes are NaN: volumes
    cannot be measured from these masks.
    """
    folder = Path(folder)
    images = {p.stem: p for p in sorted((folder / "images").glob("*.dcm"))}
    masks = {p.stem: p for p in sorted((folder / "masks").glob("*.png"))}
    if not images and not masks:
        raise FileNotFoundError(f"{folder}: no images/*.dcm and no masks/*.png")
    bad.extend(BadInput(str(masks[n]), "mask without a slice (no images/" + n + ".dcm)") for n in sorted(masks.keys() - images.keys()))
    bad.extend(BadInput(str(images[n]), "slice without a mask (no masks/" + n + ".png)") for n in sorted(images.keys() - masks.keys()))
    subtypes, patients = slice_labels(folder / "labels.csv")
    hu, truth, names = [], [], []
    for name in sorted(images.keys() & masks.keys()):
        if cases is not None and name not in cases:
            continue
        mask = cv2.imread(str(masks[name]), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            bad.append(BadInput(str(masks[name]), "not a readable PNG image"))
            continue
        try:
            slice_hu = read_hu(images[name], non_ct_as_hu)
        except DicomError as error:
            bad.append(BadInput(str(images[name]), error.reason))
            continue
        if mask.shape != slice_hu.shape:
            bad.append(BadInput(str(masks[name]), f"mask {mask.shape} differs in size from its slice {slice_hu.shape}"))
            continue
        hu.append(to_model_hu(slice_hu, size))
        truth.append(png_truth(resize_mask(mask > 0, size), subtypes.get(name)))
        names.append(name)
    if not hu:
        return empty_set(size)
    # Each slice is its own case: a folder of single slices has no volumes, and "mean Dice" is per slice.
    # Its patient is the labels' (several slices of one head), else the slice itself.
    return MaskSet(np.stack(hu), np.stack(truth), np.array(names), np.array([patients.get(n, n) for n in names]),
                   np.full((len(hu), 3), np.nan), names)


# ---------------------------------------------------------------- NIfTI label volumes

def dicom_series(folder: str | Path, bad: list[BadInput]) -> dict[str, list[Path]]:
    """The series of a DICOM folder: SeriesInstanceUID -> file paths ordered along the slice normal."""
    found: dict[str, list[tuple[float, str, Path]]] = {}
    for path in list_files(folder):
        try:
            header = read_header(path)
        except DicomError as error:
            bad.append(BadInput(str(path), error.reason))
            continue
        found.setdefault(header.series_id, []).append((header.z, header.image_id, path))
    return {series: [p for _, _, p in sorted(items)] for series, items in found.items()}


def _nifti_series_uid(path: Path) -> str:
    name = path.name
    return next(name[: -len(s)] for s in NIFTI_SUFFIXES if name.endswith(s))


def labels_on_series_grid(labels: np.ndarray, affine: np.ndarray, geometry: SeriesGeometry) -> np.ndarray:
    """A NIfTI label array as (slices, rows, cols) on the series' grid; GeometryError when it is on another grid.

    The volume may store the series' voxels in any axis order and direction (as converters such as
    dcm2niix do): its affine says which. What is refused is a grid that is not the series' own:
    shifted, rotated, resampled, or of another size (tolerance ``GRID_TOLERANCE_MM``).
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise GeometryError(f"label volume has {labels.ndim} dimensions, not 3")
    to_series = np.linalg.inv(geometry.lps_affine()) @ LPS_TO_RAS @ np.asarray(affine, float)  # NIfTI index -> series index
    axes = np.abs(to_series[:3, :3]).argmax(axis=1)  # for each series axis (row, column, slice), its NIfTI axis
    signs = np.sign(to_series[np.arange(3), axes])
    shape = (geometry.rows, geometry.cols, geometry.n_slices)
    if len(set(axes)) != 3:
        raise GeometryError("label volume's axes do not run along the series' rows, columns and slices")
    reordered = np.transpose(labels, axes)
    if reordered.shape != shape:
        raise GeometryError(f"label volume of shape {labels.shape} holds a (rows, columns, slices) grid of "
                            f"{reordered.shape}, the series {shape}")
    ideal = np.eye(4)  # NIfTI index -> series index when the volume is the series' grid reordered
    ideal[:3, :3] = 0
    ideal[np.arange(3), axes] = signs
    ideal[:3, 3] = np.where(signs < 0, np.array(shape) - 1, 0)
    corners = np.array([[i, j, k, 1] for i in (0, labels.shape[0] - 1) for j in (0, labels.shape[1] - 1)
                        for k in (0, labels.shape[2] - 1)], float)
    voxel_mm = np.array([geometry.row_spacing_mm, geometry.col_spacing_mm, geometry.slice_spacing_mm])
    error_mm = np.linalg.norm((corners @ (to_series - ideal).T)[:, :3] * voxel_mm, axis=1).max()
    if error_mm > GRID_TOLERANCE_MM:
        raise GeometryError(f"label volume's affine puts it off the series' grid (by up to {error_mm:.3g} mm)")
    flips = tuple(a for a in range(3) if signs[a] < 0)
    return np.transpose(np.flip(reordered, flips) if flips else reordered, (2, 0, 1))


def nifti_label_set(nifti_dir: str | Path, dicom_dir: str | Path, size: int, bad: list[BadInput],
                    cases: set[str] | None = None) -> MaskSet:
    """Label volumes ``<SeriesInstanceUID>.nii[.gz]`` matched to the series of ``dicom_dir``, at the model's size;
    with ``cases``, only those series."""
    import nibabel

    volumes = {_nifti_series_uid(p): p for p in sorted(Path(nifti_dir).iterdir()) if p.name.endswith(NIFTI_SUFFIXES)}
    series = dicom_series(dicom_dir, bad)
    bad.extend(BadInput(str(volumes[s]), f"label volume without a series (no series {s} in {dicom_dir})")
               for s in sorted(volumes.keys() - series.keys()))
    bad.extend(BadInput(str(series[s][0].parent), f"series {s} without a label volume in {nifti_dir}")
               for s in sorted(series.keys() - volumes.keys()))
    parts = []
    for uid in sorted(volumes.keys() & series.keys()):
        if cases is not None and uid not in cases:
            continue
        paths = series[uid]
        try:
            geometry = series_geometry([_header(p) for p in paths], uid)
            image = nibabel.load(volumes[uid])
            labels = np.asarray(image.dataobj)
        except (GeometryError, OSError, ValueError, nibabel.filebasedimages.ImageFileError) as error:
            bad.append(BadInput(str(volumes[uid]), str(error)))
            continue
        values = set(np.unique(labels).tolist()) - {0, *LABEL_VALUES.values()}
        if values:
            bad.append(BadInput(str(volumes[uid]), f"label values {sorted(values)[:5]} are not 0 or "
                                                   f"{min(LABEL_VALUES.values())}..{max(LABEL_VALUES.values())}"))
            continue
        try:
            by_slice = labels_on_series_grid(labels, image.affine, geometry)
        except GeometryError as error:
            bad.append(BadInput(str(volumes[uid]), str(error)))
            continue
        masks_5 = [np.stack([by_slice[k] == LABEL_VALUES[s] for s in BLEEDS]) for k in range(len(paths))]
        parts.append(_series_with_masks(uid, paths, masks_5, size, bad))
    return concatenate(parts, size)
