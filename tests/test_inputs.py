import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ihd.augment import AIR_HU, PARAMETER_COUNT, Augmentation, augment_hu, augmentation_parameters
from ihd.inputs import (
    channel_layout,
    fold_rows,
    inference_dataset,
    label_array,
    neighbour_rows,
    oversampled,
    stack_hu,
    training_dataset,
)
from ihd.labels import SUBTYPES
from ihd.slices import SliceStore
from ihd.windows import parse_recipe

ROOT = Path(__file__).resolve().parents[1]


def _two_series():
    """Series A (3 slices) and B (4 slices), interleaved and out of position order."""
    return pd.DataFrame(
        {
            "series_id": ["B", "A", "B", "A", "B", "A", "B"],
            "position": [2, 1, 0, 0, 3, 2, 1],
        },
        index=[10, 11, 12, 13, 14, 15, 16],
    )


def test_neighbour_rows_clamp_at_series_ends_and_never_cross_series():
    index = _two_series()
    rows = neighbour_rows(index, (-1, 0, 1))
    # A in position order: rows 3, 1, 5; B: rows 2, 6, 0, 4
    expected = {0: (6, 0, 4), 1: (3, 1, 5), 2: (2, 2, 6), 3: (3, 3, 1), 4: (0, 4, 4), 5: (1, 5, 5), 6: (2, 6, 0)}
    for row, sources in expected.items():
        assert tuple(rows[row]) == sources
    far = neighbour_rows(index, (-5, 0, 5))
    assert tuple(far[1]) == (3, 1, 5) and tuple(far[0]) == (2, 0, 4)
    series = index["series_id"].to_numpy()
    assert (series[far] == series[:, None]).all()


def test_stack_hu_puts_sources_in_channels():
    hu_rows = np.arange(3, dtype=np.float32)[:, None, None] * np.ones((3, 2, 2), np.float32)
    stacks = stack_hu(hu_rows, np.array([[0, 0, 1], [1, 2, 2]]))
    assert stacks.shape == (2, 2, 2, 3)
    np.testing.assert_array_equal(stacks[0, 0, 0], [0, 0, 1])
    np.testing.assert_array_equal(stacks[1, 1, 1], [1, 2, 2])


@pytest.mark.parametrize("spec", ["windows", "adjacent", "1:40/80,0:80/200,-1:40/380", "0:40/80,0:80/200,1:40/80",
                                  "1:40/80,0:80/200,1:40/380"])
def test_channel_layout_shows_each_channel_the_slice_at_its_offset_exactly(spec):
    # identity (no two channels share a slice, in any order), tf.repeat (one slice), the gather (the rest);
    # HU with a fraction that TensorFloat-32 or bfloat16 would round
    recipe = parse_recipe(spec)
    sources = np.stack([np.full((2, 2), 1234.567 + offset, np.float32) for offset in recipe.sources], axis=-1)[None]
    expected = np.float32(1234.567) + np.array(recipe.offsets, np.float32)
    np.testing.assert_array_equal(channel_layout(recipe)(sources).numpy()[0, 1, 1], expected)


def test_fold_rows_keep_only_labeled_train_rows():
    index = pd.DataFrame({"split": ["train", "train", "train", "test", "train"], "fold": [0, 1, 1, -1, -1]})
    train, val = fold_rows(index, 1)
    assert train.tolist() == [0] and val.tolist() == [1, 2]
    with pytest.raises(ValueError, match="fold 3"):
        fold_rows(index, 3)
    unlabeled = pd.DataFrame({"split": ["test", "test"], "fold": [-1, -1]})  # as a --dicom-dir folder indexes
    with pytest.raises(ValueError, match="the index has no labeled training slices"):
        fold_rows(unlabeled, 0)


def test_oversampled_repeats_only_positive_slices():
    labels = np.zeros((4, len(SUBTYPES)), np.float32)
    labels[2, SUBTYPES.index("any")] = 1
    assert sorted(oversampled(np.arange(4), labels, 3).tolist()) == [0, 1, 2, 2, 2, 3]


def _parameters(flip=0.0, angle=0.0, scale=1.0, shift_x=0.0, shift_y=0.0, brightness=0.0, contrast=1.0):
    return np.array([flip, angle, scale, shift_x, shift_y, brightness, contrast], np.float32)


def _augmented(stack, **changes):
    return augment_hu(stack, _parameters(**changes)).numpy()


def test_augment_hu_geometry_matches_numpy_flips_rotations_and_shifts():
    stack = np.random.default_rng(0).uniform(-1000, 1000, (9, 9, 2)).astype(np.float32)
    close = {"atol": 0.01}  # HU: bilinear weights at integer positions round in float32
    np.testing.assert_array_equal(_augmented(stack), stack)
    np.testing.assert_array_equal(_augmented(stack, flip=1), stack[:, ::-1])
    np.testing.assert_allclose(_augmented(stack, angle=np.pi / 2), np.rot90(stack, k=-1), **close)
    np.testing.assert_allclose(_augmented(stack, flip=1, angle=np.pi / 2), np.rot90(stack[:, ::-1], k=-1), **close)
    shifted = _augmented(stack, shift_x=1 / 9, shift_y=-2 / 9)
    np.testing.assert_allclose(shifted[:-2, 1:], stack[2:, :-1], **close)
    assert (shifted[:, 0] == AIR_HU).all() and (shifted[-2:] == AIR_HU).all()


