"""Stage 2 at study level: cached slice features of each series in, one label per study out.

A series is the unit the models read (as in the per-slice stage); it carries its study's label. Two
input forms: masked, length-bucketed sequences of every slice (``ihd.sequence``'s batches, the
default) or ``frames`` resliced positions per series (``ihd.reslice``, paper 000), or for the end-to-end
model (paper 002) HU volumes read from the slice store and resliced the same way. Training keeps
the epoch with the lowest validation log loss of the study outputs; prediction gives one row per
series and, per series, slice weights (attention, or temporal Grad-CAM for the volume model).
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from ihd.io import atomic_path, named
from ihd.metrics import weighted_log_loss
from ihd.reslice import reslice, slice_scores
from ihd.sequence import SeriesSet, pad_batch, plan_batches, series_set
from ihd.slices import SliceStore, to_model_hu
from ihd.study_labels import LabelSet, series_labels
from ihd.study_models import attention_view, temporal_gradcam

_views: "weakref.WeakKeyDictionary[keras.Model, keras.Model]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class StudySeries:
    """Series of a feature matrix as study-model inputs; ``labels`` (n_series, K) their study labels.

    ``frames`` None: masked sequences padded per batch; else every series resliced to ``frames``
    positions along its normal (``z``, one value per feature row)."""

    data: SeriesSet
    z: np.ndarray
    labels: np.ndarray | None = None
    frames: int | None = None

    def __len__(self) -> int:
        return len(self.data.lengths)

    def inputs(self, series: np.ndarray) -> np.ndarray:
        """Model inputs of the series numbered ``series``: (B, T, D) padded, or (B, frames, D) resliced."""
        if self.frames is None:
            return pad_batch(self.data, series)[0]
        return np.stack([reslice(self.data.inputs[start : start + length], self.z[start : start + length], self.frames)
                         for start, length in zip(self.data.starts[series], self.data.lengths[series])])

    def slice_rows(self, number: int) -> np.ndarray:
        """Feature rows of series ``number``, in z order."""
        start = self.data.starts[number]
        return np.arange(start, start + self.data.lengths[number])

    def input_spec(self) -> tf.TensorSpec:
        """The shape of a batch of inputs (batch and, for masked sequences, time unknown)."""
        return tf.TensorSpec((None, self.frames, self.data.inputs.shape[1]), tf.float32)


@dataclass(frozen=True)
class VolumeSeries(StudySeries):
    """Series read as HU volumes from the slice store, resliced to ``frames`` images of ``image_size``
    pixels, each image repeated over the model's three channels (which window it three ways)."""

    store: SliceStore | None = None
    image_ids: np.ndarray | None = None
    image_size: int = 256

    def inputs(self, series: np.ndarray) -> np.ndarray:
        """HU volumes (B, frames, size, size, 3)."""
        return np.stack([self.volume(number) for number in series])

    def volume(self, number: int) -> np.ndarray:
        """Series ``number`` as HU (frames, size, size, 3)."""
        rows = self.slice_rows(number)
        hu = np.stack([to_model_hu(self.store.read_hu(i), self.image_size) for i in self.image_ids[rows]])
        return np.repeat(reslice(hu, self.z[rows], self.frames)[..., None], 3, axis=-1)

    def input_spec(self) -> tf.TensorSpec:
        return tf.TensorSpec((None, self.frames, self.image_size, self.image_size, 3), tf.float32)


def study_series(inputs: np.ndarray, index: pd.DataFrame, rows: np.ndarray, labels: pd.DataFrame | None = None,
                 frames: int | None = None) -> StudySeries:
    """The series wholly inside the boolean ``rows``; with a label table, only those whose study is labeled; with
    ``frames`` (resliced by position), only those whose slices stand at distinct positions."""
    data = series_set(inputs, index, rows)
    z = index["z"].to_numpy(np.float64)
    values = None
    if labels is not None:
        values = series_labels(index, data.starts, labels)
        known = ~np.isnan(values).any(axis=1)
        data, values = SeriesSet(inputs, data.starts[known], data.lengths[known]), values[known]
    if frames is not None:
        kept = _without_repeated_positions(index, z, data)
        data = SeriesSet(inputs, data.starts[kept], data.lengths[kept])
        values = None if values is None else values[kept]
    return StudySeries(data, z, values, frames)


def _without_repeated_positions(index: pd.DataFrame, z: np.ndarray, data: SeriesSet) -> np.ndarray:
    """Which series of ``data`` a model that reslices by position (``frames``) can read: a series with two
    slices at one position (real RSNA series hold such pairs, with different pixels) is left out with a
    warning naming it, since which slice stands there cannot be known."""
    repeated = np.array([np.any(np.diff(z[start:start + length]) <= 0)
                         for start, length in zip(data.starts, data.lengths)], bool)
    if repeated.any():
        names = index["series_id"].to_numpy()[data.starts[repeated]]
        warnings.warn(f"{len(names)} series have two slices at one position, which a model that reslices by position "
                      f"cannot order; left out: {named(names)}")
    return ~repeated


def volume_series(index: pd.DataFrame, rows: np.ndarray, store: SliceStore, frames: int, image_size: int,
                  labels: pd.DataFrame | None = None) -> VolumeSeries:
    """``study_series`` read as HU volumes from ``store`` (the end-to-end model's input)."""
    base = study_series(np.zeros((len(index), 0), np.float32), index, rows, labels, frames)
    return VolumeSeries(base.data, base.z, base.labels, frames, store, index["image_id"].to_numpy(), image_size)


