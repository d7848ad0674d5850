"""Train the bleed U-Net on masks, then score it: Dice and volume error per subtype, Dice on held-out masks.

    python train_seg.py --synthetic data/synthetic/raw --encoder plain --weights none --image-size 128 --epochs 8
    python train_seg.py --synthetic data/synthetic/raw --encoder MobileNetV2 --weights imagenet --image-size 256
    python train_seg.py --synthetic data/synthetic/raw,data/synthetic2/raw --png-masks my/masks \\
        --score-png-masks ../shared/data/real/ctich_masks --read-non-ct-as-hu
    python train_seg.py --run seg-plain-128 --rule-only    # a trained run's mask rule chosen again, on its own data

Training masks: the training split of every ``--synthetic`` dataset (``truth/masks/`` beside
``stage_2_train/``; the phantoms, and bleeds inserted into real anatomy when a dataset holds them),
plus any ``--png-masks`` folder (``images/<name>.dcm`` + ``masks/<name>.png``) and NIfTI label volumes
(``--nifti-dir`` with ``--nifti-dicom-dir``). A fraction of each source's patients is held out
for validation (all their slices); of the training slices without blood only ``--empty-share`` is
kept. After each epoch the mask rule (`ihd.mask_rules`: a threshold on `any`, whether blood is kept only
inside the skull's hull, an optional HU range of blood) with the best pooled validation Dice of `any` is
found on the model's grid; the epoch kept is the one with the best such Dice. The run's rule is then
chosen again for that epoch on the validation slices at ``--rule-size`` (the grid masks are made on: the
maps resized back to 512x512 for CT), where a threshold that suits the model's grid no longer does. The
synthetic test splits and every ``--score-png-masks`` folder are scored after training, never trained on.

Writes models/<run>/: unet.keras, best.json, config.json (settings and data counts), history.csv,
bad_inputs.csv (every skipped file and why) and scores.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ihd.cli import run_command
from ihd.flags import held_out_share, non_negative_int, positive_float, positive_int, share
from ihd.io import read_json, run_header, write_json
from ihd.masks import BadInput, MaskSet, concatenate, nifti_label_set, png_mask_set, synthetic_set, write_bad_inputs
from ihd.report import score_text


@dataclass
class Settings:
    """What a segmentation run is made of; every field is a command-line flag."""

    synthetic: str = "data/synthetic/raw"  # synthetic datasets' raw folders (truth/masks/), comma-separated; empty: none
    png_masks: str = ""  # extra training masks: a folder of images/*.dcm + masks/*.png (comma-separated for several)
    nifti_dir: str = ""  # extra training masks: <SeriesInstanceUID>.nii.gz label volumes ...
    nifti_dicom_dir: str = ""  # ... matched to the series of this DICOM folder
    score_png_masks: str = ""  # folders scored after training, never trained on (comma-separated)
    read_non_ct_as_hu: bool = False  # mask folders' slices of other modalities read as HU (CT-ICH's OT exports)
    run: str = ""  # models/<run>/; empty: seg-<encoder>-<size>
    encoder: str = "MobileNetV2"  # the paper's family; plain for a small U-Net trained from scratch
    weights: str = "imagenet"  # ImageNet encoder weights train faster; none offline (plain always none)
    image_size: int = 256  # slices resized to this; bleeds a few mm wide need 256 or more on real scans
    rule_size: int = 512  # the grid the run's mask rule is chosen on: the slices' own (512x512 for CT)
    rule_only: bool = False  # no training: choose the mask rule of the trained run --run again, then score it
    crop_size: int = 0  # train on squares this size cut around blood or the head (0: whole slices): cheaper steps
    base_filters: int = 16  # first width of the plain U-Net and of every decoder level
    epochs: int = 8  # about a thousand synthetic slices an epoch converge in a few epochs
    batch_size: int = 16  # fits a 256x256 MobileNetV2 U-Net in a few GB
    learning_rate: float = 1e-3  # Adam under cosine decay
    empty_share: float = 0.3  # share of training slices without blood that are kept: most slices have none
    val_fraction: float = 0.2  # share of each source's patients held out to pick the epoch and the mask rule
    val_seed: int = 0  # which patients are held out: apart from --seed, so runs of several seeds validate alike
    augment: bool = True  # left-right flip and shift: heads lie in different places
    seed: int = 0  # split, weights and augmentation are reproducible
    models_dir: str = "models"  # where runs go


FLAG_TYPES = {
    "image_size": positive_int, "rule_size": positive_int, "crop_size": non_negative_int, "base_filters": positive_int,
    "epochs": positive_int, "batch_size": positive_int, "learning_rate": positive_float, "empty_share": share,
    "val_fraction": held_out_share, "val_seed": non_negative_int, "seed": non_negative_int,
}


def parse_args(argv: list[str] | None) -> Settings:
    """Command-line flags -> Settings (defaults from the dataclass); sizes, rates and shares are checked as parsed."""
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(Settings):
        default = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=FLAG_TYPES.get(field.name, type(default)), default=default)
    settings = Settings(**vars(parser.parse_args(argv)))
    settings.run = settings.run or f"seg-{settings.encoder.lower()}-{settings.image_size}"
    return settings


CASES_PER_PART = 8  # validation series (or lone slices) loaded at once at --rule-size: 8 series of 40 slices, about 0.8 GB


def folders(value: str) -> list[str]:
    """The comma-separated folders of a flag."""
    return [v for v in value.split(",") if v]


def source_loaders(settings: Settings) -> dict[str, functools.partial]:
    """Every training source the flags name, by the folder it came from: a loader of (size, bad, cases=None)
    -> MaskSet."""
    loaders = {folder: functools.partial(synthetic_set, folder, "train") for folder in folders(settings.synthetic)}
    loaders |= {folder: functools.partial(_png_masks, folder, settings.read_non_ct_as_hu)
                for folder in folders(settings.png_masks)}
    if settings.nifti_dir:
        if not settings.nifti_dicom_dir:
            raise SystemExit("--nifti-dir needs --nifti-dicom-dir, the DICOM folder its series come from")
        loaders[settings.nifti_dir] = functools.partial(nifti_label_set, settings.nifti_dir, settings.nifti_dicom_dir)
    return loaders


def _png_masks(folder: str, non_ct_as_hu: bool, size: int, bad: list[BadInput], cases: set[str] | None = None) -> MaskSet:
    return png_mask_set(folder, size, bad, non_ct_as_hu, cases)


def training_sources(settings: Settings, bad: list[BadInput]) -> dict[str, MaskSet]:
    """Every training source the flags name, at the model's size, by the folder it came from; exits naming
    a folder that holds no masks, or, when no slice could be read, why."""
    sources, loaders = {}, source_loaders(settings)
    for folder, load in loaders.items():
        try:
            sources[folder] = load(settings.image_size, bad)
        except FileNotFoundError as error:
            synthetic_among_others = folder in folders(settings.synthetic) and len(loaders) > 1
            hint = f"; leave {folder} out of --synthetic to train on the others" if synthetic_among_others else ""
            raise SystemExit(f"{error}{hint}") from None
    if not sources:
        raise SystemExit("no training masks: give --synthetic, --png-masks or --nifti-dir")
    if not any(len(masks) for masks in sources.values()):
        reasons = Counter(b.reason for b in bad).most_common(3)
        raise SystemExit(f"no training masks could be read from {', '.join(sources)}: {len(bad)} inputs skipped"
                         + "".join(f"; {count} as {reason}" for reason, count in reasons))
    return sources


def split_patients(masks: MaskSet, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation rows, each patient's slices on one side; at least one patient on each when there are two.

    Bleeds inserted into one background head make several studies of one patient: splitting by series
    would validate on heads the model trained on.
    """
    patients = np.unique(masks.patients)
    order = np.random.default_rng(seed).permutation(len(patients))
    n_val = min(len(patients) - 1, max(1, round(val_fraction * len(patients)))) if len(patients) > 1 else 0
    is_val = np.isin(masks.patients, patients[order[:n_val]])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def keep_some_empty(masks: MaskSet, rows: np.ndarray, share: float, seed: int) -> np.ndarray:
    """``rows`` with every slice that has blood (or unknown truth) and a seeded ``share`` of those without."""
    empty = ~(masks.masks[rows] != 0).any(axis=(1, 2, 3))
    keep = ~empty | (np.random.default_rng([seed, 1]).random(len(rows)) < share)
    return rows[keep]


