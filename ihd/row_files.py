"""2-D arrays in .npy files, read and written by row ranges without mapping them, and checked by chunk.

Every page of a memory-mapped file that a process touches counts in its resident memory until the
mapping goes, so one pass over a 2 GB map leaves the process 2 GB larger. A `RowFile` reads the rows
asked for with `os.preadv` into a fresh array and writes with `os.pwrite`: the process holds only
those rows, and the kernel's page cache (which it reclaims as it needs) holds the rest. The files are
ordinary .npy files: `np.load(path, mmap_mode="r")` opens them too.

Files written chunk by chunk keep a progress record: ``rows_done``, ``bytes`` (each file's size) and
``chunks``, one ``[begin, end, sha256 of each file's rows begin:end ...]`` per flushed chunk.
`verified_chunks` reads them back and says how many leading rows still match what was written, so a
truncated, overwritten or damaged file is noticed and written again from its first bad chunk.
"""
from __future__ import annotations

import errno
import os
import shutil
import weakref
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ihd.fingerprint import array_sha256


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def reserve_blocks(path: str | Path, advice: str) -> None:
    """Allocate every block of the file ``path`` now: a full disk then fails here, with a message that
    ends in ``advice``, instead of killing the process with SIGBUS when a mapped write finds no block."""
    path = Path(path)
    size = path.stat().st_size
    missing = max(0, size - path.stat().st_blocks * 512)
    free = shutil.disk_usage(path.parent).free
    message = f"{path} needs {_gib(missing)} more disk space ({_gib(size)} in all) and {path.parent} has {_gib(free)} free: {advice}"
    if missing > free:
        raise OSError(errno.ENOSPC, message)
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, size)
            except OSError as error:
                if error.errno == errno.ENOSPC:
                    raise OSError(errno.ENOSPC, message) from error
                raise


