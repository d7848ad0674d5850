"""Tests for ihd.index: grouping, ordering along the slice normal, folds by patient, bad files."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from ihd.dicom import read_header
from ihd.index import (
    INDEX_COLUMNS, MAX_FOLDS, ORIENTATION_COLUMNS, assign_folds, build_index, drop_unreadable, make_ids_unique,
    read_index, refuse_off_plane, split_by_series_order,
)
from ihd.labels import SUBTYPES


@pytest.fixture(scope="module")
def dataset(real_data, tmp_path_factory):
    """Real slices as train (with labels, one row repeated, a truncated and a non-DICOM file), two series as test."""
    raw = tmp_path_factory.mktemp("raw")
    shutil.copytree(real_data / "rsna_slices", raw / "train", ignore=shutil.ignore_patterns("*.csv"))
    shutil.copytree(real_data / "rsna_series", raw / "test" / "rsna")
    shutil.copytree(real_data / "cq500_series", raw / "test" / "cq500")
    (raw / "train" / "ID_badbad000.dcm").write_bytes((real_data / "rsna_slices" / "ID_000012eaf.dcm").read_bytes()[:300])
    (raw / "train" / "notes.txt").write_text("not an image\n")
    labels = pd.read_csv(real_data / "rsna_slices" / "labels.csv")
    pd.concat([labels, labels.iloc[:6]]).to_csv(raw / "labels.csv", index=False)
    out = tmp_path_factory.mktemp("dataset")
    index = build_index([(raw / "train", "train"), (raw / "test", "test")], out, labels_csv=raw / "labels.csv",
                        folds=3, workers=1)
    return raw, out, index


def test_columns_types_and_row_order(dataset):
    _, out, index = dataset
    stored = read_index(out)
    assert list(stored.columns) == INDEX_COLUMNS
    assert stored["position"].dtype == np.int32 and stored["fold"].dtype == np.int8
    assert all(stored[s].dtype == np.float32 for s in SUBTYPES)
    keys = list(zip(stored["split"], stored["series_id"], stored["position"]))
    assert keys == sorted(keys)
    assert stored["image_id"].is_unique


def test_rsna_series_ordered_by_z(dataset, real_data):
    _, _, index = dataset
    series = index[index["path"].str.contains("/rsna/")]
    assert len(series) == 32 and series["series_id"].nunique() == 1
    assert series["position"].tolist() == list(range(32)) and (series["series_length"] == 32).all()
    ipp_z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in series["path"]]
    assert ipp_z[0] == pytest.approx(155.0, abs=0.1) and ipp_z[-1] == pytest.approx(313.1, abs=0.1)
    assert np.all(np.diff(ipp_z) > 0)
    assert np.diff(series["z"]).min() > 4.5 and np.diff(series["z"]).max() < 5.5


def test_cq500_series_indexed(dataset):
    _, _, index = dataset
    series = index[index["path"].str.contains("/cq500/")]
    assert len(series) == 24 and series["series_id"].nunique() == 1
    assert series["z"].is_monotonic_increasing and series["split"].eq("test").all()
    assert series[list(SUBTYPES)].isna().all().all() and (series["fold"] == -1).all()


def test_labels_merged_and_duplicates_dropped(dataset, real_data):
    _, out, index = dataset
    train = index[index["split"] == "train"].set_index("image_id")
    assert train["any"].notna().sum() == 15
    assert train.loc["ID_2008dd408", ["epidural", "subarachnoid", "subdural", "any"]].tolist() == [1, 1, 1, 1]
    assert train.loc["ID_2008dd408", "intraparenchymal"] == 0
    assert np.isnan(train.loc["ID_000624786", "any"]) and train.loc["ID_000624786", "fold"] == -1


def test_training_images_without_labels_are_named_in_a_warning(real_data, tmp_path):
    images = ["ID_2008dd408", "ID_1b5ac170c", "ID_0fe31b044"]
    for image in images:
        shutil.copy(real_data / "rsna_slices" / f"{image}.dcm", tmp_path / f"{image}.dcm")
    labels = pd.read_csv(real_data / "rsna_slices" / "labels.csv")
    labels = labels[labels["ID"].str.rpartition("_")[0].isin(images[1:])]
    nameless = pd.DataFrame({"ID": [f"ID_00000nope_{subtype}" for subtype in SUBTYPES], "Label": 0})
    pd.concat([labels, nameless]).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.warns(UserWarning, match=r"labels.csv: 1 training images have no labels there and are left out of every "
                                         r"fold \(ID_2008dd408\); 1 labeled images are not among those read"):
        build_index([(tmp_path, "train")], tmp_path / "out", labels_csv=tmp_path / "labels.csv", folds=2, workers=1)
    assert json.loads((tmp_path / "out" / "index_config.json").read_text())["unlabeled_train_rows"] == 1


def test_slices_dropped_after_the_scan_leave_the_recorded_counts_true(real_data, tmp_path):
    out = tmp_path / "out"
    index = build_index([(real_data / "rsna_slices", "train")], out,
                        labels_csv=real_data / "rsna_slices" / "labels.csv", folds=3, workers=1)
    dropped = index[index["fold"] >= 0].iloc[:2]
    left = drop_unreadable(out, [(path, "truncated pixel data") for path in dropped["path"]])
    config = json.loads((out / "index_config.json").read_text())
    assert config["rows"] == len(left) == len(index) - 2
    assert sum(config["slices_by_fold"].values()) == (left["fold"] >= 0).sum() == 13
    assert config["patients"] == left["patient_id"].nunique() and config["series"] == left["series_id"].nunique()
    assert config["unlabeled_train_rows"] == 11 and config["bad_files"] == 1 + 2  # labels.csv, then the two


def test_folds_group_patients_and_balance(dataset):
    _, _, index = dataset
    labeled = index[index["fold"] >= 0]
    assert labeled["patient_id"].groupby(labeled["patient_id"]).ngroups == 15
    assert (labeled.groupby("patient_id")["fold"].nunique() == 1).all()
    assert sorted(labeled["fold"].value_counts().tolist()) == [5, 5, 5]


def test_folds_never_split_a_patient_and_are_deterministic():
    rng = np.random.default_rng(0)
    patients = np.repeat([f"P{i}" for i in range(40)], rng.integers(1, 30, 40))
    index = pd.DataFrame({"patient_id": patients, "split": "train", "any": np.float32(0)})
    folds = assign_folds(index, folds=5)
    assert (pd.Series(folds).groupby(patients).nunique() == 1).all()
    counts = np.bincount(folds, minlength=5)
    assert counts.max() - counts.min() <= pd.Series(patients).value_counts().max()
    assert np.array_equal(folds, assign_folds(index.sample(frac=1, random_state=1).sort_index(), folds=5))
    by_patients = assign_folds(index, folds=5, balance="patients")
    assert np.bincount(pd.Series(by_patients).groupby(patients).first(), minlength=5).tolist() == [8] * 5
    assert not np.array_equal(folds, assign_folds(index, folds=5, seed=1))
    assert assign_folds(index, folds=MAX_FOLDS).max() == 39  # 40 patients, one a fold
    with pytest.raises(ValueError, match="folds must be from 2 to 127"):
        assign_folds(index, folds=MAX_FOLDS + 1)


def test_bad_files_reported_and_scan_goes_on(dataset):
    raw, out, index = dataset
    bad = pd.read_csv(out / "bad_files.csv")
    reasons = dict(zip(bad["path"].map(lambda p: p.rsplit("/", 1)[-1]), bad["reason"]))
    assert set(reasons) == {"ID_badbad000.dcm", "notes.txt"}
    assert "not a DICOM" in reasons["notes.txt"]
    assert "ID_badbad000" not in set(index["image_id"]) and len(index) == 26 + 32 + 24


def test_shared_file_names_get_distinct_ids(tmp_path):
    headers = pd.DataFrame({
        "image_id": ["IM1", "IM1", "IM2"],
        "path": [str(tmp_path / "a" / "IM1.dcm"), str(tmp_path / "b" / "c" / "IM1.dcm"), str(tmp_path / "a" / "IM2.dcm")],
        "folder": str(tmp_path),
    })
    unique, clashes = make_ids_unique(headers)
    assert unique["image_id"].tolist() == ["a_IM1", "b_c_IM1", "IM2"] and clashes.empty


def test_resumed_scan_reads_only_new_files_and_gives_the_same_index(real_data, tmp_path, monkeypatch):
    import ihd.index

    raw = tmp_path / "raw"
    shutil.copytree(real_data / "rsna_series", raw)
    (raw / "ID_badbad000.dcm").write_bytes(b"not an image")
    moved = sorted(raw.glob("ID_*.dcm"))[:5]
    for path in moved:
        path.rename(tmp_path / path.name)
    first = build_index([(raw, "test")], tmp_path / "out", workers=1, resume=True)
    for path in moved:
        (tmp_path / path.name).rename(raw / path.name)
    reads = []
    monkeypatch.setattr(ihd.index, "read_header", lambda path: reads.append(path) or read_header(path))
    resumed = build_index([(raw, "test")], tmp_path / "out", workers=1, resume=True)
    assert sorted(Path(p).name for p in reads) == sorted(p.name for p in moved)
    assert len(first) == 27 and len(resumed) == 32 and resumed["position"].tolist() == list(range(32))
    fresh = build_index([(raw, "test")], tmp_path / "fresh", workers=1)
    pd.testing.assert_frame_equal(resumed, fresh)
    assert "ID_badbad000" in (tmp_path / "out" / "bad_files.csv").read_text()


def test_slices_off_the_axial_plane_or_off_their_series_plane_are_refused_by_name():
    tilt = np.radians(25)  # a gantry tilt: still axial
    axial, tilted = [1, 0, 0, 0, 1, 0], [1, 0, 0, 0, np.cos(tilt), -np.sin(tilt)]
    coronal = [1, 0, 0, 0, 0, -1]
    rows = ([("A", axial)] * 4 + [("A", coronal)]  # a localizer in an axial series
            + [("B", tilted)] * 3 + [("B", axial)]  # another reconstruction, 25 degrees off its series
            + [("C", coronal)] * 3 + [("D", [np.nan] * 6)] * 2)  # a coronal series; one without orientation
    headers = pd.DataFrame([{"split": "test", "series_id": series, "path": f"{series}{n}.dcm",
                             **dict(zip(ORIENTATION_COLUMNS, values))} for n, (series, values) in enumerate(rows)])
    kept, bad = refuse_off_plane(headers)
    assert kept["path"].tolist() == ["A0.dcm", "A1.dcm", "A2.dcm", "A3.dcm", "B5.dcm", "B6.dcm", "B7.dcm", "D12.dcm",
                                     "D13.dcm"]
    reasons = dict(zip(bad["path"], bad["reason"]))
    assert reasons["A4.dcm"].startswith("not axial: its plane lies 90 degrees from axial")
    assert reasons["B8.dcm"].startswith("its plane lies 25 degrees from the one most slices of series B share")
    assert sorted(reasons) == ["A4.dcm", "B8.dcm", "C10.dcm", "C11.dcm", "C9.dcm"]


def test_fewer_patients_than_folds_warns_about_the_empty_folds():
    index = pd.DataFrame({"split": "train", "patient_id": ["a", "a", "b", "c"], "any": 0.0})
    with pytest.warns(UserWarning, match="3 labeled patients cannot fill 5 folds: folds 3, 4 are empty"):
        folds = assign_folds(index, folds=5)
    assert sorted(set(folds)) == [0, 1, 2] and folds[0] == folds[1]


def _true_order(real_data):
    """The real RSNA series' files in slice order (their z and their position along the normal agree)."""
    files = sorted((real_data / "rsna_series").glob("*.dcm"))
    return sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def _series_copy(real_data, folder, edit):
    """The real series copied into ``folder``, ``edit(ds, k)`` applied to its k-th slice (true order)."""
    folder.mkdir()
    for k, path in enumerate(_true_order(real_data)):
        ds = pydicom.dcmread(path)
        edit(ds, k)
        ds.save_as(folder / path.name)
    return [p.stem for p in _true_order(real_data)]


