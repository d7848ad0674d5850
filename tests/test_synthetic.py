"""The synthetic dataset: Kaggle layout, files readable through ihd.dicom, labels following masks, resumable writing."""
import copy
import dataclasses
import json
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from scipy import ndimage

from ihd import synthetic
from ihd.dicom import DicomError, read_header, read_hu
from ihd.io import write_json
from ihd.labels import SUBTYPES, read_long_labels
from ihd.study_labels import read_study_labels

QUIRKY = synthetic.QuirkRates(wrap12=0.1, multi_window=0.3, implicit_vr=0.3, unsigned12=0.2, padding=0.3,
                              compressed=0.04)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic") / "raw"
    return out, synthetic.write_dataset(out, **synthetic.SMALL, seed=0, quirks=QUIRKY, workers=2)


def _files(out: Path) -> list[Path]:
    return sorted(out.glob("stage_2_*/*.dcm"))


def test_layout_and_identifiers(raw):
    out, summary = raw
    assert {p.name for p in out.iterdir()} == {"stage_2_train", "stage_2_test", "stage_2_train.csv",
                                              "stage_2_train_study_labels.csv", "stage_2_sample_submission.csv",
                                              "truth", "config.json"}
    files = _files(out)
    assert len(files) == summary["train"]["images"] + summary["test"]["images"]
    assert all(re.fullmatch(r"ID_[0-9a-f]{9}", f.stem) for f in files)
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert header.Modality == "CT" and (header.Rows, header.Columns) == (512, 512)
    assert 0.45 <= float(header.PixelSpacing[0]) <= 0.5
    assert re.fullmatch(r"ID_[0-9a-f]{10}", header.StudyInstanceUID)
    assert re.fullmatch(r"ID_[0-9a-f]{10}", header.SeriesInstanceUID)
    assert header.SOPInstanceUID == files[0].stem


def test_every_file_reads_back_except_the_truncated_one(raw):
    out, summary = raw
    failures = []
    for path in _files(out):
        try:
            hu = read_hu(path)
        except DicomError:
            failures.append(f"{path.parent.name}/{path.name}")
            continue
        assert hu.shape == (512, 512) and -1024 <= hu.min() and hu.max() <= 3071
    assert failures == [summary["truncated_file"]]


def test_quirky_files_read_as_the_phantom_rendered_them(raw):
    out, summary = raw
    plan = next(p for p in synthetic.plan_dataset(**synthetic.SMALL, seed=0, quirks=QUIRKY) if p.split == "test")
    seen = set()
    for image_id, hu, _, chosen, _ in synthetic.series_slices(plan, 0, QUIRKY):
        expected = np.clip(np.rint(hu), -1000 if chosen["wrap12"] else -1024, 3071)
        got = read_hu(out / "stage_2_test" / f"{image_id}.dcm")
        inside = np.hypot(*np.mgrid[-255.5:256, -255.5:256]) < 250
        np.testing.assert_array_equal(np.maximum(got, -1000)[inside], np.maximum(expected, -1000)[inside])
        seen |= {name for name, on in chosen.items() if on}
    assert seen == set(synthetic.QUIRK_NAMES)
    assert all(summary["quirks"][name] > 0 for name in synthetic.QUIRK_NAMES)


def test_quirks_are_written_as_the_real_data_has_them(raw):
    out, _ = raw
    syntaxes, wrapped, multi, padded = set(), 0, 0, 0
    for path in _files(out):
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        wrapped += ds.BitsStored == 12 and ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) > -100
        multi += isinstance(ds.WindowCenter, pydicom.multival.MultiValue)
        if ds.PixelRepresentation == 1 and not ds.file_meta.TransferSyntaxUID.is_compressed:
            padded += bool((np.frombuffer(pydicom.dcmread(path).PixelData, "<i2") == -2000).any())
    assert pydicom.uid.ImplicitVRLittleEndian in syntaxes and pydicom.uid.ExplicitVRLittleEndian in syntaxes
    assert any(s.is_compressed for s in syntaxes)
    assert wrapped and multi and padded


