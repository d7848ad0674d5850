"""Location, volume and thickness of bleeds on a hand-built head whose answers are known."""
import math

import numpy as np
import pytest

from ihd.geometry import SeriesGeometry
from ihd.location import COMPARTMENTS, locate_bleeds, ray_thickness_mm
from ihd.synthetic import BLEEDS

SIZE = 160
CENTRE = 80  # the head is centred here (row and column)
SLICES = 25  # 5 mm apart, z 0 (slice 0) to 120 mm (slice 24, the vertex)


def _head_geometry(row_direction=(1.0, 0.0, 0.0)) -> SeriesGeometry:
    positions = np.array([[0.0, 0.0, 5.0 * k] for k in range(SLICES)])
    return SeriesGeometry(SIZE, SIZE, 1.0, 1.0, (*row_direction, 0.0, 1.0, 0.0), positions)


def _head_hu() -> np.ndarray:
    """A disk of radius 70 mm of soft tissue in air on every slice, shrinking to 20 mm at the vertex."""
    rows, cols = np.indices((SIZE, SIZE))
    radius = np.hypot(rows - CENTRE, cols - CENTRE)
    hu = np.full((SLICES, SIZE, SIZE), -1000.0, np.float32)
    for k in range(SLICES):
        hu[k][radius < (20 if k == SLICES - 1 else 70)] = 40.0
    return hu


def _crescent(inner: float, outer: float, columns_from: int) -> np.ndarray:
    rows, cols = np.indices((SIZE, SIZE))
    radius = np.hypot(rows - CENTRE, cols - CENTRE)
    return (radius >= inner) & (radius < outer) & (cols >= columns_from) & (np.abs(rows - CENTRE) < 20)


def _masks() -> np.ndarray:
    masks = np.zeros((SLICES, SIZE, SIZE, len(BLEEDS)), bool)
    subdural, parenchymal = BLEEDS.index("subdural"), BLEEDS.index("intraparenchymal")
    for k in (14, 15, 16):  # a 6 mm crescent over the patient's left convexity (high columns = patient's left)
        masks[k, ..., subdural] = _crescent(58, 64, CENTRE + 30)
    masks[18:20, 25:35, 60:70, parenchymal] = True  # 2 x 10 x 10 voxels, front (low rows), right of the midline
    masks[1:3, 115:125, 75:85, parenchymal] = True  # low and at the back: posterior fossa, across the midline
    masks[20, 50, 50, BLEEDS.index("epidural")] = True  # one voxel, 0.005 mL: noise, not listed
    return masks


def test_every_bleed_is_located_and_measured():
    table = locate_bleeds(_masks(), _head_hu(), _head_geometry()).set_index("bleed")
    assert len(table) == 3  # the one-voxel speck is left out
    by_subtype = table.groupby("subtype")
    subdural = by_subtype.get_group("subdural").iloc[0]
    assert (subdural.side, subdural.compartment, subdural.region) == ("left", "extra-axial", "supratentorial")
    assert subdural.volume_ml == pytest.approx(_masks()[..., BLEEDS.index("subdural")].sum() * 5 / 1000)
    assert subdural.thickness_mm == pytest.approx(6.0, abs=0.6)
    assert (subdural.first_slice, subdural.last_slice) == (14, 16)
    parenchymal = by_subtype.get_group("intraparenchymal").sort_values("first_slice")
    posterior, frontal = parenchymal.iloc[0], parenchymal.iloc[1]
    assert (frontal.side, frontal.compartment, frontal.region, frontal.lobe) == ("right", "intra-axial", "supratentorial", "frontal")
    assert frontal.volume_ml == pytest.approx(200 * 5 / 1000)
    assert math.isnan(frontal.thickness_mm)
    assert (posterior.side, posterior.region, posterior.lobe) == ("midline", "infratentorial", "")


def test_side_follows_the_orientation_not_the_image():
    """With the row direction pointing to the patient's right, the same pixels are on the other side."""
    table = locate_bleeds(_masks(), _head_hu(), _head_geometry(row_direction=(-1.0, 0.0, 0.0)))
    assert table.set_index("subtype").loc["subdural", "side"] == "right"


def test_region_is_unknown_when_the_series_stops_below_the_vertex():
    hu = _head_hu()
    hu[-1] = hu[-2]  # the top slice is as wide as the others: the head goes on above the series
    table = locate_bleeds(_masks(), hu, _head_geometry())
    assert set(table["region"]) == {"unknown"}
    assert "temporal" not in set(table["lobe"])


def test_voxel_volume_uses_the_spacing_along_the_normal():
    """A tilted series: 5 mm between positions, but the planes are 5 cos(20 deg) mm apart."""
    tilt = math.radians(20)
    geometry = _head_geometry()
    tilted = SeriesGeometry(SIZE, SIZE, 1.0, 1.0, (1.0, 0.0, 0.0, 0.0, math.cos(tilt), -math.sin(tilt)),
                            geometry.positions)
    table = locate_bleeds(_masks(), _head_hu(), tilted)
    frontal = table[table["subtype"] == "intraparenchymal"].sort_values("first_slice").iloc[1]
    assert frontal.volume_ml == pytest.approx(200 * 5 * math.cos(tilt) / 1000)


def test_ray_thickness_of_a_band_is_its_radial_width():
    """12 pixels of 0.5 mm between radii 40 and 52: 6 mm, within one pixel's diagonal (staircase edges)."""
    mask = _crescent(40, 52, 0)
    assert ray_thickness_mm(mask, (CENTRE, CENTRE), (0.5, 0.5)) == pytest.approx(6.0, abs=0.5 * math.sqrt(2))
    assert ray_thickness_mm(mask, (CENTRE, CENTRE), (1.0, 1.0)) == pytest.approx(12.0, abs=math.sqrt(2))
    assert ray_thickness_mm(np.zeros((8, 8), bool), (4, 4), (1.0, 1.0)) == 0.0


def test_compartments_cover_every_subtype():
    assert set(COMPARTMENTS) == set(BLEEDS)
