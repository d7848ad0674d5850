"""Tests for ihd.slices: the 16-bit HU store round trip, packs per series, resume after a kill,
damaged packs caught on read and rewritten on resume, unreadable files, tf reading."""
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest

from ihd.dicom import read_hu
from ihd.io import read_json, write_json
from ihd.slices import (
    CONFIG_FILE, DEFLATE_LEVEL, DamagedSliceError, SliceStore, decode_pngs, encode_uint16_png,
    read_manifest, stored_values, tf_hu_of_rows, to_model_hu, write_manifest, write_slices,
)

SIZE = 64


def series_index(real_data, count=6, folder="rsna_series", series=None):
    """The first ``count`` files of a fixture folder; one series unless ``series`` is given per file."""
    paths = sorted((real_data / folder).glob("*.dcm"))[:count]
    return pd.DataFrame({"image_id": [p.stem for p in paths], "path": [str(p) for p in paths],
                         "series_id": series if series is not None else [folder] * len(paths)})


def packs_of(root):
    """Every pack file under a store, with its modification time."""
    return {path: path.stat().st_mtime_ns for path in root.glob("*/ID_*.pack")}


def test_a_slice_whose_file_changed_or_whose_id_moved_to_another_file_is_stored_again(real_data, tmp_path, capsys):
    source = tmp_path / "dicom"
    shutil.copytree(real_data / "rsna_series", source)
    index = series_index(tmp_path, 4, "dicom")
    root = tmp_path / "store"
    write_slices(index, root, size=SIZE, workers=1)
    write_manifest(root, read_manifest(root))  # without the files' states, as an earlier version left it
    assert write_slices(index, root, size=SIZE, workers=1) == [] and "writing 0" in capsys.readouterr().out
    assert (read_manifest(root, sources=True)["source_bytes"] > 0).all()  # the files' states taken as they are now

    changed = Path(index["path"][1])
    ds = pydicom.dcmread(changed)
    ds.RescaleIntercept = -1000  # every HU 24 higher
    ds.save_as(changed)
    moved = index.copy()
    moved.loc[2, "path"] = str(real_data / "rsna_slices" / "ID_000012eaf.dcm")  # the id now names another file
    before = SliceStore(root).read_hu(index["image_id"][0])
    assert write_slices(moved, root, size=SIZE, workers=1) == []
    assert "2 stored slices were made from a file that has changed since" in capsys.readouterr().out
    store = SliceStore(root)
    for row in (1, 2):
        np.testing.assert_allclose(store.read_hu(moved["image_id"][row]), to_model_hu(read_hu(moved["path"][row]), SIZE),
                                   atol=0.5)
    np.testing.assert_array_equal(store.read_hu(index["image_id"][0]), before)
    assert len(read_manifest(root)) == 4


def test_round_trip_within_one_hu_one_pack_per_series(real_data, tmp_path):
    index = pd.concat([series_index(real_data, 3), series_index(real_data, 2, "cq500_series"),
                       series_index(real_data, 3, "rsna_slices", series=["a", "b", "c"])], ignore_index=True)
    assert write_slices(index, tmp_path, size=SIZE, workers=1) == []
    store = SliceStore(tmp_path)
    assert store.size == SIZE and store.config["hu_offset"] == 1024
    packs = [store.location(i)[0] for i in index["image_id"]]
    assert len(set(packs[:3])) == 1 and len(set(packs[3:5])) == 1 and len(set(packs)) == 5
    assert packs[0].parent == tmp_path / index["image_id"][0][3:5] and packs[0].name.startswith(index["image_id"][0])
    assert [store.location(i)[1] for i in index["image_id"][:3]] == [0, store.location(index["image_id"][0])[2],
                                                                    sum(store.location(i)[2] for i in index["image_id"][:2])]
    for image_id, path in zip(index["image_id"], index["path"]):
        assert store.has(image_id)
        expected = to_model_hu(read_hu(path), SIZE)
        stored = store.read_hu(image_id)
        assert stored.shape == (SIZE, SIZE) and stored.dtype == np.float32
        assert np.abs(stored - expected).max() <= 0.5
        assert stored.min() >= -1024 and stored.max() > 60
    assert not store.has("ID_notstored")
    with pytest.raises(KeyError, match="ID_notstored"):
        store.read_hu("ID_notstored")
    with pytest.raises(KeyError, match=r"1 slices are not in the store \(first \['ID_notstored'\]\)"):
        store.slots(pd.Series(["ID_notstored", index["image_id"][0]], index=[7, 0]))