def test_labels_agree_with_masks_and_slices_are_in_z_order(raw):
    out, _ = raw
    labels = pd.concat([read_long_labels(out / "stage_2_train.csv"),
                        read_long_labels(out / "truth" / "stage_2_test_labels.csv")])
    files = {f.stem: f for f in _files(out)}
    for mask_file in sorted((out / "truth" / "masks").glob("*.npz")):
        image_ids, masks = synthetic.load_masks(mask_file)
        spacing_mm = float(pydicom.dcmread(files[image_ids[0]], stop_before_pixels=True).PixelSpacing[0])
        expected = synthetic.labels_from_masks(masks, spacing_mm ** 2)
        np.testing.assert_array_equal(labels.loc[image_ids, list(SUBTYPES)].to_numpy(), expected)
        z = [read_header(files[i]).z for i in image_ids]
        assert np.all(np.diff(z) > 0)
        assert sorted(image_ids) != list(image_ids), "file names must not follow the slice order"
    assert labels["any"].sum() > 0


def test_training_csv_has_one_duplicated_image_and_the_submission_covers_the_test_set(raw):
    out, summary = raw
    table = pd.read_csv(out / "stage_2_train.csv")
    repeated = table[table.duplicated()]
    assert len(repeated) == len(SUBTYPES) and repeated["ID"].str.startswith(summary["duplicated_label_image"]).all()
    submission = pd.read_csv(out / "stage_2_sample_submission.csv")
    test_ids = {f.stem for f in (out / "stage_2_test").glob("*.dcm")}
    assert len(submission) == len(SUBTYPES) * len(test_ids)
    assert {i.rsplit("_", 1)[0] for i in submission["ID"]} == test_ids
    assert list(submission["ID"].str.rsplit("_", n=1).str[1][:6]) == list(SUBTYPES)
    assert (submission["Label"] == 0.5).all()
    truth = pd.read_csv(out / "truth" / "stage_2_test_labels.csv")
    assert list(truth["ID"]) == list(submission["ID"])


def test_same_seed_gives_byte_identical_files_whatever_the_workers(raw, tmp_path):
    out, _ = raw
    again = tmp_path / "raw"
    synthetic.write_dataset(again, **synthetic.SMALL, seed=0, quirks=QUIRKY, workers=1)
    ours = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert ours == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for relative in ours:
        assert (out / relative).read_bytes() == (again / relative).read_bytes(), relative


def _tree(folder: Path) -> dict[Path, tuple[int, bytes]]:
    """Every file under ``folder``: its modification time and its bytes."""
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_a_killed_generation_resumes_to_the_same_bytes_without_redoing_finished_studies(raw, tmp_path, monkeypatch):
    out, summary = raw
    again = tmp_path / "raw"
    real_write_bytes, written = synthetic._write_bytes, []

    def killed_after_80_files(path, data):
        if len(written) == 80:  # a kill in the middle of a file leaves its temporary name behind, half-written
            path.with_name(f".{path.stem}.999.dead.tmp{path.suffix}").write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt
        written.append(path)
        real_write_bytes(path, data)

    monkeypatch.setattr(synthetic, "_write_bytes", killed_after_80_files)
    with pytest.raises(KeyboardInterrupt):
        synthetic.write_dataset(again, **synthetic.SMALL, seed=0, quirks=QUIRKY, workers=1)
    monkeypatch.undo()
    assert not (again / "config.json").exists()
    first, second, third = synthetic.plan_dataset(**synthetic.SMALL, seed=0, quirks=QUIRKY)[:3]
    assert len(first.image_ids) + len(second.image_ids) < 80 < len(written) + len(third.image_ids), \
        "the kill must come after two whole studies and inside the third"
    kept = [*synthetic.study_files(again, first)[0], synthetic.study_files(again, first)[1]]
    for path in kept:
        os.utime(path, ns=(1, 1))
    synthetic.study_files(again, second)[0][5].unlink()  # a finished study that lost a file is written again

    assert synthetic.write_dataset(again, **synthetic.SMALL, seed=0, quirks=QUIRKY, workers=2) == summary
    assert all(path.stat().st_mtime_ns == 1 for path in kept)
    assert sorted(_tree(again)) == sorted(_tree(out))
    for relative, (_, data) in _tree(out).items():
        assert (again / relative).read_bytes() == data, relative

    before = _tree(again)
    assert synthetic.write_dataset(again, **synthetic.SMALL, seed=0, quirks=QUIRKY, workers=2) == summary
    assert _tree(again) == before


