"""One DICOM file to Hounsfield units, with the quirks of the RSNA data and of real scanners fixed.

The modality LUT gives HU: ``HU = stored * RescaleSlope + RescaleIntercept``. What goes wrong
in practice, and what this module does about it:

- Compressed pixel data (JPEG Lossless in CQ500, JPEG 2000, RLE) is decoded by pydicom's plugins
  (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg); uncompressed data is read straight from
  the bytes, which is several times faster than the generic decoder.
- Only the low ``BitsStored`` bits of each 16-bit word are the pixel: the unused high bits may hold
  overlay-like data (unsigned storage) or zeros instead of the sign (signed storage). They are
  masked off, or the sign bit is extended into them, as pydicom's decoder does.
- ``RescaleIntercept`` written as ``-1024.000000`` and multi-valued window tags are read as
  numbers by pydicom; a missing slope/intercept means stored values are already HU.
- Outside the scanner's field of view some files hold -2000 or -3024 padding. Nothing in a head
  is less dense than air, so every value below -1024 HU is read as air (-1024).
- The RSNA 12-bit wrap: some RSNA images with ``BitsStored == 12``, ``PixelRepresentation == 0``
  and ``RescaleIntercept > -100`` hold wrapped values. The correction used by the challenge's
  top notebooks adds 1000 to the stored values, subtracts 4096 from those at or above 4096, and
  then applies an intercept of -1000.
- MONOCHROME1 only tells a viewer to display low values as white; the modality LUT still gives
  HU, so such files need no inversion to be read as HU.

Reading a file's header (``read_header``: one pass over its first bytes by ``ihd.dicom_header``, or
pydicom's parse for a file outside the common form) also notes where its pixel words lie and how to read them
(``PixelLayout``, for uncompressed 16-bit data), so that the slice store reads the pixels again
with one ``pread`` and no second parse (``read_hu_at``), as long as the file's size and
modification time are those the header pass saw; otherwise it reads the file anew with ``read_hu``.

What cannot be read as HU is refused with a ``DicomError`` naming the file and the reason, never
guessed (``interpretation_problem``): a modality other than CT (its values are not known to be HU;
``non_ct_as_hu=True`` reads them as HU anyway, for files such as CT-ICH's ``OT`` exports that hold
raw HU), a rescale slope or intercept that is not finite or outside any CT scanner's range, an image
smaller than ``MIN_IMAGE_SIDE`` pixels a side. Any other failure while reading a file (a tag that
does not parse, say) is a ``DicomError`` too, so one odd file never stops a folder.
"""
from __future__ import annotations

import functools
import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ihd.dicom_header import DEFER_BYTES, HeaderValues, plain_header, pydicom_header

# RSNA identifiers (``ID_...``) are not valid UIDs; pydicom would warn on every file of 874,035.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

AIR_HU = -1024.0
WRAP_FIX_OFFSET = 1000
WRAP_MODULUS = 4096
WRAP_FIX_INTERCEPT = -1000.0
MIN_IMAGE_SIDE = 64  # pixels: CT slices have 256 to 1024; fewer cannot show a head's anatomy
# A CT modality LUT maps stored words to about -1024..3071 HU (up to some 30,000 on extended
# scales): slopes and intercepts beyond these bounds are damaged tags or not Hounsfield units.
RESCALE_SLOPE_RANGE = (1 / 64, 64.0)
RESCALE_INTERCEPT_RANGE = (-32768.0, 32768.0)