def test_pixel_readings_from_the_header_pass_store_the_same_slices_without_a_second_parse(real_data, tmp_path,
                                                                                          monkeypatch):
    import ihd.slices as slices
    from ihd.index import header_row, pixel_readings

    index = series_index(real_data, 4)
    assert write_slices(index, tmp_path / "parsed", size=SIZE, workers=1) == []
    headers = pd.DataFrame([header_row((path, "train", str(real_data))) for path in index["path"]])
    headers.to_parquet(tmp_path / "headers.parquet")
    readings = pixel_readings(tmp_path)
    assert len(readings) == 4 and (readings["pixel_offset"] > 0).all()
    monkeypatch.setattr(slices, "read_hu", lambda path, *args: pytest.fail(f"{path} parsed a second time"))
    assert write_slices(index, tmp_path / "read", size=SIZE, workers=1, readings=readings) == []
    parsed, read = SliceStore(tmp_path / "parsed"), SliceStore(tmp_path / "read")
    for image_id in index["image_id"]:
        np.testing.assert_array_equal(read.read_hu(image_id), parsed.read_hu(image_id))


def test_to_model_hu_is_area_mean():
    hu = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert np.array_equal(to_model_hu(hu, 2), [[2.5, 4.5], [10.5, 12.5]])
    assert np.array_equal(to_model_hu(hu, 4), hu)


def test_uint16_resize_gives_the_float_paths_values_halves_and_clipping_included(real_data):
    from ihd.dicom import read_header, read_offset_hu_at
    from ihd.slices import stored_values_of_offset_hu

    hu = np.array([[0, 1, 1, 2], [0, 1, 1, 2], [-1024, -1024, 64510, 64512], [-1024, -1023, 64512, 64512]],
                  np.float32)  # block means 0.5, 1.5, -1023.75, 64511.5: halves go up
    offset_hu = np.clip(hu + 1024, 0, 65535).astype(np.uint16)
    for size in (2, 4):
        np.testing.assert_array_equal(stored_values_of_offset_hu(offset_hu, size), stored_values(to_model_hu(hu, size)))
    assert stored_values_of_offset_hu(offset_hu, 2).tolist() == [[1025, 1026], [0, 65535]]
    assert stored_values_of_offset_hu(offset_hu, 1) is None
    paths = sorted((real_data / "rsna_slices").glob("*.dcm"))[:6] + sorted((real_data / "rsna_series").glob("*.dcm"))[:2]
    for path in paths:
        header = read_header(path)
        offset_hu = read_offset_hu_at(path, header.pixels, header.rows, header.cols, header.rescale_slope,
                                      header.rescale_intercept, offset=1024)
        np.testing.assert_array_equal(offset_hu, read_hu(path) + 1024)
        for size in (512, 256):
            np.testing.assert_array_equal(stored_values_of_offset_hu(offset_hu, size),
                                          stored_values(to_model_hu(read_hu(path), size)), err_msg=f"{path} {size}")


