"""ihd.dicom on the real files and on damaged copies of them."""

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

import ihd.dicom
from ihd.dicom import AIR_HU, DicomError, has_rsna_wrap, read_header, read_hu, read_hu_at
from ihd.dicom_header import plain_header

TWELVE_BIT_SLICE = "rsna_slices/ID_2008dd408.dcm"  # BitsStored 12, unsigned, Explicit VR, bleeds in view


def _soft_tissue_peak_hu(hu):
    """The most common value among soft-tissue pixels (-100..100 HU): brain, where a slice shows it."""
    tissue = hu[(hu > -100) & (hu < 100)]
    counts, edges = np.histogram(tissue, bins=40, range=(-100, 100))
    return edges[counts.argmax()] + 2.5, tissue.size


def test_every_real_file_reads_as_plausible_hounsfield_units(real_data):
    files = sorted(real_data.glob("*/*.dcm"))
    assert len(files) == 82
    for path in files:
        hu = read_hu(path)
        assert hu.dtype == np.float32 and hu.ndim == 2, path
        assert hu.min() >= AIR_HU, path
        corner = hu[:16, :16]
        assert np.median(corner) < -800, f"{path}: air outside the head reads {np.median(corner)} HU"
        peak_hu, pixels = _soft_tissue_peak_hu(hu)
        if pixels > 0.05 * hu.size:
            assert 0 < peak_hu < 80, f"{path}: brain tissue peaks at {peak_hu} HU"


def _pydicom_hu(path):
    """HU as pydicom decodes the file (its modality LUT), with padding below air floored to air."""
    ds = pydicom.dcmread(path)
    return np.maximum(apply_modality_lut(ds.pixel_array, ds), AIR_HU)


def _one_file_per_jpeg2000_series(files):
    """Every file, except that of the JPEG 2000 series (33 ms a slice to decode) only the first slice
    of each series and header variant is kept."""
    kept, seen = [], set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.file_meta.TransferSyntaxUID.name.startswith("JPEG 2000"):
            variant = (ds.SeriesInstanceUID, ds.BitsStored, ds.PixelRepresentation, str(ds.RescaleSlope),
                       str(ds.RescaleIntercept))
            if variant in seen:
                continue
            seen.add(variant)
        kept.append(path)
    return kept


def test_real_files_read_as_pydicoms_modality_lut_gives_them(real_data):
    """Every fixture file (one slice of each JPEG 2000 series) reads as pydicom's own decoding and
    modality LUT give it (the CT-ICH OT files, raw HU without rescale tags, read as HU when asked)."""
    files = sorted(real_data.rglob("*.dcm"))
    assert len(files) == 835
    files = _one_file_per_jpeg2000_series(files)
    assert len(files) == 91 + 21
    for path in files:
        non_ct = path.parent.parent.name == "ctich_masks"
        np.testing.assert_array_equal(read_hu(path, non_ct_as_hu=non_ct), _pydicom_hu(path), err_msg=str(path))


def _read_again(path, non_ct_as_hu=False):
    """``read_hu_at`` after ``read_header``, as the slice store reads a file the index pass has read."""
    header = read_header(path)
    return read_hu_at(path, header.pixels, header.rows, header.cols, header.rescale_slope, header.rescale_intercept,
                      non_ct_as_hu=non_ct_as_hu)


def test_read_hu_at_reads_every_real_file_as_read_hu_without_parsing_it_again(real_data, monkeypatch):
    files = _one_file_per_jpeg2000_series(sorted(real_data.rglob("*.dcm")))
    layouts = {path: read_header(path).pixels for path in files}
    uncompressed = [path for path in files if path.parent.name in ("rsna_slices", "rsna_series")]
    assert uncompressed and all(layouts[path] is not None for path in uncompressed)
    assert any(layout is None for layout in layouts.values()), "the compressed series need read_hu"
    expected = {path: read_hu(path, non_ct_as_hu=path.parent.parent.name == "ctich_masks") for path in files}
    opened = []
    original_open = ihd.dicom._open
    monkeypatch.setattr(ihd.dicom, "_open", lambda path, **options: opened.append(path) or original_open(path, **options))
    for path in files:
        opened.clear()
        np.testing.assert_array_equal(_read_again(path, path.parent.parent.name == "ctich_masks"), expected[path],
                                      err_msg=str(path))
        # pydicom parses the header only where ihd.dicom_header leaves it (compressed files), the pixels only
        # without a layout
        parses = (plain_header(path) is None) + (layouts[path] is None)
        assert opened == [path] * parses, f"{path} parsed {len(opened)} times by pydicom"


