"""Masks in and out: synthetic truth, PNG mask folders, NIfTI label volumes, DICOM SEG, overlays; bad input."""
import copy
import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from ihd.geometry import GeometryError, series_geometry
from ihd.mask_export import COLOURS_RGB, label_volume, write_nifti, write_overlay, write_seg
from ihd.masks import (
    ANY, LABEL_VALUES, UNKNOWN, BadInput, dicom_series, nifti_label_set, png_mask_set, resize_mask, slice_labels,
    synthetic_set, write_bad_inputs,
)
from ihd.synthetic import BLEEDS, load_masks

PARENCHYMAL = BLEEDS.index("intraparenchymal")
SUBDURAL = BLEEDS.index("subdural")


@pytest.fixture(scope="module")
def rsna_series(real_data):
    """The real tilted RSNA series: its folder, series UID, ordered headers and geometry."""
    folder = real_data / "rsna_series"
    series = dicom_series(folder, [])
    (uid, paths), = series.items()
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return folder, uid, headers, series_geometry(headers, uid)


def _known_masks(geometry):
    """A parenchymal box on slices 3-5 and a subdural strip on slice 10, on the series' grid."""
    masks = np.zeros((geometry.n_slices, geometry.rows, geometry.cols, len(BLEEDS)), bool)
    masks[3:6, 200:240, 300:332, PARENCHYMAL] = True
    masks[10, 100:108, 150:350, SUBDURAL] = True
    return masks


def test_geometry_of_the_tilted_series(rsna_series):
    _, _, headers, geometry = rsna_series
    assert geometry.n_slices == 32
    positions_z = [float(h.ImagePositionPatient[2]) for h in headers]
    assert positions_z == sorted(positions_z)  # ordered along the normal, which points to the head here
    tilt_cos = float(headers[0].ImageOrientationPatient[4])
    assert geometry.slice_spacing_mm == pytest.approx(np.linalg.norm(geometry.step) * tilt_cos, rel=1e-6)
    lps = geometry.lps_affine() @ np.array([7, 11, 5, 1.0])  # row 7, column 11, slice 5
    expected = (np.asarray(headers[5].ImagePositionPatient, float) + 11 * geometry.col_spacing_mm * np.asarray(
        headers[5].ImageOrientationPatient[:3], float) + 7 * geometry.row_spacing_mm * np.asarray(headers[5].ImageOrientationPatient[3:], float))
    assert lps[:3] == pytest.approx(expected, abs=0.05)


def test_geometry_refuses_a_gap(rsna_series):
    _, uid, headers, _ = rsna_series
    with pytest.raises(GeometryError, match="not a regular grid"):
        series_geometry(headers[:10] + headers[11:], uid)


def test_geometry_refuses_a_slice_without_position_and_a_lone_slice_without_thickness(rsna_series):
    _, uid, headers, _ = rsna_series
    headers = copy.deepcopy(headers)
    del headers[7].ImagePositionPatient
    with pytest.raises(GeometryError, match="no ImagePositionPatient on 1 of 32 slices \\(first: slice 7\\)"):
        series_geometry(headers, uid)
    lone = headers[0]
    lone.SliceThickness = "5.0"
    assert series_geometry([lone], uid).voxel_mm[2] == 5.0
    del lone.SliceThickness
    with pytest.raises(GeometryError, match="a single slice without SliceThickness"):
        series_geometry([lone], uid)


