"""The slice CNN: windowing layer, a backbone (`ihd.backbones`), the head, training.

The model reads Hounsfield units, (size, size, 3) float32, channel c being the slice at the recipe's
offset c. Its first layer, `"windowing"`, applies the recipe's window to each channel and then the
backbone's own input scaling, so every caller feeds HU and never needs to know the backbone. The
backbone is built on that layer's output tensor (`input_tensor=`), which keeps the whole network one
flat functional graph: Grad-CAM (tf-keras-vis) can then reach the backbone's last convolution.
The head is `"embedding"` (global average pooling, the vector cached for the sequence model),
`"dropout"` and `"pred"` (Dense(6, sigmoid) in SUBTYPES order).

Training minimises binary cross-entropy weighted like the challenge (`any` counts twice; or plain,
as the paper did), with Adam under a warmup + cosine schedule (or a constant rate); the epoch kept is
the one with the best validation weighted log loss (or the last). Every epoch is committed as one unit with the optimizer state (EpochCheckpoint), so rerunning
the same command after a kill picks up at the epoch reached, and the history holds each epoch once.
The training loop is ihd.distributed's, the same on one machine and on several: there, every
machine runs these callbacks, and all but the chief write into a scratch folder they discard.
"""

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from ihd.backbones import backbone_features, backbone_input_affine, resolve_weights
from ihd.distributed import ReplicaSyncedLossScaleOptimizer, chief_value, is_chief, train_epochs
from ihd.io import atomic_path, read_json, write_json
from ihd.labels import SUBTYPES
from ihd.losses import loss_function
from ihd.metrics import summary
from ihd.progress import epoch_progress
from ihd.report import score_text
from ihd.windows import ChannelRecipe, parse_recipe

MODEL_FILE = "cnn.keras"
BEST_FILE = "best.json"
HISTORY_FILE = "history.csv"
PUBLISHED_FILES = (HISTORY_FILE, MODEL_FILE, BEST_FILE)  # in the run folder, republished from each committed epoch
CHECKPOINT_DIR = "checkpoint"
EPOCH_PREFIX = "epoch-"  # checkpoint/epoch-<k>/: everything the run keeps after epoch k
STAGING_DIR = ".staging"  # checkpoint/.staging/: an epoch being written, committed by renaming it
WEIGHTS_FILE = "training.weights.h5"  # model and optimizer weights: where a resumed run starts
# The train_cnn.py flags that a resumed training must repeat, as config.json keeps them.
TRAINING_FLAGS = ("dataset", "data_dir", "backbone", "weights", "image_size", "recipe", "fold", "epochs", "batch_size",
                  "learning_rate", "warmup_fraction", "dropout", "positive_copies", "augment", "seed", "input_norm",
                  "loss", "schedule", "keep", "prior_bias", "features_dir")
SCHEDULES = ("cosine", "constant")
KEEPS = ("best", "last")  # which epoch a run keeps: the best by validation weighted log loss, or the last
LEGACY_METADATA = "training_metadata.json"  # the checkpoint of keras' BackupAndRestore, used before EpochCheckpoint


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


def build_cnn(
    backbone: str = "MobileNetV2",
    image_size: int = 256,
    recipe: ChannelRecipe | str = "windows",
    weights: str | None = None,
    dropout: float = 0.2,
    input_scaling: tuple | None = None,
) -> keras.Model:
    """The flat slice model: HU input -> "windowing" -> backbone -> "embedding" -> "dropout" -> "pred".

    ``weights``: "imagenet" ("wsl" for the paper's ResNeXt; downloaded at first use), None/"none", or a
    backbone weights file. ``input_scaling``: per-channel (scale, offset) applied to each window in
    [0, 1]; None takes the backbone's own input range (`ihd.backbones.backbone_input_affine`).
    """
    recipe = parse_recipe(recipe) if isinstance(recipe, str) else recipe
    weights = resolve_weights(backbone, weights)
    scale, offset = backbone_input_affine(backbone) if input_scaling is None else input_scaling
    hu = keras.Input((image_size, image_size, len(recipe.offsets)), name="hu")
    windowed = Windowing(
        centers_hu=[w.center_hu for w in recipe.windows],
        widths_hu=[w.width_hu for w in recipe.windows],
        scale=scale,
        offset=offset,
        dtype="float32",
        name="windowing",
    )(hu)
    features = backbone_features(backbone, windowed, weights)
    embedding = keras.layers.GlobalAveragePooling2D(name="embedding")(features)
    dropped = keras.layers.Dropout(dropout, name="dropout")(embedding)
    pred = keras.layers.Dense(len(SUBTYPES), activation="sigmoid", dtype="float32", name="pred")(dropped)
    return keras.Model(hu, pred, name=f"cnn_{backbone}")


