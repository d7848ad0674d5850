"""The slice CNN: windowing layer, any `keras.applications` backbone (or a tiny CNN), the head, training.

The model reads Hounsfield units, (size, size, 3) float32, channel c being the slice at the recipe's
offset c. Its first layer, `"windowing"`, applies the recipe's window to each channel and then the
backbone's own input scaling, so every caller feeds HU and never needs to know the backbone. The
backbone is built on that layer's output tensor (`input_tensor=`), which keeps the whole network one
flat functional graph: Grad-CAM (tf-keras-vis) can then reach the backbone's last convolution.
The head is `"embedding"` (global average pooling, the vector cached for the sequence model),
`"dropout"` and `"pred"` (Dense(6, sigmoid) in SUBTYPES order).

Training minimises binary cross-entropy weighted like the challenge (`any` counts twice), with Adam
under a warmup + cosine schedule; the epoch kept is the one with the best validation weighted log
loss. Every epoch is checkpointed with the optimizer state, so rerunning the same command after a
kill picks up at the epoch reached.
"""

import importlib
import math
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from ihd.io import atomic_path, read_json, write_json
from ihd.labels import SUBTYPES
from ihd.losses import weighted_binary_crossentropy
from ihd.metrics import summary
from ihd.windows import ChannelRecipe, parse_recipe

TINY = "tiny"
MODEL_FILE = "cnn.keras"
BEST_FILE = "best.json"
CHECKPOINT_DIR = "checkpoint"


@keras.saving.register_keras_serializable(package="ihd")
class Windowing(keras.layers.Layer):
    """HU -> per-channel window in [0, 1] -> `scale * window + offset`, the backbone's expected range."""

    def __init__(self, centers_hu, widths_hu, scale, offset, **kwargs):
        super().__init__(**kwargs)
        self.centers_hu = [float(v) for v in centers_hu]
        self.widths_hu = [float(v) for v in widths_hu]
        self.scale = [float(v) for v in scale]
        self.offset = [float(v) for v in offset]

    def call(self, hu):
        """Window each channel, then map [0, 1] to the backbone's input range."""
        centers = np.asarray(self.centers_hu, dtype=np.float32)
        widths = np.asarray(self.widths_hu, dtype=np.float32)
        unit = keras.ops.clip((hu - (centers - widths / 2)) / widths, 0.0, 1.0)
        return unit * np.asarray(self.scale, dtype=np.float32) + np.asarray(self.offset, dtype=np.float32)

    def compute_output_shape(self, input_shape):
        """Same shape as the input."""
        return input_shape

    def get_config(self):
        """Everything needed to rebuild the layer."""
        config = super().get_config()
        config.update(centers_hu=self.centers_hu, widths_hu=self.widths_hu, scale=self.scale, offset=self.offset)
        return config


def backbone_names() -> list[str]:
    """Every backbone `build_cnn` accepts: the `keras.applications` models and `tiny`."""
    return [TINY] + sorted(n for n in dir(keras.applications) if n[:1].isupper())


def _application(name: str):
    """The `keras.applications` constructor called ``name``, and its module's `preprocess_input`."""
    constructor = getattr(keras.applications, name, None) if name[:1].isupper() else None
    if constructor is None:
        examples = ", ".join([TINY, "MobileNetV2", "EfficientNetB0", "ResNet50", "DenseNet121", "ConvNeXtTiny"])
        raise ValueError(
            f"unknown backbone {name!r}: use 'tiny' or a keras.applications model name such as {examples} "
            f"({len(backbone_names())} in all)"
        )
    module = importlib.import_module(constructor.__module__)
    return constructor, module.preprocess_input