def test_nifti_round_trip_and_alignment(rsna_series, tmp_path):
    import nibabel

    folder, uid, headers, geometry = rsna_series
    masks = _known_masks(geometry)
    path = write_nifti(tmp_path / "labels" / f"{uid}.nii.gz", masks, geometry)
    image = nibabel.load(path)
    data = np.asarray(image.dataobj)
    assert data.shape == (geometry.cols, geometry.rows, geometry.n_slices)
    assert data[310, 220, 4] == LABEL_VALUES["intraparenchymal"] and data[200, 104, 10] == LABEL_VALUES["subdural"]
    assert (data > 0).sum() == masks.sum()
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 0  # tilted: sheared grid
    ras = image.affine @ np.array([11, 7, 5, 1.0])  # NIfTI index (column, row, slice)
    lps = geometry.lps_affine() @ np.array([7, 11, 5, 1.0])
    assert ras[:3] == pytest.approx(lps[:3] * [-1, -1, 1], abs=1e-3)

    bad = []
    loaded = nifti_label_set(tmp_path / "labels", folder, 64, bad)
    assert bad == []
    assert len(loaded) == geometry.n_slices
    expected = resize_mask(masks[4, ..., PARENCHYMAL], 64)
    assert np.array_equal(loaded.masks[4, ..., PARENCHYMAL] > 0, expected)
    assert np.array_equal(loaded.masks[..., ANY] > 0, loaded.masks[..., :ANY].max(axis=-1) > 0)
    assert len(nifti_label_set(tmp_path / "labels", folder, 64, [], cases={"another series"})) == 0
    assert len(nifti_label_set(tmp_path / "labels", folder, 64, [], cases={uid})) == geometry.n_slices
    assert loaded.voxel_mm[0] == pytest.approx([geometry.row_spacing_mm * 8, geometry.col_spacing_mm * 8,
                                                geometry.slice_spacing_mm])


def test_nifti_stored_in_another_axis_order_is_read_on_the_series_grid(rsna_series, tmp_path):
    """Rows flipped and the (row, column) axes swapped, the affine saying so: the same labels come back."""
    import nibabel

    folder, uid, _, geometry = rsna_series
    masks = _known_masks(geometry)
    written = nibabel.load(write_nifti(tmp_path / "ours.nii.gz", masks, geometry))
    data = np.asarray(written.dataobj)  # (column, row, slice)
    other = np.flip(np.transpose(data, (1, 0, 2)), axis=0)  # (row reversed, column, slice)
    swap_and_flip = np.eye(4)[[1, 0, 2, 3]]  # other's index (r', c, k) -> ours (c, rows - 1 - r', k)
    swap_and_flip[1] = [-1, 0, 0, geometry.rows - 1]
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    nibabel.save(nibabel.Nifti1Image(other, written.affine @ swap_and_flip), labels_dir / f"{uid}.nii.gz")
    bad = []
    loaded = nifti_label_set(labels_dir, folder, 64, bad)
    assert bad == []
    assert np.array_equal(loaded.masks[4, ..., PARENCHYMAL] > 0, resize_mask(masks[4, ..., PARENCHYMAL], 64))
    assert np.array_equal(loaded.masks[10, ..., SUBDURAL] > 0, resize_mask(masks[10, ..., SUBDURAL], 64))


def test_nifti_on_another_grid_is_named_and_skipped(rsna_series, tmp_path):
    import nibabel

    folder, uid, _, geometry = rsna_series
    masks = _known_masks(geometry)
    labels_dir = tmp_path / "labels"
    path = write_nifti(labels_dir / f"{uid}.nii.gz", masks, geometry)
    shifted = nibabel.load(path)
    affine = shifted.affine.copy()
    affine[2, 3] += 5.0  # one slice up
    nibabel.save(nibabel.Nifti1Image(np.asarray(shifted.dataobj), affine), path)
    write_nifti(labels_dir / "1.2.3.4.nii.gz", masks, geometry)  # no such series
    bad = []
    loaded = nifti_label_set(labels_dir, folder, 64, bad)
    assert len(loaded) == 0
    reasons = {b.path: b.reason for b in bad}
    assert "off the series' grid" in reasons[str(path)]
    assert "without a series" in reasons[str(labels_dir / "1.2.3.4.nii.gz")]

    nibabel.save(nibabel.Nifti1Image(np.asarray(shifted.dataobj)[..., :-1], shifted.affine), path)
    bad = []
    nifti_label_set(labels_dir, folder, 64, bad)
    assert "shape" in {b.path: b.reason for b in bad}[str(path)]