def set_prior_bias(model: keras.Model, label_means: np.ndarray) -> None:
    """Start the "pred" layer at the training label frequencies (its bias = their log-odds)."""
    means = np.clip(np.asarray(label_means, dtype=np.float64), 1e-4, 1 - 1e-4)
    model.get_layer("pred").bias.assign(np.log(means / (1 - means)).astype(np.float32))


def compile_cnn(model: keras.Model, learning_rate: float, total_steps: int, warmup_steps: int,
                loss: str = "weighted", schedule: str = "cosine") -> None:
    """Adam and the loss named ``loss`` (`ihd.losses.LOSSES`). Schedule ``cosine``: a linear warmup to
    ``learning_rate`` over ``warmup_steps``, then cosine decay to 0 at ``total_steps``; ``constant``:
    ``learning_rate`` throughout. Under mixed float16, Adam is wrapped in ReplicaSyncedLossScaleOptimizer."""
    if schedule == "constant":
        rate = learning_rate
    elif schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=learning_rate / 10,
            decay_steps=max(1, total_steps - warmup_steps),
            warmup_target=learning_rate,
            warmup_steps=warmup_steps,
        )
    else:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}: use {' or '.join(SCHEDULES)}")
    optimizer = keras.optimizers.Adam(rate)
    if keras.mixed_precision.global_policy().name == "mixed_float16":  # where compile would add Keras' own
        optimizer = ReplicaSyncedLossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss=loss_function(loss))


def use_mixed_precision_on_gpu() -> bool:
    """Switch Keras to mixed float16 when a GPU is visible; returns whether it did."""
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    if on_gpu:
        keras.mixed_precision.set_global_policy("mixed_float16")
    return on_gpu


class ValidationScore(keras.callbacks.Callback):
    """After each epoch: the challenge's metric and per-subtype AUC on validation, added to the epoch's logs as val_*."""

    def __init__(self, val_data: tf.data.Dataset, val_labels: np.ndarray):
        super().__init__()
        self.val_data = val_data
        self.val_labels = np.asarray(val_labels)

    def on_epoch_end(self, epoch, logs=None):
        """Score the validation set into ``logs``."""
        predictions = self.model.predict(self.val_data, verbose=0)
        logs.update({f"val_{name}": value for name, value in summary(self.val_labels, predictions).items()})


def committed_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint folder of the last epoch whose end-of-epoch writes all completed (None before the first)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    epochs = [int(p.name[len(EPOCH_PREFIX):]) for p in folder.glob(f"{EPOCH_PREFIX}*") if p.name[len(EPOCH_PREFIX):].isdigit()]
    return folder / f"{EPOCH_PREFIX}{max(epochs)}" if epochs else None


def epochs_done(run_dir: str | Path) -> int:
    """Epochs completed so far by the training in ``run_dir`` (0 when none)."""
    checkpoint = committed_checkpoint(run_dir)
    return 0 if checkpoint is None else int(checkpoint.name[len(EPOCH_PREFIX):])