def input_affine(preprocess_input) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, offset) mapping [0, 1] to what ``preprocess_input`` makes of 0..255 pixels.

    Read off the function itself on constant 0 and 255 images, so every backbone family (scaling to
    [-1, 1], ImageNet mean/std, caffe means, or none because the model rescales inside) is covered
    without a table. A caffe-style RGB->BGR swap only reorders the per-channel means here: our
    channels are windows, not colours.
    """
    black = np.asarray(preprocess_input(np.zeros((1, 1, 1, 3), np.float32)), dtype=np.float64).reshape(3)
    white = np.asarray(preprocess_input(np.full((1, 1, 1, 3), 255.0, np.float32)), dtype=np.float64).reshape(3)
    return white - black, black


def _tiny_features(x):
    """A small CNN (four conv blocks, about 60k weights) for tests and quick CPU runs."""
    for block, filters in enumerate((16, 32, 64, 64)):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"tiny_conv{block}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"tiny_bn{block}")(x)
        x = keras.layers.ReLU(name=f"tiny_relu{block}")(x)
        if block < 3:
            x = keras.layers.MaxPooling2D(2, name=f"tiny_pool{block}")(x)
    return x


def _resolve_weights(backbone: str, weights) -> str | None:
    """``"imagenet"``, None (for None or "none"), or an existing weights file path."""
    if weights is None or str(weights).lower() == "none":
        return None
    if backbone == TINY:
        raise ValueError("the tiny backbone has no pretrained weights: use --weights none")
    if weights == "imagenet":
        return weights
    if not Path(weights).is_file():
        raise FileNotFoundError(f"weights file {weights} does not exist (use imagenet, none or a file path)")
    return str(weights)


def _backbone_features(backbone: str, windowed, weights: str | None):
    """The backbone's last feature map, built on ``windowed`` so that the graph stays flat."""
    if backbone == TINY:
        return _tiny_features(windowed)
    return application_on(backbone, windowed, weights).output


def application_on(backbone: str, windowed, weights: str | None) -> keras.Model:
    """The `keras.applications` model ``backbone`` without its top, built on the tensor ``windowed``."""
    constructor, _ = _application(backbone)
    try:
        model = constructor(
            include_top=False, weights=weights, input_tensor=windowed, input_shape=tuple(windowed.shape[1:])
        )
    except Exception as error:
        if weights == "imagenet" and "fetch failure" in str(error):
            raise RuntimeError(
                f"could not download the ImageNet weights of {backbone} ({error}). Offline, pass "
                "--weights none to train from scratch, or --weights PATH with a local weights file "
                "(the no-top .h5 file keras.applications would download)."
            ) from error
        raise
    return model


def build_cnn(
    backbone: str = "MobileNetV2",
    image_size: int = 256,
    recipe: ChannelRecipe | str = "windows",
    weights: str | None = None,
    dropout: float = 0.2,
) -> keras.Model:
    """The flat slice model: HU input -> "windowing" -> backbone -> "embedding" -> "dropout" -> "pred".

    ``weights``: "imagenet" (downloaded at first use), None/"none", or a backbone weights file.
    """
    recipe = parse_recipe(recipe) if isinstance(recipe, str) else recipe
    weights = _resolve_weights(backbone, weights)
    if backbone == TINY:
        scale, offset = np.ones(3), np.zeros(3)
    else:
        scale, offset = input_affine(_application(backbone)[1])
    hu = keras.Input((image_size, image_size, len(recipe.offsets)), name="hu")
    windowed = Windowing(
        centers_hu=[w.center_hu for w in recipe.windows],
        widths_hu=[w.width_hu for w in recipe.windows],
        scale=scale,
        offset=offset,
        dtype="float32",
        name="windowing",
    )(hu)
    features = _backbone_features(backbone, windowed, weights)
    embedding = keras.layers.GlobalAveragePooling2D(name="embedding")(features)
    dropped = keras.layers.Dropout(dropout, name="dropout")(embedding)
    pred = keras.layers.Dense(len(SUBTYPES), activation="sigmoid", dtype="float32", name="pred")(dropped)
    return keras.Model(hu, pred, name=f"cnn_{backbone}")


def set_prior_bias(model: keras.Model, label_means: np.ndarray) -> None:
    """Start the "pred" layer at the training label frequencies (its bias = their log-odds)."""
    means = np.clip(np.asarray(label_means, dtype=np.float64), 1e-4, 1 - 1e-4)
    model.get_layer("pred").bias.assign(np.log(means / (1 - means)).astype(np.float32))


def compile_cnn(model: keras.Model, learning_rate: float, total_steps: int, warmup_steps: int) -> None:
    """Adam with a linear warmup to ``learning_rate`` then cosine decay to 0 at ``total_steps``."""
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=learning_rate / 10,
        decay_steps=max(1, total_steps - warmup_steps),
        warmup_target=learning_rate,
        warmup_steps=warmup_steps,
    )
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=weighted_binary_crossentropy)


