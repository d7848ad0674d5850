"""Stage 1: train the slice CNN on one fold, then cache every slice's embedding for the sequence model.

    python train_cnn.py --dataset synthetic --backbone tiny --weights none --image-size 128 --epochs 4
    python train_cnn.py --dataset rsna --backbone EfficientNetB0 --weights imagenet --recipe adjacent --fold 0
    python train_cnn.py --dataset rsna --run rsna-efficientnetb0-256-adjacent-fold0 --extract-only
    python train_cnn.py --dataset synthetic --backbone tiny --weights none --image-size 64 --recipe brain_blood_bone \\
        --study-labels data/synthetic/raw/stage_2_train_study_labels.csv --frames 25 --batch-size 4 --epochs 10

Reads data/<dataset>/index.parquet and data/<dataset>/slices/; writes models/<run>/ (cnn.keras of the
best validation epoch, config.json, history.csv, tb/, checkpoint/) and features/<run>/. Rerunning a
command that was killed resumes training at the epoch it reached and extraction at the row it reached.
With --study-labels (a study-label CSV, or "derive") it trains the end-to-end study model instead
(paper 002, ihd.end_to_end): the CNN and a BiLSTM on whole resliced volumes, one label per volume;
models/<run>/end_to_end.{keras,json} (a run named by default ends in -end2end).
"""

import argparse
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ihd.cli import run_command
from ihd.cnn import (
    KEEPS,
    MODEL_FILE,
    SCHEDULES,
    build_cnn,
    compile_cnn,
    fit_cnn,
    load_cnn,
    publish_committed,
    set_prior_bias,
    use_mixed_precision_on_gpu,
)
from ihd.distributed import (
    check_same_on_every_machine,
    chief_value,
    cluster_size,
    distribution_strategy,
    is_chief,
    pipeline_seed,
    pipeline_share,
    steps_per_epoch,
    worker_folder,
)
from ihd.end_to_end import end_to_end_labels, train_end_to_end
from ihd.features import TTAS, extract_features
from ihd.fingerprint import file_sha256
from ihd.ensemble import ALL_FOLDS, labeled_folds, member_runs, write_ensemble
from ihd.flags import backbone_name, fold_spec, fraction, non_negative_int, positive_float, positive_int, recipe_spec
from ihd.inputs import (
    channel_layout,
    check_image_size,
    fold_rows,
    inference_dataset,
    label_array,
    limit_intra_op_threads_on_gpu,
    oversampled,
    training_dataset,
)
from ihd.index import split_sha256
from ihd.io import FolderTaken, read_json, run_header, write_json
from ihd.labels import SUBTYPES
from ihd.losses import LOSSES
from ihd.metrics import prior_baseline, weighted_log_loss
from ihd.normalization import INPUT_NORMS, normalising_affine, window_moments
from ihd.presets import apply_preset
from ihd.slices import MANIFEST_FILE, SliceStore
from ihd.windows import parse_recipe

# Settings that define what a run learns: a rerun with the same --run must keep them.
RUN_DEFINING = (
    "dataset", "backbone", "weights", "image_size", "recipe", "fold", "dropout",
    "learning_rate", "positive_copies", "augment", "seed", "input_norm", "loss", "schedule", "keep", "prior_bias",
    "split_sha256", "batch_size", "warmup_fraction",  # the schedule a resumed optimizer's step count must meet
)
# Settings that say where things are, not what is made: left out of config.json, whose contents
# must not depend on the working directory.
LOCATIONS = ("data_dir", "models_dir", "features_dir")
FLAG_TYPES = {
    "backbone": backbone_name, "image_size": positive_int, "recipe": recipe_spec, "fold": fold_spec,
    "epochs": positive_int, "batch_size": positive_int, "learning_rate": positive_float,
    "warmup_fraction": fraction, "dropout": fraction, "positive_copies": positive_int, "seed": non_negative_int,
    "extract_batch_size": positive_int, "frames": positive_int, "lstm_units": positive_int, "patience": positive_int,
}
CHOICES = {"input_norm": INPUT_NORMS, "loss": tuple(LOSSES), "schedule": SCHEDULES, "keep": KEEPS, "tta": TTAS}


