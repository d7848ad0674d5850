"""The bleed U-Net: builder (a `keras.applications` encoder or a plain U-Net), loss, training, prediction.

The model reads one slice in Hounsfield units, (size, size, 1) float32. It repeats the slice into
the three windows of the `windows` recipe (brain, subdural, soft tissue) with the CNN's own
`Windowing` layer, so the encoder sees what the slice CNN sees and every caller feeds HU. Its output
`"masks"` is (size, size, 6) sigmoid probabilities in SUBTYPES order: one channel per subtype and
`any` (blood of any kind), so one model gives both the binary mask and the per-subtype masks.

Encoders: any `keras.applications` model with a known set of skip layers (`ENCODER_SKIPS`), built on
the windowed tensor like the CNN's backbone (one flat graph), or `plain`, a four-level U-Net of
convolution blocks (small enough for tests and CPU runs). The decoder is the classic one: upsample,
concatenate the skip at that scale, two 3x3 convolutions.

The loss is binary cross-entropy plus a soft Dice term. Bleeds cover well under 1% of a slice, so
cross-entropy alone is content to predict nothing; the Dice term, pooled over the batch per channel,
rewards overlap whatever the size of the bleed.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import keras
import numpy as np
from scipy import ndimage

from ihd.anatomy import BONE_HU
from ihd.backbones import application_on, input_affine, keras_application, resolve_weights
from ihd.cnn import Windowing
from ihd.dicom import AIR_HU
from ihd.io import atomic_path, read_json, write_json
from ihd.labels import SUBTYPES
from ihd.mask_rules import MaskRule, RuleChoice
from ihd.masks import ANY, UNKNOWN, MaskSet
from ihd.progress import epoch_progress
from ihd.report import score_text
from ihd.seg_metrics import score_masks
from ihd.windows import parse_recipe

PLAIN = "plain"
MODEL_FILE = "unet.keras"
BEST_FILE = "best.json"
# Layers whose outputs feed the decoder, shallowest (1/2 of the input size) to deepest (1/32).
ENCODER_SKIPS = {
    "MobileNetV2": ("block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu",
                    "block_13_expand_relu", "out_relu"),
    "ResNet50": ("conv1_relu", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
    "EfficientNetB0": ("block1a_activation", "block2b_activation", "block3b_activation",
                       "block5c_activation", "top_activation"),
}
BLOOD_PRIOR = 0.01  # the output starts near the share of blood pixels, not at 0.5: training starts calm
SCRATCH_BN_MOMENTUM = 0.9
PLAIN_LEVELS = 4  # four poolings: the input size must be a multiple of 16
HEAD_HU = -300.0  # tissue lies above; air, foam and padding below
SKULL_REACH = 0.03  # pieces of bone this close to the skull's largest piece (share of the slice size) are skull


def encoder_names() -> list[str]:
    """Every encoder `build_unet` accepts."""
    return [PLAIN, *ENCODER_SKIPS]


def _conv_block(x, filters: int, name: str):
    """Two 3x3 convolutions, each with batch normalisation and ReLU."""
    for k in (1, 2):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{k}")(x)
        x = keras.layers.BatchNormalization(momentum=SCRATCH_BN_MOMENTUM, name=f"{name}_bn{k}")(x)
        x = keras.layers.ReLU(name=f"{name}_relu{k}")(x)
    return x


def _plain_encoder(x, base_filters: int):
    """Skips at full, 1/2, 1/4, 1/8 size and the bottleneck at 1/16 of a plain U-Net."""
    skips = []
    for level in range(PLAIN_LEVELS):
        x = _conv_block(x, base_filters * 2 ** level, f"enc{level}")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    return skips, _conv_block(x, base_filters * 2 ** PLAIN_LEVELS, "bottleneck")


def _application_encoder(encoder: str, windowed, weights: str | None):
    """Skips at 1/2 .. 1/16 size and the 1/32 bottleneck of a `keras.applications` encoder.

    Trained from scratch, its batch normalisation moving averages start at 0 and 1 and, at the
    applications' momentum of 0.99 or 0.999, need thousands of steps to reach the real statistics:
    until then the model predicts nothing useful in inference mode. From scratch they use
    ``SCRATCH_BN_MOMENTUM``, as the plain U-Net does.
    """
    model = application_on(encoder, windowed, weights)
    if weights is None:
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = SCRATCH_BN_MOMENTUM
    outputs = [model.get_layer(name).output for name in ENCODER_SKIPS[encoder]]
    return outputs[:-1], outputs[-1]


def build_unet(encoder: str = "MobileNetV2", image_size: int = 256, weights: str | None = None,
               base_filters: int = 16) -> keras.Model:
    """The U-Net: HU (size, size, 1) -> "windowing" -> encoder -> decoder -> "masks" (size, size, 6), SUBTYPES order.

    ``weights`` ("imagenet", None/"none" or a file) applies to a `keras.applications` encoder; the
    plain U-Net always starts from scratch. ``base_filters`` is the plain U-Net's first width (the
    decoder of an application encoder uses it too). The input size must be a multiple of 16 (plain)
    or 32 (application encoders).
    """
    if encoder not in encoder_names():
        raise ValueError(f"unknown U-Net encoder {encoder!r}: use one of {', '.join(encoder_names())}")
    multiple = 2 ** PLAIN_LEVELS if encoder == PLAIN else 32
    if image_size % multiple:
        raise ValueError(f"image size {image_size} is not a multiple of {multiple}, which the {encoder} U-Net needs")
    if encoder == PLAIN:
        if weights is not None and str(weights).lower() != "none":
            raise ValueError("the plain U-Net has no pretrained weights: use --weights none")
        scale, offset = np.ones(3), np.zeros(3)
    else:
        weights = resolve_weights(encoder, weights)
        scale, offset = input_affine(keras_application(encoder)[1])
    recipe = parse_recipe("windows")
    hu = keras.Input((image_size, image_size, 1), name="hu")
    three = keras.layers.Concatenate(name="hu_x3")([hu, hu, hu])
    windowed = Windowing(centers_hu=[w.center_hu for w in recipe.windows], widths_hu=[w.width_hu for w in recipe.windows],
                         scale=scale, offset=offset, dtype="float32", name="windowing")(three)
    if encoder == PLAIN:
        skips, x = _plain_encoder(windowed, base_filters)
    else:
        skips, x = _application_encoder(encoder, windowed, weights)
    for level in reversed(range(len(skips))):
        filters = base_filters * 2 ** level
        x = keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"dec{level}_up")(x)
        x = keras.layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = _conv_block(x, filters, f"dec{level}")
    if x.shape[1] != image_size:  # application encoders' first skip is at half size
        x = keras.layers.UpSampling2D(2, interpolation="bilinear", name="full_up")(x)
        x = _conv_block(x, base_filters, "full")
    prior_logit = math.log(BLOOD_PRIOR / (1 - BLOOD_PRIOR))
    masks = keras.layers.Conv2D(len(SUBTYPES), 1, activation="sigmoid", dtype="float32", name="masks",
                                bias_initializer=keras.initializers.Constant(prior_logit))(x)
    return keras.Model(hu, masks, name=f"unet_{encoder}")


@keras.saving.register_keras_serializable(package="ihd")
def bce_dice_loss(truth, probabilities):
    """Binary cross-entropy plus (1 - soft Dice) per channel, the Dice pooled over the batch; channels averaged.

    Truth values below 0 (`ihd.masks.UNKNOWN`: the source does not say) count in neither term.
    """
    truth = keras.ops.cast(truth, "float32")
    known = keras.ops.cast(truth >= 0, "float32")
    truth = truth * known
    probabilities = keras.ops.clip(keras.ops.cast(probabilities, "float32"), 1e-6, 1 - 1e-6)
    cross_entropy = -(truth * keras.ops.log(probabilities) + (1 - truth) * keras.ops.log(1 - probabilities))
    cross_entropy = keras.ops.sum(cross_entropy * known) / keras.ops.maximum(keras.ops.sum(known), 1.0)
    overlap = keras.ops.sum(truth * probabilities * known, axis=(0, 1, 2))
    total = keras.ops.sum(truth, axis=(0, 1, 2)) + keras.ops.sum(probabilities * known, axis=(0, 1, 2))
    soft_dice = (2 * overlap + 1.0) / (total + 1.0)
    channel_known = keras.ops.cast(keras.ops.sum(known, axis=(0, 1, 2)) > 0, "float32")
    dice_loss = keras.ops.sum((1.0 - soft_dice) * channel_known) / keras.ops.maximum(keras.ops.sum(channel_known), 1.0)
    return cross_entropy + dice_loss


def subtype_masks(probabilities: np.ndarray, blood: np.ndarray) -> np.ndarray:
    """Exclusive per-subtype masks (..., 5) from probabilities (..., 6) and the mask rule's blood (...): each
    pixel of blood gets the subtype whose channel is highest there. Every output (table, NIfTI, SEG,
    overlays) uses this rule."""
    best = np.argmax(np.asarray(probabilities)[..., :ANY], axis=-1)
    return np.asarray(blood)[..., None] & (best[..., None] == np.arange(ANY))


def inside_skull(hu: np.ndarray) -> np.ndarray:
    """Where blood inside the head can lie on one slice of HU (rows, cols): the convex hull of its skull.

    The head is the largest connected region of tissue (above ``HEAD_HU``), which leaves out the
    scanner's table and head holder unless they touch it. The skull is the head's largest piece of
    bone (above ``BONE_HU``) and every other piece within ``SKULL_REACH`` (a share of the slice's
    size) of that piece's hull, since the skull base comes in many pieces; a table under the head
    lies further off. Outside the hull lie the scalp, the face and the table: dense tissue there (a
    scalp haematoma, muscle, the table's edge) is not intracranial blood. Without bone in the head
    (a slice below the skull, an image that is no head CT), the whole slice.
    """
    hu = np.asarray(hu, np.float32)
    everywhere = np.ones(hu.shape, bool)
    labels, count = ndimage.label(hu > HEAD_HU)
    if count == 0:
        return everywhere
    head = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    labels, count = ndimage.label(head & (hu > BONE_HU), structure=np.ones((3, 3)))
    if count == 0:
        return everywhere
    largest = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    reach_px = max(1, round(SKULL_REACH * max(hu.shape)))
    near = cv2.dilate(_convex_hull(largest).astype(np.uint8), np.ones((2 * reach_px + 1,) * 2, np.uint8)) > 0
    skull = np.isin(labels, np.unique(labels[near & (labels > 0)]))
    return _convex_hull(skull)


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    """The filled convex hull of a boolean image's true pixels."""
    hull = np.zeros(mask.shape, np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(np.argwhere(mask)[:, ::-1].astype(np.int32)), 1)
    return hull > 0


def compile_unet(model: keras.Model, learning_rate: float, total_steps: int) -> None:
    """Adam under cosine decay from ``learning_rate`` to 0 at ``total_steps``, with the BCE + Dice loss."""
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, total_steps))
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=bce_dice_loss)


