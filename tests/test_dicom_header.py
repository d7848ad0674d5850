"""ihd.dicom_header's one-pass reading against pydicom's, on every real file and on files built to
take, or to fall outside, the plain form."""

import struct

import numpy as np
import pydicom
import pytest
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, RLELossless

import ihd.dicom
from ihd.dicom import DicomError, read_header
from ihd.dicom_header import DEFER_BYTES, plain_header, pydicom_header

SOURCE = "rsna_slices/ID_0000950d7.dcm"  # Explicit VR Little Endian, 512x512


def _plain(value):
    """pydicom's value classes as the int, float, str or list they derive from."""
    if isinstance(value, (MultiValue, list)):
        return [_plain(item) for item in value]
    return next((kind(value) for kind in (str, int, float) if isinstance(value, kind)), value)


def _comparable(header):
    return ({key: _plain(value) for key, value in header.values.items()}, str(header.syntax), header.pixel_offset,
            header.pixel_length)


def assert_read_alike(path):
    """The one-pass reading, where it takes the file, gives pydicom's values; read_header gives the same
    SliceHeader (or the same refusal) whichever way the file is read. Returns the one-pass result."""
    fast = plain_header(path)
    if fast is not None:
        slow = pydicom_header(pydicom.dcmread(path, defer_size=DEFER_BYTES))
        np.testing.assert_equal(_comparable(fast), _comparable(slow), str(path))
        kinds = {key: type(value) for key, value in fast.values.items()}
        for key, value in slow.values.items():  # ints stay ints, floats floats, lists lists
            assert isinstance(value, MultiValue) if kinds[key] is list else isinstance(value, kinds[key]), (path, key)
    # repr: a NaN slope (refused later, by interpretation_problem) reads alike too
    assert repr(_header_or_refusal(path, one_pass=True)) == repr(_header_or_refusal(path, one_pass=False)), path
    return fast


def _header_or_refusal(path, one_pass):
    original = ihd.dicom.plain_header
    ihd.dicom.plain_header = original if one_pass else (lambda _: None)
    try:
        return read_header(path)
    except DicomError as error:
        return error.reason
    finally:
        ihd.dicom.plain_header = original


def test_every_uncompressed_real_file_is_read_in_one_pass_as_pydicom_reads_it(real_data):
    files = sorted(real_data.rglob("*.dcm"))
    compressed = {path for path in files
                  if pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed}
    assert len(files) - len(compressed) > 60 and len(compressed) > 700  # RSNA and CT-ICH; CQ500, rsna_labeled
    for path in files:
        assert (assert_read_alike(path) is None) == (path in compressed), f"{path}: compressed files go to pydicom"


def test_the_odd_files_are_read_or_refused_alike(odd_dicom_folder):
    folder, _ = odd_dicom_folder
    for path in sorted(folder.rglob("*.dcm")):
        assert_read_alike(path)


def _edited(real_data, tmp_path, edit, **save):
    ds = pydicom.dcmread(real_data / SOURCE)
    edit(ds)
    path = tmp_path / "edited.dcm"
    pydicom.dcmwrite(path, ds, **save)
    return path


def _implicit(ds):
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian


def _big_endian(ds):
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian


def _sequence(ds, undefined_length=False):
    item = pydicom.Dataset()
    item.CodeValue = "T-A0100"
    ds.ProcedureCodeSequence = Sequence([item])
    ds["ProcedureCodeSequence"].is_undefined_length = undefined_length
    item.is_undefined_length_sequence_item = undefined_length


def _undefined_length_sequence(ds):
    _sequence(ds, undefined_length=True)


def _rle(ds):
    ds.compress(RLELossless, generate_instance_uid=False)


@pytest.mark.parametrize("edit, save, one_pass", [
    (_implicit, {"implicit_vr": True, "little_endian": True}, True),
    (_rle, {}, False),  # compressed
    (_big_endian, {"implicit_vr": False, "little_endian": False, "force_encoding": True}, False),
    (_sequence, {}, False),
    (_undefined_length_sequence, {}, False),
])
def test_other_encodings_and_structures(real_data, tmp_path, edit, save, one_pass):
    path = _edited(real_data, tmp_path, edit, **save)
    fast = assert_read_alike(path)
    assert (fast is not None) == one_pass
    header = read_header(path)
    assert (header.rows, header.cols) == (512, 512) and header.modality == "CT"


def test_a_compressed_file_has_no_pixel_layout_and_an_implicit_one_has(real_data, tmp_path):
    assert read_header(_edited(real_data, tmp_path, _rle)).pixels is None
    implicit = read_header(_edited(real_data, tmp_path, _implicit, implicit_vr=True, little_endian=True))
    np.testing.assert_array_equal(ihd.dicom.read_hu_at(tmp_path / "edited.dcm", implicit.pixels, 512, 512,
                                                       implicit.rescale_slope, implicit.rescale_intercept),
                                  ihd.dicom.read_hu(tmp_path / "edited.dcm"))


