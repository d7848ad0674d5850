"""The preprocessed slice store: every slice read from DICOM once, resized, kept lossless in HU.

Layout of a store folder::

    slices/config.json                           {"size": 256, "hu_offset": 1024, ...}
    slices/manifest.parquet                      image_id, pack, offset, length, crc32, and the source
                                                 file's path, size and mtime: one row a slice
    slices/<id[3:5]>/<first image id>.<tag>.pack  the slices of one series, back to back

Every slice is a 16-bit grayscale PNG, pixel = round(HU) + 1024 (halves up): the store is window-agnostic
and keeps Hounsfield units to the unit (rounding), so windows and channel recipes stay a choice
made at training time. A pack holds the PNGs of one series (at most ``MAX_PACK_SLICES``), so the
challenge's 874,035 slices make about 25,000 files instead of 874,035: creating, renaming and
listing one small file per slice cost as much as encoding it (see ``bench/preprocess.py``).

Writing is parallel over series and resumable. A pack is written under a temporary name and renamed
when complete; the manifest, rewritten atomically every ``MANIFEST_FLUSH_SECONDS`` and at the end,
lists only slices of renamed packs, with the size and CRC-32 of each PNG computed when it was
encoded. A rerun checks every listed slice against its size and CRC (a pack cut short or
overwritten with zeros fails), writes the damaged and the unlisted slices again into new packs,
and deletes the packs and temporary files nothing valid points to. It also writes again a slice whose
DICOM file has changed since (size or modification time), or whose id the index now gives another file.

Reading checks the same size and CRC for every slice it returns, and never decodes a damaged
slice: ``SliceStore.read_hu`` raises ``DamagedSliceError``, and ``SliceStore.tf_read_rows`` (for
``tf.data``) an ``InvalidArgumentError``, each naming the pack and the image. ``tf_read_rows``
reads, checks, inflates and unfilters a whole batch of slices in one Python call (``pread``, the
CRC, then ``unfiltered_rows``); ``tf_hu_of_rows`` turns the rows' big-endian words into HU in the
graph, per slice, where the byte swap that numpy did for the whole batch costs less and needs no
Python lock. tf.data's threads share that lock, so the per-slice Python work is kept to the read,
the checks and the inflation: a batch gathers its
manifest rows with numpy, and the names that errors need are made only for a slice that fails. The
store decodes its PNGs itself, for the one form its writer produces, with the same checks as libpng
(every chunk's CRC-32, the stream's Adler-32) and the same pixels (``tests/test_slices.py`` compares
them on every stored slice): the writer's layout, one IDAT chunk, is recognised by comparing bytes
(any other layout is parsed chunk by chunk), ISA-L inflates outside the Python lock in half of
zlib's time, and the "up" filter is undone for the whole batch at once. Any other PNG is refused by
name. TensorFlow has no op that reads a byte range of a file without reading what precedes it
(``FixedLengthRecordDataset`` skips its header by reading it), so a native read of slice k of a pack
would read the k slices before it too: ``bench/preprocess.py`` measures both.

Through libpng, encoding a PNG cost more than reading the DICOM file, so the store writes its PNGs
itself: every row gets the "up" filter (difference to the row above) and the image data is
deflated by ISA-L at level 3: about 0.31 ms for 54 KB a slice at 256x256, against 0.9 ms for 51 KB
through libpng's best fast setting (Huffman-only after the "up" or "average" filter). Level 3 costs
0.03 ms more to write than level 1 and saves 0.03 ms each time a slice is decoded, once an epoch
(``bench/preprocess.py``). Any PNG reader decodes the slices; a store written at another level
holds the same pixels, is read as it is, and its config.json records both levels.
"""
from __future__ import annotations

import functools
import hashlib
import os
import secrets
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from isal import isal_zlib

from ihd.dicom import DicomError, read_hu, read_hu_at, read_offset_hu_at
from ihd.index import pixel_reading
from ihd.io import atomic_path, file_state, is_temporary, read_json, write_json
from ihd.parallel import parallel_map

