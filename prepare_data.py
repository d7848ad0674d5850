"""Prepare a dataset: raw DICOM files -> slice index (data/<dataset>/index.parquet) -> slice store.

    python prepare_data.py --synthetic --small --dataset synthetic     # offline, a minute on 2 cores
    python prepare_data.py --synthetic --backgrounds ../shared/data/real/rsna_normal --dataset inserted
    python prepare_data.py --download --dataset rsna --workers 16      # the challenge data (Kaggle account)
    python prepare_data.py --dicom-dir /path/to/exported/study --dataset mystudy

The raw folder follows the Kaggle layout (``stage_2_train/``, ``stage_2_test/``, ``stage_2_train.csv``).
``--dicom-dir`` takes any folder of DICOM files instead (searched recursively, all rows unlabeled
test rows). Every stage is resumable: rerun the same command after an interruption.

A file that cannot be read, or read as Hounsfield units, or placed in its series, and a second copy
of a SOPInstanceUID, are listed with the reason in ``<dataset>/bad_files.csv``; the rest goes on.
``--read-non-ct-as-hu`` reads modalities other than CT (such as CT-ICH's ``OT`` files of raw HU)
as HU instead of refusing them; ``index_config.json`` records the choice.
"""
from __future__ import annotations

import argparse
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ihd import insertion, synthetic
from ihd.cli import run_command
from ihd.flags import dataset_name, existing_folder, folder_of_files, int_in
from ihd.index import FOLD_BALANCES, MAX_FOLDS, build_index, drop_unreadable, pixel_readings
from ihd.io import FolderTaken, read_json, run_header
from ihd.kaggle_api import COMPETITION, KaggleAccessError, kaggle_api, network_hint
from ihd.labels import LabelFileError
from ihd.presets import apply_preset
from ihd.slices import CONFIG_FILE as STORE_CONFIG, check_store, write_slices

TRAIN_DIR, TEST_DIR, TRAIN_LABELS = "stage_2_train", "stage_2_test", "stage_2_train.csv"
SOURCE_DIRS = {TRAIN_DIR: "train", TEST_DIR: "test"}
MIN_SIZE, MAX_SIZE = 16, 1024  # stored slice size: below 16 nothing is left to see; above 1024 only upsampling


@dataclass
class Settings:
    dataset: str = "synthetic"  # everything lands in <data-dir>/<dataset>/, so datasets never mix
    data_dir: str = "data"  # where datasets live (the other stages take the same flag)
    raw: str | None = None  # Kaggle-layout folder; None means data/<dataset>/raw
    synthetic: bool = False  # write a synthetic dataset first: the whole kit runs offline
    backgrounds: str | None = None  # with --synthetic: bleeds inserted into these bleed-free DICOM series, not phantoms
    train_studies: int | None = None  # synthetic training studies; None takes the preset (--small or default)
    test_studies: int | None = None  # synthetic test studies; None takes the preset
    seed: int = 0  # synthetic data and fold dealing are deterministic for a seed
    small: bool = False  # tiny synthetic preset for a fast CPU demo
    download: bool = False  # fetch the competition files from Kaggle first
    dicom_dir: str | None = None  # a plain folder of DICOM files to predict on: split "test", unlabeled
    size: int = 256  # stored slice size: 512 -> 256 keeps a bleed visible at a quarter of the pixels
    folds: int = 5  # cross-validation folds grouped by patient: every fold can validate (fold ensembles)
    fold_balance: str = "slices"  # balance folds by slice count (what training time follows) or patients
    train_series: int = 0  # 0: folds by patient; N: the paper's split, the first N series train (fold 0), the rest validate
    preset: str = ""  # a named set of settings (ihd.presets): paper prepares the data as the paper's code did
    workers: int | None = None  # processes for scanning and storing; None uses every core
    read_non_ct_as_hu: bool = False  # read modalities other than CT (e.g. OT exports of raw HU) as HU; else refused


