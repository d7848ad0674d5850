"""Fixtures shared by the test modules."""
import shutil
from pathlib import Path

import pydicom
import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real head CT DICOM fixtures (RSNA slices, one RSNA series, one CQ500 series)."""
    assert REAL_DATA.is_dir(), f"real DICOM fixtures not found at {REAL_DATA}"
    return REAL_DATA


@pytest.fixture(scope="session")
def prepared_synthetic(tmp_path_factory) -> Path:
    """The small synthetic dataset, written, indexed and stored at 64x64: returns ``data/small/``."""
    import prepare_data

    data_dir = tmp_path_factory.mktemp("data")
    return prepare_data.main(["--synthetic", "--small", "--dataset", "small", "--size", "64", "--data-dir", str(data_dir)])


@pytest.fixture(scope="session")
def odd_dicom_folder(real_data, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A folder holding the real RSNA series, a CT-ICH OT file and odd copies of real slices, and
    {file stem: the words its bad_files.csv reason must hold} for the files not read as HU by default."""
    folder = tmp_path_factory.mktemp("odd_export")
    shutil.copytree(real_data / "rsna_series", folder / "series")
    shutil.copy(real_data / "ctich_masks" / "images" / "049_21.dcm", folder / "ctich.dcm")
    slices = sorted((real_data / "rsna_slices").glob("ID_*.dcm"))

    def odd(name, source, edit):
        ds = pydicom.dcmread(source)
        edit(ds)
        ds.save_as(folder / f"{name}.dcm")

    odd("mr", slices[0], lambda ds: setattr(ds, "Modality", "MR"))
    odd("slope_nan", slices[1], lambda ds: setattr(ds, "RescaleSlope", "nan"))
    odd("intercept_huge", slices[2], lambda ds: setattr(ds, "RescaleIntercept", "1e9"))

    def empty_image(ds):
        ds.Rows, ds.Columns, ds.PixelData = 0, 0, b""

    def unparsable_position(ds):
        del ds.ImagePositionPatient
        ds.add_new(0x00200032, "LO", ["abc", "1", "2"])

    odd("empty", slices[3], empty_image)
    odd("bad_position", slices[4], unparsable_position)  # fails at the header scan
    odd("bad_frames", slices[5], lambda ds: ds.add_new(0x00280008, "LO", "abc"))  # fails at the pixels, not the scan
    copied = sorted((folder / "series").glob("*.dcm"))[7]
    shutil.copy(copied, folder / "series_copy.dcm")
    return folder, {
        "ctich": "modality OT, not CT",
        "mr": "modality MR, not CT",
        "slope_nan": "RescaleSlope nan is not a CT slope",
        "intercept_huge": "RescaleIntercept 1000000000.0 is not a CT intercept",
        "empty": "image of 0x0 pixels, smaller than 64x64",
        "bad_position": "unreadable (ValueError: could not convert string to float: 'abc')",
        "bad_frames": "unreadable (ValueError: invalid literal for int() with base 10: 'abc')",
        "series_copy": f"same SOPInstanceUID {copied.stem} as {copied}",
    }