class DicomError(Exception):
    """A DICOM file that cannot be turned into Hounsfield units; the message names file and reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


_WARNING_FILTERS = threading.Lock()


def _open(path: str | Path, defer_size: int | None = None) -> pydicom.Dataset:
    try:
        # the warnings filters are the process's: one reader at a time changes them
        with _WARNING_FILTERS, warnings.catch_warnings():
            # pydicom only warns when a file ends inside its encapsulated pixel data, and returns no element at all
            warnings.filterwarnings("error", message="End of file reached", category=UserWarning)
            return pydicom.dcmread(path, defer_size=defer_size)
    except UserWarning as error:
        raise DicomError(path, f"truncated: {error}") from None
    except InvalidDicomError as error:  # pydicom's advice to force reading is not the kit's to take
        reason = str(error).replace(" Use force=True to force reading.", "")
        raise DicomError(path, f"not a DICOM file ({reason})") from None
    except FileNotFoundError:
        raise DicomError(path, "no such file") from None
    except (EOFError, OSError, ValueError, TypeError, KeyError, IndexError) as error:
        raise DicomError(path, f"unreadable header, probably truncated ({type(error).__name__}: {error})") from None


def _named_failures(read):
    """Make any exception of ``read(path, ...)`` a ``DicomError`` naming the file and the exception."""

    @functools.wraps(read)
    def read_or_refuse(path, *args, **kwargs):
        try:
            return read(path, *args, **kwargs)
        except DicomError:
            raise
        except Exception as error:
            raise DicomError(path, f"unreadable ({type(error).__name__}: {error})") from error

    return read_or_refuse


@dataclass(frozen=True)
class PixelLayout:
    """Where a slice's stored 16-bit words lie in its file, how to read them, and the file as it was then."""

    offset: int  # byte offset of the first pixel word
    word: str  # numpy dtype of one word: "<u2", "<i2", ">u2" or ">i2"
    bits_stored: int
    rsna_wrap: bool  # the RSNA 12-bit fix applies (``has_rsna_wrap``)
    file_bytes: int
    file_mtime_ns: int


@dataclass(frozen=True)
class SliceHeader:
    """What the index needs from a slice's header: identity, the facts that decide whether it can be
    read as HU, and the tags that place it in its series (None where the file lacks them)."""

    image_id: str
    patient_id: str
    study_id: str
    series_id: str
    instance_uid: str | None
    modality: str
    rows: int
    cols: int
    rescale_slope: float
    rescale_intercept: float
    position: tuple[float, float, float] | None  # ImagePositionPatient (mm)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row and column direction cosines
    instance_number: float | None
    pixels: PixelLayout | None = None  # None for compressed or unusual pixel data: read with ``read_hu``

    @property
    def z(self) -> float:
        """Position along this slice's own normal (mm); NaN without ImagePositionPatient or a usable
        ImageOrientationPatient. ``ihd.index`` orders a series from what all its slices have."""
        if self.position is None or self.orientation is None:
            return math.nan
        return float(np.dot(slice_normals(self.orientation), self.position))


MAX_AXIAL_TILT_DEG = 35.0  # an axial slice's normal against the body axis: gantry tilts reach about 30 degrees


def tilt_degrees(normals) -> np.ndarray:
    """Degrees between unit slice normals (..., 3) and the body (head-foot) axis; NaN where a normal is."""
    with np.errstate(invalid="ignore"):
        return np.degrees(np.arccos(np.minimum(1.0, np.abs(np.asarray(normals, np.float64)[..., 2]))))


def slice_normals(orientations) -> np.ndarray:
    """Unit slice normals (..., 3) from ImageOrientationPatient values (..., 6): the cross product of
    the row and column direction cosines. NaN where the values are missing, not finite or degenerate
    (all zero, or not two orthogonal unit vectors)."""
    orientations = np.asarray(orientations, np.float64)
    row, col = orientations[..., :3], orientations[..., 3:]
    normals = np.cross(row, col)
    with np.errstate(invalid="ignore", divide="ignore"):
        usable = ((np.abs(np.linalg.norm(row, axis=-1) - 1) <= 0.05) & (np.abs(np.linalg.norm(col, axis=-1) - 1) <= 0.05)
                  & (np.abs(np.sum(row * col, axis=-1)) <= 0.05))
        normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    normals[~usable] = np.nan
    return normals