def format_scores(scores: dict) -> str:
    """One line per channel: pooled and mean Dice, volume errors."""
    lines = []
    for name, s in scores.items():
        line = (f"  {name:17s} dice pooled {score_text(s['dice_pooled'])}  mean {score_text(s['dice_mean'])} "
                f"({s['cases_with_dice']} cases)")
        if s["volume_cases"]:
            line += (f"  volume MAE {s['volume_mae_ml']:.2f} mL, bias {s['volume_bias_ml']:+.2f} mL "
                     f"({s['volume_cases']} cases)")
        lines.append(line)
    return "\n".join(lines)


def epoch_choice(run_dir: Path, image_size: int) -> dict:
    """How the run's epoch was chosen: epoch, rule (`MaskRule.as_json`), val_dice_any and rule_grid, from best.json
    (as training wrote it, after `choose_run_rule`, or as runs saved before the HU gate kept it)."""
    from ihd.segmentation import rule_of_best

    best = read_json(run_dir / "best.json")
    if "epoch_rule" in best:
        return {"epoch": best["epoch"], "rule": best["epoch_rule"], "val_dice_any": best["epoch_val_dice_any"],
                "rule_grid": best["epoch_rule_grid"]}
    return {"epoch": best["epoch"], "rule": rule_of_best(best).as_json(), "val_dice_any": best["val_dice_any"],
            "rule_grid": best.get("rule_grid", image_size)}