def test_seg_references_the_series_and_holds_the_masks(rsna_series, tmp_path):
    import highdicom

    _, uid, headers, geometry = rsna_series
    masks = _known_masks(geometry)
    path = write_seg(tmp_path / "seg.dcm", headers, masks, geometry, "ihd-unet", "test")
    seg = highdicom.seg.segread(path)
    assert seg.Modality == "SEG"
    assert seg.StudyInstanceUID == headers[0].StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {h.SOPInstanceUID for h in headers}
    assert [seg.get_segment_description(LABEL_VALUES[s]).SegmentLabel for s in BLEEDS] == list(BLEEDS)
    source_uids = [h.SOPInstanceUID for h in headers]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=source_uids,
                                               segment_numbers=[LABEL_VALUES[s] for s in BLEEDS],
                                               ignore_spatial_locations=False)
    assert np.array_equal(pixels.astype(bool), masks)
    frame_positions = {tuple(np.round(f.PlanePositionSequence[0].ImagePositionPatient, 3))
                       for f in seg.PerFrameFunctionalGroupsSequence}
    source_positions = {tuple(np.round(np.asarray(h.ImagePositionPatient, float), 3)) for h in headers}
    assert frame_positions <= source_positions


def test_overlay_colours_the_mask_only(tmp_path):
    hu = np.full((32, 32), 40.0, np.float32)
    masks = np.zeros((32, 32, len(BLEEDS)), bool)
    masks[10:20, 10:20, SUBDURAL] = True
    path = write_overlay(tmp_path / "o.png", hu, masks)
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB).astype(int)
    grey = rgb[30, 30]
    assert grey[0] == grey[1] == grey[2]
    inside = rgb[15, 15]
    red, green, _ = COLOURS_RGB["subdural"]
    assert inside[0] > grey[0] and inside[1] < grey[1]  # towards magenta
    assert label_volume(masks[None])[0, 15, 15] == LABEL_VALUES["subdural"]