def _numbers(ds: pydicom.Dataset | HeaderValues, keyword: str, count: int) -> tuple[float, ...] | None:
    """A multi-valued numeric tag as ``count`` floats; None when absent, empty or of another length."""
    values = ds.get(keyword)
    if values is None or values == "":
        return None
    values = list(values) if isinstance(values, (list, tuple, pydicom.multival.MultiValue)) else [values]
    return tuple(float(v) for v in values) if len(values) == count else None


def _rescale(ds: pydicom.Dataset | HeaderValues) -> tuple[float, float]:
    """Slope and intercept of the modality LUT; missing tags mean the stored values are the output."""
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    return (1.0 if slope in (None, "") else float(slope)), (0.0 if intercept in (None, "") else float(intercept))


def interpretation_problem(modality: str, rows: int, cols: int, slope: float, intercept: float,
                           non_ct_as_hu: bool = False) -> str | None:
    """Why a slice with these header values cannot be read as Hounsfield units; None when it can.

    ``non_ct_as_hu`` accepts modalities other than CT (their rescaled values are taken as HU); the
    size and rescale checks hold for every modality.
    """
    if modality != "CT" and not non_ct_as_hu:
        return (f"modality {modality or '(missing)'}, not CT: its values are not known to be Hounsfield "
                "units (--read-non-ct-as-hu reads them as HU)")
    if min(rows, cols) < MIN_IMAGE_SIDE:
        return f"image of {rows}x{cols} pixels, smaller than {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}"
    low, high = RESCALE_SLOPE_RANGE
    if not (math.isfinite(slope) and low <= slope <= high):
        return f"RescaleSlope {slope} is not a CT slope ({low:g} to {high:g})"
    low, high = RESCALE_INTERCEPT_RANGE
    if not (math.isfinite(intercept) and low <= intercept <= high):
        return f"RescaleIntercept {intercept} is not a CT intercept ({low:g} to {high:g})"
    return None


@_named_failures
def read_header(path: str | Path) -> SliceHeader:
    """Read the identifiers, rescale and position tags of a slice without its pixel data.

    Raises ``DicomError`` for a file that is not DICOM, lacks its identifiers or has a tag that does
    not parse; whether the slice can be read as HU is ``interpretation_problem``'s call.
    """
    header = plain_header(path) or pydicom_header(_open(path, defer_size=DEFER_BYTES))
    missing = [key for key in ("StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns") if key not in header.values]
    if missing:
        raise DicomError(path, f"header lacks {', '.join(missing)}")
    slope, intercept = _rescale(header)
    rows, cols = int(header.get("Rows")), int(header.get("Columns"))
    study_id = str(header.get("StudyInstanceUID"))
    instance_number = header.get("InstanceNumber")
    return SliceHeader(
        image_id=Path(path).stem,
        patient_id=str(header.get("PatientID", "")) or study_id,
        study_id=study_id,
        series_id=str(header.get("SeriesInstanceUID")),
        instance_uid=str(header.get("SOPInstanceUID", "")) or None,
        modality=str(header.get("Modality", "")),
        rows=rows,
        cols=cols,
        rescale_slope=slope,
        rescale_intercept=intercept,
        position=_numbers(header, "ImagePositionPatient", 3),
        orientation=_numbers(header, "ImageOrientationPatient", 6),
        instance_number=None if instance_number in (None, "") else float(instance_number),
        pixels=_pixel_layout(header, path, rows * cols, intercept),
    )


def _pixel_layout(header: HeaderValues, path: str | Path, pixels: int, intercept: float) -> PixelLayout | None:
    """The layout of a slice's uncompressed 16-bit single-frame pixel words; None otherwise."""
    syntax = header.syntax
    if (header.pixel_offset is None or syntax is None or syntax.is_compressed or header.pixel_length < 2 * pixels
            or int(header.get("BitsAllocated", 0) or 0) != 16 or int(header.get("SamplesPerPixel", 1) or 1) != 1
            or int(header.get("NumberOfFrames", 1) or 1) != 1):
        return None
    bits_stored = int(header.get("BitsStored", 16) or 16)
    if header.get("PixelRepresentation") in (None, "") or not 1 <= bits_stored <= 16:
        return None  # signed or not cannot be known: read_hu refuses the file by name
    representation = int(header.get("PixelRepresentation"))
    stat = os.stat(path)
    return PixelLayout(offset=header.pixel_offset,
                       word=f"{'<' if syntax.is_little_endian else '>'}{'i' if representation == 1 else 'u'}2",
                       bits_stored=bits_stored, rsna_wrap=_wraps(bits_stored, representation, intercept),
                       file_bytes=stat.st_size, file_mtime_ns=stat.st_mtime_ns)