def test_encode_clips_and_rounds():
    hu = np.array([[-3000.0, -1024.4], [39.6, 70000.0], [40.5, 41.5]], dtype=np.float32)
    decoded = cv2.imdecode(np.frombuffer(encode_uint16_png(stored_values(hu)), np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.tolist() == [[0, 0], [1064, 65535], [1065, 1066]]


def test_resume_after_kill(real_data, tmp_path):
    """A pack renamed but not yet listed, and a temporary file, are what a kill leaves behind."""
    index = pd.concat([series_index(real_data, 4), series_index(real_data, 2, "rsna_slices", series=["a", "b"])],
                      ignore_index=True)
    write_slices(index, tmp_path, size=SIZE, workers=1)
    manifest = read_manifest(tmp_path)
    unlisted = manifest["image_id"] == index["image_id"][4]
    write_manifest(tmp_path, manifest[~unlisted])
    orphan = tmp_path / manifest.loc[unlisted, "pack"].item()
    half = orphan.parent / f".{orphan.stem}.123.abcd.tmp.pack"
    half.write_bytes(orphan.read_bytes()[:100])
    before = packs_of(tmp_path)

    assert not SliceStore(tmp_path).has(index["image_id"][4])
    assert write_slices(index, tmp_path, size=SIZE, workers=2) == []
    store = SliceStore(tmp_path)
    assert all(store.has(i) for i in index["image_id"]) and not orphan.exists() and not half.exists()
    after = packs_of(tmp_path)
    assert {p: t for p, t in before.items() if p != orphan} == {p: t for p, t in after.items() if p in before}
    assert len(after) == len(before) and len(read_manifest(tmp_path)) == len(index)
    np.testing.assert_allclose(store.read_hu(index["image_id"][4]), to_model_hu(read_hu(index["path"][4]), SIZE), atol=0.5)
    assert [p for p in tmp_path.rglob("*") if p.name.startswith(".")] == []


def test_packs_written_before_a_crash_stay_listed(real_data, tmp_path, monkeypatch):
    import ihd.slices as slices

    index = series_index(real_data, 4, series=["a", "a", "b", "c"])
    monkeypatch.setattr(slices, "MANIFEST_FLUSH_SECONDS", 0.0)
    written, write_pack = [], slices.write_pack

    def write_two_packs_then_crash(items, root, size, **options):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(items)
        return write_pack(items, root, size, **options)

    monkeypatch.setattr(slices, "write_pack", write_two_packs_then_crash)
    with pytest.raises(KeyboardInterrupt):
        write_slices(index, tmp_path, size=SIZE, workers=1)
    assert sorted(read_manifest(tmp_path)["image_id"]) == sorted(index["image_id"][:3])


def test_pack_groups_follow_series_and_cap_their_size(monkeypatch):
    import ihd.slices as slices

    monkeypatch.setattr(slices, "MAX_PACK_SLICES", 2)
    todo = pd.DataFrame({"image_id": list("abcdef"), "path": list("ABCDEF"), "series_id": ["s", "t", "s", "s", "t", "s"]})
    assert slices.pack_groups(todo) == [[("a", "A", None), ("c", "C", None)], [("d", "D", None), ("f", "F", None)],
                                        [("b", "B", None), ("e", "E", None)]]
    assert slices.pack_groups(todo.drop(columns="series_id")) == [[("a", "A", None), ("b", "B", None)],
                                                                 [("c", "C", None), ("d", "D", None)],
                                                                 [("e", "E", None), ("f", "F", None)]]


@pytest.mark.parametrize("damage", ["truncate", "zero-fill"])
def test_damaged_pack_is_refused_on_read_and_rewritten_on_resume(real_data, tmp_path, damage):
    """Truncation cuts off the last two of four slices; zero-fill keeps the size and loses them all."""
    tf = pytest.importorskip("tensorflow")
    index = series_index(real_data, 4)
    write_slices(index, tmp_path, size=SIZE, workers=1)
    store = SliceStore(tmp_path)
    pack, offset, _ = store.location(index["image_id"][2])
    data = pack.read_bytes()
    pack.write_bytes(data[:offset + 10] if damage == "truncate" else bytes(len(data)))
    expected_reason = "truncated" if damage == "truncate" else "CRC-32 differs"

    with pytest.raises(DamagedSliceError, match=f"{pack.name}: slice {index['image_id'][2]}.*{expected_reason}"):
        store.read_hu(index["image_id"][2])
    data_set = tf.data.Dataset.from_tensor_slices(store.slots(index["image_id"][2:4])).batch(2).map(store.tf_read_rows)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=f"{pack.name}: slice {index['image_id'][2]}.*{expected_reason}"):
        list(data_set)

    assert write_slices(index, tmp_path, size=SIZE, workers=1) == []
    store = SliceStore(tmp_path)
    for image_id, path in zip(index["image_id"], index["path"]):
        np.testing.assert_allclose(store.read_hu(image_id), to_model_hu(read_hu(path), SIZE), atol=0.5)
    kept = [store.location(i)[0] == pack for i in index["image_id"]]
    assert kept == ([True, True, False, False] if damage == "truncate" else [False] * 4)
    assert pack.exists() == (damage == "truncate")


def test_unreadable_file_is_reported_and_run_goes_on(real_data, tmp_path):
    index = series_index(real_data, 2)
    broken = tmp_path / "ID_000broken.dcm"
    broken.write_bytes((real_data / "rsna_series" / f"{index['image_id'][0]}.dcm").read_bytes()[:5000])
    index = pd.concat([index, pd.DataFrame({"image_id": ["ID_000broken"], "path": [str(broken)],
                                            "series_id": ["rsna_series"]})], ignore_index=True)
    failures = write_slices(index, tmp_path / "store", size=SIZE, workers=1)
    assert [path for path, _ in failures] == [str(broken)] and "truncated" in failures[0][1]
    store = SliceStore(tmp_path / "store")
    assert store.has(index["image_id"][0]) and store.has(index["image_id"][1]) and not store.has("ID_000broken")


def test_other_size_or_layout_in_same_store_refused(real_data, tmp_path):
    index = series_index(real_data, 1)
    write_slices(index, tmp_path, size=SIZE, workers=1)
    with pytest.raises(ValueError, match="size 64"):
        write_slices(index, tmp_path, size=32, workers=1)
    write_json(tmp_path / CONFIG_FILE, {"size": SIZE, "hu_offset": 1024, "layout": "<image_id[3:5]>/<image_id>.png"})
    with pytest.raises(ValueError, match="earlier layout"):
        SliceStore(tmp_path)
    with pytest.raises(ValueError, match="earlier layout"):
        write_slices(index, tmp_path, size=SIZE, workers=1)


def libpng(png: bytes) -> np.ndarray:
    """A PNG's pixels as libpng decodes them (through OpenCV)."""
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)


