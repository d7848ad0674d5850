"""Study-level models: one output per exam from a series of slices.

- ``build_attention_lstm`` (paper 001): over a series' cached slice features, masked like the per-slice
  model, the same bidirectional LSTM layers (same names and shapes, so a per-slice LSTM trained on
  slice labels can lend them its weights), then gated attention pooling (Ilse, Tomczak, Welling,
  "Attention-based deep multiple instance learning", ICML 2018): each slice gets a weight, the
  weights sum to 1 over the real slices, and the weighted mean of the LSTM states gives the study
  output. The weights are the localization.
- ``build_volume_lstm`` (paper 000): a fixed number of resliced frames of cached features, one LSTM,
  its last state into a softmax (or sigmoids).
- ``build_end_to_end`` (paper 002): the slice CNN applied to every frame of a resliced volume, a
  bidirectional LSTM over the frames, trained from volume labels alone.

``temporal_gradcam`` gives any of them per-frame evidence: Grad-CAM with time as the spatial axis.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from ihd.cnn import build_cnn
from ihd.losses import weighted_binary_crossentropy
from ihd.sequence import PAD_VALUE
from ihd.study_labels import LabelSet

STUDY_OUTPUT = "study"
ATTENTION_LAYER = "attention"
EVIDENCE_LAYERS = {"attention": None, "volume": "standardise", "end_to_end": "per_frame"}
"""Where each model's slice weights come from: None, its attention; else the layer temporal Grad-CAM reads."""