def test_another_dataset_in_the_folder_is_refused_before_anything_is_written(raw, tmp_path):
    out, _ = raw
    before = _tree(out)
    with pytest.raises(synthetic.DatasetMismatch, match="seed 0 \\(asked for 1\\)"):
        synthetic.write_dataset(out, **synthetic.SMALL, seed=1, quirks=QUIRKY)
    with pytest.raises(synthetic.DatasetMismatch, match="quirks"):
        synthetic.write_dataset(out, **synthetic.SMALL, seed=0)
    assert _tree(out) == before

    partial = tmp_path / "partial"
    settings = synthetic.dataset_settings(**synthetic.SMALL, seed=0, quirks=QUIRKY)
    write_json(partial / synthetic.PROGRESS_DIR / synthetic.PROGRESS_SETTINGS,
               {**settings, "generator": {**synthetic.generator_version(), "source_sha256": "older code"}})
    before = _tree(partial)
    with pytest.raises(synthetic.DatasetMismatch, match="partly written.*generator"):
        synthetic.write_dataset(partial, **synthetic.SMALL, seed=0, quirks=QUIRKY)
    assert _tree(partial) == before

    older = tmp_path / "older"
    older.mkdir()
    config = json.loads((out / synthetic.CONFIG_FILE).read_text())
    for generator in ({**synthetic.generator_version(), "source_sha256": "older code"}, None):
        write_json(older / synthetic.CONFIG_FILE, {**config, "generator": generator})
        other = "another version of the generator: source_sha256 (older code|unrecorded)"
        with pytest.raises(synthetic.DatasetMismatch, match=other):
            synthetic.write_dataset(older, **synthetic.SMALL, seed=0, quirks=QUIRKY)  # a finished one from other code
    assert synthetic.dataset_state(out, settings) == "complete"

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine\n")
    with pytest.raises(synthetic.DatasetMismatch, match="not empty and holds no synthetic dataset"):
        synthetic.write_dataset(tmp_path / "notes", 1, 0)
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]


def test_default_size_has_every_subtype_and_real_proportions():
    plans = synthetic.plan_dataset(**synthetic.DEFAULT_SIZE, seed=0)
    labels = {p.number: synthetic.study_labels(p, seed=0) for p in plans}
    summary = synthetic.summarize(plans, labels)
    for split in ("train", "test"):
        assert 0.35 <= summary[split]["study_fraction_with_bleed"] <= 0.45
        assert all(summary[split]["slices_positive"][s] > 0 for s in SUBTYPES), summary[split]
    stacked = np.concatenate(list(labels.values()))
    fractions = dict(zip(SUBTYPES, stacked.mean(axis=0)))
    assert 0.10 <= fractions["any"] <= 0.18
    assert 0 < fractions["epidural"] < 0.01
    assert fractions["epidural"] == min(fractions.values())
    np.testing.assert_array_equal(stacked[:, -1], stacked[:, :-1].max(axis=1))


def test_quirks_can_be_turned_off():
    plan = synthetic.plan_dataset(1, 0, seed=3, quirks=synthetic.QuirkRates.off())[0]
    assert plan.truncated_image == ""
    _, _, _, chosen, data = next(synthetic.series_slices(plan, 3, synthetic.QuirkRates.off()))
    assert not any(chosen.values())
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (ds.BitsStored, ds.PixelRepresentation, float(ds.RescaleIntercept)) == (16, 1, -1024.0)


def test_contact_sheet_tiles_slices_in_the_brain_window():
    from ihd.contact_sheet import contact_sheet
    slices = [np.full((64, 64), hu, np.float32) for hu in (0.0, 40.0, 80.0)]
    sheet = contact_sheet(slices, columns=2, tile_px=16)
    assert sheet.shape == (32, 32) and sheet.dtype == np.uint8
    assert (sheet[0, 0], sheet[0, 16], sheet[16, 0], sheet[16, 16]) == (0, 128, 255, 0)


