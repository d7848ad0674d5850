"""ihd.dicom_header's one-pass reading against pydicom's, on every real file and on files built to
take, or to fall outside, the plain form."""

import numpy as np
import pydicom
import pytest
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, RLELossless

import ihd.dicom
from ihd.dicom import DicomError, read_header
from ihd.dicom_header import plain_header, pydicom_header

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
        slow = pydicom_header(pydicom.dcmread(path, defer_size=ihd.dicom.DEFER_BYTES))
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


def test_every_real_file_is_read_in_one_pass_as_pydicom_reads_it(real_data):
    files = sorted(real_data.rglob("*.dcm"))
    assert len(files) > 800
    for path in files:
        assert assert_read_alike(path) is not None, f"{path} left to pydicom"


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
    (_rle, {}, True),
    (_big_endian, {"implicit_vr": False, "little_endian": False, "force_encoding": True}, False),
    (_sequence, {}, True),
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
])
def test_values_outside_the_plain_form_are_left_to_pydicom(real_data, tmp_path, keyword, value, vr, one_pass):
    def edit(ds):
        ds.SpecificCharacterSet = "ISO_IR 13" if value == b"x~y " else "ISO_IR 100"
        if keyword in ds:
            del ds[keyword]
        ds.add(pydicom.DataElement(keyword, vr, value))

    path = _edited(real_data, tmp_path, edit)
    assert (assert_read_alike(path) is not None) == one_pass
