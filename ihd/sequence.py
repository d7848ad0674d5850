"""Stage 2: every series as a z-ordered sequence of cached slice features, read by a bidirectional LSTM.

Each slice contributes its selected CNN embedding features followed by the CNN's six probabilities
(as in Burduja et al.), at float16 precision (`INPUT_DTYPE`) wherever they come from: the file
`ihd.series_inputs` writes once per selection for training, or the arrays computed in memory at
prediction time. The index keeps each series as one contiguous block of rows sorted by position, so a
series is a (start, length) pair into the rows (an array, or a `ihd.row_files.RowFile` read by row
ranges) and nothing is read per series until a batch is assembled. Batches hold many series of
similar length (sorted by length, then cut into groups), each padded only to its own longest series
with `PAD_VALUE`, which the model's `Masking` layer hides from the LSTM, the outputs and the loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
import keras
from tqdm.auto import tqdm

from ihd.cnn import KEEPS
from ihd.io import atomic_path
from ihd.labels import SUBTYPES
from ihd.losses import loss_function
from ihd.metrics import weighted_log_loss

PAD_VALUE = -1.0e4
"""Fill value of padding steps: no real feature takes it (probabilities lie in [0, 1])."""
INPUT_DTYPE = np.float16
"""The precision of every slice's inputs: the cached embeddings' own, and half the bytes of float32."""


def series_bounds(index: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """First row and length of each series in an index whose series are contiguous and position-sorted."""
    series = index["series_id"].to_numpy()
    if len(series) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, series[1:] != series[:-1]])
    lengths = np.diff(np.r_[starts, len(series)])
    if len(pd.unique(series[starts])) != len(starts):
        repeated = pd.Series(series[starts]).value_counts().index[0]
        raise ValueError(f"series {repeated} is split over several blocks of index rows: sort the index by series")
    expected_position = np.arange(len(series)) - np.repeat(starts, lengths)
    wrong = np.flatnonzero(index["position"].to_numpy() != expected_position)
    if len(wrong):
        row = index.iloc[wrong[0]]
        raise ValueError(f"image {row['image_id']} of series {row['series_id']} is out of z order in the index")
    return starts.astype(np.int64), lengths.astype(np.int64)


def sequence_inputs(selected: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Per-slice LSTM inputs (N, k + 6) float32: the selected features, then the CNN's six probabilities,
    rounded to `INPUT_DTYPE` (so inputs computed in memory equal those read from a stored file); refuses
    a value that `INPUT_DTYPE` cannot hold."""
    if len(selected) != len(probabilities):
        raise ValueError(f"{len(selected)} rows of selected features but {len(probabilities)} of probabilities")
    exact = np.concatenate([np.asarray(selected, np.float32), np.asarray(probabilities, np.float32)], axis=1)
    with np.errstate(over="ignore"):  # refused below, by row and column
        inputs = exact.astype(INPUT_DTYPE)
    if not np.isfinite(inputs).all():
        row, column = np.argwhere(~np.isfinite(inputs))[0]
        raise ValueError(f"row {row}, input {column} is {exact[row, column]}: not a finite {np.dtype(INPUT_DTYPE).name}")
    return inputs.astype(np.float32)


@dataclass(frozen=True)
class SeriesSet:
    """Some series of a feature matrix: `inputs` (N, D) and `labels` (N, 6) hold every row, the
    series are the row blocks `starts[i] : starts[i] + lengths[i]`. `inputs` is an array or anything
    that gives rows by slice and has a `shape` (a `RowFile`): only the blocks a batch needs are read."""

    inputs: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray | None = None

    @property
    def rows(self) -> np.ndarray:
        """Row numbers of every slice of these series, series by series."""
        return np.concatenate([np.arange(s, s + n) for s, n in zip(self.starts, self.lengths)] or [np.zeros(0, int)])


def series_set(inputs: np.ndarray, index: pd.DataFrame, rows: np.ndarray, labels: np.ndarray | None = None) -> SeriesSet:
    """The series whose rows are selected by the boolean `rows` (a series must be wholly in or out)."""
    rows = np.asarray(rows, bool)
    starts, lengths = series_bounds(index)
    inside = np.add.reduceat(rows.astype(np.int64), starts) if len(starts) else np.zeros(0, np.int64)
    partial = np.flatnonzero((inside > 0) & (inside < lengths))
    if len(partial):
        raise ValueError(f"series {index['series_id'].iloc[starts[partial[0]]]} is split between row selections")
    keep = inside == lengths
    return SeriesSet(inputs, starts[keep], lengths[keep], labels)