@dataclass
class Settings:
    """What a training run is made of; every field is a command-line flag."""

    dataset: str = "synthetic"  # data/<dataset>/ holds index.parquet and slices/ (prepare_data.py)
    run: str = ""  # name of models/<run>/ and features/<run>/; empty: dataset-backbone-size-recipe-fold
    backbone: str = "MobileNetV2"  # fast and accurate enough on slices; any keras.applications name, or tiny
    weights: str = "imagenet"  # ImageNet features train far faster than scratch; none or a file offline
    image_size: int = 256  # the paper's downsampled size; smaller than the store's is resized on the fly
    recipe: str = "windows"  # brain/subdural/soft-tissue windows as in the paper; adjacent for s-1, s, s+1
    fold: int | str = 0  # validation fold (folds are grouped by patient in the index); all: one CNN per fold
    epochs: int = 5  # the paper's CNNs converge in a few epochs over 670k slices
    batch_size: int = 32  # fits a 256x256 MobileNetV2 on an 8 GB GPU
    learning_rate: float = 5e-4  # peak Adam rate after warmup; fine-tuning tolerates it with BatchNorm
    warmup_fraction: float = 0.05  # ramp up over the first 5% of steps so pretrained weights are not wrecked
    dropout: float = 0.2  # light regularisation of the embedding before the head
    positive_copies: int = 1  # each slice with a bleed appears this many times per epoch (about 14% are positive)
    augment: bool = True  # flip, shift-scale-rotate, brightness/contrast: slices vary in position and scanner
    seed: int = 0  # weights, shuffling and augmentation are reproducible
    input_norm: str = "backbone"  # each window scaled to the backbone's input range; dataset: by its mean and std
    loss: str = "weighted"  # cross-entropy weighted like the metric (any twice); bce: the six labels alike
    schedule: str = "cosine"  # warmup then cosine decay; constant: the learning rate throughout
    keep: str = "best"  # cnn.keras is the best validation epoch; last: the last epoch
    prior_bias: bool = True  # the head starts at the training label frequencies
    preset: str = ""  # a named set of settings (ihd.presets): paper runs the paper's recipe
    extract: bool = True  # cache embeddings after training; stage 2 needs them
    extract_only: bool = False  # only (re)run the extraction of an already trained run
    extract_batch_size: int = 64  # inference batches; larger is faster until memory runs out
    tta: str = "none"  # cached features of each slice alone, or (flip) averaged with its left-right mirror
    data_dir: str = "data"  # where datasets live
    models_dir: str = "models"  # where CNN runs go
    features_dir: str = "features"  # where cached embeddings go
    study_labels: str = ""  # a study-label CSV or "derive": train the end-to-end volume model on study labels
    label_set: str = "subtypes"  # study labels: subtypes (six sigmoids) or exam (hemorrhage/no_finding/other)
    frames: int = 25  # end-to-end: images per resliced volume (paper 000's 25)
    lstm_units: int = 128  # end-to-end: BiLSTM width per direction
    patience: int = 5  # end-to-end: stop after this many epochs without a better validation study loss


def parse_args(argv: list[str] | None) -> Settings:
    """Command-line flags -> Settings (defaults from the dataclass)."""
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if field.name == "preset":
            continue
        if field.type is bool or isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=FLAG_TYPES.get(field.name, type(default)), default=default,
                                choices=CHOICES.get(field.name))
    apply_preset(parser, "cnn", argv)
    settings = Settings(**vars(parser.parse_args(argv)))
    if settings.fold == ALL_FOLDS and (settings.study_labels or settings.extract_only):
        parser.error("--fold all trains one CNN per fold: not with --study-labels or --extract-only "
                     "(rerun --fold all to extract what is missing)")
    if not settings.run:
        recipe_slug = re.sub(r"[^0-9a-z]+", "_", parse_recipe(settings.recipe).name.lower()).strip("_")
        settings.run = f"{settings.dataset}-{settings.backbone.lower()}-{settings.image_size}-{recipe_slug}"
        if settings.fold != ALL_FOLDS:
            settings.run += f"-fold{settings.fold}"
        settings.run += "-end2end" if settings.study_labels else ""
    return settings


def check_same_run(run_dir: Path, config: dict) -> None:
    """Refuse to continue a run that was started with different run-defining settings. A run folder that holds
    its config.json alone (its start stopped before training began: say, pretrained weights that could not be
    downloaded) takes the new settings."""
    path = run_dir / "config.json"
    if not path.exists() or [entry.name for entry in run_dir.iterdir()] == [path.name]:
        return
    previous = read_json(path)
    changed = [k for k in RUN_DEFINING if previous.get(k) != config[k]]
    if changed:
        details = ", ".join(f"{k}: {previous.get(k)!r} -> {config[k]!r}" for k in changed)
        raise FolderTaken(f"{run_dir} was started with other settings ({details}): choose another --run")


