"""CNN inputs: which slices fill each channel, and the `tf.data` pipelines from the slice store.

A model input is an HU stack (size, size, C): channel c holds the slice `recipe.offsets[c]` away from
the current one within its series, clamped at the series ends (the first slice's "previous" slice is
itself). `neighbour_rows` resolves those sources to row numbers once; the pipelines then read slices
from the store by row number, so a row's neighbours come from the store even when the neighbour is
not itself in the rows being read (a validation slice next to nothing but validation slices is the
usual case, since folds keep series whole).

Pipelines: `training_dataset` (shuffled, optional oversampling of positive slices, augmented with
`ihd.augment` inside the graph, each element from its own seed), `inference_dataset` (index order,
no augmentation). Both read the store a batch of rows at a time, decode and augment each element in
parallel, resize to the model's size when it is smaller than the store's, batch and prefetch. Each
slice a recipe reads is read once, however many channels show it: training batches hold those
distinct sources, which the training step lays out as the model's channels on its own device
(`channel_layout`); inference batches are laid out in tf.data (`StackReader.expand`).
"""

from collections.abc import Callable

import numpy as np
import pandas as pd
import tensorflow as tf

from ihd.augment import augment_hu, augmentation_parameters
from ihd.labels import ANY, SUBTYPES
from ihd.slices import SliceStore, tf_hu_of_rows
from ihd.windows import ChannelRecipe

AUTOTUNE = tf.data.AUTOTUNE


def neighbour_rows(index: pd.DataFrame, offsets) -> np.ndarray:
    """Row numbers (N, C) of each row's channel sources: same series, `offsets[c]` slices away, clamped.

    Rows are ordered within each series by the `position` column; the result indexes rows of
    ``index`` by position (0..N-1), whatever the frame's own index labels or row order.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    series = pd.factorize(index["series_id"])[0]
    order = np.lexsort((index["position"].to_numpy(), series))
    sorted_series = series[order]
    first = np.searchsorted(sorted_series, sorted_series, side="left")
    last = np.searchsorted(sorted_series, sorted_series, side="right") - 1
    rank = np.arange(len(order)) - first
    target = np.clip(rank[:, None] + offsets[None, :], 0, (last - first)[:, None]) + first[:, None]
    result = np.empty((len(order), len(offsets)), dtype=np.int64)
    result[order] = order[target]
    return result


def stack_hu(hu_rows: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """HU slices (N, H, W) and their neighbour rows (M, C) -> stacks (M, H, W, C)."""
    return np.stack([hu_rows[neighbours[:, c]] for c in range(neighbours.shape[1])], axis=-1)


def channel_layout(recipe: ChannelRecipe) -> Callable[[tf.Tensor], tf.Tensor]:
    """A function that lays out batches of the recipe's distinct sources (..., S) as its channels (..., C)
    on the device that trains: a copy, exact on any device.

    The identity when no two channels share a slice (`adjacent`); `tf.repeat` when all show one slice
    (`windows`, `brain_blood_bone`); otherwise a gather along the last axis, which a CPU runs about
    four times slower. Not a product with a one-hot matrix, which TensorFloat-32 would round on a GPU
    (`StackReader.expand`, in tf.data, runs on the CPU).
    """
    if recipe.sources_are_channels:
        return tf.identity
    if len(recipe.sources) == 1:
        return lambda sources: tf.repeat(sources, len(recipe.offsets), axis=-1)
    return lambda sources: tf.gather(sources, list(recipe.channel_sources), axis=-1)


def label_array(index: pd.DataFrame) -> np.ndarray:
    """The six labels of every row, float32 (N, 6) in SUBTYPES order (NaN when unlabeled)."""
    return index[list(SUBTYPES)].to_numpy(dtype=np.float32)


def fold_rows(index: pd.DataFrame, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers (training, validation) for validation fold ``fold``: labeled train rows only."""
    folds = index["fold"].to_numpy()
    labeled_train = (index["split"].to_numpy() == "train") & (folds >= 0)
    known = sorted(set(folds[labeled_train].tolist()))
    if not known:
        raise ValueError("the index has no labeled training slices, so there is nothing to train or validate on (a "
                         "dataset indexed from a --dicom-dir folder has no labels): prepare a labeled dataset")
    if fold not in known:
        raise ValueError(f"fold {fold} is not in the index (its labeled training folds are {known})")
    return np.flatnonzero(labeled_train & (folds != fold)), np.flatnonzero(labeled_train & (folds == fold))


