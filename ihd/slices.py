"""The preprocessed slice store: every slice read from DICOM once, resized, kept lossless in HU.

Layout of a store folder::

    slices/config.json                       {"size": 256, "hu_offset": 1024, ...}
    slices/<image_id[3:5]>/<image_id>.png    16-bit grayscale PNG, pixel = round(HU) + 1024

The store is window-agnostic: it keeps Hounsfield units to the unit (rounding), so windows and
channel recipes stay a choice made at training time. Shard folders keep directory listings short
(256 of them for the ``ID_<hex>`` names of the challenge).

Writing is parallel over all cores and resumable: every PNG is written under a temporary sibling
name and renamed when complete, so a file with its final name is always whole; a rerun deletes
temporary leftovers and writes only the slices that are missing.

PNG encoding is the costliest step of writing a slice, so the store writes its PNGs itself: every
row gets the "up" filter (difference to the row above) and the image data is deflated by ISA-L
at level 1. On the real 512x512 RSNA slices at 256x256 that takes about 0.4 ms for 54 KB a
slice, against 1.5 ms for 51 KB through libpng's best fast setting (Huffman-only after the
"average" filter); see ``bench/preprocess.py``. Any PNG reader (TensorFlow, OpenCV, Pillow)
decodes the files.
"""
from __future__ import annotations

import functools
import os
import struct
import zlib
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
import pandas as pd
from isal import isal_zlib

from ihd.dicom import DicomError, read_hu
from ihd.io import atomic_path, is_temporary, read_json, write_json
from ihd.parallel import parallel_map

HU_OFFSET = 1024
CONFIG_FILE = "config.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_FILTER_UP = 2
DEFLATE_LEVEL = 1  # ISA-L's levels 1-3 differ by under 1% in size here; 0 is 13% larger


def shard_name(image_id: str) -> str:
    """The shard folder of an image: characters 3 and 4 of its id (``ID_3f...`` -> ``3f``)."""
    return image_id[3:5] or "_"


def slice_path(root: str | Path, image_id: str) -> Path:
    """Where the store under ``root`` keeps ``image_id``."""
    return Path(root) / shard_name(image_id) / f"{image_id}.png"


def to_model_hu(hu: np.ndarray, size: int) -> np.ndarray:
    """Resize a slice of HU to ``size`` x ``size`` float32 (cv2 INTER_AREA), as the store does."""
    hu = np.asarray(hu, dtype=np.float32)
    if hu.shape == (size, size):
        return hu
    return cv2.resize(hu, (size, size), interpolation=cv2.INTER_AREA)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_uint16_png(image: np.ndarray) -> bytes:
    """A 2-D uint16 array -> bytes of a 16-bit grayscale PNG (up filter, ISA-L deflate)."""
    rows, cols = image.shape
    raw = image.astype(">u2").view(np.uint8).reshape(rows, 2 * cols)
    filtered = np.empty((rows, 2 * cols + 1), np.uint8)
    filtered[:, 0] = PNG_FILTER_UP
    filtered[0, 1:] = raw[0]
    np.subtract(raw[1:], raw[:-1], out=filtered[1:, 1:])
    header = struct.pack(">IIBBBBB", cols, rows, 16, 0, 0, 0, 0)
    return b"".join((
        PNG_SIGNATURE,
        _png_chunk(b"IHDR", header),
        _png_chunk(b"IDAT", isal_zlib.compress(filtered.tobytes(), DEFLATE_LEVEL)),
        _png_chunk(b"IEND", b""),
    ))


def encode_png(hu: np.ndarray) -> bytes:
    """HU (float) -> bytes of a 16-bit PNG of clip(round(HU) + 1024, 0, 65535)."""
    stored = np.rint(hu)
    stored += HU_OFFSET
    np.clip(stored, 0, np.iinfo(np.uint16).max, out=stored)
    return encode_uint16_png(stored.astype(np.uint16))


def decode_png(path: str | Path) -> np.ndarray:
    """Read a stored PNG back as float32 HU."""
    stored = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if stored is None:
        raise FileNotFoundError(f"{path}: missing or unreadable slice PNG")
    if stored.dtype != np.uint16 or stored.ndim != 2:
        raise ValueError(f"{path}: expected a 16-bit grayscale PNG, found {stored.dtype} {stored.shape}")
    hu = stored.astype(np.float32)
    hu -= HU_OFFSET
    return hu