def distribution_strategy() -> tf.distribute.Strategy:
    """MirroredStrategy across GPUs when more than one is visible, else the default strategy."""
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def use_mixed_precision_on_gpu() -> bool:
    """Switch Keras to mixed float16 when a GPU is visible; returns whether it did."""
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    if on_gpu:
        keras.mixed_precision.set_global_policy("mixed_float16")
    return on_gpu


class ValidationScore(keras.callbacks.Callback):
    """After each epoch: the challenge's metric on validation, logged; the best epoch saved as cnn.keras."""

    def __init__(self, val_data: tf.data.Dataset, val_labels: np.ndarray, run_dir: Path):
        super().__init__()
        self.val_data = val_data
        self.val_labels = np.asarray(val_labels)
        self.model_path = Path(run_dir) / MODEL_FILE
        self.best_path = Path(run_dir) / BEST_FILE
        self.best_loss = math.inf

    def on_train_begin(self, logs=None):
        """Remember the best score of earlier (interrupted) runs of the same training."""
        if self.best_path.exists():
            self.best_loss = read_json(self.best_path)["val_weighted_log_loss"]

    def on_epoch_end(self, epoch, logs=None):
        """Score the validation set, log every figure, keep the model if it is the best so far."""
        predictions = self.model.predict(self.val_data, verbose=0)
        scores = summary(self.val_labels, predictions)
        if logs is not None:
            logs.update({f"val_{name}": value for name, value in scores.items()})
        loss = scores["weighted_log_loss"]
        improved = loss < self.best_loss
        if improved:
            self.best_loss = loss
            with atomic_path(self.model_path) as tmp:
                self.model.save(tmp)
            write_json(self.best_path, {"epoch": epoch + 1, "val_weighted_log_loss": loss})
        train_loss = (logs or {}).get("loss", math.nan)
        print(
            f"epoch {epoch + 1}: loss {train_loss:.4f} val_weighted_log_loss {loss:.4f} "
            f"val_auc_any {scores['auc_any']:.3f}{' (best, saved)' if improved else ''}",
            flush=True,
        )


def fit_cnn(
    model: keras.Model,
    train_data: tf.data.Dataset,
    val_data: tf.data.Dataset,
    val_labels: np.ndarray,
    run_dir: str | Path,
    epochs: int,
) -> None:
    """Train up to ``epochs``, resuming from ``run_dir/checkpoint`` when an earlier run was cut short.

    Writes cnn.keras (best validation epoch), best.json, history.csv and TensorBoard logs in tb/ in
    ``run_dir``. A terminal gets Keras' progress bar (rate and ETA) within each epoch; a log file
    only the validation callback's line per epoch.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [
        ValidationScore(val_data, val_labels, run_dir),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
        keras.callbacks.TensorBoard(str(run_dir / "tb"), write_graph=False),
        keras.callbacks.BackupAndRestore(str(run_dir / CHECKPOINT_DIR), double_checkpoint=True, delete_checkpoint=False),
    ]
    verbose = 1 if sys.stdout.isatty() else 0
    model.fit(train_data, epochs=epochs, callbacks=callbacks, shuffle=False, verbose=verbose)


def epochs_done(run_dir: str | Path) -> int:
    """Epochs completed so far by the training in ``run_dir`` (0 when none)."""
    metadata = Path(run_dir) / CHECKPOINT_DIR / "training_metadata.json"
    return int(read_json(metadata)["epoch"]) if metadata.exists() else 0


def embedding_extractor(model: keras.Model) -> keras.Model:
    """The CNN with two outputs: the pooled embedding and the six probabilities."""
    return keras.Model(model.input, [model.get_layer("embedding").output, model.get_layer("pred").output])


def load_cnn(run_dir: str | Path) -> tuple[keras.Model, dict]:
    """The best-epoch model of a CNN run (for inference) and the run's config.json."""
    run_dir = Path(run_dir)
    model_path = run_dir / MODEL_FILE
    if not model_path.exists():
        raise FileNotFoundError(f"{model_path} does not exist: train the CNN first (train_cnn.py --run {run_dir.name})")
    return keras.models.load_model(model_path, compile=False), read_json(run_dir / "config.json")