def publish_committed(run_dir: str | Path) -> int:
    """Make history.csv, cnn.keras and best.json in ``run_dir`` copies of the last committed epoch's (none
    before the first), each written atomically, and delete older epochs and staging leftovers; returns the
    epochs done. Rerun on a run whose publication a kill interrupted, it finishes that publication.
    """
    run_dir = Path(run_dir)
    folder = run_dir / CHECKPOINT_DIR
    if (folder / LEGACY_METADATA).exists():
        raise ValueError(f"{run_dir} was trained by an earlier version of the kit ({folder / LEGACY_METADATA}): "
                         "choose another --run, or delete that folder to train it again")
    shutil.rmtree(folder / STAGING_DIR, ignore_errors=True)
    committed = committed_checkpoint(run_dir)
    for name in PUBLISHED_FILES:
        if committed is None:
            (run_dir / name).unlink(missing_ok=True)
            continue
        with atomic_path(run_dir / name) as tmp:
            shutil.copyfile(committed / name, tmp)
    for older in folder.glob(f"{EPOCH_PREFIX}*"):
        if older != committed:
            shutil.rmtree(older)
    return epochs_done(run_dir)


class EpochCheckpoint(keras.callbacks.Callback):
    """Commits every epoch as one unit, so that a kill at any moment leaves a run that resumes consistently.

    ``keep``: "best" keeps the epoch of lowest validation weighted log loss as cnn.keras, "last" every
    epoch in turn (the paper's code kept its last epoch).

    At the end of epoch k (after ValidationScore has put the val_* scores in the logs) everything the
    run keeps is written into a staging folder: the model and optimizer weights, history.csv with
    one row per epoch up to k, the best model so far (cnn.keras, the lowest validation weighted log
    loss; a copy of the previous one when k is no better) and best.json. Renaming that folder to
    ``checkpoint/epoch-k`` is the commit. Only then are history.csv, cnn.keras and best.json
    published in the run folder (``publish_committed``). A run killed before the rename resumes at
    epoch k (its history without a row k, its best model without epoch k); after it, at epoch k + 1;
    either way the run folder is first republished from the committed epoch. history.csv's ``epoch``
    counts from 0 as Keras does; best.json's, like the log lines, from 1.
    """

    def __init__(self, run_dir: str | Path, keep: str = "best"):
        super().__init__()
        if keep not in KEEPS:
            raise ValueError(f"unknown epoch to keep {keep!r}: use {' or '.join(KEEPS)}")
        self.run_dir = Path(run_dir)
        self.keep = keep
        self.folder = self.run_dir / CHECKPOINT_DIR
        self.history: list[dict] = []
        self.best: dict | None = None

    def on_train_begin(self, logs=None):
        """Restore the last committed epoch (weights, optimizer, history, best) after republishing it."""
        if publish_committed(self.run_dir) == 0:
            return
        committed = committed_checkpoint(self.run_dir)
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(committed / WEIGHTS_FILE)
        self.history = pd.read_csv(committed / HISTORY_FILE).to_dict("records")
        self.best = read_json(committed / BEST_FILE)

    def _saved_note(self, saved: bool) -> str:
        """What the epoch's log line says about cnn.keras."""
        if not saved:
            return ""
        return " (saved)" if self.keep == "last" else " (best, saved)"

    def on_epoch_end(self, epoch, logs=None):
        """Write the epoch's whole state, commit it by one rename, then publish it."""
        loss = float(logs["val_weighted_log_loss"])
        best_loss = math.nan if self.best is None else self.best["val_weighted_log_loss"]
        improved = (self.keep == "last" or self.best is None or loss < best_loss
                    or (math.isnan(best_loss) and not math.isnan(loss)))
        staging = self.folder / STAGING_DIR
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self.model.save_weights(staging / WEIGHTS_FILE)
        history = [*self.history, {"epoch": epoch, **{key: float(logs[key]) for key in sorted(logs)}}]
        pd.DataFrame(history).to_csv(staging / HISTORY_FILE, index=False)
        if improved:
            self.model.save(staging / MODEL_FILE)
            best = {"epoch": epoch + 1, "val_weighted_log_loss": loss}
        else:
            shutil.copyfile(committed_checkpoint(self.run_dir) / MODEL_FILE, staging / MODEL_FILE)
            best = self.best
        write_json(staging / BEST_FILE, best)
        committed = self.folder / f"{EPOCH_PREFIX}{epoch + 1}"
        os.rename(staging, committed)
        self.history, self.best = history, best
        publish_committed(self.run_dir)
        saved = improved and is_chief(self.model.distribute_strategy)  # other machines write a scratch copy
        print(
            f"epoch {epoch + 1}: loss {logs.get('loss', math.nan):.4f} val_weighted_log_loss {loss:.4f} "
            f"val_auc_any {score_text(logs.get('val_auc_any', math.nan))}{self._saved_note(saved)}",
            flush=True,
        )