def epoch_batch(batch_size: int, series: int, min_steps: int) -> tuple[int, str]:
    """The batch an epoch of ``series`` trains with, and the log's words for it: ``batch_size`` series, fewer
    where the epoch would otherwise take fewer than ``min_steps`` steps (at least one)."""
    batch = max(1, min(batch_size, series // min_steps))
    why = f" (--min-steps {min_steps} a training epoch)" if batch < min(batch_size, series) else ""
    return batch, f"{batch} series per batch{why}"


def plan_batches(lengths: np.ndarray, batch_size: int, shuffle: bool = False, seed: int = 0) -> list[np.ndarray]:
    """Series numbers grouped into batches of similar length; every series lands in exactly one batch.

    Series are sorted by length (ties broken at random when shuffling) and cut into consecutive
    groups of `batch_size`; shuffling also randomises the order of the batches.
    """
    lengths = np.asarray(lengths)
    rng = np.random.default_rng(seed)
    tiebreak = rng.random(len(lengths)) if shuffle else np.arange(len(lengths))
    order = np.lexsort((tiebreak, lengths))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def pad_batch(data: SeriesSet, series: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Inputs (B, T, D) padded with PAD_VALUE and labels (B, T, 6) padded with 0, T the longest series."""
    lengths = data.lengths[series]
    steps = int(lengths.max())
    x = np.full((len(series), steps, data.inputs.shape[1]), PAD_VALUE, np.float32)
    y = None if data.labels is None else np.zeros((len(series), steps, len(SUBTYPES)), np.float32)
    for slot, (start, length) in enumerate(zip(data.starts[series], lengths)):
        x[slot, :length] = data.inputs[start : start + length]
        if y is not None:
            y[slot, :length] = data.labels[start : start + length]
    return x, y


class SeriesBatches:
    """Padded, length-bucketed batches of a SeriesSet as a `tf.data` pipeline, reshuffled every epoch."""

    def __init__(self, data: SeriesSet, batch_size: int, shuffle: bool = False, seed: int = 0):
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.data.lengths) / self.batch_size)

    def __iter__(self):
        plan = plan_batches(self.data.lengths, self.batch_size, self.shuffle, self.seed + self.epoch)
        self.epoch += 1
        for series in plan:
            x, y = pad_batch(self.data, series)
            yield x if y is None else (x, y)

    def dataset(self) -> tf.data.Dataset:
        """The batches as a prefetched `tf.data.Dataset` with an unknown time dimension (one trace)."""
        x_spec = tf.TensorSpec((None, None, self.data.inputs.shape[1]), tf.float32)
        y_spec = tf.TensorSpec((None, None, len(SUBTYPES)), tf.float32)
        signature = x_spec if self.data.labels is None else (x_spec, y_spec)
        dataset = tf.data.Dataset.from_generator(self.__iter__, output_signature=signature)
        return dataset.apply(tf.data.experimental.assert_cardinality(len(self))).prefetch(2)


def row_runs(starts: np.ndarray, lengths: np.ndarray, most: int) -> list[tuple[int, int]]:
    """The rows of the blocks `starts[i] : starts[i] + lengths[i]` as (begin, end) ranges in row order:
    adjacent blocks joined, no range longer than `most` rows."""
    order = np.argsort(starts, kind="stable")
    runs: list[tuple[int, int]] = []
    for start, length in zip(starts[order].tolist(), lengths[order].tolist()):
        end = start + length
        if runs and runs[-1][1] == start:
            start = runs.pop()[0]
        while end - start > most:
            runs.append((start, start + most))
            start += most
        runs.append((start, end))
    return runs


def input_moments(data: SeriesSet, chunk_rows: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and variance over the set's rows, for the model's normalisation; reads
    contiguous runs of at most `chunk_rows` rows, one at a time."""
    total = np.zeros(data.inputs.shape[1])
    squares = np.zeros(data.inputs.shape[1])
    count = 0
    for begin, end in row_runs(data.starts, data.lengths, chunk_rows):
        chunk = np.asarray(data.inputs[begin:end], np.float64)
        total += chunk.sum(axis=0)
        squares += (chunk**2).sum(axis=0)
        count += end - begin
    mean = total / count
    return mean, np.maximum(squares / count - mean**2, 1e-6)


PAPER_HEAD_DROPOUT = 0.5  # the paper's dropout on the concatenation before its last layer


@keras.saving.register_keras_serializable(package="ihd")
class CnnProbabilities(keras.layers.Layer):
    """The CNN's six probabilities, the last six input features, as they are."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs):
        return inputs[..., -len(SUBTYPES) :]

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], len(SUBTYPES))


STANDARDIZATIONS = ("per-feature", "shared", "none")


def standardizing_moments(data: SeriesSet, how: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The mean and variance the model standardises its inputs with (None: inputs as they come).

    ``per-feature``: every input by its own mean and variance over the set's rows. ``shared``: every
    input by its own mean, and the selected features (all inputs but the last six, the CNN's
    probabilities) by one variance, their mean variance: their relative scales stay, so PCA
    components keep their spectrum instead of being whitened, while the probabilities get their own.
    """
    if how == "none":
        return None
    if how not in STANDARDIZATIONS:
        raise ValueError(f"unknown standardisation {how!r}: use {', '.join(STANDARDIZATIONS)}")
    mean, variance = input_moments(data)
    if how == "shared":
        features = slice(0, len(variance) - len(SUBTYPES))
        variance = variance.copy()
        variance[features] = variance[features].mean()
    return mean, variance


@keras.saving.register_keras_serializable(package="ihd")
class NeighbourDifferences(keras.layers.Layer):
    """Each step's features, then their differences to the previous and to the next step of its series.

    A series' first step is its own previous step and its last real step (padding follows it) its own
    next, so the differences there are zero.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs, mask=None):
        previous = keras.ops.concatenate([inputs[:, :1], inputs[:, :-1]], axis=1)
        following = keras.ops.concatenate([inputs[:, 1:], inputs[:, -1:]], axis=1)
        if mask is not None:
            real = keras.ops.expand_dims(keras.ops.cast(mask, inputs.dtype), -1)
            next_real = keras.ops.concatenate([real[:, 1:], keras.ops.zeros_like(real[:, :1])], axis=1)
            following = next_real * following + (1.0 - next_real) * inputs
        return keras.ops.concatenate([inputs, inputs - previous, inputs - following], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3 * input_shape[-1])


@keras.saving.register_keras_serializable(package="ihd")
class ProbabilityLogits(keras.layers.Layer):
    """The logits of the CNN's six probabilities, the last six input features (clipped away from 0 and 1)."""

    def __init__(self, epsilon: float = 1e-4, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.supports_masking = True

    def call(self, inputs):
        p = keras.ops.clip(inputs[..., -len(SUBTYPES) :], self.epsilon, 1.0 - self.epsilon)
        return keras.ops.log(p) - keras.ops.log1p(-p)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], len(SUBTYPES))

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


HEADS = ("residual", "paper", "plain")


def build_lstm(
    input_dim: int,
    layers: int = 3,
    units: int = 256,
    dropout: float = 0.5,
    moments: tuple[np.ndarray, np.ndarray] | None = None,
    head: str = "residual",
    neighbour_differences: bool = False,
) -> keras.Model:
    """Masking, standardisation by the training `moments` (mean, variance) if given, with
    ``neighbour_differences`` each slice's inputs joined by their differences to its neighbours'
    (`NeighbourDifferences`, after the second-place solution), `layers` bidirectional LSTMs of `units`
    per direction with dropout, and six sigmoids per slice from one of three heads:

    - ``residual``: dropout after every LSTM layer; the last Dense layer starts at zero and adds to the
      logits of the CNN's own probabilities (the last six inputs), so training starts from the CNN's
      answer and learns what the neighbouring slices change about it, which matters when series are few;
    - ``paper``: dropout between LSTM layers only, then (as the paper's code) the last LSTM output
      concatenated with the CNN's six probabilities, dropout 0.5, and one Dense layer;
    - ``plain``: dropout after every LSTM layer, then one Dense layer on the LSTM output alone.
    """
    if head not in HEADS:
        raise ValueError(f"unknown LSTM head {head!r}: use {', '.join(HEADS)}")
    if head != "plain" and input_dim < len(SUBTYPES):
        raise ValueError(f"the {head} head needs the six CNN probabilities as its last inputs, got {input_dim} inputs")
    inputs = keras.Input((None, input_dim), name="sequence")
    masked = keras.layers.Masking(mask_value=PAD_VALUE, name="padding")(inputs)
    x = masked
    if moments is not None:
        x = keras.layers.Normalization(mean=moments[0], variance=moments[1], name="standardise")(x)
    if neighbour_differences:
        x = NeighbourDifferences(name="neighbour_differences")(x)
    for layer in range(1, layers + 1):
        x = keras.layers.Bidirectional(keras.layers.LSTM(units, return_sequences=True), name=f"bilstm{layer}")(x)
        if head != "paper" or layer < layers:
            x = keras.layers.Dropout(dropout, name=f"dropout{layer}")(x)
    if head == "plain":
        outputs = keras.layers.Dense(len(SUBTYPES), activation="sigmoid", name="pred")(x)
    elif head == "paper":
        probabilities = CnnProbabilities(name="cnn_probabilities")(masked)
        joined = keras.layers.Concatenate(name="with_cnn")([x, probabilities])
        joined = keras.layers.Dropout(PAPER_HEAD_DROPOUT, name="head_dropout")(joined)
        outputs = keras.layers.Dense(len(SUBTYPES), activation="sigmoid", name="pred")(joined)
    else:
        change = keras.layers.Dense(len(SUBTYPES), kernel_initializer="zeros", name="logit_change")(x)
        cnn_logits = ProbabilityLogits(name="cnn_logits")(masked)
        logits = keras.layers.Add(name="logits")([cnn_logits, change])
        outputs = keras.layers.Activation("sigmoid", name="pred")(logits)
    return keras.Model(inputs, outputs, name="series_lstm")


def compile_lstm(model: keras.Model, learning_rate: float = 1e-3, jit_compile: bool = False, loss: str = "weighted",
                 clipnorm: float = 1.0) -> keras.Model:
    """Adam (gradients clipped at norm ``clipnorm``; 0: not clipped) and the loss named ``loss`` (`ihd.losses`).

    XLA stays off by default: it compiles once per padded batch length, and on the CPU a compiled
    step measured no faster (bench/lstm.py --jit).
    """
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate, clipnorm=clipnorm or None),
        loss=loss_function(loss),
        jit_compile=jit_compile,
    )
    return model