def train(settings: Settings, index: pd.DataFrame, store: SliceStore, run_dir: Path, index_path: Path,
          strategy) -> None:
    """Train (or resume) the CNN of ``settings`` on its fold under ``strategy`` and write the run folder
    (on the chief; another worker of several machines writes a scratch copy it discards)."""
    import keras

    run_dir = worker_folder(run_dir, strategy)
    recipe = parse_recipe(settings.recipe)
    train_rows, val_rows = fold_rows(index, settings.fold)
    labels = label_array(index)
    mixed_precision = use_mixed_precision_on_gpu()
    baseline = weighted_log_loss(labels[val_rows], prior_baseline(labels[train_rows], len(val_rows)))
    moments = None if settings.input_norm == "backbone" else window_moments(
        index, store, recipe, train_rows, settings.image_size, seed=settings.seed)
    scaling = None if moments is None else normalising_affine(*moments)
    config = {
        **{k: v for k, v in dataclasses.asdict(settings).items() if k not in LOCATIONS},
        "recipe": recipe.spec,
        "subtypes": list(SUBTYPES),
        "index_sha256": file_sha256(index_path),
        "split_sha256": split_sha256(index),
        "store_size": store.size,
        "train_rows": len(train_rows),
        "val_rows": len(val_rows),
        "val_prior_baseline": baseline,
        "mixed_precision": mixed_precision,
        "replicas": strategy.num_replicas_in_sync,
        "machines": cluster_size(),
        "input_moments": None if moments is None else {"mean": moments[0].tolist(), "std": moments[1].tolist()},
    }
    # the moments follow from the slices and the seed, both compared; summed on other CPUs, their last bits may not
    shared = {key: value for key, value in config.items() if key != "input_moments"}
    check_same_on_every_machine(strategy, {**shared, "slices_sha256": file_sha256(store.root / MANIFEST_FILE)})
    check_same_run(run_dir, config)
    write_json(run_dir / "config.json", config)
    print(f"{len(train_rows)} training and {len(val_rows)} validation slices (fold {settings.fold}); "
          f"prior baseline val weighted log loss {baseline:.4f}")

    done = chief_value(strategy, publish_committed(run_dir))
    if done >= settings.epochs:
        print(f"{run_dir}: already trained for {done} epochs")
        return
    if done:
        print(f"{run_dir}: resuming at epoch {done + 1} of {settings.epochs}")
    keras.utils.set_random_seed(settings.seed)
    epoch_rows = oversampled(train_rows, labels, settings.positive_copies)
    steps = steps_per_epoch(len(epoch_rows), settings.batch_size, strategy)

    def train_data(context):
        """One input pipeline's share of every epoch, in per-replica batches (ihd.distributed)."""
        return training_dataset(
            index, store, recipe, pipeline_share(epoch_rows, context), settings.image_size,
            context.get_per_replica_batch_size(settings.batch_size), seed=pipeline_seed(settings.seed, context),
            augment=settings.augment,
        )

    val_data = inference_dataset(index, store, recipe, val_rows, settings.image_size, settings.extract_batch_size)
    total_steps = settings.epochs * steps
    with strategy.scope():
        model = build_cnn(settings.backbone, settings.image_size, recipe, settings.weights, settings.dropout, scaling)
        if settings.prior_bias:
            set_prior_bias(model, labels[train_rows].mean(axis=0))
        compile_cnn(model, settings.learning_rate, total_steps, int(settings.warmup_fraction * total_steps),
                    settings.loss, settings.schedule)
    fit_cnn(model, train_data, steps, val_data, labels[val_rows], run_dir, settings.epochs, settings.keep,
            channel_layout(recipe))