def test_every_stored_slice_decodes_as_libpng_does_in_batches_and_through_tf(real_data, tmp_path):
    tf = pytest.importorskip("tensorflow")
    index = pd.concat([series_index(real_data, 40), series_index(real_data, 24, "cq500_series"),
                       series_index(real_data, 30, "rsna_slices")], ignore_index=True)
    write_slices(index, tmp_path, size=SIZE, workers=1)
    store = SliceStore(tmp_path)
    slots = store.slots(index["image_id"])[::-1]
    pngs = [store.read_png(slot) for slot in slots]
    expected = np.stack([libpng(png) for png in pngs])
    big_endian = expected.astype(">u2").view(np.uint8).reshape(len(slots), SIZE, 2 * SIZE)
    assert (big_endian[:, 1:] < big_endian[:, :-1]).mean() > 0.1  # the up filter's sums wrap modulo 256
    np.testing.assert_array_equal(decode_pngs(pngs, None, SIZE), expected)
    np.testing.assert_array_equal(store.read_rows(slots)[:, :, 1:], big_endian)
    np.testing.assert_array_equal(store.read_rows(slots[:1])[:, :, 1:], big_endian[:1])
    assert not np.array_equal(expected[0], expected[1])
    batches = tf.data.Dataset.from_tensor_slices(slots).batch(7).map(store.tf_read_rows).unbatch().map(tf_hu_of_rows)
    stacked = np.stack(list(batches.as_numpy_iterator()))
    assert stacked.dtype == np.float32
    np.testing.assert_array_equal(stacked, expected.astype(np.float32) - 1024)
    np.testing.assert_array_equal(store.read_hu(index["image_id"].iloc[-1]), expected[0].astype(np.float32) - 1024)
    grid = tf_hu_of_rows(store.tf_read_rows(tf.constant(slots[[[0, 1], [2, 0]]]))).numpy()
    assert grid.shape == (2, 2, SIZE, SIZE)
    np.testing.assert_array_equal(grid, expected[[[0, 1], [2, 0]]].astype(np.float32) - 1024)


def test_rows_whose_up_filter_wraps_decode_exactly():
    """Each pixel steps across a byte boundary from one row to the next, so every filtered byte wraps."""
    column = np.array([0x00FF, 0x0100, 0xFFFF, 0x0000, 0x7F80, 0x8000, 0x0001, 0xFF00], np.uint16)
    image = np.tile(column[:, None], (4, 32)) ^ np.arange(32, dtype=np.uint16)
    png = encode_uint16_png(image)
    np.testing.assert_array_equal(libpng(png), image)
    np.testing.assert_array_equal(decode_pngs([png, encode_uint16_png(image.T)], ["a", "b"], 32),
                                  np.stack([image, image.T]))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(header: bytes, image_data: bytes, *chunks: bytes) -> bytes:
    """A PNG of the given IHDR fields and (already deflated) image data, with correct chunk CRCs."""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", image_data) + b"".join(chunks) + _chunk(b"IEND", b"")