def oversampled(rows: np.ndarray, labels: np.ndarray, positive_copies: int) -> np.ndarray:
    """``rows`` with each row whose `any` label is positive repeated ``positive_copies`` times in all."""
    if positive_copies < 1:
        raise ValueError(f"positive_copies must be at least 1, got {positive_copies}")
    positive = rows[labels[rows, ANY] >= 0.5]
    return np.concatenate([rows] + [positive] * (positive_copies - 1))


READ_BATCH = 64  # rows whose slices one Python call reads and decodes


def check_image_size(store: SliceStore, image_size: int) -> None:
    """Refuse (ValueError) a model size larger than the store's slices, which would be upsampled."""
    if image_size > store.size:
        raise ValueError(
            f"--image-size {image_size} is larger than the slice store's {store.size} ({store.root}): "
            "lower --image-size, or delete that folder and store the slices again with prepare_data.py --size"
        )


@tf.function(jit_compile=True)
def _sources_hu(image_rows: tf.Tensor) -> tf.Tensor:
    """One row's image rows (S, size, 2 size + 1) -> HU (size, size, S): one XLA computation, one pass over a slice."""
    return tf.transpose(tf_hu_of_rows(image_rows), (1, 2, 0))


class StackReader:
    """Reads the stacks of rows from the store: their distinct sources, in HU at the model's size.

    A recipe may feed several channels from the same slice (the paper's three windows all read the
    current slice): each distinct source is read once, and `decode_sources` returns just those
    (size, size, S), so that training augments S channels rather than C and its batches carry S
    (`channel_layout` lays them out as the recipe's C channels in the training step, `expand` in
    tf.data for inference). Reading goes in two steps, so that Python runs once per batch of rows,
    not once per slice: `read_sources` reads, checks, inflates and unfilters the slices of a batch of
    rows (one call into the store, `SliceStore.tf_read_rows`), `decode_sources` turns one row's image
    rows into HU at the model's size.
    """

    def __init__(self, index: pd.DataFrame, store: SliceStore, recipe: ChannelRecipe, image_size: int):
        check_image_size(store, image_size)
        self.store = store
        self.image_size = image_size
        self.selection = None if recipe.sources_are_channels else tf.one_hot(
            recipe.channel_sources, len(recipe.sources), axis=0)
        self.slots = tf.constant(store.slots(index["image_id"]))
        self.neighbours = tf.constant(neighbour_rows(index, recipe.sources))

    def read_sources(self, rows):
        """Row numbers (B,) int64 -> the image rows of their distinct sources, tf.uint8 (B, S, size, 2 size + 1)
        (`SliceStore.tf_read_rows`)."""
        return self.store.tf_read_rows(tf.gather(self.slots, tf.gather(self.neighbours, rows)))

    def decode_sources(self, image_rows):
        """One row's image rows (S, size, 2 size + 1) -> float32 (image_size, image_size, S) HU of its distinct sources."""
        stack = _sources_hu(image_rows)
        if self.image_size < self.store.size:
            stack = tf.image.resize(stack, (self.image_size, self.image_size), method="area")
        return stack

    def expand(self, sources):
        """One element's distinct sources (size, size, S) -> the recipe's channels (size, size, C), exactly.

        A product with a one-hot (S, C) matrix: each output value is one source times 1 plus the
        others times 0, which is exact for finite HU in float32, and in tf.data twice as fast as a
        copy by `tf.repeat` and eight times a gather. It runs inside tf.data, on the CPU; on a GPU,
        TensorFloat-32 matmuls would round it (the training step uses `channel_layout` there).
        """
        if self.selection is None:
            return sources
        count, channels = self.selection.shape
        selected = tf.linalg.matmul(tf.reshape(sources, (-1, count)), self.selection)
        return tf.reshape(selected, (*sources.shape[:-1], channels))

    def read_batches(self, data: tf.data.Dataset) -> tf.data.Dataset:
        """A dataset whose elements are tuples led by a row number -> the same tuples, each followed by
        its row's image rows (S, size, 2 size + 1), read ``READ_BATCH`` rows at a time, in the same order."""
        def with_rows(*batch):
            return (*batch, self.read_sources(batch[0]))

        return data.batch(READ_BATCH).map(with_rows, num_parallel_calls=AUTOTUNE).unbatch()


