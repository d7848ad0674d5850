"""Where a series' voxels sit in the patient: orientation, spacing, the voxel-to-patient affine.

DICOM places every slice by ``ImagePositionPatient`` (the centre of its first pixel, mm, in the
patient's LPS frame: x to the patient's left, y to the back, z to the head) and
``ImageOrientationPatient`` (the directions of increasing column and increasing row). With the
slices ordered along the normal, voxel (row r, column c, slice k) lies at
``position[0] + c * col_spacing * row_direction + r * row_spacing * col_direction + k * step``, where
``step`` is the mean vector from one slice position to the next. A tilted gantry makes ``step``
oblique to the slice plane: the affine is then sheared, as the acquisition was, and the voxel
volume is the slice area times the spacing *along the normal*.

NIfTI stores arrays indexed (column, row, slice) with an affine to RAS (x to the right, y to the
front), so ``nifti_affine`` flips the first two axes of the LPS affine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
STEP_TOLERANCE = 0.1  # a slice gap further than 10% from the mean step is not a regular grid
ORIENTATION_TOLERANCE = 1e-3


class GeometryError(ValueError):
    """A series whose slices do not form one regular grid (the message says how)."""


@dataclass(frozen=True)
class SeriesGeometry:
    """The grid of one series: slices in order along the normal, every length in mm."""

    rows: int
    cols: int
    row_spacing_mm: float  # between rows (PixelSpacing[0])
    col_spacing_mm: float  # between columns (PixelSpacing[1])
    orientation: tuple[float, ...]  # ImageOrientationPatient: row direction, then column direction
    positions: np.ndarray  # (n, 3) ImagePositionPatient of each slice, in slice order
    thickness_mm: float = float("nan")  # SliceThickness: the depth of a lone slice's voxels

    @property
    def n_slices(self) -> int:
        """Slices in the series."""
        return len(self.positions)

    @property
    def normal(self) -> np.ndarray:
        """Unit normal of the slice plane (row direction x column direction)."""
        return np.cross(np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:]))

    @property
    def step(self) -> np.ndarray:
        """Mean vector (mm) from one slice position to the next; zeros for a single slice."""
        if self.n_slices < 2:
            return np.zeros(3)
        return (self.positions[-1] - self.positions[0]) / (self.n_slices - 1)

    @property
    def slice_spacing_mm(self) -> float:
        """Distance between slice planes along the normal; for a single slice, its thickness."""
        return float(abs(self.step @ self.normal)) if self.n_slices > 1 else self.thickness_mm

    @property
    def voxel_mm(self) -> tuple[float, float, float]:
        """(row spacing, column spacing, spacing along the normal): their product is a voxel's volume."""
        return self.row_spacing_mm, self.col_spacing_mm, self.slice_spacing_mm

    def lps_affine(self) -> np.ndarray:
        """4x4 affine from (row, column, slice) indices to LPS millimetres."""
        affine = np.eye(4)
        affine[:3, 0] = np.asarray(self.orientation[3:]) * self.row_spacing_mm
        affine[:3, 1] = np.asarray(self.orientation[:3]) * self.col_spacing_mm
        affine[:3, 2] = self.step if self.n_slices > 1 else self.normal
        affine[:3, 3] = self.positions[0]
        return affine

    def nifti_affine(self) -> np.ndarray:
        """4x4 affine from NIfTI (column, row, slice) indices to RAS millimetres."""
        swap = np.eye(4)[[1, 0, 2, 3]]  # (column, row, slice) -> (row, column, slice)
        return LPS_TO_RAS @ self.lps_affine() @ swap


def series_geometry(headers: list[pydicom.Dataset], name: str = "series") -> SeriesGeometry:
    """The grid of ``headers`` (one series, already ordered along the normal); raises GeometryError if irregular."""
    first = headers[0]
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        lacking = [k for k, ds in enumerate(headers) if tag not in ds]
        if lacking:
            raise GeometryError(f"{name}: no {tag} on {len(lacking)} of {len(headers)} slices (first: slice "
                                f"{lacking[0]}), so its voxels cannot be placed or measured")
    thickness = float(first.get("SliceThickness") or "nan")
    if len(headers) == 1 and not thickness > 0:
        raise GeometryError(f"{name}: a single slice without SliceThickness: the depth of its voxels, hence any "
                            "volume, cannot be known")
    orientation = tuple(float(v) for v in first.ImageOrientationPatient)
    for ds in headers[1:]:
        if np.abs(np.asarray(ds.ImageOrientationPatient, float) - orientation).max() > ORIENTATION_TOLERANCE:
            raise GeometryError(f"{name}: slices have different orientations")
        if (int(ds.Rows), int(ds.Columns)) != (int(first.Rows), int(first.Columns)):
            raise GeometryError(f"{name}: slices have different sizes")
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
    geometry = SeriesGeometry(int(first.Rows), int(first.Columns), float(first.PixelSpacing[0]),
                              float(first.PixelSpacing[1]), orientation, positions, thickness)
    if len(headers) > 1:
        gaps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
        mean_gap = np.linalg.norm(geometry.step)
        if mean_gap == 0 or np.abs(gaps - mean_gap).max() > STEP_TOLERANCE * mean_gap:
            raise GeometryError(f"{name}: slice gaps from {gaps.min():.2f} to {gaps.max():.2f} mm, not a regular grid "
                                "(missing or duplicated slices?)")
    return geometry
