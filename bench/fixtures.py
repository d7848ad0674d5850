"""Slice stores made from the real RSNA files, the shared input of the benchmarks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ihd.slices import SliceStore, write_slices

REAL_SLICES = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "rsna_slices"


def store_of_real_slices(work_dir: Path, count: int, size: int) -> tuple[pd.DataFrame, SliceStore]:
    """A slice store of ``count`` slices made from the real RSNA files, repeated; each its own series."""
    files = sorted(REAL_SLICES.glob("ID_*.dcm"))
    image_ids = [f"ID_{n:09x}" for n in range(count)]
    index = pd.DataFrame({
        "image_id": image_ids,
        "path": [str(files[n % len(files)]) for n in range(count)],
        "series_id": image_ids,
        "position": np.zeros(count, np.int32),
    })
    failures = write_slices(index, work_dir / "slices", size=size, workers=None)
    if failures:
        raise RuntimeError(f"unreadable fixture files: {failures}")
    return index, SliceStore(work_dir / "slices")