def _shifted_in_plane(ds, k):
    """Slice k sits 5 mm after slice k-1 along the tilted normal, every other slice shifted 60 mm along
    its columns: the order along the normal is k, the order of ImagePositionPatient[2] is not."""
    row, col = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
    position = 5.0 * k * np.cross(row, col) + (60.0 if k % 2 else 0.0) * col
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]


def _built(folder, out, **kwargs):
    index = build_index([(folder, "test")], out, workers=1, **kwargs)
    bad = pd.read_csv(out / "bad_files.csv")
    return index, dict(zip(bad["path"].map(lambda p: Path(p).stem), bad["reason"]))


def test_tilted_gantry_series_is_ordered_along_the_normal_not_by_z(real_data, tmp_path):
    order = _series_copy(real_data, tmp_path / "s", _shifted_in_plane)
    tilt = pydicom.dcmread(tmp_path / "s" / f"{order[0]}.dcm").ImageOrientationPatient
    assert abs(float(tilt[5])) > 0.15  # the real series' gantry is tilted about 11 degrees
    by_z = sorted(order, key=lambda i: float(pydicom.dcmread(tmp_path / "s" / f"{i}.dcm").ImagePositionPatient[2]))
    assert by_z != order
    index, bad = _built(tmp_path / "s", tmp_path / "out")
    assert index["image_id"].tolist() == order and not bad
    np.testing.assert_allclose(np.diff(index["z"]), 5.0, atol=1e-3)


