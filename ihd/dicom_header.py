"""The header values a slice is indexed by, read straight from the file's bytes where the file takes
the common form, and through pydicom otherwise: the same values either way.

Parsing a CT slice's header with pydicom and converting its values costs more than reading, resizing
and storing its pixels. Nearly every uncompressed slice takes one plain form: the DICOM preamble, a
transfer syntax of little-endian data (explicit or implicit VR), then the data set's elements in
order, without a command set or a sequence, up to uncompressed pixel data that ends the file; and
the values the index reads in the VR the dictionary gives them, each in its plain encoding (one
16-bit word for US, printable ASCII for text, ASCII decimals for DS, a 32-bit integer for IS).
``plain_header`` reads such a file in one pass over its first few kilobytes; for any other file
(compressed ones included) it returns None and ``pydicom_header`` reads it, so that pydicom decides
what an unusual file holds. ``tests/test_dicom_header.py`` checks that both give the same values on
every real file and on files built to take, or to fall just outside, the plain form.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.datadict import DicomDictionary, dictionary_VR, tag_for_keyword
from pydicom.uid import UID

KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID", "Modality", "Rows", "Columns",
            "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel", "NumberOfFrames",
            "InstanceNumber", "RescaleSlope", "RescaleIntercept", "ImagePositionPatient", "ImageOrientationPatient")
PIXEL_DATA_TAG = 0x7FE00010
TRANSFER_SYNTAX_TAG = 0x00020010
IMPLICIT_LITTLE = "1.2.840.10008.1.2"
# Data sets encoded other than in explicit VR little endian (after the file meta, which always is).
OTHER_ENCODINGS = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}  # big endian, deflated
PREAMBLE_BYTES = 128
DEFER_BYTES = 4096  # pydicom reads a header with this defer_size: longer values (the pixel data) are skipped
FIRST_READ_BYTES = 4096  # the header of a CT slice is one to two kilobytes
MAX_HEADER_BYTES = 1 << 20  # past this without reaching the pixel data the file is left to pydicom
LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
UNDEFINED_LENGTH = 0xFFFFFFFF

# Printable ASCII reads the same in every character set a DICOM file can name, except the backslash
# (the value delimiter; a yen sign in ISO_IR 13) and the tilde (an overline there); UIDs are padded with a NUL.
_PLAIN_TEXT = re.compile(rb"[\x20-\x5b\x5d-\x7d]*\x00?")
_DECIMAL = re.compile(rb" *[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)? *")
_INTEGER = re.compile(rb" *[+-]?\d+ *")
_VR_CODE = re.compile(rb"[A-Z]{2}")


class _NotPlain(Exception):
    """The file is not in the plain form: pydicom reads it."""


def _plain_text(raw: bytes) -> str:
    if not _PLAIN_TEXT.fullmatch(raw):
        raise _NotPlain
    return raw.decode("ascii").rstrip(" \0")


def _decimals(raw: bytes) -> float | list[float] | None:
    if not raw:
        return None  # pydicom's value of an empty DS, IS or US
    parts = raw.split(b"\\")
    if not all(_DECIMAL.fullmatch(part) for part in parts):
        raise _NotPlain
    values = [float(part) for part in parts]
    return values[0] if len(values) == 1 else values


def _uid(raw: bytes) -> str:
    return _plain_text(raw).strip()  # pydicom's UID strips spaces at both ends


def _integer(raw: bytes) -> int | None:
    if not raw:
        return None
    if not _INTEGER.fullmatch(raw) or not -2**31 <= int(raw) < 2**31:  # IS is a 32-bit integer
        raise _NotPlain
    return int(raw)


def _word(raw: bytes) -> int | None:
    if not raw:
        return None
    if len(raw) != 2:
        raise _NotPlain
    return struct.unpack("<H", raw)[0]


_READERS = {"US": _word, "DS": _decimals, "IS": _integer, "CS": _plain_text, "LO": _plain_text, "UI": _uid}
# pydicom parses a sequence's items as it reads the data set; a sequence is left to it
_SEQUENCE_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")
_WANTED = {tag_for_keyword(keyword): (keyword, dictionary_VR(tag_for_keyword(keyword))) for keyword in KEYWORDS}


@dataclass(frozen=True)
class HeaderValues:
    """What the index reads from one file: ``values`` as pydicom's ``Dataset.get`` gives them (an int
    for US and IS, a float for DS and a list of them for several, a str for text; absent keywords left
    out), the transfer syntax, and where the pixel data's value lies when pydicom would defer it (a
    defined length over ``DEFER_BYTES``)."""

    values: dict[str, object] = field(default_factory=dict)
    syntax: UID | None = None
    pixel_offset: int | None = None  # byte offset of the PixelData value
    pixel_length: int | None = None

    def get(self, keyword: str, default=None):
        """The value of ``keyword``, or ``default`` when the file lacks it."""
        return self.values.get(keyword, default)


def pydicom_header(ds: pydicom.Dataset) -> HeaderValues:
    """The header values of a data set pydicom read (the pixel data deferred, not loaded)."""
    element = ds.get_item(PIXEL_DATA_TAG, keep_deferred=True)
    deferred = isinstance(element, RawDataElement) and element.value is None and element.length != UNDEFINED_LENGTH
    values = {keyword: ds.get(keyword) for keyword in KEYWORDS if keyword in ds}
    syntax = ds.file_meta.get("TransferSyntaxUID")
    return HeaderValues(values, syntax if isinstance(syntax, UID) else None, element.value_tell if deferred else None,
                        element.length if deferred else None)


class _Buffer:
    """The start of a file, read further on demand."""

    def __init__(self, file):
        self.file, self.data = file, file.read(FIRST_READ_BYTES)
        self.size = os.fstat(file.fileno()).st_size

    def take(self, start: int, count: int) -> bytes:
        while len(self.data) < start + count:
            if len(self.data) >= MAX_HEADER_BYTES:
                raise _NotPlain
            more = self.file.read(max(len(self.data), start + count - len(self.data)))
            if not more:
                raise _NotPlain  # truncated: pydicom names what is wrong
            self.data += more
        return self.data[start:start + count]


def _explicit_element(buffer: _Buffer, at: int) -> tuple[int, bytes, int, int]:
    """(tag, VR, value offset, value length) of the explicit-VR little-endian element at ``at``."""
    group, element, vr = struct.unpack("<HH2s", buffer.take(at, 6))
    if not _VR_CODE.fullmatch(vr):
        raise _NotPlain
    if vr in LONG_LENGTH_VRS:
        return (group << 16) | element, vr, at + 12, struct.unpack("<I", buffer.take(at + 8, 4))[0]
    return (group << 16) | element, vr, at + 8, struct.unpack("<H", buffer.take(at + 6, 2))[0]


def _implicit_element(buffer: _Buffer, at: int) -> tuple[int, None, int, int]:
    group, element, length = struct.unpack("<HHI", buffer.take(at, 8))
    return (group << 16) | element, None, at + 8, length


def _read_plain(buffer: _Buffer) -> HeaderValues:
    if buffer.take(PREAMBLE_BYTES, 4) != b"DICM":
        raise _NotPlain
    at, syntax = PREAMBLE_BYTES + 4, None
    while struct.unpack("<H", buffer.take(at, 2))[0] == 2:  # the file meta: group 2, explicit VR little endian
        tag, vr, start, length = _explicit_element(buffer, at)
        if length == UNDEFINED_LENGTH or (tag == TRANSFER_SYNTAX_TAG and (vr != b"UI" or syntax is not None)):
            raise _NotPlain
        if tag == TRANSFER_SYNTAX_TAG:
            syntax = _uid(buffer.take(start, length))
        at = start + length
    if not syntax or syntax in OTHER_ENCODINGS:
        raise _NotPlain
    implicit = syntax == IMPLICIT_LITTLE
    if implicit and _VR_CODE.fullmatch(buffer.take(at + 4, 2)):
        raise _NotPlain  # an implicit syntax over explicit data: pydicom sorts that out
    next_element = _implicit_element if implicit else _explicit_element
    values, last_tag = {}, -1
    while True:
        tag, vr, start, length = next_element(buffer, at)
        # in order, no command set (group 0), no sequence, no undefined length before the pixel data
        if (tag <= last_tag or tag >> 16 == 0 or vr == b"SQ" or (implicit and tag in _SEQUENCE_TAGS)
                or length == UNDEFINED_LENGTH or tag > PIXEL_DATA_TAG):
            raise _NotPlain
        if tag == PIXEL_DATA_TAG:
            if start + length != buffer.size or length == 0:
                raise _NotPlain  # anything after the pixel data (pydicom reads it too), or no pixels
            deferred = length > DEFER_BYTES
            return HeaderValues(values, UID(syntax), start if deferred else None, length if deferred else None)
        wanted = _WANTED.get(tag)
        if wanted is not None:
            keyword, dictionary_vr = wanted
            if vr is not None and vr.decode() != dictionary_vr:
                raise _NotPlain
            values[keyword] = _READERS[dictionary_vr](buffer.take(start, length))
        at, last_tag = start + length, tag


def plain_header(path) -> HeaderValues | None:
    """The header values of a file in the plain form (see the module docstring); None for any other file."""
    try:
        with open(path, "rb") as file:
            return _read_plain(_Buffer(file))
    except (_NotPlain, OSError):
        return None
