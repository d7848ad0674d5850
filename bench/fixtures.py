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


def tf_read_png_bytes(store: SliceStore, slots):
    """tf.data map function, the store's read path before it decoded its own PNGs: manifest rows
    (int64 tensor of any shape) -> their checked PNG bytes (tf.string, same shape), in one Python call."""
    import tensorflow as tf

    def read(slot_array):
        return np.array(store.read_pngs(slot_array.ravel()), dtype=object).reshape(slot_array.shape)

    return tf.ensure_shape(tf.numpy_function(read, [slots], tf.string, stateful=False), slots.shape)


def tf_decode_png_hu(png):
    """TensorFlow's own decoder: the bytes of a stored PNG (string tensor) -> tf.float32 HU (height, width)."""
    import tensorflow as tf

    from ihd.slices import tf_hu

    return tf_hu(tf.io.decode_png(png, channels=1, dtype=tf.uint16)[:, :, 0])
