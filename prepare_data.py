"""Prepare a dataset: raw DICOM files -> slice index (data/<dataset>/index.parquet) -> slice store.

    python prepare_data.py --synthetic --small --dataset synthetic     # offline, a minute on 2 cores
    python prepare_data.py --synthetic --backgrounds ../shared/data/real/rsna_normal --dataset inserted
    python prepare_data.py --download --dataset rsna --workers 16      # the challenge data (Kaggle account)
    python prepare_data.py --dicom-dir /path/to/exported/study --dataset mystudy

The raw folder follows the Kaggle layout (``stage_2_train/``, ``stage_2_test/``, ``stage_2_train.csv``).
``--dicom-dir`` takes any folder of DICOM files instead (searched recursively, all rows unlabeled
test rows). Every stage is resumable: rerun the same command after an interruption.
"""
from __future__ import annotations

import argparse
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ihd import insertion, synthetic
from ihd.index import FOLD_BALANCES, build_index, drop_unreadable
from ihd.io import read_json, run_header
from ihd.kaggle_api import COMPETITION, KaggleAccessError, kaggle_api, network_hint
from ihd.slices import write_slices

TRAIN_DIR, TEST_DIR, TRAIN_LABELS = "stage_2_train", "stage_2_test", "stage_2_train.csv"


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
    folds: int = 5  # the paper's cross-validation, grouped by patient
    fold_balance: str = "slices"  # balance folds by slice count (what training time follows) or patients
    workers: int | None = None  # processes for scanning and storing; None uses every core


def parse_args(argv: list[str] | None) -> Settings:
    """Command line -> Settings."""
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=defaults.dataset)
    parser.add_argument("--data-dir", default=defaults.data_dir)
    parser.add_argument("--raw", default=defaults.raw)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--synthetic", action="store_true")
    source.add_argument("--download", action="store_true")
    source.add_argument("--dicom-dir", default=defaults.dicom_dir)
    parser.add_argument("--backgrounds", default=defaults.backgrounds)
    parser.add_argument("--train-studies", type=int, default=defaults.train_studies)
    parser.add_argument("--test-studies", type=int, default=defaults.test_studies)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--size", type=int, default=defaults.size)
    parser.add_argument("--folds", type=int, default=defaults.folds)
    parser.add_argument("--fold-balance", choices=FOLD_BALANCES, default=defaults.fold_balance)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    settings = Settings(**vars(parser.parse_args(argv)))
    if settings.backgrounds and not settings.synthetic:
        parser.error("--backgrounds goes with --synthetic (bleeds inserted into those series)")
    if settings.synthetic:
        preset = synthetic.SMALL if settings.small else synthetic.DEFAULT_SIZE
        settings.train_studies = settings.train_studies or preset["train_studies"]
        settings.test_studies = settings.test_studies or preset["test_studies"]
    return settings


def write_synthetic(settings: Settings, raw: Path) -> None:
    """Write the synthetic dataset into ``raw``, unless the same one is already there."""
    backgrounds = str(Path(settings.backgrounds).resolve()) if settings.backgrounds else None
    wanted = {"train_studies": settings.train_studies, "test_studies": settings.test_studies, "seed": settings.seed,
              "backgrounds": backgrounds}
    config_path = raw / "config.json"
    if config_path.is_file():
        found = {key: read_json(config_path)["settings"].get(key) for key in wanted}
        if found == wanted:
            print(f"{raw} already holds the synthetic dataset {wanted}")
            return
        raise SystemExit(f"{raw} holds a synthetic dataset made with {found}, not {wanted}: "
                         "choose another --dataset or delete that folder")
    if raw.is_dir() and any(raw.iterdir()):
        raise SystemExit(f"{raw} is not empty and holds no synthetic dataset: choose another --dataset or --raw")
    if backgrounds:
        try:
            summary = insertion.write_dataset(raw, backgrounds, settings.train_studies, settings.test_studies,
                                              seed=settings.seed, workers=settings.workers)
        except insertion.BackgroundError as error:
            raise SystemExit(f"--backgrounds: {error}") from None
    else:
        summary = synthetic.write_dataset(raw, settings.train_studies, settings.test_studies,
                                          seed=settings.seed, workers=settings.workers)
    images = sum(summary[split]["images"] for split in ("train", "test") if split in summary)
    print(f"synthetic dataset ({'bleeds inserted into ' + backgrounds if backgrounds else 'phantoms'}): "
          f"{images} images -> {raw}")


def download_competition(raw: Path) -> None:
    """Fetch and unpack the competition files into ``raw`` through the kaggle package's API."""
    if (raw / TRAIN_DIR).is_dir() and (raw / TRAIN_LABELS).is_file() and not any(raw.glob("*.zip")):
        print(f"{raw} already holds the unpacked competition files")
        return
    try:
        api = kaggle_api()
    except KaggleAccessError as error:
        raise SystemExit(f"--download: {error}") from None
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
    sources = [(raw / name, split) for name, split in ((TRAIN_DIR, "train"), (TEST_DIR, "test")) if (raw / name).is_dir()]
    if not sources:
        raise SystemExit(
            f"{raw} holds neither {TRAIN_DIR}/ nor {TEST_DIR}/: use --synthetic, --download, --dicom-dir "
            "or point --raw at a folder in the Kaggle layout"
        )
    labels = raw / TRAIN_LABELS
    return sources, labels if labels.is_file() else None


def main(argv: list[str] | None = None) -> Path:
    """Run the stages; returns the dataset folder."""
    settings = parse_args(argv)
    run_header(argv, settings)
    dataset_dir = Path(settings.data_dir) / settings.dataset
    raw = Path(settings.raw) if settings.raw else dataset_dir / "raw"
    if settings.synthetic:
        write_synthetic(settings, raw)
    if settings.download:
        download_competition(raw)
    sources, labels = index_sources(settings, raw)
    index = build_index(sources, dataset_dir, labels_csv=labels, folds=settings.folds, balance=settings.fold_balance,
                        seed=settings.seed, workers=settings.workers, extra_config={"prepare_data": settings}, resume=True)
    failures = write_slices(index, dataset_dir / "slices", size=settings.size, workers=settings.workers)
    index = drop_unreadable(dataset_dir, failures)
    print(f"done: {len(index)} slices indexed in {dataset_dir / 'index.parquet'}, stored in {dataset_dir / 'slices'}; "
          f"unreadable files listed in {dataset_dir / 'bad_files.csv'}")
    return dataset_dir


if __name__ == "__main__":
    main()