def test_read_hu_at_reads_a_file_changed_since_its_header_was_read_anew(real_data, tmp_path):
    source = real_data / TWELVE_BIT_SLICE
    target = tmp_path / "ID_changed.dcm"
    target.write_bytes(source.read_bytes())
    header = read_header(target)
    ds = pydicom.dcmread(source)
    ds.PixelData = (ds.pixel_array // 2).astype("<u2").tobytes()
    ds.save_as(target)
    assert target.stat().st_size == header.pixels.file_bytes
    changed = read_hu_at(target, header.pixels, header.rows, header.cols, header.rescale_slope,
                         header.rescale_intercept)
    np.testing.assert_array_equal(changed, read_hu(target))
    assert not np.array_equal(changed, read_hu(source))


def _save_with_words(source, target, words, **tags):
    """A copy of a real slice with new 16-bit pixel words and header values."""
    ds = pydicom.dcmread(source)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.PixelData = words.astype("<u2").tobytes()
    ds.save_as(target)
    return target


def test_unsigned_12_bit_words_with_high_bits_set_read_their_low_12_bits(real_data, tmp_path):
    source = real_data / TWELVE_BIT_SLICE
    stored = pydicom.dcmread(source).pixel_array
    overlay = np.zeros(stored.shape, bool)
    overlay[100:400:3, 50:450] = True  # overlay-like data in bits 12-15, as old scanners wrote it
    noisy = stored | (overlay * np.uint16(0xF000)) | ((stored % 7 == 0) * np.uint16(0x8000))
    target = _save_with_words(source, tmp_path / "ID_highbits.dcm", noisy)
    assert np.array_equal(pydicom.dcmread(target).pixel_array, stored)
    hu = read_hu(target)
    np.testing.assert_array_equal(hu, _pydicom_hu(target))
    np.testing.assert_array_equal(hu, read_hu(source))
    np.testing.assert_array_equal(_read_again(target), hu)


def test_signed_12_bit_words_without_sign_extension_read_as_signed(real_data, tmp_path):
    source = real_data / TWELVE_BIT_SLICE
    hu_words = pydicom.dcmread(source).pixel_array.astype(np.int32) - 1024
    assert (hu_words < 0).mean() > 0.5
    target = _save_with_words(source, tmp_path / "ID_signed12.dcm", hu_words & 0x0FFF,
                              PixelRepresentation=1, RescaleIntercept="0")
    assert np.array_equal(pydicom.dcmread(target).pixel_array, hu_words)
    hu = read_hu(target)
    np.testing.assert_array_equal(hu, _pydicom_hu(target))
    np.testing.assert_array_equal(hu, read_hu(source))
    np.testing.assert_array_equal(_read_again(target), hu)


def test_a_slice_without_pixel_representation_is_refused_on_both_read_paths(real_data, tmp_path):
    ds = pydicom.dcmread(real_data / "rsna_slices" / "ID_000012eaf.dcm")  # signed words, -2000 padding
    del ds.PixelRepresentation
    ds.save_as(tmp_path / "ID_nosign.dcm")
    for read in (read_hu, _read_again):
        with pytest.raises(DicomError, match="ID_nosign.dcm.*no PixelRepresentation"):
            read(tmp_path / "ID_nosign.dcm")


def test_padding_outside_the_field_of_view_reads_as_air(real_data):
    path = real_data / "rsna_slices" / "ID_000012eaf.dcm"
    stored = pydicom.dcmread(path).pixel_array
    assert stored.min() == -2000
    hu = read_hu(path)
    assert np.all(hu[stored == -2000] == AIR_HU)


def test_compressed_cq500_series_decodes(real_data):
    path = sorted((real_data / "cq500_series").glob("*.dcm"))[0]
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    hu = read_hu(path)
    assert hu.shape == (int(ds.Rows), int(ds.Columns))
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(hu, np.maximum(expected, AIR_HU))


def _wrapped_copy(source, target):
    """Store a real 12-bit slice the way the wrapped RSNA images are stored (see the data README)."""
    ds = pydicom.dcmread(source)
    assert int(ds.BitsStored) == 12 and int(ds.PixelRepresentation) == 0
    hu = ds.pixel_array.astype(np.int32) + int(float(ds.RescaleIntercept))
    # The correction reads stored values s as s - 4096 when s >= 3096, else s: HU -1000..3095 fit.
    ds.PixelData = (np.clip(hu, -1000, 3095) % 4096).astype(np.uint16).tobytes()
    ds.RescaleIntercept = "0"
    ds.save_as(target)
    return target


def test_rsna_12_bit_wrap_is_corrected(real_data, tmp_path):
    source = real_data / "rsna_slices" / "ID_00008ce3c.dcm"
    target = _wrapped_copy(source, tmp_path / "ID_wrapped.dcm")
    assert has_rsna_wrap(pydicom.dcmread(target))
    assert not has_rsna_wrap(pydicom.dcmread(source))
    np.testing.assert_array_equal(read_hu(target), np.maximum(read_hu(source), -1000))


def test_slope_intercept_as_decimal_strings_and_monochrome1(real_data, tmp_path):
    source = real_data / "rsna_slices" / "ID_0000950d7.dcm"
    ds = pydicom.dcmread(source)
    assert str(ds.RescaleIntercept).startswith("-1024.0")
    ds.RescaleSlope = "2.000000"
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "x.dcm")
    expected = np.maximum(ds.pixel_array * 2.0 - 1024.0, AIR_HU)
    np.testing.assert_array_equal(read_hu(tmp_path / "x.dcm"), expected)


