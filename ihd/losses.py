"""The training losses of both stages: binary cross-entropy, weighted as the challenge's metric or not.

``weighted`` (the kit's default): each slice's loss is the weighted mean of its six binary
cross-entropies, with the weights of ``ihd.labels.LABEL_WEIGHTS`` (``any`` twice), so that minimising
it minimises the weighted log loss. ``bce``: the plain mean of the six, what the paper's code
minimised (PyTorch's BCEWithLogitsLoss). Both return one value per slice: Keras averages those and,
for the sequence model, drops the padding steps that the ``Masking`` layer marked.
"""
import keras
import numpy as np

from ihd.labels import LABEL_WEIGHTS


def _mean_crossentropy(y_true, y_pred, weights: np.ndarray):
    """Per-slice binary cross-entropy averaged over the six labels with ``weights`` (summing to 1)."""
    weights = keras.ops.convert_to_tensor(weights, dtype="float32")
    y_true = keras.ops.cast(y_true, "float32")
    per_label = keras.ops.binary_crossentropy(y_true, keras.ops.cast(y_pred, "float32"))
    return keras.ops.sum(per_label * weights, axis=-1)


@keras.saving.register_keras_serializable(package="ihd")
def weighted_binary_crossentropy(y_true, y_pred):
    """Per-slice binary cross-entropy averaged over subtypes with the metric's weights."""
    return _mean_crossentropy(y_true, y_pred, LABEL_WEIGHTS / LABEL_WEIGHTS.sum())


@keras.saving.register_keras_serializable(package="ihd")
def mean_binary_crossentropy(y_true, y_pred):
    """Per-slice binary cross-entropy averaged over the six labels alike."""
    return _mean_crossentropy(y_true, y_pred, np.full(len(LABEL_WEIGHTS), 1.0 / len(LABEL_WEIGHTS)))


LOSSES = {"weighted": weighted_binary_crossentropy, "bce": mean_binary_crossentropy}


def loss_function(name: str):
    """The loss called ``name`` in LOSSES."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: use {' or '.join(LOSSES)}")
    return LOSSES[name]