@pytest.mark.parametrize("keyword, value, vr, one_pass", [
    ("PatientID", "Müller", "LO", False),  # outside ASCII: decoded through the character set
    ("PatientID", "A\\B", "LO", False),  # two values
    ("PatientID", b"x~y ", "LO", False),  # an overline in ISO_IR 13
    ("PatientID", "", "LO", True),
    ("Modality", b"CT  ", "CS", True),  # extra padding
    ("InstanceNumber", "12.0", "IS", False),  # not an integer string
    ("InstanceNumber", "+7", "IS", True),
    ("InstanceNumber", "", "IS", True),
    ("RescaleSlope", "1e0", "DS", True),
    ("RescaleSlope", "", "DS", True),
    ("Columns", None, "US", True),  # empty: refused alike
    ("RescaleIntercept", " -1024.", "DS", True),
    ("RescaleIntercept", b"-1024\\", "DS", False),  # a stray delimiter
    ("RescaleIntercept", "nan", "DS", False),
    ("ImagePositionPatient", "-125\\-115.9\\77.97", "DS", True),
    ("ImagePositionPatient", "-125\\-115.9", "DS", True),  # two of three numbers
    ("Rows", [512, 512], "US", False),  # two words
    ("Rows", 512, "SS", False),  # another VR than the dictionary's
    ("Rows", "512", "IS", False),
    ("StudyInstanceUID", "1.2.3\0", "UI", True),
    ("InstanceNumber", "99999999999", "IS", False),  # beyond a 32-bit integer
])
def test_values_outside_the_plain_form_are_left_to_pydicom(real_data, tmp_path, keyword, value, vr, one_pass):
    def edit(ds):
        ds.SpecificCharacterSet = "ISO_IR 13" if value == b"x~y " else "ISO_IR 100"
        if keyword in ds:
            del ds[keyword]
        ds.add(pydicom.DataElement(keyword, vr, value))

    path = _edited(real_data, tmp_path, edit)
    assert (assert_read_alike(path) is not None) == one_pass


def _data_set_start(raw: bytes) -> int:
    """Where the data set begins: after the file meta, whose group length follows the preamble."""
    assert raw[132:134] == b"\x02\x00" and raw[136:138] == b"UL"
    return 144 + struct.unpack("<I", raw[140:144])[0]


def _explicit(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _syntax_reads(raw: bytes, syntax: bytes, vr: bytes = b"UI") -> bytes:
    at = raw.index(b"\x02\x00\x10\x00UI")
    length = struct.unpack("<H", raw[at + 6:at + 8])[0]
    assert len(syntax) == length
    return raw[:at + 4] + vr + raw[at + 6:at + 8] + syntax + raw[at + 8 + length:]


@pytest.mark.parametrize("name, change", [
    ("an element after the pixel data", lambda raw: raw + _explicit(0x0028, 0x1053, b"DS", b"2 ")),
    ("a second pixel data", lambda raw: raw + _explicit(0x7FE0, 0x0010, b"OB", b"\x00\x00")),
    ("bytes after the pixel data", lambda raw: raw + b"\x00\x01"),
    ("a command set before the data set", lambda raw: raw[:_data_set_start(raw)] +
     struct.pack("<HH2sHI", 0, 0, b"UL", 4, 0) + raw[_data_set_start(raw):]),
    ("big endian named with a leading space over little-endian data",
     lambda raw: _syntax_reads(raw, b" 1.2.840.10008.1.2.2")),
    ("the transfer syntax in another VR", lambda raw: _syntax_reads(raw, b"1.2.840.10008.1.2.1\0", b"LO")),
])
@pytest.mark.filterwarnings("ignore:Expected implicit VR")  # pydicom on the command set's encoding
def test_files_that_pydicom_reads_past_the_plain_form_are_left_to_it(real_data, tmp_path, name, change):
    path = tmp_path / "changed.dcm"
    path.write_bytes(change((real_data / SOURCE).read_bytes()))
    assert assert_read_alike(path) is None, name


def test_pixel_data_pydicom_does_not_defer_has_no_offset_either_way(real_data, tmp_path):
    def small(ds):
        ds.Rows = ds.Columns = 32
        ds.PixelData = bytes(32 * 32 * 2)

    header = assert_read_alike(_edited(real_data, tmp_path, small))
    assert header is not None and header.pixel_offset is None


def test_a_uid_with_spaces_at_both_ends_reads_as_pydicom_strips_it(real_data, tmp_path):
    raw = (real_data / SOURCE).read_bytes()
    at = raw.index(b"\x20\x00\x0d\x00UI")
    length = struct.unpack("<H", raw[at + 6:at + 8])[0]
    study = raw[at + 8:at + 8 + length].rstrip(b"\0 ")
    spaced = b" " + study + b" " * (1 + len(study) % 2)  # an even length
    path = tmp_path / "spaced.dcm"
    path.write_bytes(raw[:at] + _explicit(0x0020, 0x000D, b"UI", spaced) + raw[at + 8 + length:])
    header = assert_read_alike(path)
    assert header is not None and header.get("StudyInstanceUID") == study.decode()