def test_resampling_matches_tensorflows_projective_transform_edges_included():
    """The XLA resampler against the kernel it replaces, on maps that reach past every edge."""
    import tensorflow as tf

    from ihd.augment import _inverse_map, resample_bilinear

    rng = np.random.default_rng(1)
    stack = rng.uniform(-1000, 2000, (23, 17, 2)).astype(np.float32)
    for flip, angle, scale, shift_x, shift_y in [(0, 0.3, 1.1, 0.06, -0.05), (1, -0.26, 0.9, -0.06, 0.06),
                                                 (1, 0.0, 1.0, 0.5, 0.0), (0, 2.0, 0.5, 0.0, 0.3)]:
        inverse = _inverse_map(tf.constant([flip, angle, scale, shift_x, shift_y], tf.float32), 23, 17)
        expected = tf.raw_ops.ImageProjectiveTransformV3(
            images=stack[None], transforms=tf.concat([inverse, [0.0, 0.0]], 0)[None],
            output_shape=tf.constant([23, 17]), fill_value=tf.constant(AIR_HU), interpolation="BILINEAR",
            fill_mode="CONSTANT")[0]
        # HU: float32 coordinates round apart by about 1e-5 pixel, and neighbours differ by up to 3000 HU.
        np.testing.assert_allclose(resample_bilinear(stack, inverse).numpy(), expected.numpy(), atol=0.05)


def test_augment_hu_zooms_about_the_centre_and_fills_air():
    ramp = np.tile(np.arange(9, dtype=np.float32) * 100, (9, 1))[..., None]
    zoomed = _augmented(ramp, scale=2.0)
    # Twice as large about the centre column 4: output column 4 + 2d samples input column 4 + d.
    np.testing.assert_allclose(zoomed[4, [0, 2, 4, 6, 8]], ramp[4, [2, 3, 4, 5, 6]], atol=1e-3)
    np.testing.assert_allclose(zoomed[4, 5], 450.0, atol=1e-3)
    rotated = _augmented(ramp, angle=np.pi / 4)
    assert rotated[0, 0] == AIR_HU and rotated[4, 4] == ramp[4, 4]


def test_augment_hu_changes_hounsfield_units_about_the_pivot_without_clipping():
    stack = np.array([[[-1024.0], [40.0]], [[1000.0], [3000.0]]], np.float32)
    pivot = Augmentation().pivot_hu
    out = _augmented(stack, brightness=7.0, contrast=1.1)
    np.testing.assert_allclose(out, pivot + (stack - pivot) * 1.1 + 7.0, rtol=1e-6)
    assert out.max() > 3000


def test_augmentation_parameters_are_a_function_of_the_seed_within_their_ranges():
    settings = Augmentation()
    draws = np.stack([augmentation_parameters(seed).numpy() for seed in range(400)])
    assert draws.shape == (400, PARAMETER_COUNT)
    np.testing.assert_array_equal(draws[17], augmentation_parameters(17).numpy())
    flip, angle, scale, shift_x, shift_y, brightness, contrast = draws.T
    assert set(flip) == {0.0, 1.0} and 0.4 < flip.mean() < 0.6
    assert np.abs(angle).max() <= np.radians(settings.rotate_deg) and np.abs(angle).max() > np.radians(12)
    assert np.abs(scale - 1).max() <= settings.scale_fraction + 1e-6
    assert max(np.abs(shift_x).max(), np.abs(shift_y).max()) <= settings.shift_fraction + 1e-6
    assert np.abs(brightness).max() <= settings.brightness_hu and np.abs(contrast - 1).max() <= settings.contrast + 1e-6
    # Each change is applied to about half of the elements and is neutral on the rest.
    for unchanged in (angle == 0, brightness == 0):
        assert 0.4 < unchanged.mean() < 0.6
    assert ((angle == 0) == (scale == 1)).all() and ((brightness == 0) == (contrast == 1)).all()


