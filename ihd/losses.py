"""The training loss of both stages: binary cross-entropy weighted as the challenge's metric.

Each slice's loss is the weighted mean of its six binary cross-entropies, with the weights of
``ihd.labels.LABEL_WEIGHTS`` (``any`` twice), so that minimising it minimises the weighted log
loss. It returns one value per slice: Keras averages those and, for the sequence model, drops the
padding steps that the ``Masking`` layer marked.
"""
import keras

from ihd.labels import LABEL_WEIGHTS


@keras.saving.register_keras_serializable(package="ihd")
def weighted_binary_crossentropy(y_true, y_pred):
    """Per-slice binary cross-entropy averaged over subtypes with the metric's weights."""
    weights = keras.ops.convert_to_tensor(LABEL_WEIGHTS / LABEL_WEIGHTS.sum(), dtype="float32")
    y_true = keras.ops.cast(y_true, "float32")
    per_label = keras.ops.binary_crossentropy(y_true, keras.ops.cast(y_pred, "float32"))
    return keras.ops.sum(per_label * weights, axis=-1)