def _keep_stored_bits(words: np.ndarray, bits_stored: int) -> np.ndarray:
    """The pixel values held in the low ``bits_stored`` bits of integer words: the unused high bits
    masked off (unsigned words) or overwritten by the sign bit (signed words). Words already in the
    stored range (nearly every file) are returned as they are, without a copy."""
    unused = 8 * words.dtype.itemsize - bits_stored
    if unused == 0:
        return words
    if words.dtype.kind == "i":
        bound = 1 << (bits_stored - 1)
        if words.min() >= -bound and words.max() < bound:
            return words
        return (words << unused) >> unused
    if words.max() < 1 << bits_stored:
        return words
    return words & ((1 << bits_stored) - 1)


def _stored_values(ds: pydicom.Dataset, path: str | Path) -> np.ndarray:
    """The stored pixel values as a 2-D integer array."""
    if "PixelData" not in ds:
        raise DicomError(path, "no pixel data")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise DicomError(path, f"multi-frame images ({ds.NumberOfFrames} frames) are not slices")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DicomError(path, f"{ds.SamplesPerPixel} samples per pixel: not a grayscale CT slice")
    rows, cols = int(ds.Rows), int(ds.Columns)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None and not syntax.is_compressed and int(ds.BitsAllocated) == 16:
        bits_stored = int(ds.get("BitsStored", 16))
        if not 1 <= bits_stored <= 16:
            raise DicomError(path, f"BitsStored {bits_stored} does not fit 16-bit words")
        order = ">" if not syntax.is_little_endian else "<"
        if ds.get("PixelRepresentation") in (None, ""):
            raise DicomError(path, "no PixelRepresentation: whether its pixel words are signed cannot be known")
        kind = "i" if int(ds.PixelRepresentation) == 1 else "u"
        data = ds.PixelData
        if len(data) < rows * cols * 2:
            raise DicomError(path, f"truncated pixel data: {len(data)} bytes for {rows}x{cols} 16-bit pixels")
        words = np.frombuffer(data, dtype=f"{order}{kind}2", count=rows * cols).reshape(rows, cols)
        return _keep_stored_bits(words, bits_stored)
    try:
        return ds.pixel_array
    except (NotImplementedError, RuntimeError) as error:
        name = syntax.name if syntax is not None else "unknown"
        raise DicomError(
            path, f"cannot decode transfer syntax {name}: install pylibjpeg, pylibjpeg-libjpeg and "
            f"pylibjpeg-openjpeg (or python-gdcm) ({error})"
        ) from None
    except (ValueError, EOFError, OSError) as error:
        raise DicomError(path, f"damaged or truncated pixel data ({error})") from None


def has_rsna_wrap(ds: pydicom.Dataset) -> bool:
    """True for the RSNA images whose 12-bit stored values wrapped (see the module docstring)."""
    _, intercept = _rescale(ds)
    return _wraps(int(ds.get("BitsStored", 16)), int(ds.get("PixelRepresentation", 0)), intercept)


def _wraps(bits_stored: int, pixel_representation: int, intercept: float) -> bool:
    """The RSNA 12-bit wrap rule on the header values it reads."""
    return bits_stored == 12 and pixel_representation == 0 and intercept > -100


