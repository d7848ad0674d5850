"""Tests for ihd.slices: the 16-bit HU store round trip, resume after a kill, unreadable files, tf reading."""
import os

import cv2
import numpy as np
import pandas as pd
import pytest

from ihd.dicom import read_hu
from ihd.slices import SliceStore, encode_png, slice_path, tf_read_hu, to_model_hu, write_slices

SIZE = 64


def series_index(real_data, count=6, folder="rsna_series"):
    paths = sorted((real_data / folder).glob("*.dcm"))[:count]
    return pd.DataFrame({"image_id": [p.stem for p in paths], "path": [str(p) for p in paths]})


def test_round_trip_within_one_hu(real_data, tmp_path):
    index = pd.concat([series_index(real_data, 3), series_index(real_data, 2, "cq500_series"),
                       series_index(real_data, 3, "rsna_slices")], ignore_index=True)
    assert write_slices(index, tmp_path, size=SIZE, workers=1) == []
    store = SliceStore(tmp_path)
    assert store.size == SIZE and store.config["hu_offset"] == 1024
    for image_id, path in zip(index["image_id"], index["path"]):
        assert store.path(image_id) == tmp_path / image_id[3:5] / f"{image_id}.png" and store.has(image_id)
        expected = to_model_hu(read_hu(path), SIZE)
        stored = store.read_hu(image_id)
        assert stored.shape == (SIZE, SIZE) and stored.dtype == np.float32
        assert np.abs(stored - expected).max() <= 0.5
        assert stored.min() >= -1024 and stored.max() > 60


def test_to_model_hu_is_area_mean():
    hu = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert np.array_equal(to_model_hu(hu, 2), [[2.5, 4.5], [10.5, 12.5]])
    assert np.array_equal(to_model_hu(hu, 4), hu)


def test_encode_clips_and_rounds(tmp_path):
    hu = np.array([[-3000.0, -1024.4], [39.6, 70000.0]], dtype=np.float32)
    path = tmp_path / "x.png"
    path.write_bytes(encode_png(hu))
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).tolist() == [[0, 0], [1064, 65535]]


def test_resume_after_kill(real_data, tmp_path):
    index = series_index(real_data, 6)
    write_slices(index, tmp_path, size=SIZE, workers=1)
    paths = [slice_path(tmp_path, i) for i in index["image_id"]]
    old = 1_000_000_000
    for path in paths:
        os.utime(path, ns=(old, old))
    paths[1].unlink()
    half = paths[2].parent / f".{paths[2].stem}.abc123.tmp.png"
    half.write_bytes(paths[2].read_bytes()[:100])
    paths[2].unlink()

    assert not SliceStore(tmp_path).has(index["image_id"][2])
    assert write_slices(index, tmp_path, size=SIZE, workers=2) == []
    assert all(p.is_file() for p in paths) and not half.exists()
    assert [p.stat().st_mtime_ns == old for p in paths] == [True, False, False, True, True, True]
    assert np.abs(SliceStore(tmp_path).read_hu(index["image_id"][2]) - to_model_hu(read_hu(index["path"][2]), SIZE)).max() <= 0.5
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.name.startswith(".")]
    assert leftovers == []


def test_unreadable_file_is_reported_and_run_goes_on(real_data, tmp_path):
    index = series_index(real_data, 2)
    broken = tmp_path / "ID_000broken.dcm"
    broken.write_bytes((real_data / "rsna_series" / f"{index['image_id'][0]}.dcm").read_bytes()[:5000])
    index = pd.concat([index, pd.DataFrame({"image_id": ["ID_000broken"], "path": [str(broken)]})], ignore_index=True)
    failures = write_slices(index, tmp_path / "store", size=SIZE, workers=1)
    assert [path for path, _ in failures] == [str(broken)] and "truncated" in failures[0][1]
    store = SliceStore(tmp_path / "store")
    assert store.has(index["image_id"][0]) and store.has(index["image_id"][1]) and not store.has("ID_000broken")


def test_other_size_in_same_store_refused(real_data, tmp_path):
    index = series_index(real_data, 1)
    write_slices(index, tmp_path, size=SIZE, workers=1)
    with pytest.raises(ValueError, match="size 64"):
        write_slices(index, tmp_path, size=32, workers=1)


def test_tf_read_hu_matches_store(real_data, tmp_path):
    tf = pytest.importorskip("tensorflow")
    index = series_index(real_data, 1)
    write_slices(index, tmp_path, size=SIZE, workers=1)
    store = SliceStore(tmp_path)
    image_id = index["image_id"][0]
    hu = tf_read_hu(tf.constant(str(store.path(image_id))), size=SIZE)
    assert hu.dtype == tf.float32 and tuple(hu.shape) == (SIZE, SIZE)
    assert np.array_equal(hu.numpy(), store.read_hu(image_id))


def test_png_encoder_round_trips_exactly_through_opencv_and_tensorflow():
    import tensorflow as tf

    from ihd.slices import encode_uint16_png

    rng = np.random.default_rng(0)
    image = rng.integers(0, 65536, size=(37, 53), dtype=np.uint16)
    image[0, :5] = [0, 65535, 1, 256, 65280]
    encoded = encode_uint16_png(image)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED), image)
    np.testing.assert_array_equal(tf.io.decode_png(encoded, channels=1, dtype=tf.uint16).numpy()[..., 0], image)