def training_dataset(masks: MaskSet, batch_size: int, seed: int, augment: bool = True, shift_fraction: float = 0.1,
                     crop_size: int = 0):
    """Shuffled, batched (HU, masks) pairs; with ``augment`` a random left-right flip and shift, the same for both.

    A flip keeps every label true (subtypes have no side); the shift moves the head within the slice
    as patient positioning does. The shift pads with air (HU) and with "no blood" (masks).

    With ``crop_size`` (0: whole slices) each pair is then cut to a ``crop_size`` square holding a
    random pixel of blood, or of the head where the slice has none, at a random place in the square:
    training at a fraction of the cost per slice, on the head rather than on the air around it. The
    U-Net is fully convolutional: it still predicts whole slices.
    """
    import tensorflow as tf

    size = masks.hu.shape[1]
    if crop_size and not (0 < crop_size <= size and crop_size % 2 ** PLAIN_LEVELS == 0):
        raise ValueError(f"crop size {crop_size} must be a multiple of {2 ** PLAIN_LEVELS} up to the slice size {size}")
    pad = int(round(shift_fraction * size))
    data = tf.data.Dataset.from_tensor_slices((masks.hu[..., None], masks.masks))
    data = data.shuffle(len(masks), seed=seed, reshuffle_each_iteration=True)

    def as_float(hu, truth):
        return hu, tf.cast(truth, tf.float32)

    def flip_and_shift(hu, truth, seeds):
        unknown = tf.reduce_all(truth < 0, axis=(0, 1))  # channels the source does not say
        joined = tf.concat([hu - AIR_HU, truth], axis=-1)  # pads as air and as "no blood"
        joined = tf.image.stateless_random_flip_left_right(joined, seeds[0])
        joined = tf.image.pad_to_bounding_box(joined, pad, pad, size + 2 * pad, size + 2 * pad)
        joined = tf.image.stateless_random_crop(joined, (size, size, joined.shape[-1]), seeds[1])
        return joined[..., :1] + AIR_HU, tf.where(unknown, tf.cast(UNKNOWN, tf.float32), joined[..., 1:])

    def crop(hu, truth, seed):
        draws = tf.random.stateless_uniform([3], seed)
        blood = tf.where(truth[..., ANY] > 0.5)
        head = tf.concat([tf.where(hu[..., 0] > HEAD_HU), [[size // 2, size // 2]]], axis=0)  # never empty
        pixels = tf.cond(tf.shape(blood)[0] > 0, lambda: blood, lambda: head)
        count = tf.shape(pixels, out_type=tf.int64)[0]
        centre = pixels[tf.minimum(tf.cast(draws[0] * tf.cast(count, tf.float32), tf.int64), count - 1)]
        corner = tf.clip_by_value(centre - tf.cast(draws[1:] * crop_size, tf.int64), 0, size - crop_size)
        return (tf.slice(hu, [corner[0], corner[1], 0], [crop_size, crop_size, 1]),
                tf.slice(truth, [corner[0], corner[1], 0], [crop_size, crop_size, truth.shape[-1]]))

    def transform(pair, element_seed):
        hu, truth = pair
        seeds = tf.random.experimental.stateless_split(tf.stack([element_seed, tf.constant(0, tf.int64)]), 3)
        if augment:
            hu, truth = flip_and_shift(hu, truth, seeds)
        if crop_size:
            hu, truth = crop(hu, truth, seeds[2])
        return hu, truth

    data = data.map(as_float, num_parallel_calls=tf.data.AUTOTUNE)
    if augment or crop_size:
        # Each element draws from its own seed, so the same seed gives the same batches on any thread count.
        element_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        data = tf.data.Dataset.zip(data, element_seeds).map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    return data.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def predict_probabilities(model: keras.Model, hu: np.ndarray, batch_size: int = 16,
                          within_skull: bool = False) -> np.ndarray:
    """Mask probabilities (n, size, size, 6) of HU slices (n, size, size) at the model's size; with
    ``within_skull``, 0 outside each slice's skull hull (`inside_skull`)."""
    hu = np.asarray(hu, np.float32)
    parts = [np.asarray(model.predict_on_batch(hu[begin:begin + batch_size, ..., None]))
             for begin in range(0, len(hu), batch_size)]
    probabilities = np.concatenate(parts) if parts else np.zeros((*hu.shape[:3], len(SUBTYPES)), np.float32)
    return skull_hulls(hu)[..., None] * probabilities if within_skull else probabilities


def skull_hulls(hu: np.ndarray) -> np.ndarray:
    """`inside_skull` of every slice of HU (n, rows, cols)."""
    return np.stack([inside_skull(s) for s in hu]) if len(hu) else np.zeros(np.shape(hu), bool)


def predicted_masks(probabilities: np.ndarray, hu: np.ndarray, rule: MaskRule) -> np.ndarray:
    """Boolean (..., 6) masks in SUBTYPES order under ``rule``: the exclusive subtype masks and `any`."""
    blood = rule.blood(np.asarray(probabilities)[..., ANY], hu)
    return np.concatenate([subtype_masks(probabilities, blood), blood[..., None]], axis=-1)


def score_probabilities(probabilities: np.ndarray, masks: MaskSet, rule: MaskRule) -> dict:
    """Dice and volume errors per subtype and `any` of probabilities (n, size, size, 6) under ``rule`` against a
    MaskSet's truth (see `ihd.seg_metrics.score_masks`)."""
    return score_masks(predicted_masks(probabilities, masks.hu, rule), masks.masks, masks.cases, masks.voxel_mm,
                       SUBTYPES)


def evaluate(model: keras.Model, masks: MaskSet, rule: MaskRule = MaskRule()) -> dict:
    """Dice and volume errors per subtype and `any` of ``model`` on a MaskSet under the mask rule ``rule``, on the
    MaskSet's grid."""
    return score_probabilities(predict_probabilities(model, masks.hu, within_skull=rule.within_skull), masks, rule)


def choose_mask_rule(probabilities_any: np.ndarray, truth_any: np.ndarray, skull: np.ndarray,
                     hu: np.ndarray) -> tuple[MaskRule, float]:
    """The mask rule with the best pooled Dice of `any` over (validation) slices of one grid (`RuleChoice`):
    probabilities, truth, skull hulls and HU all of the same shape. Returns the rule and its Dice."""
    choice = RuleChoice()
    probabilities_any = np.asarray(probabilities_any)
    choice.add(truth_any, hu, probabilities_any, probabilities_any * skull)
    return choice.best()


class ValidationDice(keras.callbacks.Callback):
    """After each epoch: the mask rule with the best pooled validation Dice of `any` on the model's grid
    (`choose_mask_rule`) and that Dice, logged; the best epoch saved as unet.keras, its rule in best.json
    (the run's rule until train_seg.py chooses it again on the slices' grid).

    ``full_size``: the U-Net at the slices' size when training runs on crops (another input size, the
    same weights): it gets the trained weights, predicts the validation slices and is the one saved.
    """

    def __init__(self, validation: MaskSet, run_dir: str | Path, full_size: keras.Model | None = None):
        super().__init__()
        self.validation = validation
        self.full_size = full_size
        self.model_path = Path(run_dir) / MODEL_FILE
        self.best_path = Path(run_dir) / BEST_FILE
        self.best_dice = -math.inf
        self.skull = skull_hulls(validation.hu)  # once: the slices do not change
        if not (validation.masks[..., ANY] == 1).any():
            print(f"warning: the {len(validation.hu)} validation slices hold no blood: an epoch is kept for finding "
                  "none there (Dice undefined, n/a) over one that finds any (Dice 0), and nothing else tells epochs "
                  "apart; hold out cases with bleeds", flush=True)

    def on_epoch_end(self, epoch, logs=None):
        """Score validation under its best mask rule, log it, keep the model when it is the best so far."""
        model = self.model
        if self.full_size is not None:
            self.full_size.set_weights(self.model.get_weights())
            model = self.full_size
        probabilities = predict_probabilities(model, self.validation.hu)
        rule, _ = choose_mask_rule(probabilities[..., ANY], self.validation.masks[..., ANY], self.skull,
                                   self.validation.hu)
        if rule.within_skull:
            probabilities = probabilities * self.skull[..., None]
        scores = score_probabilities(probabilities, self.validation, rule)
        if logs is not None:
            logs.update({f"val_dice_{name}": s["dice_pooled"] for name, s in scores.items()}
                        | {"val_threshold": rule.threshold, "val_within_skull": int(rule.within_skull),
                           "val_blood_hu_low": rule.blood_hu[0] if rule.blood_hu else math.nan,
                           "val_blood_hu_high": rule.blood_hu[1] if rule.blood_hu else math.nan})
        dice_any = scores["any"]["dice_pooled"]
        undefined = math.isnan(dice_any)  # no blood in the truth nor in the prediction: the right answer
        rank = 1.0 if undefined else dice_any  # so it ranks with a perfect Dice
        improved = rank > self.best_dice
        if improved:
            self.best_dice = rank
            with atomic_path(self.model_path) as tmp:
                model.save(tmp)
            write_json(self.best_path, {"epoch": epoch + 1, "rule": rule.as_json(),
                                        "val_dice_any": None if undefined else dice_any,
                                        "rule_grid": int(self.validation.hu.shape[1])})
        print(f"epoch {epoch + 1}: loss {(logs or {}).get('loss', math.nan):.4f} val_dice_any {score_text(dice_any)} "
              f"({rule.describe()}){' (best, saved)' if improved else ''}", flush=True)


def fit_unet(model: keras.Model, train_data, validation: MaskSet, run_dir: str | Path, epochs: int,
             full_size: keras.Model | None = None) -> None:
    """Train for ``epochs``; unet.keras keeps the epoch with the best validation Dice of `any`, history.csv every epoch.

    ``full_size``: the same U-Net at the slices' size when ``model`` trains on crops (see `ValidationDice`).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    verbose, progress = epoch_progress()
    callbacks = [ValidationDice(validation, run_dir, full_size),
                 keras.callbacks.CSVLogger(str(run_dir / "history.csv")), *progress]
    model.fit(train_data, epochs=epochs, callbacks=callbacks, shuffle=False, verbose=verbose)


def unet_file(run_dir: str | Path) -> Path:
    """The U-Net file of a segmentation run; FileNotFoundError naming the command that trains it when absent."""
    path = Path(run_dir) / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: train the U-Net first "
                                f"(train_seg.py --run {Path(run_dir).name})")
    return path


def load_unet(run_dir: str | Path) -> tuple[keras.Model, dict]:
    """The best-epoch U-Net of a segmentation run and the run's config.json, with ``"mask_rule"``: the run's mask
    rule (`MaskRule.as_json`) from best.json, the neutral rule (`MaskRule()`) for a run without one, and
    ``"mask_rule_grid"``: the size of the slices it was chosen on (None when not recorded)."""
    run_dir = Path(run_dir)
    path = unet_file(run_dir)
    best_path = run_dir / BEST_FILE
    best = read_json(best_path) if best_path.is_file() else {}
    config = read_json(run_dir / "config.json") | {"mask_rule": rule_of_best(best).as_json(),
                                                   "mask_rule_grid": best.get("rule_grid")}
    return keras.models.load_model(path, compile=False), config


def rule_of_best(best: dict) -> MaskRule:
    """The mask rule a best.json holds; runs saved before the HU gate kept threshold and hull at its top level."""
    return MaskRule.from_json(best.get("rule", best))