@keras.saving.register_keras_serializable(package="ihd")
class GatedAttentionPooling(keras.layers.Layer):
    """Gated attention over time: score_t = w . (tanh(V h_t) * sigmoid(U h_t)), softmax over the real
    steps (padding steps, where the raw sequence holds PAD_VALUE, get weight 0).

    Called on [hidden states (B, T, H), raw sequence (B, T, D)]; returns [pooled (B, H), weights (B, T)].
    """

    def __init__(self, units: int = 64, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.value = keras.layers.Dense(units, activation="tanh", name="value")
        self.gate = keras.layers.Dense(units, activation="sigmoid", name="gate")
        self.score = keras.layers.Dense(1, kernel_initializer="zeros", name="score")  # starts as the mean over slices

    def build(self, input_shape):
        hidden_shape = input_shape[0]
        self.value.build(hidden_shape)
        self.gate.build(hidden_shape)
        self.score.build((*hidden_shape[:-1], self.units))

    def call(self, inputs):
        hidden, sequence = inputs
        real = keras.ops.any(keras.ops.not_equal(sequence, PAD_VALUE), axis=-1)
        hidden = keras.ops.where(real[..., None], hidden, keras.ops.zeros_like(hidden))
        scores = self.score(self.value(hidden) * self.gate(hidden))[..., 0]
        scores = keras.ops.where(real, scores, keras.ops.full_like(scores, -1e9))
        weights = keras.ops.softmax(scores, axis=-1) * keras.ops.cast(real, scores.dtype)
        weights = weights / keras.ops.maximum(keras.ops.sum(weights, axis=-1, keepdims=True), 1e-9)
        pooled = keras.ops.sum(hidden * weights[..., None], axis=1)
        return [pooled, weights]

    def compute_output_shape(self, input_shape):
        hidden_shape = input_shape[0]
        return [(hidden_shape[0], hidden_shape[-1]), hidden_shape[:2]]

    def compute_mask(self, inputs, mask=None):
        return [None, None]

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def _normalised(x, moments):
    """Standardisation by training (mean, variance), named like the per-slice LSTM's."""
    if moments is None:
        return x
    return keras.layers.Normalization(mean=moments[0], variance=moments[1], name="standardise")(x)


def build_attention_lstm(
    input_dim: int,
    labels: LabelSet,
    layers: int = 3,
    units: int = 256,
    dropout: float = 0.5,
    moments: tuple[np.ndarray, np.ndarray] | None = None,
    attention_units: int = 64,
) -> keras.Model:
    """Masked series of slice features -> bidirectional LSTMs (``bilstm1``..) -> gated attention -> study output."""
    inputs = keras.Input((None, input_dim), name="sequence")
    x = _normalised(keras.layers.Masking(mask_value=PAD_VALUE, name="padding")(inputs), moments)
    for layer in range(1, layers + 1):
        x = keras.layers.Bidirectional(keras.layers.LSTM(units, return_sequences=True), name=f"bilstm{layer}")(x)
        x = keras.layers.Dropout(dropout, name=f"dropout{layer}")(x)
    pooled, _ = GatedAttentionPooling(attention_units, name=ATTENTION_LAYER)([x, inputs])
    outputs = keras.layers.Dense(len(labels.columns), activation=labels.activation, dtype="float32",
                                 name=STUDY_OUTPUT)(pooled)
    return keras.Model(inputs, outputs, name="attention_lstm")


def attention_view(model: keras.Model) -> keras.Model:
    """The attention model with two outputs: the study output and the slice weights (B, T)."""
    return keras.Model(model.inputs, [model.get_layer(STUDY_OUTPUT).output, model.get_layer(ATTENTION_LAYER).output[1]])


def build_volume_lstm(
    input_dim: int,
    labels: LabelSet,
    frames: int,
    units: int = 128,
    dropout: float = 0.5,
    moments: tuple[np.ndarray, np.ndarray] | None = None,
) -> keras.Model:
    """Resliced frames of slice features (frames, D) -> one LSTM -> its last state -> study output. Its evidence
    along the frames is read at the "standardise" layer (``EVIDENCE_LAYERS``), the identity without ``moments``."""
    inputs = keras.Input((frames, input_dim), name="volume")
    x = _normalised(inputs, moments if moments is not None else (np.zeros(input_dim), np.ones(input_dim)))
    x = keras.layers.LSTM(units, name="lstm")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(len(labels.columns), activation=labels.activation, dtype="float32",
                                 name=STUDY_OUTPUT)(x)
    return keras.Model(inputs, outputs, name="volume_lstm")


def build_end_to_end(
    labels: LabelSet,
    frames: int,
    backbone: str = "MobileNetV2",
    image_size: int = 256,
    recipe: str = "brain_blood_bone",
    weights: str | None = None,
    units: int = 128,
    dropout: float = 0.3,
) -> keras.Model:
    """HU volumes (frames, size, size, 3) -> the slice CNN's embedding per frame -> bidirectional LSTM -> study output."""
    cnn = build_cnn(backbone, image_size, recipe, weights)
    encoder = keras.Model(cnn.input, cnn.get_layer("embedding").output, name="slice_encoder")
    inputs = keras.Input((frames, image_size, image_size, 3), name="volume_hu")
    x = keras.layers.TimeDistributed(encoder, name="per_frame")(inputs)
    x = keras.layers.Bidirectional(keras.layers.LSTM(units), name="bilstm")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(len(labels.columns), activation=labels.activation, dtype="float32",
                                 name=STUDY_OUTPUT)(x)
    return keras.Model(inputs, outputs, name="end_to_end")


def study_loss(labels: LabelSet):
    """Categorical cross-entropy over exclusive classes; else the challenge-weighted binary cross-entropy."""
    return "categorical_crossentropy" if labels.exclusive else weighted_binary_crossentropy


def compile_study_model(model: keras.Model, labels: LabelSet, learning_rate: float = 1e-3) -> keras.Model:
    """Adam (gradients clipped at norm 1) and the label set's loss."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate, clipnorm=1.0), loss=study_loss(labels))
    return model


def copy_slice_lstm_weights(study_model: keras.Model, slice_lstm: keras.Model) -> list[str]:
    """Initialise the study model's bidirectional LSTM layers from a per-slice LSTM's (slice-label
    pretraining); returns the names copied. Raises ValueError when the layers or shapes differ."""
    names = [layer.name for layer in study_model.layers if layer.name.startswith("bilstm")]
    for name in names:
        try:
            source = slice_lstm.get_layer(name)
        except ValueError:
            raise ValueError(f"the per-slice LSTM has no layer {name}: train it with as many --layers") from None
        target = study_model.get_layer(name)
        shapes = [w.shape for w in source.get_weights()], [w.shape for w in target.get_weights()]
        if shapes[0] != shapes[1]:
            raise ValueError(f"layer {name}: the per-slice LSTM's weights {shapes[0]} do not fit {shapes[1]}: "
                             "train it with the same --units and selection")
        target.set_weights(source.get_weights())
    return names


def temporal_gradcam(model: keras.Model, x: np.ndarray, class_index: int, layer_name: str) -> np.ndarray:
    """Per-step evidence (B, T) for output ``class_index``: Grad-CAM with time as the spatial axis.

    The feature map is layer ``layer_name``'s output (B, T, C), the layers after it a plain chain (as in
    ``build_volume_lstm``); each channel is weighted by its
    gradient averaged over the real steps, the weighted sum is rectified, then normalised to sum 1
    per series (uniform where no step has positive evidence). Padding steps get 0.
    """
    x = tf.convert_to_tensor(np.asarray(x, np.float32))
    names = [layer.name for layer in model.layers]
    body = keras.Model(model.inputs, model.get_layer(layer_name).output)
    feature_map = tf.convert_to_tensor(body(x, training=False))
    with tf.GradientTape() as tape:
        tape.watch(feature_map)
        output = feature_map
        for layer in model.layers[names.index(layer_name) + 1 :]:
            output = layer(output, training=False)
        target = output[:, class_index]
    gradients = tape.gradient(target, feature_map).numpy()
    feature_map = feature_map.numpy()
    real = np.any(x.numpy() != PAD_VALUE, axis=-1) if x.shape.rank == 3 else np.ones(feature_map.shape[:2], bool)
    steps = np.maximum(real.sum(axis=1, keepdims=True), 1)
    channel_weights = (gradients * real[..., None]).sum(axis=1, keepdims=True) / steps[..., None]
    cam = np.maximum((feature_map * channel_weights).sum(axis=-1), 0.0) * real
    totals = cam.sum(axis=1, keepdims=True)
    uniform = real / steps
    return np.where(totals > 0, cam / np.where(totals > 0, totals, 1.0), uniform)