def tf_read_hu(path, size: int | None = None):
    """tf.data map function: a PNG path (string tensor) -> tf.float32 (size, size) HU."""
    import tensorflow as tf

    stored = tf.io.decode_png(tf.io.read_file(path), channels=1, dtype=tf.uint16)
    hu = tf.cast(stored[:, :, 0], tf.float32) - float(HU_OFFSET)
    if size is not None:
        hu = tf.ensure_shape(hu, (size, size))
    return hu


class SliceStore:
    """Random access by image id to a slice store written by ``write_slices``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        config_path = self.root / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: write the store with prepare_data.py first")
        self.config = read_json(config_path)
        self.size = int(self.config["size"])

    def path(self, image_id: str) -> Path:
        """The PNG file of ``image_id``."""
        return slice_path(self.root, image_id)

    def has(self, image_id: str) -> bool:
        """True when the slice has been written completely."""
        return self.path(image_id).is_file()

    def read_hu(self, image_id: str) -> np.ndarray:
        """The stored slice as float32 HU, shape (size, size)."""
        return decode_png(self.path(image_id))


def store_config(size: int) -> dict:
    """The settings a store is made with, written to its ``config.json``."""
    return {
        "size": size,
        "hu_offset": HU_OFFSET,
        "format": "16-bit grayscale PNG, pixel = clip(round(HU) + hu_offset, 0, 65535)",
        "resize": "cv2.INTER_AREA",
        "layout": "<image_id[3:5]>/<image_id>.png",
        "png": f"up filter, ISA-L deflate level {DEFLATE_LEVEL}",
    }


def check_store(root: str | Path, size: int) -> None:
    """Raise ValueError when ``root`` holds a store made another way than ``size`` asks; writes nothing."""
    config_path = Path(root) / CONFIG_FILE
    if config_path.is_file():
        found = read_json(config_path)
        if (found.get("size"), found.get("hu_offset")) != (size, HU_OFFSET):
            raise ValueError(f"{root} holds slices of size {found.get('size')} (hu_offset {found.get('hu_offset')}); "
                             f"asked for size {size}")


def _check_config(root: Path, size: int) -> None:
    """Write the store's config, or check that an existing store was made the same way."""
    try:
        check_store(root, size)
    except ValueError as error:
        raise ValueError(f"{error}: use another folder or delete this one") from None
    write_json(root / CONFIG_FILE, store_config(size))


def _existing_names(root: Path, shards: Iterable[str]) -> set[str]:
    """Names of the complete PNGs in the given shards; deletes leftovers of interrupted writes."""
    names: set[str] = set()
    for shard in shards:
        folder = root / shard
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if is_temporary(Path(entry.name)):
                    os.unlink(entry.path)
                elif entry.name.endswith(".png"):
                    names.add(entry.name)
    return names


def write_one_slice(item: tuple[str, str], root: str, size: int, non_ct_as_hu: bool = False) -> tuple[str, str] | None:
    """Read one DICOM file and store its slice; returns (path, reason) when the file is unreadable
    (``non_ct_as_hu``: see ``ihd.dicom.read_hu``)."""
    image_id, dicom_path = item
    try:
        hu = read_hu(dicom_path, non_ct_as_hu)
    except DicomError as error:
        return dicom_path, error.reason
    encoded = encode_png(to_model_hu(hu, size))
    with atomic_path(slice_path(root, image_id)) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(encoded)
    return None


def write_slices(
    index: pd.DataFrame, root: str | Path, size: int = 256, workers: int | None = None, non_ct_as_hu: bool = False
) -> list[tuple[str, str]]:
    """Store every slice of ``index`` (columns image_id, path) that the store lacks.

    Returns (path, reason) for each DICOM file that could not be read; the others are written.
    ``non_ct_as_hu`` reads modalities other than CT as HU (``ihd.dicom.read_hu``).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _check_config(root, size)
    image_ids = index["image_id"].astype(str).tolist()
    done = _existing_names(root, sorted({shard_name(i) for i in image_ids}))
    todo = [(i, str(p)) for i, p in zip(image_ids, index["path"]) if f"{i}.png" not in done]
    print(f"slice store {root}: {len(image_ids) - len(todo)} of {len(image_ids)} slices present, writing {len(todo)}")
    writer = functools.partial(write_one_slice, root=str(root), size=size, non_ct_as_hu=non_ct_as_hu)
    failures = parallel_map(writer, todo, workers=workers, desc="slices", unit="slice")
    return sorted(failure for failure in failures if failure is not None)