def predict_series(model: keras.Model, data: SeriesSet, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Probabilities (len(data.inputs), 6) for every row of the set's series (other rows stay NaN)."""
    out = np.full((len(data.inputs), len(SUBTYPES)), np.nan, np.float32)
    plan = plan_batches(data.lengths, batch_size)
    for series in tqdm(plan, desc="lstm", unit="batch", disable=not progress):
        x, _ = pad_batch(data, series)
        predicted = np.asarray(model.predict_on_batch(x))
        for slot, (start, length) in enumerate(zip(data.starts[series], data.lengths[series])):
            out[start : start + length] = predicted[slot, :length]
    return out


class BestEpoch(keras.callbacks.Callback):
    """Scores the validation series by the challenge's weighted log loss after every epoch, keeps the
    weights of the best epoch so far (in memory) and stops after `patience` epochs without improvement.
    With ``keep="last"`` it keeps every epoch in turn and never stops early (the paper's code)."""

    def __init__(self, val: SeriesSet, batch_size: int, patience: int, keep: str = "best"):
        super().__init__()
        if keep not in KEEPS:
            raise ValueError(f"unknown epoch to keep {keep!r}: use {' or '.join(KEEPS)}")
        self.keep = keep
        self.val = val
        self.batch_size = batch_size
        self.patience = patience
        self.rows = val.rows
        self.history: list[dict] = []
        self.best = math.inf
        self.best_epoch = -1
        self.best_weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch, logs=None):
        predicted = predict_series(self.model, self.val, self.batch_size)[self.rows]
        score = weighted_log_loss(self.val.labels[self.rows], predicted)
        self.history.append({"epoch": epoch + 1, "loss": float(logs["loss"]), "val_weighted_log_loss": score})
        improved = score < self.best or self.best_weights is None
        if improved or self.keep == "last":
            self.best, self.best_epoch = score, epoch + 1
            self.best_weights = self.model.get_weights()
        note = " (kept)" if self.keep == "last" else " (best)" if improved else ""
        print(f"epoch {epoch + 1}: loss {logs['loss']:.5f} val_wll {score:.5f}{note}", flush=True)
        if self.keep == "best" and epoch + 1 - self.best_epoch >= self.patience:
            self.model.stop_training = True


def fit_lstm(
    model: keras.Model,
    train: SeriesSet,
    val: SeriesSet,
    model_path: Path,
    epochs: int,
    batch_size: int,
    patience: int | None = None,
    seed: int = 0,
    keep: str = "best",
) -> BestEpoch:
    """Train a compiled LSTM, then save its best epoch by validation weighted log loss (or its last,
    ``keep="last"``) at `model_path`.

    Nothing is written before training ends, so a kill leaves whatever `model_path` held before.
    """
    keras.utils.set_random_seed(seed)
    best = BestEpoch(val, batch_size, patience or epochs, keep)
    batches = SeriesBatches(train, batch_size, shuffle=True, seed=seed)
    model.fit(batches.dataset(), epochs=epochs, callbacks=[best], shuffle=False, verbose=0)
    model.set_weights(best.best_weights)
    with atomic_path(model_path) as tmp:
        model.save(tmp)
    return best


def load_lstm(path: Path) -> keras.Model:
    """A saved series LSTM, for prediction."""
    return keras.models.load_model(path, compile=False)