def parse_args(argv: list[str] | None) -> Settings:
    """Command line -> Settings; flags with values out of range stop here with a message."""
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=dataset_name, default=defaults.dataset)
    parser.add_argument("--data-dir", default=defaults.data_dir)
    parser.add_argument("--raw", default=defaults.raw)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--synthetic", action="store_true")
    source.add_argument("--download", action="store_true")
    source.add_argument("--dicom-dir", type=folder_of_files, default=defaults.dicom_dir)
    parser.add_argument("--backgrounds", type=existing_folder, default=defaults.backgrounds)
    studies = int_in(0, meaning=" studies")
    parser.add_argument("--train-studies", type=studies, default=defaults.train_studies)
    parser.add_argument("--test-studies", type=studies, default=defaults.test_studies)
    parser.add_argument("--seed", type=int_in(0, meaning=" (random seeds are not negative)"), default=defaults.seed)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--size", type=int_in(MIN_SIZE, MAX_SIZE, " pixels a side (the challenge's slices are 512)"),
                        default=defaults.size)
    parser.add_argument("--folds", type=int_in(2, MAX_FOLDS, meaning=": one fold validates while the others train"),
                        default=defaults.folds)
    parser.add_argument("--fold-balance", choices=FOLD_BALANCES, default=defaults.fold_balance)
    parser.add_argument("--train-series", type=int_in(0, meaning=" series"), default=defaults.train_series)
    parser.add_argument("--workers", type=int_in(1, meaning=" (worker processes)"), default=defaults.workers)
    parser.add_argument("--read-non-ct-as-hu", action="store_true")
    apply_preset(parser, "prepare", argv)
    settings = Settings(**vars(parser.parse_args(argv)))
    if not settings.synthetic:
        stray = [flag for flag, value in (("--small", settings.small), ("--train-studies", settings.train_studies),
                                          ("--test-studies", settings.test_studies), ("--backgrounds", settings.backgrounds))
                 if value not in (None, False)]
        if stray:
            parser.error(f"{', '.join(stray)} can only be used with --synthetic")
        if settings.raw and not settings.download and not Path(settings.raw).is_dir():
            parser.error(f"argument --raw: {settings.raw} is not a folder: it is read from unless --synthetic or "
                         "--download writes into it")
    else:
        preset = synthetic.SMALL if settings.small else synthetic.DEFAULT_SIZE
        if settings.train_studies is None:
            settings.train_studies = preset["train_studies"]
        if settings.test_studies is None:
            settings.test_studies = preset["test_studies"]
        if settings.train_studies + settings.test_studies == 0:
            parser.error("--train-studies 0 and --test-studies 0: a synthetic dataset needs at least one study")
    return settings


def synthetic_settings(settings: Settings) -> dict:
    """The settings of the synthetic dataset that ``settings`` asks for."""
    return synthetic.dataset_settings(settings.train_studies, settings.test_studies, settings.seed)


def refusal(settings: Settings, dataset_dir: Path, raw: Path) -> str | None:
    """Why this run cannot go ahead in these folders, or None; checked before anything is written or deleted."""
    if settings.synthetic and settings.backgrounds:
        wanted = {"backgrounds": str(Path(settings.backgrounds).resolve()), "train_studies": settings.train_studies,
                  "test_studies": settings.test_studies, "seed": settings.seed}
        if (raw / "config.json").is_file():
            config = read_json(raw / "config.json")
            found = {key: config["settings"].get(key) for key in wanted}
            if found != wanted:
                return f"{raw} holds a synthetic dataset made with {found}, not {wanted}: choose another --dataset or delete that folder"
            try:
                synthetic.check_generator(raw, "a dataset of inserted bleeds", config.get("generator"),
                                          insertion.generator_version(), config["settings"])
            except synthetic.DatasetMismatch as error:
                return f"{error}: choose another --dataset, or delete that folder"
        elif raw.is_dir() and any(raw.iterdir()):
            return (f"{raw} is not empty and holds no finished synthetic dataset (inserted bleeds are written in one "
                    "go: an interrupted run starts again): delete that folder, or choose another --dataset")
    elif settings.synthetic:
        try:
            synthetic.dataset_state(raw, synthetic_settings(settings))
        except synthetic.DatasetMismatch as error:
            flags = ("train_studies", "test_studies", "seed")
            same_flags = "" if error.found is None or set(error.different) - set(flags) else (
                "rerun with " + " ".join(f"--{key.replace('_', '-')} {error.found[key]}" for key in flags) + " to use it, ")
            return f"{error}: {same_flags}choose another --dataset (or --raw), or delete that folder"
    elif not settings.download and not settings.dicom_dir and not any((raw / name).is_dir() for name in SOURCE_DIRS):
        return (f"{raw} holds neither {TRAIN_DIR}/ nor {TEST_DIR}/: use --synthetic, --download, --dicom-dir "
                "or point --raw at a folder in the Kaggle layout")
    store = dataset_dir / "slices"
    try:
        check_store(store, settings.size)
    except ValueError as error:
        found_size = read_json(store / STORE_CONFIG).get("size")
        rerun = f"rerun with --size {found_size} to use it, or " if found_size != settings.size else ""
        return f"{error}: {rerun}delete {store} to store the slices again at {settings.size}"
    return None