def test_orientation_missing_on_some_slices_uses_the_series_normal(real_data, tmp_path):
    def edit(ds, k):
        _shifted_in_plane(ds, k)
        if k in (3, 4, 17):
            del ds.ImageOrientationPatient
        if k == 9:
            ds.ImageOrientationPatient = [0] * 6
    order = _series_copy(real_data, tmp_path / "s", edit)
    index, bad = _built(tmp_path / "s", tmp_path / "out")
    assert index["image_id"].tolist() == order and not bad


def test_no_usable_orientation_orders_along_the_positions_with_a_warning(real_data, tmp_path):
    order = _series_copy(real_data, tmp_path / "s", lambda ds, k: setattr(ds, "ImageOrientationPatient", [0] * 6))
    with pytest.warns(UserWarning, match="1 series: no slice has a usable ImageOrientationPatient"):
        index, bad = _built(tmp_path / "s", tmp_path / "out")
    assert index["image_id"].tolist() == order and not bad
    assert json.loads((tmp_path / "out" / "index_config.json").read_text())["series_ordered_by"]["position line"] == 1


def test_positions_missing_on_some_slices_order_the_series_by_instance_number(real_data, tmp_path):
    def edit(ds, k):
        _shifted_in_plane(ds, k)
        ds.InstanceNumber = 100 - 2 * k  # numbered from the top of the head down
        if k in (0, 12, 13):
            del ds.ImagePositionPatient
    order = _series_copy(real_data, tmp_path / "s", edit)
    with pytest.warns(UserWarning, match="1 series: ImagePositionPatient missing on some slices.*by InstanceNumber"):
        index, bad = _built(tmp_path / "s", tmp_path / "out")
    assert index["image_id"].tolist() == order[::-1] and not bad