def choose_run_rule(model, settings: Settings, validation_by_source: dict[str, MaskSet], run_dir: Path):
    """Choose the run's mask rule for its kept epoch on the validation slices at ``--rule-size``
    (`choose_rule_on_grid`, a few cases loaded at a time) and record it in best.json, beside the rule the
    epoch was chosen with; returns the rule and its validation Dice of `any` (NaN when undefined)."""
    from ihd.seg_inference import choose_rule_on_grid

    loaders = source_loaders(settings)

    def parts():  # the files that cannot be read were named when the sources were loaded at the model's size
        for folder, held_out in validation_by_source.items():
            cases = sorted(set(held_out.cases.tolist()))
            for begin in range(0, len(cases), CASES_PER_PART):
                yield loaders[folder](settings.rule_size, [], set(cases[begin:begin + CASES_PER_PART]))

    choice = choose_rule_on_grid(model, settings.image_size, parts())
    rule, dice_any = choice.best()
    chosen = epoch_choice(run_dir, settings.image_size)
    write_json(run_dir / "best.json", {"epoch": chosen["epoch"], "rule": rule.as_json(),
                                       "val_dice_any": None if math.isnan(dice_any) else dice_any,
                                       "rule_grid": settings.rule_size, "val_dice_any_by_rule": choice.table(),
                                       "epoch_rule": chosen["rule"], "epoch_val_dice_any": chosen["val_dice_any"],
                                       "epoch_rule_grid": chosen["rule_grid"]})
    return rule, dice_any


def check_same_validation(run_dir: Path, validation: MaskSet) -> None:
    """Refuse (SystemExit) a validation split that differs from the one the run was trained with, as its
    config.json records it (the cases, or for runs that did not record them the slice count): the data on
    disk changed, and the rule would be chosen on other slices, perhaps ones the U-Net trained on."""
    config = read_json(run_dir / "config.json")
    cases = sorted(set(validation.cases.tolist()))
    if "val_cases" in config and config["val_cases"] != cases:
        changed = sorted(set(config["val_cases"]) ^ set(cases))
        raise SystemExit(f"--rule-only: the validation series of {run_dir} differ from those it was trained with "
                         f"({len(changed)} differ, first {changed[:3]}): its data changed; train it again")
    if config.get("val_slices", len(validation)) != len(validation):
        raise SystemExit(f"--rule-only: {len(validation)} validation slices now, {config['val_slices']} when "
                         f"{run_dir} was trained: its data changed; train it again")


def settings_of_run(run_dir: Path, rule_size: int) -> Settings:
    """The settings a run was trained with (its config.json), choosing its rule at ``rule_size``."""
    if not (run_dir / "config.json").is_file() or not (run_dir / "best.json").is_file():
        raise SystemExit(f"--rule-only: {run_dir} holds no trained run (config.json and best.json): train it first")
    config = read_json(run_dir / "config.json")
    names = {field.name for field in dataclasses.fields(Settings)}
    return dataclasses.replace(Settings(**{k: v for k, v in config.items() if k in names}), rule_size=rule_size,
                               rule_only=True)