def test_study_labels_are_the_highest_slice_labels_and_other_findings_show(raw):
    out, _ = raw
    plans = synthetic.plan_dataset(**synthetic.SMALL, seed=0, quirks=QUIRKY)
    slices = pd.concat([read_long_labels(out / "stage_2_train.csv"), read_long_labels(out / "truth" / "stage_2_test_labels.csv")])
    for path in (out / "stage_2_train_study_labels.csv", out / "truth" / "stage_2_test_study_labels.csv"):
        studies = read_study_labels(path, "subtypes")[0]
        exam = read_study_labels(path, "exam")[0]
        for plan in plans:
            if plan.study_id in studies.index:
                highest = slices.reindex(list(plan.image_ids)).max()
                assert studies.loc[plan.study_id].tolist() == highest[list(SUBTYPES)].tolist()
                other = synthetic.has_other_finding(plan, 0) and not highest["any"]
                assert exam.loc[plan.study_id, "other"] == other
    plan = next(p for p in plans if synthetic.has_other_finding(p, 0))
    phantom = synthetic.build_phantom(plan, 0, pixels=128)
    middle = int(np.argmin(np.abs(phantom.heights_mm() - phantom.finding.h_centre_mm)))
    with_finding = phantom.render(middle)[0]
    phantom.finding = None
    assert np.abs(with_finding - phantom.render(middle)[0]).max() > 5  # the finding is painted where it lies


def test_real_anatomy_cues_are_drawn_and_never_labeled():
    plans = synthetic.plan_dataset(30, 0, seed=2, quirks=synthetic.QuirkRates.off())
    phantoms = [synthetic.build_phantom(p, 2) for p in plans if not p.subtypes]
    phantom = next(ph for ph in phantoms if ph.cues.pineal_hu > 300)
    index = int(np.argmin(np.abs(phantom.heights_mm() - 38.0)))
    hu, masks = phantom.render(index)
    assert not masks.any()
    a, middle = phantom.anatomy, (synthetic.PIXELS - 1) / 2
    mm = phantom.mm_per_pixel
    pineal = np.hypot(phantom.x - 0.0, phantom.y - 14.0) < 1.0
    assert hu[pineal].min() > 100  # a hyperdense spot that is no bleed
    rows = np.arange(synthetic.PIXELS)[:, None] * np.ones((1, synthetic.PIXELS))
    outside = phantom.r > max(a.half_width_mm, a.half_length_mm) * 1.05 + a.scalp_mm
    below = rows > middle + a.centre_mm[1] / mm
    assert (hu[outside & below] > 100).sum() * mm ** 2 > 50  # the head holder's shell behind the head
    over_the_face = rows < middle + (a.centre_mm[1] - 0.5 * a.half_length_mm) / mm
    assert (hu[outside & over_the_face] > 100).sum() == 0
    scalp = (phantom.r > max(a.half_width_mm, a.half_length_mm) * 0.8) & (hu < -40) & (hu > -130)
    assert scalp.sum() * mm ** 2 > 100  # subcutaneous fat in the scalp
    calcified = [ph for ph in phantoms if ph.cues.choroid_hu or ph.cues.falx_hu]
    assert calcified and all(not ph.render(i)[1].any() for ph in calcified[:2] for i in range(0, ph.anatomy.n_slices, 4))


def test_blood_dense_anatomy_outside_bleeds_is_drawn_and_never_labeled():
    """Muscles outside the skull, the falx and the venous sinuses are as dense as blood, and unlabeled."""
    plans = synthetic.plan_dataset(30, 0, seed=2, quirks=synthetic.QuirkRates.off())
    phantom = next(synthetic.build_phantom(p, 2) for p in plans if not p.subtypes)
    mm2 = phantom.mm_per_pixel ** 2
    a = phantom.anatomy
    temporal = int(np.argmin(np.abs(phantom.heights_mm() - 20.0)))
    hu, masks = phantom.render(temporal)
    outside = phantom.r > 0.8 * a.half_width_mm
    blood_dense = (hu > 40) & (hu < 70) & outside & (np.abs(phantom.x) > np.abs(phantom.y))
    without_muscle = copy.copy(phantom)
    without_muscle.cues = dataclasses.replace(phantom.cues, temporalis_mm=0.0, neck_mm=0.0)
    bare = without_muscle.render(temporal)[0]
    bare_dense = (bare > 40) & (bare < 70) & outside & (np.abs(phantom.x) > np.abs(phantom.y))
    assert not masks.any() and (blood_dense.sum() - bare_dense.sum()) * mm2 > 300  # the temporal muscles
    high = int(np.argmin(np.abs(phantom.heights_mm() - 70.0)))
    midline = (np.abs(phantom.x) < 3) & (np.abs(phantom.y) > 30) & (phantom.r < 0.9 * a.half_length_mm)
    without_falx = copy.copy(phantom)
    without_falx.cues = dataclasses.replace(phantom.cues, falx_dura_hu=float(a.white_hu))
    for hu, masks in (phantom.render(high), without_falx.render(high)):
        assert not masks.any() and ((hu > 44) & midline).sum() * mm2 > 20  # the superior sagittal sinus, the falx