def train_and_extract(settings: Settings, index: pd.DataFrame, index_path: Path, store: SliceStore,
                      strategy) -> Path:
    """Train (or resume) one fold's CNN under ``strategy`` and cache its features, as the flags say; returns
    the features folder (or the run folder when nothing is extracted, or on a worker other than the chief)."""
    run_dir = Path(settings.models_dir) / settings.run
    features_dir = Path(settings.features_dir) / settings.run
    if not settings.extract_only:
        train(settings, index, store, run_dir, index_path, strategy)
        if not is_chief(strategy):
            print(f"worker done: the model is in the chief's {run_dir}", flush=True)
            return run_dir
        print(f"model: {run_dir / 'cnn.keras'} (best epoch in best.json), history: {run_dir / 'history.csv'}, "
              f"TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    if not (settings.extract or settings.extract_only):
        return run_dir
    if not (run_dir / MODEL_FILE).exists():
        raise SystemExit(f"{run_dir / MODEL_FILE} not found: train the CNN first, with this command "
                         "without --extract-only")
    model, config = load_cnn(run_dir)
    if config.get("split_sha256") != split_sha256(index):
        raise SystemExit(f"{index_path} gives training other labeled rows, folds or labels than {run_dir} was trained "
                         f"on: its validation fold could hold slices the CNN trained on; train a new --run")
    extract_features(model, config, file_sha256(run_dir / MODEL_FILE), index, index_path, store, features_dir,
                     batch_size=settings.extract_batch_size, tta=settings.tta)
    print(f"features: {features_dir} ({len(index)} slices, float16 embeddings and probabilities)")
    return features_dir


def training_folds(index: pd.DataFrame, fold: int) -> list[int]:
    """The validation folds a run of ``--fold fold`` trains on the index: every labeled fold for --fold all;
    ValueError saying what the index lacks."""
    if fold == ALL_FOLDS:
        return labeled_folds(index)
    fold_rows(index, fold)
    return [fold]


def main(argv: list[str] | None = None) -> Path:
    """Train and/or extract as the flags say; returns the features folder (or the run folder, or with
    --fold all the ensemble's folder)."""
    settings = parse_args(argv)
    run_header(argv, settings)
    if cluster_size() > 1 and (settings.extract_only or settings.study_labels):
        raise SystemExit("TF_CONFIG names several machines, and only the slice CNN's training runs across machines: "
                         "run --extract-only and --study-labels on one machine, without TF_CONFIG")
    limit_intra_op_threads_on_gpu()  # before any TensorFlow op, like the strategy
    strategy = distribution_strategy()  # before any TensorFlow op: several machines configure their collectives here
    data_dir = Path(settings.data_dir) / settings.dataset
    index_path = data_dir / "index.parquet"
    if not index_path.exists():
        data_flag = "" if settings.data_dir == "data" else f" --data-dir {settings.data_dir}"
        raise SystemExit(
            f"{index_path} not found: prepare the dataset first with prepare_data.py --dataset {settings.dataset}"
            f"{data_flag} and --synthetic, --download or --dicom-dir DIR"
        )
    index = pd.read_parquet(index_path)
    folds = []
    if not (settings.study_labels or settings.extract_only):  # refused here, before a run folder is written
        try:
            folds = training_folds(index, settings.fold)
        except ValueError as error:
            raise SystemExit(f"{index_path}: {error}") from None
    targets = None
    if settings.study_labels:
        try:
            targets = end_to_end_labels(index, settings.study_labels, settings.label_set, settings.fold,
                                        settings.recipe)
        except ValueError as error:
            raise SystemExit(str(error)) from None
    store = SliceStore(data_dir / "slices")
    if targets is not None:
        run_dir = Path(settings.models_dir) / settings.run
        use_mixed_precision_on_gpu()
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", {**dataclasses.asdict(settings), "index_path": str(index_path)})
        train_end_to_end(index, store, data_dir, run_dir, targets, settings.backbone, settings.image_size,
                         settings.recipe, settings.weights, settings.frames, settings.lstm_units, settings.dropout,
                         settings.learning_rate, settings.epochs, settings.batch_size, settings.patience, settings.seed,
                         dataclasses.asdict(settings))
        return run_dir
    if not settings.extract_only:  # training reads the store at --image-size; extraction, at the run's own
        try:
            check_image_size(store, settings.image_size)
        except ValueError as error:
            raise SystemExit(str(error)) from None
    if settings.fold != ALL_FOLDS:
        return train_and_extract(settings, index, index_path, store, strategy)
    members = member_runs(settings.run, folds)
    for number, (fold, member) in enumerate(zip(folds, members), start=1):
        print(f"fold {fold} ({number} of {len(folds)}): run {member}", flush=True)
        train_and_extract(dataclasses.replace(settings, fold=fold, run=member), index, index_path, store, strategy)
    if not is_chief(strategy):
        return Path(settings.models_dir) / settings.run
    record = write_ensemble(settings.models_dir, settings.run, members, folds, dataclasses.asdict(settings))
    print(f"fold ensemble: {record} ({len(members)} CNNs, one per validation fold)")
    return record.parent


if __name__ == "__main__":
    run_command(main, "rerun the same command to resume the slice CNN at its last finished epoch "
                      "(an end-to-end run, --study-labels, starts again)")
