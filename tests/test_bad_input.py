"""prepare_data.py on a folder of real files with odd ones among them: each odd file is named in
bad_files.csv with its reason, or read as asked; the others are indexed and stored as pydicom reads them."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.pixels import apply_modality_lut

import prepare_data
from ihd.dicom import AIR_HU
from ihd.slices import SliceStore, to_model_hu

SIZE = 64


def bad_reasons(dataset_dir: Path) -> dict[str, str]:
    """{file stem: reason} of a dataset's bad_files.csv."""
    bad = pd.read_csv(dataset_dir / "bad_files.csv")
    return dict(zip(bad["path"].map(lambda p: Path(p).stem), bad["reason"]))


def pydicom_model_hu(path) -> np.ndarray:
    """A file's HU as pydicom's decoding and modality LUT give them, air floored, at the stored size."""
    ds = pydicom.dcmread(path)
    return to_model_hu(np.maximum(apply_modality_lut(ds.pixel_array, ds), AIR_HU), SIZE)


def test_odd_files_are_named_with_their_reason_and_the_rest_is_stored(odd_dicom_folder, tmp_path, monkeypatch):
    folder, expected = odd_dicom_folder
    monkeypatch.chdir(tmp_path)
    out = prepare_data.main(["--dicom-dir", str(folder), "--dataset", "odd", "--size", str(SIZE), "--workers", "1"])
    reasons = bad_reasons(out)
    assert sorted(reasons) == sorted(expected)
    for name, words in expected.items():
        assert words in reasons[name], name
    index = pd.read_parquet(out / "index.parquet")
    series = sorted((folder / "series").glob("*.dcm"))
    assert sorted(index["path"]) == sorted(str(p) for p in series)
    assert index["position"].tolist() == list(range(32))
    store = SliceStore(out / "slices")
    for row in index.iloc[::10].itertuples():
        assert np.abs(store.read_hu(row.image_id) - pydicom_model_hu(row.path)).max() <= 0.5


def test_non_ct_files_are_read_as_hu_when_asked_and_the_choice_is_recorded(odd_dicom_folder, tmp_path, monkeypatch):
    folder, expected = odd_dicom_folder
    monkeypatch.chdir(tmp_path)
    out = prepare_data.main(["--dicom-dir", str(folder), "--dataset", "odd", "--size", str(SIZE), "--workers", "1",
                             "--read-non-ct-as-hu"])
    assert sorted(bad_reasons(out)) == sorted(set(expected) - {"ctich", "mr"})
    index = pd.read_parquet(out / "index.parquet").set_index("image_id")
    assert len(index) == 34
    store = SliceStore(out / "slices")
    np.testing.assert_allclose(store.read_hu("ctich"), pydicom_model_hu(folder / "ctich.dcm"), atol=0.5)
    assert pydicom.dcmread(folder / "ctich.dcm").pixel_array.min() < -1000
    config = json.loads((out / "index_config.json").read_text())
    assert config["non_ct_as_hu"] is True and config["non_ct_read_as_hu"] == 2
    assert config["prepare_data"]["read_non_ct_as_hu"] is True