HU_OFFSET = 1024
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.parquet"
MANIFEST_COLUMNS = ["image_id", "pack", "offset", "length", "crc32"]  # where each slice lies: what a reader needs
SOURCE_COLUMNS = ["source_path", "source_bytes", "source_mtime_ns"]  # the DICOM file it was made from, as it was then
UNKNOWN_SOURCE = {"source_path": None, "source_bytes": -1, "source_mtime_ns": -1}  # a slice stored before they were kept
PACK_SUFFIX = ".pack"
LAYOUT = "<image_id[3:5]>/<first image_id>.<tag>.pack: a series' PNGs back to back; manifest.parquet"
MAX_PACK_SLICES = 256  # thin-slice series reach 500+ slices: packs stay under about 15 MB
MANIFEST_FLUSH_SECONDS = 30.0  # an interrupted run writes again at most this long's slices
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_FILTER_UP = 2
PNG_HEADER = ">IIBBBBB"  # IHDR: width, height, bit depth, colour type, compression, filter method, interlace method
DEFLATE_LEVEL = 3  # the fastest to inflate of ISA-L's levels 0-3; 1-3 differ by under 2% in size, 0 is 13% larger


class DamagedSliceError(ValueError):
    """A stored slice whose bytes differ from what was written; the message names pack and image."""


def shard_name(image_id: str) -> str:
    """The shard folder of an image: characters 3 and 4 of its id (``ID_3f...`` -> ``3f``)."""
    return image_id[3:5] or "_"


def to_model_hu(hu: np.ndarray, size: int) -> np.ndarray:
    """Resize a slice of HU to ``size`` x ``size`` float32 (cv2 INTER_AREA), as the store does."""
    hu = np.asarray(hu, dtype=np.float32)
    if hu.shape == (size, size):
        return hu
    return cv2.resize(hu, (size, size), interpolation=cv2.INTER_AREA)


def model_hu_through_store(hu: np.ndarray, store_size: int, image_size: int) -> np.ndarray:
    """A slice of HU as training and extraction read it: resized to the store's size and kept as the store keeps
    it (whole HU, air floor), then, for a model smaller than the store, resized again (the area resize that
    `ihd.inputs` does in TensorFlow; OpenCV's here agrees to 0.001 HU). Resizing once, straight to the model's
    size, differs by hundreds of HU at the edge of bone wherever the sizes are not whole multiples."""
    stored = stored_values(to_model_hu(hu, store_size)).astype(np.float32) - np.float32(HU_OFFSET)
    return to_model_hu(stored, image_size) if image_size < store_size else stored