def npy_layout(path: str | Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a C-ordered .npy file; ValueError when it is not one."""
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(handle)
        except ValueError as error:
            raise ValueError(f"{path} is not a .npy file ({error})") from None
        if fortran_order or dtype.hasobject:
            raise ValueError(f"{path} holds a Fortran-ordered or object array, not rows")
        return tuple(shape), dtype, handle.tell()


class RowFile:
    """Rows of a 2-D .npy file, read with `preadv` into fresh arrays (converted to ``read_as`` if given).

    Indexing takes a slice of step 1 (one contiguous read), one row number, or row numbers / a boolean
    mask (read in runs of consecutive rows, in any order); anything else is refused. ``writable``
    opens the file for `write`.
    """

    def __init__(self, path: str | Path, read_as=None, writable: bool = False):
        self.path = Path(path)
        self.shape, self.stored_dtype, self.offset = npy_layout(self.path)
        if len(self.shape) != 2:
            raise ValueError(f"{self.path} holds an array of shape {self.shape}, not rows")
        self.dtype = np.dtype(read_as) if read_as is not None else self.stored_dtype
        self.row_bytes = self.shape[1] * self.stored_dtype.itemsize
        expected = self.offset + self.shape[0] * self.row_bytes
        if self.path.stat().st_size != expected:
            raise ValueError(f"{self.path} has {self.path.stat().st_size} bytes, its header says {expected} (truncated?)")
        self._fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)
        self._closer = weakref.finalize(self, os.close, self._fd)

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        """Close the file (also done when the object is collected)."""
        self._closer()

    def stored(self, begin: int, end: int) -> np.ndarray:
        """Rows ``begin:end`` as stored (the file's dtype)."""
        if not 0 <= begin <= end <= len(self):
            raise IndexError(f"rows {begin}:{end} are outside {self.path} ({len(self)} rows)")
        rows = np.empty((end - begin, self.shape[1]), self.stored_dtype)
        view, position = memoryview(rows.reshape(-1).view(np.uint8)), self.offset + begin * self.row_bytes
        while len(view):
            count = os.preadv(self._fd, [view], position)
            if count == 0:
                raise EOFError(f"{self.path} ends before row {end} (truncated while open?)")
            view, position = view[count:], position + count
        return rows

    def read(self, begin: int, end: int) -> np.ndarray:
        """Rows ``begin:end`` as ``read_as``."""
        return self.stored(begin, end).astype(self.dtype, copy=False)

    def take(self, rows) -> np.ndarray:
        """Rows numbered ``rows`` (any order, repeats allowed) or selected by a boolean mask, as ``read_as``."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (len(self),):
                raise IndexError(f"a boolean mask of {rows.shape} rows for {self.path}'s {len(self)}")
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).ravel()
        rows = np.where(rows < 0, rows + len(self), rows)
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        breaks = np.flatnonzero(np.diff(ordered) > 1) + 1
        for first, last in zip(np.r_[0, breaks], np.r_[breaks, len(ordered)]):
            begin = int(ordered[first])
            block = self.read(begin, int(ordered[last - 1]) + 1)
            out[order[first:last]] = block[ordered[first:last] - begin]
        return out

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            begin, end, step = key.indices(len(self))
            if step != 1:
                raise IndexError(f"{self.path}: rows are read in steps of 1, not {step}")
            return self.read(begin, max(begin, end))
        if isinstance(key, (int, np.integer)):
            row = int(key) + (len(self) if key < 0 else 0)
            return self.read(row, row + 1)[0]
        if isinstance(key, tuple):
            raise IndexError(f"{self.path}: index rows only (read them, then pick columns)")
        return self.take(key)

    def write(self, begin: int, rows: np.ndarray) -> None:
        """Write ``rows`` (converted to the stored dtype) as rows ``begin:begin + len(rows)``."""
        rows = np.ascontiguousarray(rows, self.stored_dtype)
        if rows.ndim != 2 or rows.shape[1] != self.shape[1] or begin + len(rows) > len(self):
            raise ValueError(f"cannot write {rows.shape} at row {begin} of {self.path} {self.shape}")
        view, position = memoryview(rows.reshape(-1).view(np.uint8)), self.offset + begin * self.row_bytes
        while len(view):
            count = os.pwrite(self._fd, view, position)
            view, position = view[count:], position + count

    def sha256(self, begin: int, end: int) -> str:
        """sha256 of rows ``begin:end`` as stored (`ihd.fingerprint.array_sha256`)."""
        return array_sha256(self.stored(begin, end))


def create_row_file(path: str | Path, shape: tuple[int, int], dtype, advice: str) -> RowFile:
    """A new .npy file of ``shape`` (its blocks allocated: see `reserve_blocks`), open for writing."""
    path = Path(path)
    path.unlink(missing_ok=True)
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_2_0(handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                      "fortran_order": False, "shape": tuple(shape)})
        handle.truncate(handle.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize)
    reserve_blocks(path, advice)
    return RowFile(path, writable=True)


def verified_chunks(folder: str | Path, progress: dict, record: str | Path,
                    shapes: dict[str, tuple[int, int]]) -> tuple[int, list, str]:
    """How many leading rows of the files ``shapes`` names (in ``folder``) still match what was written,
    by the ``progress`` record (kept in the file ``record``): its sizes and each chunk's sha256.

    Returns those rows, the chunks covering them, and what is wrong after them ("" when nothing is).
    A file of the wrong size is not read: its rows count as lost. Files are read, not mapped.
    """
    folder = Path(folder)
    if progress.get("rows_done", 0) == 0:
        return 0, [], ""
    if "chunks" not in progress:
        return 0, [], f"{record} records no checksums (written by an older version)"
    for name, size in progress["bytes"].items():
        actual = (folder / name).stat().st_size if (folder / name).exists() else None
        if actual != size:
            found = "is missing" if actual is None else f"has {actual} bytes"
            return 0, [], f"{folder / name} {found}, {size} were written (truncated or replaced)"
    try:
        files = {name: RowFile(folder / name) for name in shapes}
    except ValueError as error:
        return 0, [], f"cannot read {folder} ({error})"
    for name, shape in shapes.items():
        if files[name].shape != tuple(shape):
            return 0, [], f"{folder / name} holds {files[name].shape} rows, expected {tuple(shape)}"
    good = []
    for chunk in tqdm(progress["chunks"], desc=f"checking {folder.name}", unit="chunk", dynamic_ncols=True,
                      disable=len(progress["chunks"]) < 50):
        begin, end, *digests = chunk
        for name, digest in zip(shapes, digests):
            if files[name].sha256(begin, end) != digest:
                return begin, good, f"{folder / name} rows {begin} to {end - 1} differ from what was written (damaged or overwritten)"
        good.append(chunk)
    return progress["rows_done"], good, ""
