"""Fixtures shared by the test modules."""
from pathlib import Path

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