def test_the_inner_tables_rim_is_dense_fades_inwards_widens_to_the_vertex_and_is_never_labeled():
    """Real slices are brighter than the brain against the inner table (partial volume of the bone, beam
    hardening), within a few mm: as dense as a thin subdural, and no bleed. Near the vertex, where the table
    crosses the slice obliquely, the rim spreads further in."""
    plans = synthetic.plan_dataset(30, 0, seed=2, quirks=synthetic.QuirkRates.off())
    phantom = next(synthetic.build_phantom(p, 2) for p in plans if not p.subtypes)
    without_rim = copy.copy(phantom)
    without_rim.cues = dataclasses.replace(phantom.cues, rim_hu=0.0)
    at_2_mm = []  # what the rim adds 2 mm inside the table
    for height in (70.0, 0.85 * phantom.anatomy.h_vertex_mm):
        index = int(np.argmin(np.abs(phantom.heights_mm() - height)))
        (hu, masks), bare = phantom.render(index), without_rim.render(index)[0]
        bone = (bare > 250).astype(np.uint8)
        to_bone_mm = cv2.distanceTransform(1 - bone, cv2.DIST_L2, 5) * phantom.mm_per_pixel
        added = hu - bare
        assert not masks.any()
        assert added[(to_bone_mm > 0) & (to_bone_mm < 1.0)].max() > 40  # blood-dense against the table
        assert np.abs(added[to_bone_mm > 8]).max() < 1.0  # gone a few mm in
        assert not added[~ndimage.binary_fill_holes(bone)].any()  # and nothing outside the skull
        at_2_mm.append(float(np.median(added[(np.abs(to_bone_mm - 2) < 0.25) & (added > 0)])))
    assert at_2_mm[1] > 2 * at_2_mm[0]


def test_a_slice_is_the_mean_of_sections_through_its_thickness(monkeypatch):
    plans = synthetic.plan_dataset(30, 0, seed=2, quirks=synthetic.QuirkRates.off())
    phantom = synthetic.build_phantom(next(p for p in plans if p.subtypes), 2, pixels=128)
    top = phantom.anatomy.n_slices - 2
    thick = [phantom.render(i) for i in range(phantom.anatomy.n_slices)]
    monkeypatch.setattr(synthetic, "SECTION_SAMPLES", 1)
    thin = [phantom.render(i) for i in range(phantom.anatomy.n_slices)]
    between = [((image > 150) & (image < 600)).sum() for image in (thick[top][0], thin[top][0])]
    assert between[0] > 1.5 * between[1]  # the skull crossed obliquely near the vertex: partial volume
    assert sum(masks.sum() for _, masks in thick) > 0
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(thick, thin))  # the masks are the middle section's


def test_a_bleeds_blood_shows_only_where_its_slice_is_labeled():
    """Every section of a slice shows the middle section's cavity, so a bleed's blood lies within that slice's
    masks: sections drawing their own cavities would show blood a few mm above or below, unlabeled (here on the
    slice below the top one). The top slice's middle section is above the vertex, its lower one cuts the skull."""
    plans = synthetic.plan_dataset(60, 0, seed=2, quirks=synthetic.QuirkRates.off())
    phantom = synthetic.build_phantom(plans[1], 2, pixels=128)  # its top slice: the middle section above the vertex
    top = phantom.anatomy.n_slices - 1
    h = float(phantom.heights_mm()[top])
    assert phantom._scale(h, phantom.anatomy.h_vertex_mm) <= 0.02
    phantom.bleeds = [synthetic.Bleed("subdural", h - 8.0, 12.0, 80.0, 0.0, 1.2, 12.0)]
    phantom.finding = None
    bare = copy.copy(phantom)
    bare.bleeds = []
    for index in (top - 2, top - 1, top):
        hu, masks = phantom.render(index)
        near_masks = cv2.dilate(masks.any(axis=0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        assert np.abs(hu - bare.render(index)[0])[~near_masks].max() < 1.0
    assert phantom.render(top - 2)[1].any() and not phantom.render(top)[1].any()
