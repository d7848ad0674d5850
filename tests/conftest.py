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