def train_unet(settings: Settings, train: MaskSet, validation: MaskSet, run_dir: Path, bad: list[BadInput]) -> float:
    """Write the run's config.json (its settings and data, the validation cases named), train the U-Net (best epoch and its rule in unet.keras and best.json); returns
    the seconds training took."""
    import keras

    from ihd.segmentation import build_unet, compile_unet, fit_unet, training_dataset

    write_json(run_dir / "config.json", {**dataclasses.asdict(settings), "train_slices": len(train),
                                         "val_slices": len(validation), "skipped_inputs": len(bad),
                                         "val_cases": sorted(set(validation.cases.tolist()))})
    keras.utils.set_random_seed(settings.seed)
    model = build_unet(settings.encoder, settings.image_size, settings.weights, settings.base_filters)
    trainer = model
    if settings.crop_size:  # the same layers at the crop's size; ``model`` gets its weights to validate and save
        trainer = build_unet(settings.encoder, settings.crop_size, settings.weights, settings.base_filters)
    steps = settings.epochs * math.ceil(len(train) / settings.batch_size)
    compile_unet(trainer, settings.learning_rate, steps)
    data = training_dataset(train, settings.batch_size, settings.seed, settings.augment, crop_size=settings.crop_size)
    start = time.perf_counter()
    fit_unet(trainer, data, validation if len(validation) else train, run_dir, settings.epochs,
             model if settings.crop_size else None)
    return round(time.perf_counter() - start, 1)


def main(argv: list[str] | None = None) -> Path:
    """Train, keep the best validation epoch, choose its mask rule, score it (``--rule-only``: the last two for a
    trained run); returns the run folder."""
    from ihd.mask_rules import MaskRule
    from ihd.segmentation import evaluate, load_unet

    settings = parse_args(argv)
    run_dir = Path(settings.models_dir) / settings.run
    if settings.rule_only:
        settings = settings_of_run(run_dir, settings.rule_size)
        print(f"--rule-only: {run_dir}'s own settings (config.json), choosing at {settings.rule_size}x"
              f"{settings.rule_size}; other flags are not used")
    run_header(argv, settings)
    bad: list[BadInput] = []
    train_parts, validation_by_source = [], {}
    for folder, masks in training_sources(settings, bad).items():
        train_rows, val_rows = split_patients(masks, settings.val_fraction, settings.val_seed)
        train_parts.append(masks.subset(keep_some_empty(masks, train_rows, settings.empty_share, settings.seed)))
        validation_by_source[folder] = masks.subset(val_rows)
    train = concatenate(train_parts, settings.image_size)
    validation = concatenate(list(validation_by_source.values()), settings.image_size)
    bad_path = write_bad_inputs(run_dir / "bad_inputs.csv", bad)
    print(f"{len(train)} training and {len(validation)} validation slices; {len(bad)} inputs skipped -> {bad_path}")
    if settings.rule_only:
        check_same_validation(run_dir, validation)
        scores_path = run_dir / "scores.json"
        train_seconds = read_json(scores_path).get("train_seconds") if scores_path.is_file() else None
    else:
        train_seconds = train_unet(settings, train, validation, run_dir, bad)

    model, _ = load_unet(run_dir)
    rule = MaskRule.from_json(epoch_choice(run_dir, settings.image_size)["rule"])  # on the model's grid: scores below
    scores = {"train_seconds": train_seconds, "epoch_rule": rule.as_json(),
              "scored_on": f"the model's grid ({settings.image_size}x{settings.image_size}) under epoch_rule"}
    if len(validation):
        run_rule, run_dice = choose_run_rule(model, settings, validation_by_source, run_dir)
        scores["mask_rule"] = run_rule.as_json()
        scores["mask_rule_val_dice_any"] = None if math.isnan(run_dice) else run_dice
        print(f"mask rule on the slices' grid ({settings.rule_size}x{settings.rule_size}): {run_rule.describe()}, "
              f"validation Dice of `any` {score_text(run_dice)} (bench/segment.py scores it on held-out slices)")
    print(f"scores on the model's grid ({settings.image_size}x{settings.image_size}) under the epoch's rule: "
          f"{rule.describe()}")
    for folder, held_out in validation_by_source.items():
        if len(held_out):
            scores[f"{folder} validation"] = evaluate(model, held_out, rule)
            print(f"validation ({folder}, {len(np.unique(held_out.patients))} patients held out):\n"
                  f"{format_scores(scores[f'{folder} validation'])}")
    for folder in folders(settings.synthetic):
        scores[f"{folder} test"] = evaluate(model, synthetic_set(folder, "test", settings.image_size, bad), rule)
        print(f"synthetic test split ({folder}):\n{format_scores(scores[f'{folder} test'])}")
    for folder in folders(settings.score_png_masks):
        scores[folder] = evaluate(model, png_mask_set(folder, settings.image_size, bad, settings.read_non_ct_as_hu),
                                  rule)
        print(f"held out ({folder}):\n{format_scores(scores[folder])}")
    write_bad_inputs(bad_path, bad)
    write_json(run_dir / "scores.json", scores)
    print(f"model: {run_dir / 'unet.keras'}, scores: {run_dir / 'scores.json'}")
    return run_dir


if __name__ == "__main__":
    run_command(main, "rerun the same command to train the U-Net again")
