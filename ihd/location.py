"""Where each bleed is, from its mask: side, compartment, region, volume, and thickness of extra-axial ones.

A bleed is one 3D connected component (26-connectivity) of one subtype's mask. Everything is measured
in the patient's frame (LPS, `ihd.geometry`): x to the patient's left, y to the back, z to the head.
The head's own outline sets the reference on every slice: its centre is the centroid of the pixels
above ``HEAD_HU`` (scalp, skull, brain), its midline the sagittal plane through that centre.

- side: `left` or `right` when at least ``SIDE_SHARE`` of the bleed's voxels lie on that side of the
  midline, else `midline` (it spans both sides);
- compartment: fixed by the subtype (`COMPARTMENTS`): epidural, subdural and subarachnoid blood is
  extra-axial, intraparenchymal intra-axial, intraventricular in the ventricles;
- region: `infratentorial` when the bleed's centre lies more than ``TENTORIUM_BELOW_VERTEX_MM`` below
  the vertex and behind the head's centre, else `supratentorial`; `unknown` when the series does not
  reach the vertex (its top slice still shows at least ``VERTEX_AREA_SHARE`` of the head's widest
  cross-section), since then the height cannot be told;
- lobe (supratentorial, not intraventricular): from the bleed centre's place in the head outline on
  its slice, front to back and centre to side: `frontal` (front quarter), `occipital` (back fifth),
  `temporal` (lateral and more than ``TEMPORAL_BELOW_VERTEX_MM`` below the vertex), else `parietal`;
  without a vertex, lateral bleeds are `temporal or parietal`. This is a rule on the head outline,
  not an atlas: a guide for reading, not a measurement;
- volume in mL: voxel count times the voxel volume (slice area times spacing along the normal);
- components under ``MIN_BLEED_ML`` are not listed (they stay in the masks);
- thickness (epidural, subdural): the largest extent of the bleed along a ray from the head centre,
  which over a convexity is the extent perpendicular to the inner table, in mm.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import ndimage

from ihd.geometry import SeriesGeometry
from ihd.synthetic import BLEEDS

HEAD_HU = -300.0  # scalp, bone and brain are above it; air and the pillow's foam below
SIDE_SHARE = 0.8
TENTORIUM_BELOW_VERTEX_MM = 100.0  # adult tentorium, roughly at the level of the external auditory meatus
TEMPORAL_BELOW_VERTEX_MM = 60.0  # the temporal lobes lie below the Sylvian fissure
VERTEX_AREA_SHARE = 0.3
RAY_ANGLES = 720
MIN_BLEED_ML = 0.01  # smaller components (a few voxels) are noise, not findings to list
RAY_STEP_MM = 0.1
COMPARTMENTS = {"epidural": "extra-axial", "subdural": "extra-axial", "subarachnoid": "extra-axial",
                "intraparenchymal": "intra-axial", "intraventricular": "intraventricular"}
EXTRA_AXIAL_COLLECTIONS = ("epidural", "subdural")
TABLE_COLUMNS = ["bleed", "subtype", "compartment", "side", "region", "lobe", "volume_ml", "thickness_mm",
                 "first_slice", "last_slice"]


class HeadFrame:
    """Per slice: the head's centre (row, col) and outline; per series: heights and the vertex."""

    def __init__(self, hu: np.ndarray, geometry: SeriesGeometry):
        self.geometry = geometry
        self.head = np.asarray(hu) > HEAD_HU
        self.area = self.head.sum(axis=(1, 2))
        rows, cols = np.indices(hu.shape[1:])
        with np.errstate(invalid="ignore", divide="ignore"):
            self.centre = np.stack([(self.head * rows).sum(axis=(1, 2)) / self.area,
                                    (self.head * cols).sum(axis=(1, 2)) / self.area], axis=1)
        self.height_mm = geometry.positions[:, 2]
        with_head = np.flatnonzero(self.area > 0)
        top = with_head[np.argmax(self.height_mm[with_head])] if len(with_head) else None
        reaches = top is not None and self.area[top] < VERTEX_AREA_SHARE * self.area.max()
        self.vertex_mm = float(self.height_mm[top]) if reaches else None
        self._half_extents: dict[int, tuple[float, float]] = {}

    def offsets_mm(self, slice_index: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(n, 3) LPS offsets in mm of pixels (rows, cols) of a slice from that slice's head centre."""
        g = self.geometry
        row_direction, col_direction = np.asarray(g.orientation[:3]), np.asarray(g.orientation[3:])
        d_row = (rows - self.centre[slice_index, 0]) * g.row_spacing_mm
        d_col = (cols - self.centre[slice_index, 1]) * g.col_spacing_mm
        return d_col[:, None] * row_direction + d_row[:, None] * col_direction

    def half_extent_mm(self, slice_index: int) -> tuple[float, float]:
        """Half the head's width (x) and length (y) on a slice, in mm (computed once per slice)."""
        if slice_index not in self._half_extents:
            rows, cols = np.nonzero(self.head[slice_index])
            offsets = self.offsets_mm(slice_index, rows, cols)
            self._half_extents[slice_index] = float(np.ptp(offsets[:, 0]) / 2), float(np.ptp(offsets[:, 1]) / 2)
        return self._half_extents[slice_index]


def _side(left_share: float) -> str:
    if left_share >= SIDE_SHARE:
        return "left"
    if left_share <= 1 - SIDE_SHARE:
        return "right"
    return "midline"


def _region_and_lobe(subtype: str, frame: HeadFrame, centre_slice: int, centre_offset: np.ndarray,
                     height_mm: float) -> tuple[str, str]:
    """Supra- or infratentorial, and the lobe (see the module docstring)."""
    below_vertex = None if frame.vertex_mm is None else frame.vertex_mm - height_mm
    if below_vertex is None:
        region = "unknown"
    elif below_vertex > TENTORIUM_BELOW_VERTEX_MM and centre_offset[1] > 0:
        region = "infratentorial"
    else:
        region = "supratentorial"
    if region == "infratentorial" or subtype == "intraventricular":
        return region, ""
    half_width, half_length = frame.half_extent_mm(centre_slice)
    front_back = centre_offset[1] / half_length  # -1 front, +1 back
    lateral = abs(centre_offset[0]) / half_width
    if front_back < -0.5:
        return region, "frontal"
    if front_back > 0.6:
        return region, "occipital"
    if lateral > 0.45:
        if below_vertex is None:
            return region, "temporal or parietal"
        return region, "temporal" if below_vertex > TEMPORAL_BELOW_VERTEX_MM else "parietal"
    return region, "parietal"


def ray_thickness_mm(mask: np.ndarray, centre: tuple[float, float], spacing_mm: tuple[float, float]) -> float:
    """Largest extent (mm) of a 2D mask along rays from ``centre`` (row, col), pixels ``spacing_mm`` (row, col).

    ``centre`` may lie outside ``mask`` (a crop of a slice: pass the centre in the crop's coordinates).
    """
    rows, cols = np.nonzero(mask)
    if not len(rows):
        return 0.0
    distances_mm = np.hypot((rows - centre[0]) * spacing_mm[0], (cols - centre[1]) * spacing_mm[1])
    pixel_mm = math.hypot(*spacing_mm)
    distances = np.arange(max(0.0, distances_mm.min() - pixel_mm), distances_mm.max() + pixel_mm, RAY_STEP_MM)
    angles = np.linspace(0, 2 * np.pi, RAY_ANGLES, endpoint=False)
    sample_rows = np.rint(centre[0] + np.outer(np.sin(angles), distances) / spacing_mm[0]).astype(int)
    sample_cols = np.rint(centre[1] + np.outer(np.cos(angles), distances) / spacing_mm[1]).astype(int)
    inside = (sample_rows >= 0) & (sample_rows < mask.shape[0]) & (sample_cols >= 0) & (sample_cols < mask.shape[1])
    hits = np.zeros(inside.shape, bool)
    hits[inside] = mask[sample_rows[inside], sample_cols[inside]]
    return float(hits.sum(axis=1).max() * RAY_STEP_MM)


def locate_bleeds(masks: np.ndarray, hu: np.ndarray, geometry: SeriesGeometry,
                  min_volume_ml: float = MIN_BLEED_ML) -> pd.DataFrame:
    """One row per bleed (columns TABLE_COLUMNS) of a series' subtype masks (n, rows, cols, 5), BLEEDS order.

    ``hu`` (n, rows, cols) and ``geometry`` describe the same grid as ``masks``. Components smaller
    than ``min_volume_ml`` are left out of the table (they stay in the masks).
    """
    if masks.shape[:3] != hu.shape or masks.shape[1:3] != (geometry.rows, geometry.cols):
        raise ValueError(f"masks {masks.shape[:3]}, slices {hu.shape} and series grid "
                         f"({geometry.n_slices}, {geometry.rows}, {geometry.cols}) differ")
    frame = HeadFrame(hu, geometry)
    voxel_ml = float(np.prod(geometry.voxel_mm)) / 1000.0
    spacing = (geometry.row_spacing_mm, geometry.col_spacing_mm)
    rows_out = []
    for k, subtype in enumerate(BLEEDS):
        components, _ = ndimage.label(masks[..., k], structure=np.ones((3, 3, 3), bool))
        for label, box in enumerate(ndimage.find_objects(components), start=1):
            inside = components[box] == label
            if inside.sum() * voxel_ml < min_volume_ml:
                continue
            slices, rows, cols = np.nonzero(inside)
            slices, rows, cols = slices + box[0].start, rows + box[1].start, cols + box[2].start
            offsets = np.concatenate([frame.offsets_mm(s, rows[slices == s], cols[slices == s]) for s in np.unique(slices)])
            centre_slice = int(np.rint(np.median(slices)))
            region, lobe = _region_and_lobe(subtype, frame, centre_slice, offsets.mean(axis=0), frame.height_mm[centre_slice])
            thickness = math.nan
            if subtype in EXTRA_AXIAL_COLLECTIONS:
                corner = np.array([box[1].start, box[2].start])
                thickness = max(ray_thickness_mm(inside[s - box[0].start], tuple(frame.centre[s] - corner), spacing)
                                for s in np.unique(slices))
            rows_out.append({"subtype": subtype, "compartment": COMPARTMENTS[subtype],
                             "side": _side(float((offsets[:, 0] > 0).mean())), "region": region, "lobe": lobe,
                             "volume_ml": len(slices) * voxel_ml, "thickness_mm": thickness,
                             "first_slice": int(slices.min()), "last_slice": int(slices.max())})
    table = pd.DataFrame(rows_out, columns=TABLE_COLUMNS[1:])
    table.insert(0, "bleed", np.arange(1, len(table) + 1))
    return table
