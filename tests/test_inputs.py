import albumentations as A
import numpy as np
import pandas as pd
import pytest

from ihd.augment import AIR_HU, RandomBrightnessContrastHU, augment_hu, training_augmentation
from ihd.inputs import (
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


def test_fold_rows_keep_only_labeled_train_rows():
    index = pd.DataFrame({"split": ["train", "train", "train", "test", "train"], "fold": [0, 1, 1, -1, -1]})
    train, val = fold_rows(index, 1)
    assert train.tolist() == [0] and val.tolist() == [1, 2]
    with pytest.raises(ValueError, match="fold 3"):
        fold_rows(index, 3)


def test_oversampled_repeats_only_positive_slices():
    labels = np.zeros((4, len(SUBTYPES)), np.float32)
    labels[2, SUBTYPES.index("any")] = 1
    assert sorted(oversampled(np.arange(4), labels, 3).tolist()) == [0, 1, 2, 2, 2, 3]


def test_augmentation_is_seeded_and_keeps_hounsfield_units():
    stack = np.full((32, 32, 3), 40.0, np.float32)
    stack[:, :4] = 1000.0
    first = [augment_hu(training_augmentation(seed=5), stack) for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    transform = training_augmentation(seed=5)
    outputs = [augment_hu(transform, stack) for _ in range(12)]
    assert any(not np.array_equal(out, stack) for out in outputs)
    assert all(out.dtype == np.float32 and out.shape == stack.shape for out in outputs)
    assert max(out.max() for out in outputs) > 900, "HU must not be clipped to [0, 1]"
    shift = A.Compose([RandomBrightnessContrastHU(brightness_hu=10, contrast=0.0, p=1)], seed=0)
    delta = shift(image=stack)["image"] - stack
    assert np.allclose(delta, delta.flat[0]) and 0 < abs(delta.flat[0]) <= 10
    rotated = A.Compose([A.Affine(rotate=(45, 45), fill=AIR_HU, p=1)], seed=0)(image=stack)["image"]
    assert rotated[0, 0, 0] == AIR_HU


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
    assert x.shape == (8, 32, 32, 3) and y.shape == (8, len(SUBTYPES))
    assert {tuple(row) for row in y.numpy()} <= {tuple(row) for row in labels[train]}
    with pytest.raises(ValueError, match="unlabeled"):
        training_dataset(index, store, parse_recipe("windows"), np.flatnonzero(index["split"] == "test"), 32, 8)