@_named_failures
def read_hu(path: str | Path, non_ct_as_hu: bool = False) -> np.ndarray:
    """Read one slice as float32 Hounsfield units, shape (rows, cols), air floor at -1024 HU.

    Raises ``DicomError`` naming the file and the reason when it cannot be read, or cannot be read
    as HU (see ``interpretation_problem``; ``non_ct_as_hu`` reads modalities other than CT as HU).
    """
    ds = _open(path)
    slope, intercept = _rescale(ds)
    problem = interpretation_problem(str(ds.get("Modality", "")), int(ds.Rows), int(ds.Columns), slope, intercept,
                                     non_ct_as_hu)
    if problem:
        raise DicomError(path, problem)
    return _hounsfield_units(_stored_values(ds, path), slope, intercept, has_rsna_wrap(ds))


def _rsna_fixed(stored: np.ndarray, intercept: float, rsna_wrap: bool) -> tuple[np.ndarray, float]:
    """The stored values and intercept after the RSNA 12-bit fix, when it applies."""
    if not rsna_wrap:
        return stored, intercept
    shifted = stored.astype(np.int32) + WRAP_FIX_OFFSET
    shifted[shifted >= WRAP_MODULUS] -= WRAP_MODULUS
    return shifted, WRAP_FIX_INTERCEPT


def _hounsfield_units(stored: np.ndarray, slope: float, intercept: float, rsna_wrap: bool) -> np.ndarray:
    """Stored pixel values -> float32 HU: the RSNA fix when it applies, the modality LUT, the air floor."""
    stored, intercept = _rsna_fixed(stored, intercept, rsna_wrap)
    hu = stored.astype(np.float32)
    if slope != 1.0:
        hu *= np.float32(slope)
    hu += np.float32(intercept)
    np.maximum(hu, np.float32(AIR_HU), out=hu)
    return hu


def _stored_at(path: str | Path, pixels: PixelLayout, rows: int, cols: int) -> np.ndarray | None:
    """The stored values at a file's known pixel layout, with one ``pread``; None when the file's size or
    modification time differ from those its header was read with, or it ends early."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        stat = os.fstat(descriptor)
        if (stat.st_size, stat.st_mtime_ns) != (pixels.file_bytes, pixels.file_mtime_ns):
            return None
        data = os.pread(descriptor, rows * cols * 2, pixels.offset)
    finally:
        os.close(descriptor)
    if len(data) != rows * cols * 2:
        return None
    return _keep_stored_bits(np.frombuffer(data, dtype=pixels.word).reshape(rows, cols), pixels.bits_stored)


@_named_failures
def read_offset_hu_at(path: str | Path, pixels: PixelLayout | None, rows: int, cols: int, slope: float,
                      intercept: float, offset: int) -> np.ndarray | None:
    """``read_hu_at``'s values plus ``offset`` as uint16, in one saturating OpenCV add, where that is
    exact: slope 1, whole intercept, no RSNA fix, native little-endian words. With ``offset`` = 1024,
    saturation at 0 is the air floor and at 65535 the top of the range. None where it does not apply,
    the file has no layout, or it changed since its header was read."""
    if (pixels is None or slope != 1.0 or intercept != round(intercept) or pixels.rsna_wrap
            or not pixels.word.startswith("<") or offset != -AIR_HU):
        return None
    stored = _stored_at(path, pixels, rows, cols)
    if stored is None:
        return None
    return cv2.add(stored, float(intercept + offset), dtype=cv2.CV_16U)


@_named_failures
def read_hu_at(path: str | Path, pixels: PixelLayout | None, rows: int, cols: int, slope: float, intercept: float,
               non_ct_as_hu: bool = False) -> np.ndarray:
    """``read_hu`` for a file whose header was read before: the pixel words with one ``pread`` at the
    offset ``read_header`` found, no second parse, when the file still has the size and modification
    time seen then (and the header's checks passed then); otherwise, or without a layout, ``read_hu``."""
    stored = None if pixels is None else _stored_at(path, pixels, rows, cols)
    if stored is None:
        return read_hu(path, non_ct_as_hu)
    return _hounsfield_units(stored, slope, intercept, pixels.rsna_wrap)