def fit_cnn(
    model: keras.Model,
    train_data: Callable[[tf.distribute.InputContext], tf.data.Dataset],
    steps: int,
    val_data: tf.data.Dataset,
    val_labels: np.ndarray,
    run_dir: str | Path,
    epochs: int,
    keep: str = "best",
    lay_out: Callable[[tf.Tensor], tf.Tensor] = tf.identity,
) -> None:
    """Train up to ``epochs``, resuming from the last epoch committed in ``run_dir/checkpoint``.

    ``train_data(context)`` gives one input pipeline's per-replica batches of an epoch and ``steps``
    is the number of global batches per epoch (see ihd.distributed: the model trains under the
    strategy it was built in, on one machine or several); ``lay_out`` turns a training batch's inputs
    into the model's on the training device (`ihd.inputs.channel_layout`). Writes cnn.keras (best
    validation epoch), best.json, history.csv and TensorBoard logs in tb/ in ``run_dir`` (see
    EpochCheckpoint). The chief's terminal gets Keras' progress bar (rate and ETA) within each epoch;
    a log file a line a minute (``ihd.progress``).
    """
    strategy = model.distribute_strategy
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    verbose, progress = epoch_progress(show=is_chief(strategy))
    callbacks = [
        ValidationScore(val_data, val_labels),
        EpochCheckpoint(run_dir, keep),
        keras.callbacks.TensorBoard(str(run_dir / "tb"), write_graph=False),
        *progress,
    ]
    train_epochs(model, train_data, steps, epochs, chief_value(strategy, epochs_done(run_dir)), callbacks, verbose,
                 lay_out)


def embedding_extractor(model: keras.Model) -> keras.Model:
    """The CNN with two outputs: the pooled embedding and the six probabilities."""
    return keras.Model(model.input, [model.get_layer("embedding").output, model.get_layer("pred").output])


def _training_command(run_dir: Path) -> str:
    """How to get a trained CNN in ``run_dir``: the command that started it, or how to start one."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        trained = sorted(p.parent.name for p in run_dir.parent.glob(f"*/{MODEL_FILE}"))
        others = f"; runs with a trained CNN in {run_dir.parent}: {', '.join(trained)}" if trained else ""
        return (f"no CNN was trained under that name. Train one with python train_cnn.py --dataset <prepared dataset> "
                f"--run {run_dir.name} --models-dir {run_dir.parent}{others}")
    config = read_json(config_path)
    flags = []
    for key in TRAINING_FLAGS:
        value = config.get(key)
        if isinstance(value, bool):
            flags.append(f"--{'' if value else 'no-'}{key.replace('_', '-')}")
        elif value is not None:
            flags.append(f"--{key.replace('_', '-')} {value}")
    done = epochs_done(run_dir)
    state = (f"its training reached epoch {done} ({committed_checkpoint(run_dir)}): rerun the command that started it, "
             "which puts cnn.keras back" if done else
             "its training stopped before its first epoch ended: resume it with the command that started it")
    return f"{state}: python train_cnn.py {' '.join(flags)} --models-dir {run_dir.parent} --run {run_dir.name}"


def load_cnn(run_dir: str | Path) -> tuple[keras.Model, dict]:
    """The best-epoch model of a CNN run (for inference) and the run's config.json."""
    run_dir = Path(run_dir)
    model_path = run_dir / MODEL_FILE
    if not model_path.exists():
        raise FileNotFoundError(f"{model_path} does not exist: {_training_command(run_dir)}")
    return keras.models.load_model(model_path, compile=False), read_json(run_dir / "config.json")