def study_batches(series: StudySeries, batch_size: int, shuffle: bool = False, seed: int = 0):
    """A `tf.data.Dataset` of (inputs, study labels) batches of similar length, reshuffled every epoch."""
    epoch = [0]

    def generate():
        plan = plan_batches(series.data.lengths, batch_size, shuffle, seed + epoch[0])
        epoch[0] += 1
        for numbers in plan:
            yield series.inputs(numbers), series.labels[numbers]

    signature = (series.input_spec(), tf.TensorSpec((None, series.labels.shape[1]), tf.float32))
    data = tf.data.Dataset.from_generator(generate, output_signature=signature)
    return data.apply(tf.data.experimental.assert_cardinality(math.ceil(len(series) / batch_size))).prefetch(2)


def predict_studies(model: keras.Model, series: StudySeries, batch_size: int = 64) -> np.ndarray:
    """Study outputs (n_series, K) in series order."""
    out = np.zeros((len(series), int(model.outputs[0].shape[-1])), np.float32)
    for numbers in plan_batches(series.data.lengths, batch_size):
        out[numbers] = np.asarray(model.predict_on_batch(series.inputs(numbers)))
    return out


def study_log_loss(y_true: np.ndarray, probabilities: np.ndarray, labels: LabelSet) -> float:
    """Validation loss of study outputs: categorical cross-entropy, or the challenge's weighted log loss."""
    if not labels.exclusive:
        return weighted_log_loss(y_true, probabilities)
    p = np.clip(np.asarray(probabilities, np.float64), 1e-7, 1.0)
    return float(-(np.asarray(y_true) * np.log(p)).sum(axis=1).mean())


def _attention_view(model: keras.Model) -> keras.Model:
    """The model's two-output view (study output, slice weights), built once per model."""
    if model not in _views:
        _views[model] = attention_view(model)
    return _views[model]


def outputs_and_weights(model: keras.Model, series: StudySeries, evidence_layer: str | None = None,
                        batch_size: int = 64, class_index: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Study outputs (n_series, K) and, per series, weights over its own slices summing to 1: the
    attention weights of an attention model (one pass gives both), else temporal Grad-CAM of output
    ``class_index`` on ``evidence_layer`` mapped from frames to slices."""
    outputs = np.zeros((len(series), int(model.outputs[0].shape[-1])), np.float32)
    weights: list[np.ndarray] = [np.zeros(0)] * len(series)
    view = _attention_view(model) if evidence_layer is None else None
    for numbers in plan_batches(series.data.lengths, batch_size):
        x = series.inputs(numbers)
        if view is not None:
            predicted, per_step = (np.asarray(v) for v in view.predict_on_batch(x))
        else:
            predicted = np.asarray(model.predict_on_batch(x))
            per_step = temporal_gradcam(model, x, class_index, evidence_layer)
        outputs[numbers] = predicted
        for slot, number in enumerate(numbers):
            length = series.data.lengths[number]
            if series.frames is None:
                weights[number] = per_step[slot, :length]
            else:
                weights[number] = slice_scores(per_step[slot], series.z[series.slice_rows(number)])
    return outputs, weights


def slice_weights(model: keras.Model, series: StudySeries, evidence_layer: str | None = None,
                  batch_size: int = 64, class_index: int = 0) -> list[np.ndarray]:
    """Per series, weights over its own slices summing to 1 (see ``outputs_and_weights``)."""
    return outputs_and_weights(model, series, evidence_layer, batch_size, class_index)[1]


class BestStudyEpoch(keras.callbacks.Callback):
    """After each epoch: the validation study log loss; the best epoch's weights kept in memory; early
    stop after ``patience`` epochs without improvement."""

    def __init__(self, val: StudySeries, labels: LabelSet, batch_size: int, patience: int):
        super().__init__()
        self.val, self.labels = val, labels
        self.batch_size, self.patience = batch_size, patience
        self.history: list[dict] = []
        self.best, self.best_epoch = math.inf, -1
        self.best_weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch, logs=None):
        score = study_log_loss(self.val.labels, predict_studies(self.model, self.val, self.batch_size), self.labels)
        self.history.append({"epoch": epoch + 1, "loss": float(logs["loss"]), "val_study_log_loss": score})
        improved = score < self.best or self.best_weights is None
        if improved:
            self.best, self.best_epoch = score, epoch + 1
            self.best_weights = self.model.get_weights()
        print(f"epoch {epoch + 1}: loss {logs['loss']:.5f} val_study_loss {score:.5f}{' (best)' if improved else ''}",
              flush=True)
        if epoch + 1 - self.best_epoch >= self.patience:
            self.model.stop_training = True


def fit_study_model(model: keras.Model, train: StudySeries, val: StudySeries, labels: LabelSet, model_path: Path,
                    epochs: int, batch_size: int, patience: int | None = None, seed: int = 0) -> BestStudyEpoch:
    """Train a compiled study model, then save its best epoch by validation study log loss at ``model_path``
    (atomically, after training: a kill leaves whatever the path held before)."""
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"{len(train)} training and {len(val)} validation series have study labels: need both")
    keras.utils.set_random_seed(seed)
    best = BestStudyEpoch(val, labels, batch_size, patience or epochs)
    model.fit(study_batches(train, batch_size, shuffle=True, seed=seed), epochs=epochs, callbacks=[best],
              shuffle=False, verbose=0)
    model.set_weights(best.best_weights)
    with atomic_path(model_path) as tmp:
        model.save(tmp)
    return best


def load_study_model(path: Path) -> keras.Model:
    """A saved study model, for prediction."""
    return keras.models.load_model(path, compile=False)