def test_slices_without_position_or_instance_number_are_refused_by_name(real_data, tmp_path):
    def edit(ds, k):
        _shifted_in_plane(ds, k)
        if k in (0, 12, 13):
            del ds.ImagePositionPatient
    order = _series_copy(real_data, tmp_path / "s", edit)
    with pytest.warns(UserWarning, match="1 series: ImagePositionPatient missing on some slices and InstanceNumbers"):
        index, bad = _built(tmp_path / "s", tmp_path / "out")
    refused = [order[k] for k in (0, 12, 13)]
    assert index["image_id"].tolist() == [i for i in order if i not in refused]
    assert index["position"].tolist() == list(range(29)) and (index["series_length"] == 29).all()
    assert sorted(bad) == sorted(refused)
    assert all("no ImagePositionPatient" in reason and "InstanceNumbers are missing" in reason for reason in bad.values())


def test_a_second_file_with_the_same_sop_instance_uid_is_read_once_and_named(real_data, tmp_path):
    folder = tmp_path / "s"
    shutil.copytree(real_data / "rsna_series", folder)
    first = sorted(folder.glob("*.dcm"))[4]
    shutil.copy(first, folder / "ID_zzcopy.dcm")
    index, bad = _built(folder, tmp_path / "out")
    assert len(index) == 32 and "ID_zzcopy" not in set(index["image_id"]) and first.stem in set(index["image_id"])
    uid = pydicom.dcmread(first, stop_before_pixels=True).SOPInstanceUID
    assert bad == {"ID_zzcopy": f"same SOPInstanceUID {uid} as {first.resolve()}: read once, from that file"}


def test_non_ct_files_are_refused_at_the_scan_unless_read_as_hu(real_data, tmp_path):
    folder = tmp_path / "s"
    shutil.copytree(real_data / "ctich_masks" / "images", folder)
    shutil.copy(real_data / "rsna_slices" / "ID_000039fa0.dcm", folder)
    index, bad = _built(folder, tmp_path / "out")
    assert index["image_id"].tolist() == ["ID_000039fa0"] and len(bad) == 9
    assert all(reason.startswith("modality OT, not CT") for reason in bad.values())
    index, bad = _built(folder, tmp_path / "as_hu", non_ct_as_hu=True)
    assert len(index) == 10 and not bad
    config = json.loads((tmp_path / "as_hu" / "index_config.json").read_text())
    assert config["non_ct_as_hu"] is True and config["non_ct_read_as_hu"] == 9