def test_implicit_vr_and_odd_size(real_data):
    implicit = pydicom.dcmread(real_data / "rsna_slices" / "ID_0000aee4b.dcm")
    assert implicit.file_meta.TransferSyntaxUID.is_implicit_VR
    assert read_hu(real_data / "rsna_slices" / "ID_0000aee4b.dcm").shape == (512, 512)
    assert read_hu(real_data / "rsna_slices" / "ID_e0cc6a4b5.dcm").shape == (256, 256)


def test_truncated_and_non_dicom_files_raise_dicom_error_naming_the_file(real_data, tmp_path):
    source = real_data / "rsna_slices" / "ID_000039fa0.dcm"
    truncated = tmp_path / "ID_truncated.dcm"
    truncated.write_bytes(source.read_bytes()[:300_000])
    text = tmp_path / "notes.dcm"
    text.write_text("not an image\n")
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    for path, reason in ((truncated, "truncated"), (text, "not a DICOM"), (empty, "not a DICOM")):
        with pytest.raises(DicomError, match=reason) as caught:
            read_hu(path)
        assert str(path) in str(caught.value) and "force" not in str(caught.value)


def test_a_compressed_file_cut_inside_its_pixel_data_is_refused_as_truncated(real_data, tmp_path):
    # pydicom reads such a file as a dataset without any element, which would read as a header without its tags
    source = sorted((real_data / "rsna_labeled" / "stage_2_train").glob("*.dcm"))[0]  # JPEG 2000, encapsulated
    cut = tmp_path / source.name
    cut.write_bytes(source.read_bytes()[:2000])
    for read in (read_header, read_hu):
        with pytest.raises(DicomError, match="truncated: End of file reached") as caught:
            read(cut)
        assert str(cut) in str(caught.value)


