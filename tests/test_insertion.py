"""Bleeds inserted into real bleed-free RSNA series: placement by compartment, blood and noise, labels, bad backgrounds."""
import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest

import prepare_data
from ihd import insertion, synthetic
from ihd.dicom import read_header, read_hu
from ihd.labels import SUBTYPES, read_long_labels

SHORT_SERIES = ("ID_9d97cf289b", "ID_d479d9cbaa", "ID_c0d8754a07")  # three patients' shortest series


def _series_files(real_data: Path) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {}
    for path in sorted((real_data / "rsna_normal" / "stage_2_train").glob("*.dcm")):
        files.setdefault(read_header(path).series_id, []).append(path)
    return files


@pytest.fixture(scope="module")
def normal_files(real_data) -> dict[str, list[Path]]:
    return _series_files(real_data)


@pytest.fixture(scope="module")
def backgrounds_dir(normal_files, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("backgrounds")
    for series in SHORT_SERIES:
        for path in normal_files[series]:
            (folder / path.name).symlink_to(path)
    return folder


@pytest.fixture(scope="module")
def prepared(backgrounds_dir, tmp_path_factory) -> Path:
    """Two training and one test study inserted into the backgrounds, indexed and stored at 64x64."""
    return prepare_data.main(["--synthetic", "--backgrounds", str(backgrounds_dir), "--train-studies", "2",
                              "--test-studies", "1", "--seed", "1", "--size", "64", "--workers", "2", "--folds", "2",
                              "--dataset", "inserted", "--data-dir", str(tmp_path_factory.mktemp("data"))])


@pytest.fixture(scope="module")
def inserted(prepared) -> tuple[Path, dict]:
    return prepared / "raw", json.loads((prepared / "raw" / "config.json").read_text())["summary"]


@pytest.fixture(scope="module")
def every_subtype(backgrounds_dir):
    """One study of the first background with all five subtypes, rendered in memory, and its background."""
    backgrounds, _ = insertion.find_backgrounds(backgrounds_dir)
    plan = insertion.plan_insertions(backgrounds, 1, 0, seed=0)[0]
    plan = dataclasses.replace(plan, subtypes=synthetic.BLEEDS)
    study = insertion.render_study(plan, seed=4)
    record = study["record"]
    augmentation = insertion.Augmentation(**{**record["augmentation"], "shift_mm": tuple(record["augmentation"]["shift_mm"])})
    background = insertion.augment(np.stack([read_hu(p) for p in plan.background.paths]), augmentation,
                                   plan.background.spacing_mm)
    return plan, study, background


def test_layout_labels_agree_with_masks_and_slices_keep_their_positions(inserted):
    out, summary = inserted
    assert {p.name for p in out.iterdir()} == {"stage_2_train", "stage_2_test", "stage_2_train.csv",
                                              "stage_2_sample_submission.csv", "truth", "config.json"}
    labels = pd.concat([read_long_labels(out / "stage_2_train.csv"),
                        read_long_labels(out / "truth" / "stage_2_test_labels.csv")])
    files = {f.stem: f for f in out.glob("stage_2_*/*.dcm")}
    assert len(files) == len(labels) == summary["train"]["images"] + summary["test"]["images"]
    for mask_file in sorted((out / "truth" / "masks").glob("*.npz")):
        image_ids, masks = synthetic.load_masks(mask_file)
        spacing_mm = float(pydicom.dcmread(files[image_ids[0]], stop_before_pixels=True).PixelSpacing[0])
        np.testing.assert_array_equal(labels.loc[image_ids, list(SUBTYPES)].to_numpy(),
                                      synthetic.labels_from_masks(masks, spacing_mm ** 2))
        assert np.all(np.diff([read_header(files[i]).z for i in image_ids]) > 0)
    assert labels["any"].sum() > 0 and (labels["any"] == 0).sum() > 0
    assert not set(summary["backgrounds"]["train"]) & set(summary["backgrounds"]["test"])


def test_prepare_data_indexes_every_inserted_slice_with_its_label(prepared, inserted):
    index = pd.read_parquet(prepared / "index.parquet")
    out, summary = inserted
    assert len(index) == summary["train"]["images"] + summary["test"]["images"]
    train = index[index["split"] == "train"].set_index("image_id")
    labels = read_long_labels(out / "stage_2_train.csv")
    np.testing.assert_array_equal(train.loc[labels.index, list(SUBTYPES)].to_numpy(), labels.to_numpy())
    assert (train["fold"] >= 0).all() and index.loc[index["split"] == "test", "any"].isna().all()


def test_a_dataset_inserted_by_other_code_is_refused_by_name(prepared, backgrounds_dir, tmp_path):
    config = json.loads((prepared / "raw" / "config.json").read_text())
    assert config["generator"] == insertion.generator_version()
    older = tmp_path / "older" / "raw"
    older.mkdir(parents=True)
    (older / "config.json").write_text(json.dumps({**config, "generator": {**config["generator"], "source_sha256": "x"}}))
    flags = ["--synthetic", "--backgrounds", str(backgrounds_dir), "--train-studies", "2", "--test-studies", "1",
             "--seed", "1", "--size", "64", "--folds", "2", "--dataset", "older", "--data-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="older/raw holds a dataset of inserted bleeds made by another version of "
                                         "the generator: source_sha256 x"):
        prepare_data.main(flags)
    assert [p.name for p in older.iterdir()] == ["config.json"]
    phantoms = [flag for flag in flags if flag not in ("--backgrounds", str(backgrounds_dir))]
    with pytest.raises(SystemExit, match="older/raw holds bleeds inserted into the series of .*, not phantoms: pass "
                                         "that folder as --backgrounds to use it"):
        prepare_data.main(phantoms)
    assert [p.name for p in older.iterdir()] == ["config.json"]


def test_studies_of_one_background_share_a_new_patient_id(inserted):
    out, _ = inserted
    records = pd.read_json(out / "truth" / "insertions.json")
    patients = {}
    for path in out.glob("stage_2_*/*.dcm"):
        header = read_header(path)
        patients[header.series_id] = header.patient_id
    records["patient"] = records["series_id"].map(patients)
    per_background = records.groupby("background_series")["patient"].nunique()
    assert (per_background == 1).all()
    assert records["patient"].nunique() == records["background_series"].nunique()
    assert not set(records["patient"]) & set(records["background_patient"])


def test_same_seed_gives_byte_identical_files_whatever_the_workers(inserted, backgrounds_dir, tmp_path):
    out, _ = inserted
    again = tmp_path / "raw"
    insertion.write_dataset(again, backgrounds_dir, 2, 1, seed=1, workers=1)
    ours = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert ours == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for relative in ours:
        assert (out / relative).read_bytes() == (again / relative).read_bytes(), relative


def _bone_distance_mm(background_slice: np.ndarray, spacing_mm: float) -> np.ndarray:
    not_bone = (cv2.GaussianBlur(background_slice, (0, 0), 1.0) <= 250).astype(np.uint8)
    return cv2.distanceTransform(not_bone, cv2.DIST_L2, cv2.DIST_MASK_PRECISE) * spacing_mm


def test_every_subtype_sits_in_its_compartment_of_the_background(every_subtype):
    plan, study, background = every_subtype
    masks, spacing = study["masks"], plan.background.spacing_mm
    assert study["record"]["labeled_subtypes"] == list(synthetic.BLEEDS)
    smooth = np.stack([cv2.GaussianBlur(s, (0, 0), 1.0) for s in background])
    bone_mm = np.stack([_bone_distance_mm(s, spacing) for s in background])
    per_subtype = {s: masks[:, k] for k, s in enumerate(synthetic.BLEEDS)}
    for subtype in ("epidural", "subdural"):
        mask = per_subtype[subtype]
        assert bone_mm[mask].max() < 25, subtype  # against the inner table, no deeper than the thickest bleed
        for index in np.flatnonzero(mask.any(axis=(1, 2))):
            assert bone_mm[index][mask[index]].min() < 2.0, (subtype, index)  # touches the table on every slice
        assert (smooth[mask] < 250).all(), subtype  # never painted over bone
    brain_like = (smooth >= 18) & (smooth <= 50)
    iph = per_subtype["intraparenchymal"]
    assert brain_like[iph].mean() > 0.8 and bone_mm[iph].min() > 2
    ivh = per_subtype["intraventricular"]
    assert (smooth[ivh] < 16).mean() > 0.9 and bone_mm[ivh].min() > 15  # deep CSF
    sah = per_subtype["subarachnoid"]  # sulci and cisterns: darker than the brain, never in the ventricles
    brain = study["anatomy"].cavity & brain_like
    assert smooth[sah].mean() < smooth[brain].mean() - 3 and bone_mm[sah].min() > 0.5
    assert not (sah & ivh).any()


@pytest.fixture(scope="module")
def flat_blood(every_subtype) -> np.ndarray:
    """The study of ``every_subtype`` painted again with each bleed of one density: its HU without the unevenness."""
    plan, study, background = every_subtype
    bleeds = [synthetic.Bleed(**{k: v for k, v in b.items() if k != "unevenness_hu"}) for b in study["record"]["bleeds"]]
    hu, masks = insertion.insert_bleeds(background, study["anatomy"], bleeds, np.asarray(plan.background.heights_mm),
                                        [0.0] * len(bleeds), np.random.default_rng(0))
    np.testing.assert_array_equal(masks, study["masks"])
    return hu


def _full_cores(plan, masks: np.ndarray, bleed: dict) -> np.ndarray:
    """The bleed's mask less its outer 2 pixels, on the slices it crosses at full contrast."""
    k = synthetic.BLEEDS.index(bleed["subtype"])
    heights = np.asarray(plan.background.heights_mm)
    full = np.abs(heights - bleed["h_centre_mm"]) < bleed["h_half_mm"] - synthetic.TAPER_SLICES * plan.background.slice_step_mm
    core = np.zeros_like(masks[:, k])
    for index in np.flatnonzero(full):
        core[index] = cv2.erode(masks[index, k].astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    return core


def test_blood_is_50_to_90_hu_with_the_background_noise(every_subtype, flat_blood):
    plan, study, background = every_subtype
    hu, masks = flat_blood, study["masks"]
    noise = study["anatomy"].noise_hu
    assert 1.5 < noise < 10
    for bleed in study["record"]["bleeds"]:
        k = synthetic.BLEEDS.index(bleed["subtype"])
        core = _full_cores(plan, masks, bleed)
        if core.sum() < 200:
            continue
        middle = np.median(hu[core])
        assert 50 <= middle <= 90, bleed["subtype"]
        if bleed["subtype"] != "subarachnoid":  # blood in a thin sulcus keeps some of the sulcus' darkness
            assert abs(middle - bleed["hu"]) < 3, bleed["subtype"]
        inside = masks[:, k].astype(np.float32)
        local = hu - np.stack([cv2.GaussianBlur(s * w, (0, 0), 3.0) / np.maximum(cv2.GaussianBlur(w, (0, 0), 3.0), 1e-3)
                               for s, w in zip(hu, inside)])  # around its mean within the bleed
        spread = 1.4826 * np.median(np.abs(local[core] - np.median(local[core])))
        assert 0.6 * noise < spread < 1.6 * noise, (bleed["subtype"], spread, noise)
    untouched = ~masks.any(axis=1)
    outside = untouched & ~np.stack([cv2.dilate(m.any(0).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0 for m in masks])
    np.testing.assert_allclose(hu[outside], background[outside], atol=0.5)  # below the files' 1 HU step


def test_blood_is_uneven_over_millimetres_inside_the_bleeds_only(every_subtype, flat_blood):
    plan, study, _ = every_subtype
    uneven = study["hu"] - flat_blood  # what the unevenness adds: each bleed's spread times a smooth field
    checked = 0
    for bleed in study["record"]["bleeds"]:
        core = _full_cores(plan, study["masks"], bleed)
        if core.sum() < 200:
            continue
        checked += 1
        spread = bleed["unevenness_hu"]
        assert insertion.UNEVENNESS_HU[0] <= spread <= insertion.UNEVENNESS_HU[1]
        assert 0.5 * spread < uneven[core].std() < 1.5 * spread, bleed["subtype"]
        assert abs(uneven[core].mean()) < 0.6 * spread, bleed["subtype"]
        grain = uneven - np.stack([cv2.GaussianBlur(s, (0, 0), 1.0) for s in uneven])  # over half a millimetre
        assert grain[core].std() < 0.3 * uneven[core].std(), bleed["subtype"]
    assert checked >= 3
    near = np.stack([cv2.dilate(m.any(0).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0 for m in study["masks"]])
    assert np.abs(uneven[~near]).max() < 0.05  # nothing beyond the blurred edges of the bleeds


def test_edges_and_ends_blend_partially(every_subtype):
    plan, study, background = every_subtype
    hu, masks = study["hu"], study["masks"]
    edge = np.zeros_like(masks[:, 0])
    for index in range(len(masks)):
        union = masks[index].any(axis=0).astype(np.uint8)
        edge[index] = (cv2.dilate(union, np.ones((3, 3), np.uint8)) > 0) & (union == 0)
    change = (hu - background)[edge]
    assert (change > 1).mean() > 0.3 and np.median(change) < 25


def _copy_series(files: list[Path], folder: Path, change=None) -> None:
    folder.mkdir(parents=True)
    for path in files:
        ds = pydicom.dcmread(path)
        if change:
            change(ds)
        ds.save_as(folder / path.name, enforce_file_format=True)


def test_bad_backgrounds_are_skipped_by_name_and_too_few_is_an_error(normal_files, tmp_path):
    folder = tmp_path / "backgrounds"
    short, no_position, sagittal, good = "ID_d479d9cbaa", "ID_9d97cf289b", "ID_c0d8754a07", "ID_99fc6d2b76"
    _copy_series(normal_files[good], folder / "good")
    _copy_series(normal_files[short][:6], folder / "short")
    def drop_position(ds):  # such files are ordered by InstanceNumber, but cannot be placed in 3D
        ds.InstanceNumber = int(float(ds.ImagePositionPatient[2]))
        del ds.ImagePositionPatient

    _copy_series(normal_files[no_position], folder / "no_position", drop_position)
    def make_sagittal(ds):  # slices stacked along x, their rows along y and columns down z
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [z, y, x]

    _copy_series(normal_files[sagittal], folder / "sagittal", make_sagittal)
    water = tmp_path / "backgrounds" / "water"
    disc = np.where(np.hypot(*np.mgrid[-128:128, -128:128]) < 100, 0.0, -1024.0).astype(np.float32)
    ids = type("Ids", (), {"patient_id": "ID_water", "study_id": "ID_w1", "series_id": "ID_water_series"})
    water.mkdir()
    for index in range(14):
        geometry = synthetic.SliceGeometry(("-64", "-64", str(8.0 * index)), ("1", "0", "0", "0", "1", "0"),
                                           ("0.5", "0.5"), ("40", "80"))
        (water / f"ID_w{index:02d}.dcm").write_bytes(
            synthetic.dicom_slice_bytes(ids, f"ID_w{index:02d}", geometry, disc, synthetic.PLAIN_FILE, f"1.2.3.{index}"))
    (folder / "notes.txt").write_text("not a scan")

    usable, skipped = insertion.find_backgrounds(folder)
    assert [b.series_id for b in usable] == [good]
    text = "\n".join(skipped)
    assert len(skipped) == 4, text
    assert f"series {short} " in text and "too short: 6 slices" in text
    assert f"series {no_position} " in text and "lack ImagePositionPatient" in text
    assert f"series {sagittal} " in text and "not axial" in text
    assert "series ID_water_series " in text and "not a head CT" in text
    with pytest.raises(insertion.BackgroundError, match=f"{folder}: 1 usable background series"):
        insertion.plan_insertions(usable, 2, 1, folder=folder)
    with pytest.raises(SystemExit, match="--backgrounds: .*1 usable background series"):
        prepare_data.main(["--synthetic", "--backgrounds", str(folder), "--dataset", "bad",
                           "--data-dir", str(tmp_path / "data"), "--train-studies", "2", "--test-studies", "1"])
    assert len(insertion.plan_insertions(usable, 2, 0)) == 2  # one patient is enough without test studies


def test_backgrounds_flag_needs_synthetic_and_an_existing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        prepare_data.main(["--backgrounds", str(tmp_path), "--dataset", "x", "--data-dir", str(tmp_path)])
    assert "--backgrounds can only be used with --synthetic" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare_data.main(["--synthetic", "--backgrounds", str(tmp_path / "absent"), "--dataset", "x",
                           "--data-dir", str(tmp_path)])
    assert f"argument --backgrounds: {tmp_path / 'absent'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_series_the_folders_labels_call_bleeding_are_no_backgrounds(real_data):
    usable, skipped = insertion.find_backgrounds(real_data / "rsna_labeled", workers=1)
    assert len(usable) == 3  # the three bleed-free series of the seven
    labeled = [message for message in skipped if "labeled as bleeding in" in message]
    assert len(labeled) == 4 and all(message.endswith("stage_2_train.csv, not bleed-free, skipped") for message in labeled)