def test_a_patient_with_two_studies_never_straddles_folds(real_data, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(real_data / "rsna_labeled" / "stage_2_train", raw)
    series = {}
    for path in sorted(raw.glob("*.dcm")):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        series.setdefault(str(header.StudyInstanceUID), []).append(path)
    studies = sorted(series, key=lambda s: -len(series[s]))
    for path in series[studies[0]] + series[studies[1]]:  # the two largest, which dealing by study would part
        ds = pydicom.dcmread(path)
        ds.PatientID = "ID_twostudies"
        ds.save_as(path)
    index = build_index([(raw, "train")], tmp_path / "out", labels_csv=real_data / "rsna_labeled" / "stage_2_train.csv",
                        folds=3, workers=1)
    patient = index[index["patient_id"] == "ID_twostudies"]
    assert patient["study_id"].nunique() == 2 and patient["fold"].nunique() == 1 and (patient["fold"] >= 0).all()
    assert index["patient_id"].nunique() == 6 and index.groupby("patient_id")["fold"].nunique().max() == 1


def test_files_changed_since_the_scan_are_read_again(real_data, tmp_path, monkeypatch, capsys):
    import ihd.index

    raw = tmp_path / "raw"
    shutil.copytree(real_data / "rsna_series", raw)
    shutil.copy(real_data / "rsna_slices" / "ID_000012eaf.dcm", tmp_path / "good.dcm")
    (raw / "ID_fixedlater.dcm").write_bytes(b"not an image yet")
    first = build_index([(raw, "test")], tmp_path / "out", workers=1, resume=True)
    changed = sorted(raw.glob("ID_*.dcm"))[3]
    ds = pydicom.dcmread(changed)
    ds.PatientID = "ID_anotherpatient"
    ds.save_as(changed)
    shutil.copy(tmp_path / "good.dcm", raw / "ID_fixedlater.dcm")
    reads = []
    monkeypatch.setattr(ihd.index, "read_header", lambda path: reads.append(path) or read_header(path))
    again = build_index([(raw, "test")], tmp_path / "out", workers=1, resume=True)
    assert sorted(Path(p).name for p in reads) == sorted([changed.name, "ID_fixedlater.dcm"])
    assert "2 files changed since" in capsys.readouterr().out
    assert len(first) == 32 and len(again) == 33
    assert again.set_index("image_id").loc[changed.stem, "patient_id"] == "ID_anotherpatient"


def test_a_header_cache_from_an_older_version_is_read_again(real_data, tmp_path, monkeypatch, capsys):
    import ihd.index

    first = build_index([(real_data / "rsna_series", "test")], tmp_path / "out", workers=1, resume=True)
    cache = tmp_path / "out" / "headers.parquet"
    pd.read_parquet(cache).drop(columns=["modality", "orientation_0"]).assign(z=0.0).to_parquet(cache)
    reads = []
    monkeypatch.setattr(ihd.index, "read_header", lambda path: reads.append(path) or read_header(path))
    again = build_index([(real_data / "rsna_series", "test")], tmp_path / "out", workers=1, resume=True)
    assert len(reads) == 32 and "written by an older version" in capsys.readouterr().out
    pd.testing.assert_frame_equal(again, first)


def test_the_papers_split_trains_the_first_series_by_uid_and_validates_the_rest():
    index = pd.DataFrame({"series_id": ["S3", "S1", "S1", "S2", "S4", "S0"], "patient_id": ["P"] * 6,
                          "split": ["train"] * 5 + ["test"], "any": [0.0, 1.0, 0.0, 0.0, np.nan, np.nan]})
    folds = split_by_series_order(index, train_series=2)
    assert folds.tolist() == [1, 0, 0, 0, -1, -1], "S1 and S2 train, S3 validates, unlabeled and test rows get -1"
    with pytest.raises(ValueError, match="this dataset has 3: choose --train-series below it"):
        split_by_series_order(index, train_series=3)


def test_a_series_with_two_slices_at_one_place_is_ordered_and_warned_about():
    from ihd.index import order_series

    headers = pd.DataFrame({"split": "train", "series_id": ["S", "S", "S", "T", "T"],
                            "z": [5.0, 0.0, 5.0, 5.0, 0.0], "image_id": ["ID_c", "ID_a", "ID_b", "ID_e", "ID_d"]})
    with pytest.warns(UserWarning, match=r"1 series hold two slices at one place \(1 pairs; .*\(S\)"):
        ordered = order_series(headers)
    assert ordered["image_id"].tolist() == ["ID_a", "ID_b", "ID_c", "ID_d", "ID_e"]
    assert ordered["position"].tolist() == [0, 1, 2, 0, 1]