def write_synthetic(settings: Settings, raw: Path) -> None:
    """Write the synthetic dataset into ``raw``: phantoms (finishing an interrupted run), or bleeds inserted
    into the ``--backgrounds`` series; nothing when the same dataset is there (``refusal`` has ruled out another)."""
    if settings.backgrounds:
        if (raw / "config.json").is_file():
            print(f"{raw} already holds this dataset of inserted bleeds")
            return
        try:
            summary = insertion.write_dataset(raw, settings.backgrounds, settings.train_studies, settings.test_studies,
                                              seed=settings.seed, workers=settings.workers)
        except insertion.BackgroundError as error:
            raise SystemExit(f"--backgrounds: {error}") from None
    else:
        summary = synthetic.write_dataset(raw, settings.train_studies, settings.test_studies,
                                          seed=settings.seed, workers=settings.workers)
    images = sum(summary[split]["images"] for split in ("train", "test") if split in summary)
    kind = f"bleeds inserted into {settings.backgrounds}" if settings.backgrounds else "phantoms"
    print(f"synthetic dataset ({kind}): {images} images in {raw}")


def download_competition(raw: Path) -> None:
    """Fetch and unpack the competition files into ``raw`` through the kaggle package's API."""
    if (raw / TRAIN_DIR).is_dir() and (raw / TRAIN_LABELS).is_file() and not any(raw.glob("*.zip")):
        print(f"{raw} already holds the unpacked competition files")
        return
    try:
        api = kaggle_api()
    except KaggleAccessError as error:
        offline = "Offline, try the kit with: python prepare_data.py --synthetic --small"
        raise SystemExit(f"--download: {error}\n  {offline}") from None
    raw.mkdir(parents=True, exist_ok=True)
    try:
        api.competition_download_files(COMPETITION, path=str(raw), quiet=False)
    except Exception as error:
        raise SystemExit(network_hint(f"download of {COMPETITION}", error)) from None
    for archive in sorted(raw.glob("*.zip")):
        print(f"unpacking {archive} ...")
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(raw)
        archive.unlink()
    nested = raw / COMPETITION
    if nested.is_dir():
        for entry in nested.iterdir():
            shutil.move(str(entry), str(raw / entry.name))
        nested.rmdir()


def index_sources(settings: Settings, raw: Path) -> tuple[list[tuple[Path, str]], Path | None]:
    """The (folder, split) pairs to scan and the label CSV, if any."""
    if settings.dicom_dir:
        return [(Path(settings.dicom_dir), "test")], None
    sources = [(raw / name, split) for name, split in SOURCE_DIRS.items() if (raw / name).is_dir()]
    if not sources:
        raise SystemExit(f"{raw} holds neither {TRAIN_DIR}/ nor {TEST_DIR}/ after the download: see what it unpacked there")
    labels = raw / TRAIN_LABELS
    if (raw / TRAIN_DIR).is_dir() and not labels.is_file():
        raise SystemExit(f"{raw / TRAIN_DIR} holds training images but {labels} is missing: the training split needs "
                         f"the challenge's labels ({TRAIN_LABELS})")
    return sources, labels if labels.is_file() else None


def main(argv: list[str] | None = None) -> Path:
    """Run the stages; returns the dataset folder."""
    settings = parse_args(argv)
    run_header(argv, settings)
    dataset_dir = Path(settings.data_dir) / settings.dataset
    raw = Path(settings.raw) if settings.raw else dataset_dir / "raw"
    refused = refusal(settings, dataset_dir, raw)
    if refused:
        raise FolderTaken(refused)
    if settings.synthetic:
        write_synthetic(settings, raw)
    if settings.download:
        download_competition(raw)
    sources, labels = index_sources(settings, raw)
    try:
        index = build_index(sources, dataset_dir, labels_csv=labels, folds=settings.folds,
                            balance=settings.fold_balance, seed=settings.seed, workers=settings.workers,
                            extra_config={"prepare_data": settings}, resume=True,
                            non_ct_as_hu=settings.read_non_ct_as_hu, train_series=settings.train_series)
    except LabelFileError as error:
        raise SystemExit(str(error)) from None
    failures = write_slices(index, dataset_dir / "slices", size=settings.size, workers=settings.workers,
                            non_ct_as_hu=settings.read_non_ct_as_hu, readings=pixel_readings(dataset_dir))
    index = drop_unreadable(dataset_dir, failures)
    print(f"done: {len(index)} slices indexed in {dataset_dir / 'index.parquet'}, stored in {dataset_dir / 'slices'}; "
          f"unreadable files listed in {dataset_dir / 'bad_files.csv'}")
    return dataset_dir


if __name__ == "__main__":
    run_command(main, "rerun the same command: it checks what was written and goes on from there")