def test_file_without_pixel_data(real_data, tmp_path):
    ds = pydicom.dcmread(real_data / "rsna_slices" / "ID_000039fa0.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "ID_nopixels.dcm")
    with pytest.raises(DicomError, match="no pixel data"):
        read_hu(tmp_path / "ID_nopixels.dcm")


def test_header_orders_the_real_series_by_position(real_data):
    headers = [read_header(p) for p in (real_data / "rsna_series").glob("*.dcm")]
    assert {h.series_id for h in headers} == {headers[0].series_id}
    by_position = sorted(headers, key=lambda h: h.z)
    stored_z = [float(pydicom.dcmread(real_data / "rsna_series" / f"{h.image_id}.dcm",
                                      stop_before_pixels=True).ImagePositionPatient[2]) for h in by_position]
    assert stored_z == sorted(stored_z)
    assert stored_z[0] == pytest.approx(155.0, abs=0.1) and stored_z[-1] == pytest.approx(313.1, abs=0.1)
    gaps = np.diff([h.z for h in by_position])
    assert np.all(gaps > 4.5) and np.all(gaps < 5.5)


def _edited_copy(source, target, **tags):
    """A copy of a real file with some header values replaced (``None`` deletes the tag)."""
    ds = pydicom.dcmread(source)
    for keyword, value in tags.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(target)
    return target


def test_other_modalities_are_refused_unless_read_as_hu_on_request(real_data, tmp_path):
    ctich = real_data / "ctich_masks" / "images" / "049_21.dcm"
    mr = _edited_copy(real_data / "rsna_slices" / "ID_000039fa0.dcm", tmp_path / "ID_mr.dcm", Modality="MR")
    for path, modality in ((ctich, "OT"), (mr, "MR")):
        with pytest.raises(DicomError, match=f"modality {modality}, not CT.*--read-non-ct-as-hu") as caught:
            read_hu(path)
        assert caught.value.path == str(path)
    raw_hu = pydicom.dcmread(ctich).pixel_array
    assert raw_hu.min() < -1000 and "RescaleSlope" not in pydicom.dcmread(ctich)
    np.testing.assert_array_equal(read_hu(ctich, non_ct_as_hu=True), np.maximum(raw_hu, AIR_HU))


@pytest.mark.parametrize("tags, reason", [
    ({"RescaleSlope": "nan"}, "RescaleSlope nan is not a CT slope"),
    ({"RescaleSlope": "inf"}, "RescaleSlope inf is not a CT slope"),
    ({"RescaleSlope": "0"}, "RescaleSlope 0.0 is not a CT slope"),
    ({"RescaleSlope": "-1"}, "RescaleSlope -1.0 is not a CT slope"),
    ({"RescaleSlope": "1000"}, "RescaleSlope 1000.0 is not a CT slope"),
    ({"RescaleIntercept": "nan"}, "RescaleIntercept nan is not a CT intercept"),
    ({"RescaleIntercept": "-1e9"}, "RescaleIntercept -1000000000.0 is not a CT intercept"),
], ids=["nan-slope", "inf-slope", "zero-slope", "negative-slope", "huge-slope", "nan-intercept", "huge-intercept"])
def test_absurd_rescale_is_refused_by_name(real_data, tmp_path, tags, reason):
    path = _edited_copy(real_data / "rsna_slices" / "ID_000039fa0.dcm", tmp_path / "ID_rescale.dcm", **tags)
    with pytest.raises(DicomError, match=reason):
        read_hu(path, non_ct_as_hu=True)


def test_images_below_the_minimum_size_are_refused(real_data, tmp_path):
    source = real_data / "rsna_slices" / "ID_000039fa0.dcm"
    small = pydicom.dcmread(source).pixel_array[::16, ::16]
    shrunk = _save_with_words(source, tmp_path / "ID_32.dcm", small.view(np.uint16), Rows=32, Columns=32)
    empty = _save_with_words(source, tmp_path / "ID_0.dcm", np.zeros(0, np.uint16), Rows=0, Columns=0)
    for path, size in ((shrunk, "32x32"), (empty, "0x0")):
        with pytest.raises(DicomError, match=f"image of {size} pixels, smaller than 64x64"):
            read_hu(path)
        assert read_header(path).rows == int(size.split("x")[0])


def test_any_failure_while_reading_is_a_dicom_error_naming_the_file(real_data, tmp_path):
    ds = pydicom.dcmread(real_data / "rsna_slices" / "ID_000039fa0.dcm")
    ds.add_new(0x00280008, "LO", "abc")  # NumberOfFrames that does not parse as a number
    ds.save_as(tmp_path / "ID_frames.dcm")
    del ds.NumberOfFrames, ds.ImagePositionPatient
    ds.add_new(0x00200032, "LO", ["abc", "1", "2"])  # ImagePositionPatient that does not parse
    ds.save_as(tmp_path / "ID_position.dcm")
    for path, read in ((tmp_path / "ID_frames.dcm", read_hu), (tmp_path / "ID_position.dcm", read_header)):
        with pytest.raises(DicomError, match="ValueError.*'abc'") as caught:
            read(path)
        assert caught.value.path == str(path) and str(path) in str(caught.value)