def test_inference_dataset_reads_the_store_in_row_order_with_neighbours(prepared_synthetic):
    index = pd.read_parquet(prepared_synthetic / "index.parquet")
    store = SliceStore(prepared_synthetic / "slices")
    rows = np.arange(min(len(index), 12))
    data = inference_dataset(index, store, parse_recipe("adjacent"), rows, store.size, batch_size=5)
    stacks = np.concatenate([batch.numpy() for batch in data])
    expected = stack_hu(
        np.stack([store.read_hu(i) for i in index["image_id"]]), neighbour_rows(index, (-1, 0, 1))[rows]
    )
    np.testing.assert_array_equal(stacks, expected)
    windows = np.concatenate([b.numpy() for b in inference_dataset(index, store, parse_recipe("windows"), rows,
                                                                   store.size, batch_size=5)])
    np.testing.assert_array_equal(windows, np.repeat(expected[..., 1:2], 3, axis=-1))
    small = inference_dataset(index, store, parse_recipe("windows"), rows[:2], store.size // 2, batch_size=2)
    assert next(iter(small)).shape == (2, store.size // 2, store.size // 2, 3)
    with pytest.raises(ValueError, match="larger than the slice store"):
        inference_dataset(index, store, parse_recipe("windows"), rows, store.size * 2, batch_size=2)


def test_training_dataset_yields_labeled_batches(prepared_synthetic):
    index = pd.read_parquet(prepared_synthetic / "index.parquet")
    store = SliceStore(prepared_synthetic / "slices")
    train, _ = fold_rows(index, 0)
    data = training_dataset(index, store, parse_recipe("windows"), train, 32, batch_size=8, positive_copies=2)
    labels = label_array(index)
    x, y = next(iter(data))
    assert x.shape == (8, 32, 32, 1) and y.shape == (8, len(SUBTYPES))  # the three windows' one source
    assert {tuple(row) for row in y.numpy()} <= {tuple(row) for row in labels[train]}
    with pytest.raises(ValueError, match="unlabeled"):
        training_dataset(index, store, parse_recipe("windows"), np.flatnonzero(index["split"] == "test"), 32, 8)


def test_training_batches_hold_each_distinct_source_once_and_lay_out_as_the_inference_stacks(prepared_synthetic):
    index = pd.read_parquet(prepared_synthetic / "index.parquet")
    store = SliceStore(prepared_synthetic / "slices")
    train, _ = fold_rows(index, 0)
    recipe = parse_recipe("1:40/80,0:80/200,1:40/380")  # two sources, the first shown twice
    assert recipe.sources == (1, 0) and recipe.channel_sources == (0, 1, 0)
    row = train[len(train) // 2]
    data = training_dataset(index, store, recipe, np.full(4, row), store.size, batch_size=4, augment=False)
    sources, _ = next(iter(data))
    assert sources.shape == (4, store.size, store.size, 2)
    assert not np.array_equal(sources[0, ..., 0], sources[0, ..., 1]), "pick a row whose next slice is another"
    laid_out = channel_layout(recipe)(sources).numpy()
    expected = next(iter(inference_dataset(index, store, recipe, np.array([row]), store.size, batch_size=1))).numpy()
    np.testing.assert_array_equal(laid_out, np.repeat(expected, 4, axis=0))
    hu = np.stack([store.read_hu(i) for i in index["image_id"]])
    np.testing.assert_array_equal(expected, stack_hu(hu, neighbour_rows(index, recipe.offsets)[[row]]))


def test_training_dataset_augments_the_same_way_for_the_same_seed(prepared_synthetic):
    index = pd.read_parquet(prepared_synthetic / "index.parquet")
    store = SliceStore(prepared_synthetic / "slices")
    train, _ = fold_rows(index, 0)

    def first_batch(seed, augment=True):
        data = training_dataset(index, store, parse_recipe("windows"), train, 32, 8, seed=seed, augment=augment)
        return next(iter(data))[0].numpy()

    np.testing.assert_array_equal(first_batch(3), first_batch(3))
    assert not np.array_equal(first_batch(3), first_batch(4))
    assert not np.array_equal(first_batch(3, augment=False), first_batch(3)), "augmentation changed nothing"


def test_one_intra_op_thread_on_a_gpu_machine_gives_the_same_training_batches(prepared_synthetic, tmp_path):
    # Fresh interpreters: TensorFlow's thread pools can only be set before its first op, and a global
    # seed set by another test would change the pipeline's draws.
    def first_batch_script(on_gpu: bool) -> str:
        return f"""
import sys
import numpy as np, pandas as pd, tensorflow as tf
sys.path.insert(0, {str(ROOT)!r})
from ihd.inputs import fold_rows, limit_intra_op_threads_on_gpu, training_dataset
from ihd.slices import SliceStore
from ihd.windows import parse_recipe
assert limit_intra_op_threads_on_gpu(on_gpu={on_gpu}) == {on_gpu}
assert tf.config.threading.get_intra_op_parallelism_threads() == {1 if on_gpu else 0}
index = pd.read_parquet({str(prepared_synthetic / "index.parquet")!r})
train, _ = fold_rows(index, 0)
data = training_dataset(index, SliceStore({str(prepared_synthetic / "slices")!r}), parse_recipe("windows"), train, 64, 8,
                        seed=5)
np.save({str(tmp_path / f"{on_gpu}.npy")!r}, next(iter(data))[0].numpy())
"""

    runs = [subprocess.Popen([sys.executable, "-c", first_batch_script(on_gpu)]) for on_gpu in (False, True)]
    assert [run.wait() for run in runs] == [0, 0]
    default_threads, one_thread = np.load(tmp_path / "False.npy"), np.load(tmp_path / "True.npy")
    np.testing.assert_array_equal(one_thread, default_threads)