def test_png_mask_folder_with_bad_files(real_data, tmp_path):
    source = real_data / "ctich_masks"
    folder = tmp_path / "masks_folder"
    shutil.copytree(source, folder)
    (folder / "images" / "049_21.dcm").unlink()  # mask without a slice
    (folder / "masks" / "050_21.png").unlink()  # slice without a mask
    small = cv2.resize(cv2.imread(str(source / "masks" / "050_24.png"), cv2.IMREAD_GRAYSCALE), (256, 256))
    cv2.imwrite(str(folder / "masks" / "050_24.png"), small)  # mask of another size
    refused = []
    assert png_mask_set(folder, 64, refused).names == []  # Modality OT is not read as HU unless asked
    assert sum("modality OT, not CT" in b.reason for b in refused) == 7  # every slice that has a mask
    bad = []
    loaded = png_mask_set(folder, 64, bad, non_ct_as_hu=True)
    reasons = {b.path: b.reason for b in bad}
    assert "without a slice" in reasons[str(folder / "masks" / "049_21.png")]
    assert "without a mask" in reasons[str(folder / "images" / "050_21.dcm")]
    assert "differs in size" in reasons[str(folder / "masks" / "050_24.png")]
    assert loaded.names == ["051_23", "051_31", "052_17", "066_19", "071_14", "071_19"]
    assert loaded.patients.tolist() == ["51", "51", "52", "66", "71", "71"]  # labels.csv's patient column
    only = png_mask_set(folder, 64, [], non_ct_as_hu=True, cases={"052_17", "071_19"})  # the named slices alone
    assert only.names == ["052_17", "071_19"]
    assert np.array_equal(only.masks, loaded.masks[[2, 5]]) and np.array_equal(only.hu, loaded.hu[[2, 5]])
    # labels.csv: 071_19 is subdural only, so its mask is subdural; 071_14 is subdural and
    # intraparenchymal, so those two are unknown there and the other three known absent.
    mask_071_14 = loaded.masks[loaded.names.index("071_14")]
    assert np.array_equal(loaded.masks[-1, ..., SUBDURAL], loaded.masks[-1, ..., ANY])
    assert (loaded.masks[-1, ..., PARENCHYMAL] == 0).all()
    assert (mask_071_14[..., [SUBDURAL, PARENCHYMAL]] == UNKNOWN).all()
    assert (mask_071_14[..., BLEEDS.index("epidural")] == 0).all()
    (folder / "labels.csv").unlink()
    unlabeled = png_mask_set(folder, 64, [], non_ct_as_hu=True)
    assert (unlabeled.masks[..., :ANY] == UNKNOWN).all()  # only `any` is known
    assert unlabeled.patients.tolist() == unlabeled.names  # without labels each slice is its own patient
    mask = cv2.imread(str(source / "masks" / "071_19.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert np.array_equal(loaded.masks[-1, ..., ANY] > 0, resize_mask(mask, 64))
    raw = pydicom.dcmread(source / "images" / "071_19.dcm").pixel_array
    assert loaded.hu[-1].mean() == pytest.approx(cv2.resize(np.maximum(raw, -1024).astype(np.float32), (64, 64),
                                                            interpolation=cv2.INTER_AREA).mean(), rel=1e-5)
    csv_path = write_bad_inputs(tmp_path / "bad.csv", bad)
    assert len(csv_path.read_text().splitlines()) == 1 + 3


@pytest.mark.parametrize("value", ["", "yes", "2"])
def test_a_subtype_that_is_not_0_or_1_in_labels_csv_is_refused_naming_file_and_row(real_data, tmp_path, value):
    rows = (real_data / "ctich_masks" / "labels.csv").read_text().splitlines()
    cells = rows[3].split(",")
    cells[4] = value  # 050_24's intraparenchymal
    (tmp_path / "labels.csv").write_text("\n".join([*rows[:3], ",".join(cells), *rows[4:]]) + "\n")
    with pytest.raises(ValueError, match=r"labels.csv: row 4 \(050_24.dcm\): every subtype must be 0 or 1"):
        slice_labels(tmp_path / "labels.csv")
    assert slice_labels(real_data / "ctich_masks" / "labels.csv")[0]["050_24"]["intraparenchymal"] == 1


def test_synthetic_truth_matches_the_saved_masks(prepared_synthetic):
    raw = prepared_synthetic / "raw"
    bad: list[BadInput] = []
    test = synthetic_set(raw, "test", 64, bad)
    assert bad == []
    mask_path = next(p for p in sorted((raw / "truth" / "masks").glob("*.npz"))
                     if (raw / "stage_2_test" / f"{load_masks(p)[0][0]}.dcm").exists())
    image_ids, masks = load_masks(mask_path)
    rows = np.flatnonzero(test.cases == mask_path.stem)
    assert len(rows) == len(image_ids)
    header = pydicom.dcmread(raw / "stage_2_test" / f"{image_ids[0]}.dcm", stop_before_pixels=True)
    assert set(test.patients[rows]) == {header.PatientID}
    for k in range(len(BLEEDS)):
        assert np.array_equal(test.masks[rows, ..., k] > 0, np.stack([resize_mask(m[k], 64) for m in masks]))
    assert test.voxel_mm[rows[0], 0] == pytest.approx(float(header.PixelSpacing[0]) * 512 / 64)
    one = synthetic_set(raw, "test", 64, [], cases={mask_path.stem})  # that series alone
    assert set(one.cases) == {mask_path.stem} and np.array_equal(one.masks, test.masks[rows])


def test_synthetic_series_with_an_unreadable_slice_still_trains_without_volumes(prepared_synthetic):
    """The small dataset's truncated file is named and skipped; the rest of its series stays, volume unknown."""
    raw = prepared_synthetic / "raw"
    bad: list[BadInput] = []
    train = synthetic_set(raw, "train", 64, bad)
    assert len(bad) == 1 and "truncated" in bad[0].reason
    victim = next(p.stem for p in (raw / "truth" / "masks").glob("*.npz") if Path(bad[0].path).stem in load_masks(p)[0])
    rows = train.cases == victim
    assert rows.sum() == len(load_masks(raw / "truth" / "masks" / f"{victim}.npz")[0]) - 1
    assert np.isnan(train.voxel_mm[rows]).all() and np.isfinite(train.voxel_mm[~rows]).all()