def training_dataset(
    index: pd.DataFrame,
    store: SliceStore,
    recipe: ChannelRecipe,
    rows: np.ndarray,
    image_size: int,
    batch_size: int,
    seed: int = 0,
    augment: bool = True,
    positive_copies: int = 1,
) -> tf.data.Dataset:
    """Shuffled, augmented (sources, labels) batches of ``rows`` for one epoch, positives repeated.

    A batch holds each row's distinct sources (batch, size, size, S), not the recipe's C channels:
    the training step lays them out (`channel_layout`) on the device that trains, so that the input
    pipeline moves S channels rather than C (one rather than three for the paper's windows).
    """
    labels = label_array(index)
    epoch_rows = oversampled(np.asarray(rows), labels, positive_copies)
    if np.isnan(labels[epoch_rows]).any():
        raise ValueError("training rows include unlabeled slices")
    reader = StackReader(index, store, recipe, image_size)
    label_table = tf.constant(labels)
    data = tf.data.Dataset.from_tensor_slices(epoch_rows)
    data = data.shuffle(len(epoch_rows), seed=seed, reshuffle_each_iteration=True)
    element_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    data = reader.read_batches(tf.data.Dataset.zip(data, element_seeds))

    def prepared(row, element_seed, image_rows):
        sources = reader.decode_sources(image_rows)
        if augment:
            sources = augment_hu(sources, augmentation_parameters(element_seed))
        return sources, tf.gather(label_table, row)

    data = data.map(prepared, num_parallel_calls=AUTOTUNE)
    drop_remainder = len(epoch_rows) >= batch_size
    batches = len(epoch_rows) // batch_size if drop_remainder else 1
    return with_batches(data.batch(batch_size, drop_remainder=drop_remainder), batches)


def inference_dataset(
    index: pd.DataFrame,
    store: SliceStore,
    recipe: ChannelRecipe,
    rows: np.ndarray,
    image_size: int,
    batch_size: int,
) -> tf.data.Dataset:
    """HU stack batches (batch, size, size, C) of ``rows`` in the given order, unaugmented (validation, extraction)."""
    reader = StackReader(index, store, recipe, image_size)
    data = reader.read_batches(tf.data.Dataset.from_tensor_slices(np.asarray(rows, dtype=np.int64)))
    data = data.map(lambda row, image_rows: reader.expand(reader.decode_sources(image_rows)),
                    num_parallel_calls=AUTOTUNE)
    return with_batches(data.batch(batch_size), -(-len(rows) // batch_size))


def limit_intra_op_threads_on_gpu(on_gpu: bool | None = None) -> bool:
    """On a GPU machine, one thread for TensorFlow's intra-op pool; returns whether it set that.

    There the model runs on the GPU and the input pipeline on tf.data's own threads, but the
    augmentation's XLA computation (`ihd.augment`) splits each slice's work across the intra-op pool,
    whose threads then compete with tf.data's for the same cores: with one, the training input gains
    more from a second core (``bench/input.py``). On a CPU-only machine the model needs the pool, so it
    is left alone. ``on_gpu`` None looks for a GPU. Call it before TensorFlow runs its first op.
    """
    if on_gpu is None:
        on_gpu = bool(tf.config.list_physical_devices("GPU"))
    if on_gpu:
        tf.config.threading.set_intra_op_parallelism_threads(1)
    return on_gpu


def with_batches(data: tf.data.Dataset, batches: int) -> tf.data.Dataset:
    """``data`` prefetched and declared to hold ``batches`` batches: reading a batch at a time (`read_batches`)
    hides the count from tf.data, and Keras needs it for its progress bar's ETA and to know where an
    epoch ends (a wrong count fails loudly)."""
    return data.apply(tf.data.experimental.assert_cardinality(batches)).prefetch(AUTOTUNE)
