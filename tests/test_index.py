"""Tests for ihd.index: grouping, ordering along the slice normal, folds by patient, bad files."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from ihd.dicom import read_header
from ihd.index import INDEX_COLUMNS, assign_folds, build_index, make_ids_unique, read_index
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


def test_fewer_patients_than_folds_warns_about_the_empty_folds():
    index = pd.DataFrame({"split": "train", "patient_id": ["a", "a", "b", "c"], "any": 0.0})
    with pytest.warns(UserWarning, match="3 labeled patients cannot fill 5 folds: folds 3, 4 are empty"):
        folds = assign_folds(index, folds=5)
    assert sorted(set(folds)) == [0, 1, 2] and folds[0] == folds[1]