def test_a_png_this_store_does_not_write_is_refused_by_name_never_decoded():
    image = np.random.default_rng(0).integers(0, 4096, size=(16, 16), dtype=np.uint16)
    big_endian = image.astype(">u2").view(np.uint8).reshape(16, 32)
    rows = np.concatenate([np.full((16, 1), 2, np.uint8), np.diff(big_endian, axis=0, prepend=0).astype(np.uint8)], axis=1)
    header = struct.pack(">IIBBBBB", 16, 16, 16, 0, 0, 0, 0)
    deflated = zlib.compress(rows.tobytes())
    split = _png(header, deflated[:100]).replace(_chunk(b"IEND", b""), _chunk(b"IDAT", deflated[100:]) + _chunk(b"IEND", b""))
    np.testing.assert_array_equal(decode_pngs([_png(header, deflated), split], ["a", "b"], 16), np.stack([image, image]))
    sub_filter = rows.copy()
    sub_filter[3, 0] = 1
    bad_crc = bytearray(_png(header, deflated))
    bad_crc[-20] ^= 0x10
    cases = {
        "ends before its zlib stream does": _png(header, deflated[: len(deflated) // 2]),
        "does not inflate": _png(header, deflated[:2] + bytes(len(deflated) - 2)),
        "inflates to 272 bytes": _png(header, zlib.compress(rows[:, :17].tobytes())),
        "inflates to 528 bytes .then 3 more.": _png(header, deflated + b"end"),
        "filters other than up": _png(header, zlib.compress(sub_filter.tobytes())),
        "expected a 16x16 16-bit grayscale PNG without interlacing": _png(struct.pack(">IIBBBBB", 16, 16, 8, 0, 0, 0, 0), deflated),
        "without interlacing, found the header 00000010000000101000000001": _png(struct.pack(">IIBBBBB", 16, 16, 16, 0, 0, 0, 1), deflated),
        "without interlacing, found the header 00000020": _png(struct.pack(">IIBBBBB", 32, 16, 16, 0, 0, 0, 0), deflated),
        "chunk b'IDAT' fails its CRC-32": bytes(bad_crc),
        "'tEXt'.*not the IHDR, IDAT, IEND": _png(header, deflated, _chunk(b"tEXt", b"a\0b")),
        "'IDAT', 'IHDR'.*not the IHDR, IDAT, IEND": (b"\x89PNG\r\n\x1a\n" + _chunk(b"IDAT", deflated) + _chunk(b"IHDR", header)
                                                     + _chunk(b"IEND", b"")),
        "IEND chunk holds 1 bytes": _png(header, deflated)[:-12] + _chunk(b"IEND", b"x"),
        "4 bytes after the PNG's IEND chunk": _png(header, deflated) + b"more",
        "ends before its IEND chunk": _png(header, deflated)[:-12],
        "chunk b'IDAT' cut short": _png(header, deflated)[:60],
        "not a PNG": b"GIF89a" + bytes(100),
    }
    for reason, png in cases.items():
        with pytest.raises(DamagedSliceError, match=f"^pack 7, slice ID_x: .*{reason}"):
            decode_pngs([encode_uint16_png(image), png], ["pack 0, slice ID_0", "pack 7, slice ID_x"], 16)
    with pytest.raises(DamagedSliceError, match="expected a 8x8"):
        decode_pngs([encode_uint16_png(image)], ["here"], 8)


def test_bit_flips_in_a_stored_slice_are_refused_or_change_nothing(real_data, tmp_path):
    """With the chunk CRCs left as they were, every flip is refused; with the IDAT CRC made to match
    again, a flip in the deflated data is refused by inflate or by the stream's Adler-32, or falls on
    bits that do not matter (the padding after the last code): never other pixels."""
    index = series_index(real_data, 1)
    write_slices(index, tmp_path, size=SIZE, workers=1)
    png = SliceStore(tmp_path).read_png(0)
    original = libpng(png)
    idat = png.index(b"IDAT")
    length = struct.unpack(">I", png[idat - 4:idat])[0]
    rng = np.random.default_rng(0)
    refused = 0
    for bit in np.concatenate([np.arange(8 * 48), rng.choice(8 * len(png), 300, replace=False)]):
        flipped = bytearray(png)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(DamagedSliceError):
            decode_pngs([bytes(flipped)], ["here"], SIZE)
        if idat + 4 <= bit // 8 < idat + 4 + length:
            flipped[idat + 4 + length: idat + 8 + length] = struct.pack(">I", zlib.crc32(flipped[idat:idat + 4 + length]))
            try:
                np.testing.assert_array_equal(decode_pngs([bytes(flipped)], ["here"], SIZE)[0], original)
            except DamagedSliceError:
                refused += 1
    assert refused > 250


def test_a_truncated_image_stream_with_a_matching_crc_is_refused_naming_pack_and_image(real_data, tmp_path):
    """The store's CRC-32 matches what was written; the PNG inside is whole but its deflate stream ends early."""
    tf = pytest.importorskip("tensorflow")
    index = series_index(real_data, 2)
    write_slices(index, tmp_path, size=SIZE, workers=1)
    manifest = read_manifest(tmp_path)
    png = SliceStore(tmp_path).read_png(1)
    idat = png.index(b"IDAT")
    data = png[idat + 4: idat + 4 + struct.unpack(">I", png[idat - 4:idat])[0]]
    broken = _png(png[16:29], data[: len(data) - 200])
    pack = tmp_path / manifest["pack"][1]
    pack.write_bytes(pack.read_bytes() + broken)
    manifest.loc[1, ["offset", "length", "crc32"]] = [pack.stat().st_size - len(broken), len(broken), zlib.crc32(broken)]
    write_manifest(tmp_path, manifest)
    store = SliceStore(tmp_path)
    where = f"{pack.name}: slice {index['image_id'][1]}: PNG image data ends before its zlib stream does"
    with pytest.raises(DamagedSliceError, match=where):
        store.read_hu(index["image_id"][1])
    with pytest.raises(tf.errors.InvalidArgumentError, match=where):
        list(tf.data.Dataset.from_tensor_slices(store.slots(index["image_id"])).batch(2).map(store.tf_read_rows))
    assert store.read_hu(index["image_id"][0]).shape == (SIZE, SIZE)


def test_png_encoder_round_trips_exactly_through_opencv_tensorflow_and_the_store_decoder():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    image = rng.integers(0, 65536, size=(53, 53), dtype=np.uint16)
    image[0, :5] = [0, 65535, 1, 256, 65280]
    encoded = encode_uint16_png(image)
    np.testing.assert_array_equal(libpng(encoded), image)
    np.testing.assert_array_equal(tf.io.decode_png(encoded, channels=1, dtype=tf.uint16).numpy()[..., 0], image)
    np.testing.assert_array_equal(decode_pngs([encoded, encoded], ["a", "b"], 53), np.stack([image, image]))


def test_a_store_written_at_another_deflate_level_records_both(real_data, tmp_path):
    """Slices added to a store written at an earlier level: the same pixels, and the record says how each was made."""
    index = series_index(real_data, 4)
    write_slices(index.iloc[:2], tmp_path, size=SIZE, workers=1)
    config = read_json(tmp_path / CONFIG_FILE)
    assert config["png"] == f"up filter, ISA-L deflate level {DEFLATE_LEVEL}"
    write_json(tmp_path / CONFIG_FILE, config | {"png": "up filter, ISA-L deflate level 1"})  # as an older kit wrote it
    for _ in range(2):  # a second run records nothing new
        assert write_slices(index, tmp_path, size=SIZE, workers=1) == []
        assert read_json(tmp_path / CONFIG_FILE)["png"] == (
            f"up filter, ISA-L deflate level 1; slices written later: up filter, ISA-L deflate level {DEFLATE_LEVEL}")
    store = SliceStore(tmp_path)
    assert all(store.has(image_id) for image_id in index["image_id"])