def _png_chunk(kind: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    """One PNG chunk in three parts: length and type, data, CRC of type and data."""
    return struct.pack(">I", len(data)) + kind, data, struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def encode_uint16_png(image: np.ndarray, level: int = DEFLATE_LEVEL) -> bytes:
    """A 2-D uint16 array -> bytes of a 16-bit grayscale PNG (up filter, ISA-L deflate at ``level``, 0 to 3)."""
    rows, cols = image.shape
    raw = image.astype(">u2", order="C").view(np.uint8).reshape(rows, 2 * cols)
    filtered = np.empty((rows, 2 * cols + 1), np.uint8)
    filtered[:, 0] = PNG_FILTER_UP
    filtered[0, 1:] = raw[0]
    np.subtract(raw[1:], raw[:-1], out=filtered[1:, 1:])
    header = struct.pack(PNG_HEADER, cols, rows, 16, 0, 0, 0, 0)
    return b"".join((
        PNG_SIGNATURE,
        *_png_chunk(b"IHDR", header),
        *_png_chunk(b"IDAT", isal_zlib.compress(filtered.data, level)),
        *_png_chunk(b"IEND", b""),
    ))


def stored_values(hu: np.ndarray) -> np.ndarray:
    """HU (float) -> the store's uint16 pixels: clip(floor(HU + 0.5) + 1024, 0, 65535), halves up."""
    stored = np.floor(hu + np.float32(0.5))
    stored += HU_OFFSET
    np.clip(stored, 0, np.iinfo(np.uint16).max, out=stored)
    return stored.astype(np.uint16)


def stored_values_of_offset_hu(offset_hu: np.ndarray, size: int) -> np.ndarray | None:
    """``stored_values(to_model_hu(hu, size))`` from whole-number ``hu + 1024`` held in uint16, for a
    side of ``size`` or twice that: OpenCV's INTER_AREA on uint16 adds each 2x2 block and rounds the
    sum's quarter halves up, the float path's values in a third of the time. None for other sides."""
    if offset_hu.shape == (size, size):
        return offset_hu
    if offset_hu.shape != (2 * size, 2 * size):
        return None
    return cv2.resize(offset_hu, (size, size), interpolation=cv2.INTER_AREA)


def _square_header(size: int) -> bytes:
    """The IHDR data of the store's PNGs at ``size`` x ``size``: 16-bit grayscale, no interlacing."""
    return struct.pack(PNG_HEADER, size, size, 16, 0, 0, 0, 0)


@functools.lru_cache(maxsize=8)
def _one_idat_frame(size: int) -> tuple[bytes, bytes]:
    """What surrounds the image data of a PNG in ``encode_uint16_png``'s form at ``size`` x ``size``
    written as one IDAT chunk: the signature and IHDR chunk before it, the IEND chunk after it."""
    header = b"".join(_png_chunk(b"IHDR", _square_header(size)))
    return PNG_SIGNATURE + header, b"".join(_png_chunk(b"IEND", b""))


def _image_data(png: bytes, size: int) -> bytes | memoryview:
    """The zlib stream of a PNG in ``encode_uint16_png``'s form at ``size`` x ``size``: IHDR (16-bit
    grayscale, no interlacing), IDAT chunks, IEND, nothing after it, every chunk's CRC-32 as libpng
    checks it. Anything else raises ``DamagedSliceError`` saying what is wrong.

    The form the store writes, one IDAT chunk between fixed IHDR and IEND chunks, is recognised by
    comparing bytes; any other layout is parsed chunk by chunk, with the same checks."""
    view = memoryview(png)
    before, after = _one_idat_frame(size)
    end = len(png) - len(after) - 4
    if (png.startswith(before) and png.endswith(after) and png[len(before) + 4:len(before) + 8] == b"IDAT"
            and struct.unpack_from(">I", png, len(before))[0] == end - len(before) - 8):
        body = view[len(before) + 8:end]
        if isal_zlib.crc32(body, isal_zlib.crc32(b"IDAT")) != struct.unpack_from(">I", png, end)[0]:
            raise DamagedSliceError("PNG chunk b'IDAT' fails its CRC-32")
        return body
    if view[:len(PNG_SIGNATURE)] != PNG_SIGNATURE:
        raise DamagedSliceError("not a PNG (no PNG signature)")
    position, kinds, header, data = len(PNG_SIGNATURE), [], None, []
    while not kinds or kinds[-1] != b"IEND":
        if position + 12 > len(png):
            raise DamagedSliceError("PNG ends before its IEND chunk")
        length, kind = struct.unpack_from(">I4s", png, position)
        end = position + 12 + length
        if end > len(png):
            raise DamagedSliceError(f"PNG chunk {kind!r} cut short")
        body = view[position + 8:end - 4]
        if isal_zlib.crc32(body, isal_zlib.crc32(kind)) != struct.unpack_from(">I", png, end - 4)[0]:
            raise DamagedSliceError(f"PNG chunk {kind!r} fails its CRC-32")
        if kind == b"IHDR":
            header = body
        elif kind == b"IEND" and length:
            raise DamagedSliceError(f"PNG IEND chunk holds {length} bytes, not none")
        elif kind == b"IDAT":
            data.append(body)
        kinds.append(kind)
        position = end
    if position != len(png):
        raise DamagedSliceError(f"{len(png) - position} bytes after the PNG's IEND chunk")
    if kinds[0] != b"IHDR" or set(kinds[1:-1]) != {b"IDAT"}:
        raise DamagedSliceError(f"PNG chunks {[kind.decode('latin-1') for kind in kinds]}, "
                                "not the IHDR, IDAT, IEND this store writes")
    if header != _square_header(size):
        raise DamagedSliceError(f"expected a {size}x{size} 16-bit grayscale PNG without interlacing, "
                                f"found the header {bytes(header).hex()} (width, height, bit depth, colour "
                                "type, compression, filter, interlacing)")
    return data[0] if len(data) == 1 else b"".join(data)


def _filtered_rows(png: bytes, size: int) -> bytes:
    """The filtered rows of one of the store's PNGs, inflated and checked (the up filter on every row);
    ``DamagedSliceError`` saying what is wrong otherwise."""
    row_bytes = 2 * size + 1
    stream = isal_zlib.decompressobj()
    try:
        rows = stream.decompress(_image_data(png, size), size * row_bytes + 1)
    except isal_zlib.error as error:
        raise DamagedSliceError(f"PNG image data does not inflate ({error})") from None
    if not stream.eof:
        raise DamagedSliceError("PNG image data ends before its zlib stream does")
    if len(rows) != size * row_bytes or stream.unused_data:
        raise DamagedSliceError(f"PNG image data inflates to {len(rows)} bytes "
                                f"(then {len(stream.unused_data)} more), not {size * row_bytes}")
    if rows[::row_bytes] != bytes([PNG_FILTER_UP]) * size:
        raise DamagedSliceError("PNG rows use filters other than up, which this store never writes")
    return rows


def unfiltered_rows(pngs: list[bytes], wheres, size: int) -> np.ndarray:
    """The store's PNGs (``encode_uint16_png``'s form, ``size`` x ``size``) -> their image rows, inflated and
    unfiltered, uint8 (len(pngs), size, 2 * size + 1): after each row's first byte, which is not image data,
    its pixels as big-endian 16-bit words. ``wheres[k]`` names PNG k in errors (``DamagedSliceError``); it
    is looked up only for a PNG that fails.

    The one form the store writes, for a whole batch at once: every chunk's CRC-32 checked, the image
    data inflated by ISA-L outside the Python lock (its Adler-32 checked), the "up" filter undone for all
    the slices together, one numpy addition of bytes modulo 256 per row. Anything else (another chunk,
    header, filter or interlacing, a stream cut short or of another length) is refused, never decoded as
    zeros. The words are left in PNG byte order: ``decode_pngs`` swaps them in numpy, ``tf_hu_of_rows`` in
    the graph.
    """
    row_bytes = 2 * size + 1
    rows = np.empty((len(pngs), size, row_bytes), np.uint8)
    for k, png in enumerate(pngs):
        try:
            filtered = _filtered_rows(png, size)
        except DamagedSliceError as error:
            raise DamagedSliceError(f"{wheres[k]}: {error}") from None
        rows[k] = np.frombuffer(filtered, np.uint8).reshape(size, row_bytes)
    for row in range(1, size):
        np.add(rows[:, row], rows[:, row - 1], out=rows[:, row])
    return rows


def decode_pngs(pngs: list[bytes], wheres, size: int) -> np.ndarray:
    """The store's PNGs -> their pixels, uint16 (len(pngs), size, size), as libpng decodes them
    (``unfiltered_rows``, then the big-endian words swapped)."""
    return unfiltered_rows(pngs, wheres, size)[:, :, 1:].view(">u2").astype(np.uint16)


def decode_png(png: bytes, where: str, size: int) -> np.ndarray:
    """The bytes of a stored PNG -> float32 HU (size, size); ``where`` names the slice in errors."""
    hu = decode_pngs([png], [where], size)[0].astype(np.float32)
    hu -= HU_OFFSET
    return hu


def tf_hu(stored):
    """TensorFlow ops: stored pixels (uint16 tensor, any shape) -> float32 HU."""
    import tensorflow as tf

    return tf.cast(stored, tf.float32) - float(HU_OFFSET)


def tf_hu_of_rows(rows):
    """TensorFlow ops: image rows as ``SliceStore.tf_read_rows`` gives them (uint8, (..., size, 2 * size + 1))
    -> float32 HU (..., size, size): each big-endian word's high byte times 256 plus its low byte, less
    ``HU_OFFSET``. Exact: every stored value is an integer under 2^16, which float32 holds."""
    import tensorflow as tf

    size = rows.shape[-2]
    words = tf.reshape(rows[..., 1:], tf.concat([tf.shape(rows)[:-1], [size, 2]], axis=0))
    return tf.cast(words[..., 0], tf.float32) * 256.0 + tf.cast(words[..., 1], tf.float32) - float(HU_OFFSET)


def read_manifest(root: str | Path, sources: bool = False) -> pd.DataFrame:
    """The manifest of the store under ``root`` (columns ``MANIFEST_COLUMNS``, with ``sources`` also
    ``SOURCE_COLUMNS``, ``UNKNOWN_SOURCE`` where not recorded); empty when absent."""
    path = Path(root) / MANIFEST_FILE
    columns = MANIFEST_COLUMNS + (SOURCE_COLUMNS if sources else [])
    if not path.is_file():
        return pd.DataFrame({column: pd.Series(dtype=object if column in ("image_id", "pack", "source_path") else np.int64)
                             for column in columns})
    if not sources:
        return pd.read_parquet(path, columns=columns)
    return _with_sources(pd.read_parquet(path))


def _with_sources(manifest: pd.DataFrame) -> pd.DataFrame:
    """``manifest`` with every column of ``SOURCE_COLUMNS``, ``UNKNOWN_SOURCE`` where it has none."""
    manifest = manifest.copy()
    for column, unknown in UNKNOWN_SOURCE.items():
        if column not in manifest.columns:
            manifest[column] = unknown
    return manifest[MANIFEST_COLUMNS + SOURCE_COLUMNS]


def write_manifest(root: str | Path, manifest: pd.DataFrame) -> None:
    """Replace the manifest of the store under ``root`` atomically (source columns it lacks are written unknown)."""
    with atomic_path(Path(root) / MANIFEST_FILE) as tmp:
        _with_sources(manifest).to_parquet(tmp, index=False)


def unchanged_sources(manifest: pd.DataFrame, wanted: pd.DataFrame) -> pd.DataFrame:
    """The manifest rows (with ``SOURCE_COLUMNS``) still made from the files ``wanted`` (columns image_id, path)
    names for them, as those files are now; rows of images not wanted stay.

    A slice whose file changed since it was stored, or whose id another file now gives, is dropped, so
    that it is stored again. A slice stored without a record of its file (by an earlier version) takes
    the file's state as it is now.
    """
    path_of = pd.Series(wanted["path"].astype(str).to_numpy(), index=wanted["image_id"].astype(str).to_numpy())
    paths = manifest["image_id"].map(path_of)
    listed = paths.notna().to_numpy()
    now = np.full((len(manifest), 2), -2, np.int64)  # -2: not wanted now, or the file cannot be seen
    for row in np.flatnonzero(listed):
        now[row] = file_state(paths.iat[row]) or (-2, -2)
    manifest = manifest.copy()
    unknown = listed & (manifest["source_bytes"].to_numpy() < 0)
    manifest.loc[unknown, "source_path"] = paths[unknown]
    manifest.loc[unknown, "source_bytes"] = now[unknown, 0]
    manifest.loc[unknown, "source_mtime_ns"] = now[unknown, 1]
    recorded = manifest[["source_bytes", "source_mtime_ns"]].to_numpy(np.int64)
    changed = listed & ((now[:, 0] == -2) | (manifest["source_path"] != paths).to_numpy() | (recorded != now).any(axis=1))
    if changed.any():
        print(f"slice store: {int(changed.sum())} stored slices were made from a file that has changed since, or "
              f"from another file of the same id (first {manifest['image_id'].iloc[int(np.argmax(changed))]}): "
              f"storing them again")
    return manifest[~changed].reset_index(drop=True)


def check_slice(png: bytes, length: int, crc32: int) -> str | None:
    """Why the bytes read for a slice are not what was written (None when they are)."""
    if len(png) != length:
        return f"{len(png)} of {length} bytes (truncated)"
    if isal_zlib.crc32(png) != crc32:
        return "CRC-32 differs from the one recorded at write time (overwritten or zero-filled)"
    return None


class SliceStore:
    """Random access by image id to a slice store written by ``write_slices``.

    The manifest is read once, when the store is opened: open it again to see slices written since.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        config_path = self.root / CONFIG_FILE
        if not config_path.is_file():
            dataset_dir = self.root.parent
            raise FileNotFoundError(f"{config_path} not found: write the store with prepare_data.py --dataset "
                                    f"{dataset_dir.name} --data-dir {dataset_dir.parent} and its source flags")
        self.config = read_json(config_path)
        if self.config.get("layout") != LAYOUT:
            raise ValueError(f"{self.root} holds slices in an earlier layout ({self.config.get('layout')}): "
                             "write the store again with prepare_data.py into a new folder")
        self.size = int(self.config["size"])
        manifest = read_manifest(self.root)
        self.image_ids = pd.Index(manifest["image_id"])
        pack_of_slot, packs = pd.factorize(manifest["pack"])
        self._pack_of_slot = pack_of_slot.astype(np.int64)
        self._pack_paths = [os.path.join(self.root, pack) for pack in packs]
        self._offsets = manifest["offset"].to_numpy(np.int64)
        self._lengths = manifest["length"].to_numpy(np.int64)
        self._crcs = manifest["crc32"].to_numpy(np.int64)

    def has(self, image_id: str) -> bool:
        """True when the slice was written completely (as of opening the store)."""
        return image_id in self.image_ids

    def slots(self, image_ids) -> np.ndarray:
        """Manifest rows (int64) of ``image_ids``, the keys ``tf_read_rows`` reads by; refuses absent ids."""
        wanted = pd.Index(image_ids)
        slots = self.image_ids.get_indexer(wanted)
        missing = np.flatnonzero(slots < 0)
        if len(missing):
            first = [str(image_id) for image_id in wanted[missing[:3]]]
            raise KeyError(f"{self.root}: {len(missing)} slices are not in the store (first {first}): "
                           "run prepare_data.py to store them")
        return slots.astype(np.int64)

    def contents_sha256(self, image_ids) -> str:
        """A sha256 of what the store holds for ``image_ids``, in their order (each slice's CRC-32): it changes
        when any of them is stored again with other pixels; refuses absent ids."""
        return hashlib.sha256(self._crcs[self.slots(image_ids)].astype("<i8").tobytes()).hexdigest()

    def location(self, image_id: str) -> tuple[Path, int, int]:
        """(pack file, byte offset, byte length) of ``image_id``'s PNG."""
        slot = int(self.slots([image_id])[0])
        return Path(self._pack_paths[self._pack_of_slot[slot]]), int(self._offsets[slot]), int(self._lengths[slot])

    def read_png(self, slot: int) -> bytes:
        """The checked PNG bytes of manifest row ``slot``; ``DamagedSliceError`` when they differ."""
        return self.read_pngs(np.array([slot]))[0]

    def read_pngs(self, slots: np.ndarray) -> list[bytes]:
        """The checked PNG bytes of manifest rows ``slots`` (1-D); ``DamagedSliceError`` names the first
        that differs from what was written. The per-slice work is a ``pread`` and a CRC: the names
        that errors need are only made for the slice that fails."""
        paths = self._pack_paths
        pngs = []
        for slot, pack, offset, length, crc in zip(slots.tolist(), self._pack_of_slot[slots].tolist(),
                                                   self._offsets[slots].tolist(), self._lengths[slots].tolist(),
                                                   self._crcs[slots].tolist()):
            try:
                descriptor = os.open(paths[pack], os.O_RDONLY)
            except FileNotFoundError:
                raise DamagedSliceError(f"{self._where(slot)} (bytes {offset}-{offset + length}): pack file "
                                        "missing; rerun prepare_data.py") from None
            try:
                png = os.pread(descriptor, length, offset)
            finally:
                os.close(descriptor)
            reason = check_slice(png, length, crc)
            if reason is not None:
                raise DamagedSliceError(f"{self._where(slot)} (bytes {offset}-{offset + length}): {reason}; "
                                        "rerun prepare_data.py to write it again")
            pngs.append(png)
        return pngs

    def read_hu(self, image_id: str) -> np.ndarray:
        """The stored slice as float32 HU, shape (size, size)."""
        slot = int(self.slots([image_id])[0])
        return decode_png(self.read_png(slot), self._where(slot), self.size)

    def read_rows(self, slots: np.ndarray) -> np.ndarray:
        """The image rows of manifest rows ``slots`` (any shape), checked, inflated and unfiltered
        (``unfiltered_rows``): uint8, shape ``slots.shape + (size, 2 * size + 1)``."""
        slots = np.asarray(slots, dtype=np.int64)
        flat = slots.ravel()
        rows = unfiltered_rows(self.read_pngs(flat), _SliceNames(self, flat), self.size)
        return rows.reshape(*slots.shape, self.size, 2 * self.size + 1)

    def tf_read_rows(self, slots):
        """tf.data map function on a batch: manifest rows (int64 tensor of any shape, from ``slots``) -> their
        checked image rows (tf.uint8, shape + (size, 2 * size + 1), ``read_rows``) in one Python call;
        ``tf_hu_of_rows`` makes them HU. A damaged slice is an ``InvalidArgumentError`` naming pack and image."""
        import tensorflow as tf

        rows = tf.numpy_function(self.read_rows, [slots], tf.uint8, stateful=False)
        return tf.ensure_shape(rows, (*slots.shape, self.size, 2 * self.size + 1))

    def _where(self, slot: int) -> str:
        """The pack and image of manifest row ``slot``, as errors name them."""
        return f"{self._pack_paths[self._pack_of_slot[slot]]}: slice {self.image_ids[slot]}"


class _SliceNames:
    """The names of a batch of slices as errors give them, made only when one is asked for."""

    def __init__(self, store: SliceStore, slots: np.ndarray):
        self.store, self.slots = store, slots

    def __getitem__(self, k: int) -> str:
        return self.store._where(int(self.slots[k]))


def store_config(size: int) -> dict:
    """The settings a store is made with, written to its ``config.json``."""
    return {
        "size": size,
        "hu_offset": HU_OFFSET,
        "format": "16-bit grayscale PNG, pixel = clip(floor(HU + 0.5) + hu_offset, 0, 65535)",
        "resize": "cv2.INTER_AREA",
        "layout": LAYOUT,
        "png": f"up filter, ISA-L deflate level {DEFLATE_LEVEL}",
        "checks": "size and CRC-32 of every PNG, recorded in the manifest at write time",
    }


def check_store(root: str | Path, size: int) -> None:
    """Raise ValueError when ``root`` holds a store made another way than ``size`` asks; writes nothing."""
    config_path = Path(root) / CONFIG_FILE
    if config_path.is_file():
        found = read_json(config_path)
        if (found.get("size"), found.get("hu_offset")) != (size, HU_OFFSET):
            raise ValueError(f"{root} holds slices of size {found.get('size')} (hu_offset {found.get('hu_offset')}); "
                             f"asked for size {size}")
        if found.get("layout") != LAYOUT:
            raise ValueError(f"{root} holds slices in an earlier layout ({found.get('layout')})")


def _check_config(root: Path, size: int) -> None:
    """Write the store's config, or check that an existing store was made the same way. A store whose
    earlier slices were deflated another way (the same pixels) keeps that in its record too."""
    try:
        check_store(root, size)
    except ValueError as error:
        raise ValueError(f"{error}: use another folder or delete this one") from None
    config = store_config(size)
    earlier = read_json(root / CONFIG_FILE).get("png") if (root / CONFIG_FILE).is_file() else None
    if earlier and not earlier.endswith(config["png"]):
        config["png"] = f"{earlier}; slices written later: {config['png']}"
    elif earlier:
        config["png"] = earlier
    write_json(root / CONFIG_FILE, config)


def check_pack(item: tuple[str, np.ndarray, np.ndarray, np.ndarray], root: str) -> tuple[str, np.ndarray]:
    """For one pack (relative path, offsets, lengths, CRCs of its manifest rows): (path, which rows are intact)."""
    pack, offsets, lengths, crcs = item
    try:
        data = (Path(root) / pack).read_bytes()
    except FileNotFoundError:
        return pack, np.zeros(len(offsets), bool)
    return pack, np.array([check_slice(data[offset:offset + length], length, crc) is None
                           for offset, length, crc in zip(offsets, lengths, crcs)], bool)


def verified_manifest(root: Path, workers: int | None = None) -> pd.DataFrame:
    """The manifest rows whose slices are intact; deletes what no intact row points to.

    Every listed slice is read and checked against the size and CRC-32 recorded when it was
    written. Temporary files of interrupted writes and packs that hold no intact slice (written
    but never listed, or wholly damaged) are deleted.
    """
    manifest = read_manifest(root, sources=True)
    intact = np.zeros(len(manifest), bool)
    if len(manifest):
        groups = manifest.groupby("pack", sort=False).indices
        items = [(pack, manifest["offset"].to_numpy()[rows], manifest["length"].to_numpy()[rows],
                  manifest["crc32"].to_numpy()[rows]) for pack, rows in groups.items()]
        checker = functools.partial(check_pack, root=str(root))
        for pack, ok in parallel_map(checker, items, workers=workers, desc="check store", unit="pack"):
            intact[groups[pack]] = ok
    damaged = manifest[~intact]
    if len(damaged):
        packs = sorted(damaged["pack"].unique())
        print(f"slice store {root}: {len(damaged)} stored slices are damaged (truncated or overwritten) in "
              f"{len(packs)} packs, first {packs[0]}: writing them again")
    manifest = manifest[intact].reset_index(drop=True)
    keep = set(manifest["pack"])
    for path in [*root.iterdir(), *root.glob("*/*")]:
        if is_temporary(path) or (path.suffix == PACK_SUFFIX and path.relative_to(root).as_posix() not in keep):
            path.unlink()
    return manifest


def pack_groups(todo: pd.DataFrame) -> list[list[tuple[str, str, tuple | None]]]:
    """The (image_id, path, pixel reading) items of ``todo``, one list a pack: by series (column
    ``series_id`` when present, else in row order), at most ``MAX_PACK_SLICES`` each. The pixel
    reading (``ihd.index.pixel_reading``) comes from the columns of ``ihd.index.pixel_readings`` when
    ``todo`` has them; it is None otherwise, and the file is then parsed again (``read_hu``)."""
    series = todo["series_id"].to_numpy() if "series_id" in todo.columns else np.zeros(len(todo))
    if "pixel_offset" in todo.columns:
        readings = [pixel_reading(row) for row in todo.to_dict("records")]
    else:
        readings = [None] * len(todo)
    items = list(zip(todo["image_id"].astype(str), todo["path"].astype(str), readings))
    groups = []
    for rows in pd.Series(np.arange(len(todo))).groupby(series, sort=False).indices.values():
        members = [items[row] for row in rows]
        groups += [members[start:start + MAX_PACK_SLICES] for start in range(0, len(members), MAX_PACK_SLICES)]
    return groups


def slice_png(dicom_path: str, reading: tuple | None, size: int, non_ct_as_hu: bool = False) -> bytes:
    """The stored PNG of one DICOM file at ``size``: with a pixel reading from the header pass
    (``ihd.index.pixel_reading``) one ``pread`` and no second parse while the file is unchanged
    (``ihd.dicom.read_offset_hu_at``, whole HU resized in uint16, or ``ihd.dicom.read_hu_at``);
    without one, ``ihd.dicom.read_hu``. Raises ``DicomError`` for a file it cannot read."""
    offset_hu = None if reading is None else read_offset_hu_at(dicom_path, *reading, offset=HU_OFFSET)
    stored = None if offset_hu is None else stored_values_of_offset_hu(offset_hu, size)
    if stored is None:
        hu = read_hu(dicom_path, non_ct_as_hu) if reading is None else read_hu_at(dicom_path, *reading,
                                                                                   non_ct_as_hu=non_ct_as_hu)
        stored = stored_values(to_model_hu(hu, size))
    return encode_uint16_png(stored)


def write_pack(items: list[tuple[str, str, tuple | None]], root: str, size: int,
               non_ct_as_hu: bool = False) -> tuple[list[tuple], list[tuple[str, str]]]:
    """Read the DICOM files of one pack and store their slices (``slice_png``) in one new pack file
    (``non_ct_as_hu``: see ``ihd.dicom.read_hu``).

    Returns (manifest rows of the stored slices, (path, reason) of each unreadable file).
    """
    pack = f"{shard_name(items[0][0])}/{items[0][0]}.{secrets.token_hex(4)}{PACK_SUFFIX}"
    rows, pngs, failures = [], [], []
    offset = 0
    for image_id, dicom_path, reading in items:
        state = file_state(dicom_path)  # taken first: a file that changes while it is read is stored again
        try:
            png = slice_png(dicom_path, reading, size, non_ct_as_hu)
        except DicomError as error:
            failures.append((dicom_path, error.reason))
            continue
        rows.append((image_id, pack, offset, len(png), isal_zlib.crc32(png), dicom_path, *(state or (-1, -1))))
        pngs.append(png)
        offset += len(png)
    if pngs:
        with atomic_path(Path(root) / pack) as tmp:
            with open(tmp, "wb") as handle:
                handle.writelines(pngs)
    return rows, failures


def write_slices(
    index: pd.DataFrame, root: str | Path, size: int = 256, workers: int | None = None, non_ct_as_hu: bool = False,
    readings: pd.DataFrame | None = None,
) -> list[tuple[str, str]]:
    """Store every slice of ``index`` (columns image_id, path; series_id groups packs) that the store
    lacks, or holds damaged.

    Returns (path, reason) for each DICOM file that could not be read; the others are written.
    ``non_ct_as_hu`` reads modalities other than CT as HU (``ihd.dicom.read_hu``). ``readings``
    (``ihd.index.pixel_readings``: by path, where the header pass found each file's pixel words)
    spares a second parse of every file it lists.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _check_config(root, size)
    wanted = index.drop_duplicates("image_id")
    manifest = unchanged_sources(verified_manifest(root, workers), wanted)
    todo = wanted[~wanted["image_id"].astype(str).isin(set(manifest["image_id"]))]
    if readings is not None:
        todo = todo.merge(readings.drop_duplicates("path"), on="path", how="left", suffixes=("", "_header"))
    print(f"slice store {root}: {len(wanted) - len(todo)} of {len(wanted)} slices present, writing {len(todo)}")
    writer = functools.partial(write_pack, root=str(root), size=size, non_ct_as_hu=non_ct_as_hu)
    parts, new_rows, failures = [manifest], [], []
    flushed_at = time.monotonic()
    for rows, bad in parallel_map(writer, pack_groups(todo), workers=workers, desc="slices", unit="pack"):
        new_rows += rows
        failures += bad
        if time.monotonic() - flushed_at > MANIFEST_FLUSH_SECONDS:
            parts.append(pd.DataFrame(new_rows, columns=MANIFEST_COLUMNS + SOURCE_COLUMNS))
            new_rows = []
            write_manifest(root, pd.concat(parts, ignore_index=True))
            flushed_at = time.monotonic()
    parts.append(pd.DataFrame(new_rows, columns=MANIFEST_COLUMNS + SOURCE_COLUMNS))
    write_manifest(root, pd.concat(parts, ignore_index=True))
    return sorted(failures)
