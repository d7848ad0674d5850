"""How a chain trained on bleeds inserted into some bleed-free heads finds bleeds inserted into others.

    python bench/inserted_transfer.py                              # seeds 201 202, the candidates below
    python bench/inserted_transfer.py --seeds 203 --candidate 160:6:3

The bleed-free series of ``--backgrounds`` are split by series, in the order of their SeriesInstanceUID:
the first ``--training-heads`` are the training heads, the rest are held out. The validation set is built
once: 40 studies of bleeds inserted into the held-out heads (seed ``--validation-seed``,
`bench.phantom_transfer.validation_set`), whose slices without a bleed are anatomy no model here
trained on, as a real scan's are. The labeled real series are never read.

A candidate is ``studies:epochs:folds``: an inserted dataset of that many training studies on the training
heads, dealt into that many folds, and the demo's CNN for that many epochs. For each seed and candidate:
the dataset, one chain on fold 0 (`bench.phantom_transfer.fold_chain_scores`: the CNN, its LSTM on pca:32,
``predict.py --dicom-dir --labels`` on the validation set). Reported: the slice AUC for ``any`` and the
weighted log loss of the prior, the CNN and CNN+LSTM on the validation set, and the CNN's validation
loss on its own fold. Everything goes under <root>/<N>-training-heads/, the results to its transfer.json as
they come; a rerun resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import demo  # noqa: E402
import prepare_data  # noqa: E402
from bench.machine import cpu_description, load_description  # noqa: E402
from bench.phantom_transfer import REAL, fold_chain_scores, validation_record, validation_set  # noqa: E402
from ihd import insertion  # noqa: E402

CANDIDATES = ["80:12:3", "160:6:3", "160:12:3", "160:12:2"]  # the first is the demo's


def split_heads(backgrounds: Path, training_heads: int, out: Path) -> tuple[Path, Path]:
    """Folders ``out``/training and ``out``/held-out in the Kaggle layout (made afresh), of links to the files of
    the series of ``backgrounds`` (first ``training_heads`` by SeriesInstanceUID, then the rest) and their rows of
    its labels. A file that is not DICOM or names no series is left out with a message."""
    by_series: dict[str, list[Path]] = {}
    for path in sorted((backgrounds / "stage_2_train").glob("*.dcm")):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            by_series.setdefault(str(header.SeriesInstanceUID), []).append(path)
        except (InvalidDicomError, AttributeError, OSError) as error:
            print(f"{path}: left out, no series to place it in ({type(error).__name__}: {error})", flush=True)
    series = sorted(by_series)
    if not 0 < training_heads < len(series):
        raise SystemExit(f"{backgrounds} holds {len(series)} series in stage_2_train/ (the Kaggle layout): "
                         f"--training-heads {training_heads} must leave some on each side")
    labels = pd.read_csv(backgrounds / "stage_2_train.csv")
    shutil.rmtree(out, ignore_errors=True)  # links of an earlier split or of files since removed must not stay
    parts = {"training": series[:training_heads], "held-out": series[training_heads:]}
    for part, chosen in parts.items():
        folder = out / part / "stage_2_train"
        folder.mkdir(parents=True)
        ids = set()
        for name in chosen:
            for path in by_series[name]:
                os.symlink(path.resolve(), folder / path.name)
                ids.add(path.stem)
        labels[labels["ID"].str.rsplit("_", n=1).str[0].isin(ids)].to_csv(out / part / "stage_2_train.csv", index=False)
    return out / "training", out / "held-out"


def score(seed: int, candidate: str, root: Path, training: Path, validation: Path, made_with: dict) -> dict:
    """Train one fold's chain under ``candidate`` on bleeds inserted into ``training`` (``seed``), score it on
    ``validation``."""
    studies, epochs, folds = (int(part) for part in candidate.split(":"))
    data = root / (f"data-{studies}-{seed}" if folds == demo.FOLDS else f"data-{studies}-f{folds}-{seed}")
    prepare_data.main(["--synthetic", "--backgrounds", str(training), "--dataset", demo.DATASET, "--size", "128",
                       "--folds", str(folds), "--seed", str(seed), "--train-studies", str(studies),
                       "--test-studies", "2", "--data-dir", str(data)])
    work = data / f"run-{epochs}-epochs"
    return {"seed": seed, "candidate": candidate, "made_with": made_with,
            **fold_chain_scores(data, work, [*demo.CNN, "--epochs", str(epochs)], validation)}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[201, 202])
    parser.add_argument("--candidate", action="append", help="studies:epochs:folds; repeatable")
    parser.add_argument("--root", default="/tmp/ihd-inserted-transfer")
    parser.add_argument("--backgrounds", default=str(REAL / "rsna_normal"))
    parser.add_argument("--training-heads", type=int, default=10)
    parser.add_argument("--validation-seed", type=int, default=301)
    args = parser.parse_args(argv)
    root = Path(args.root) / f"{args.training_heads}-training-heads"  # another split never shares a dataset
    print(f"{cpu_description()}; {load_description()}", flush=True)
    training, held_out = split_heads(Path(args.backgrounds), args.training_heads, root / "heads")
    validation = validation_set(root / "val", held_out, args.validation_seed)
    made_with = {"cnn": demo.CNN, "lstm": demo.LSTM, "generator": insertion.generator_version(),
                 "training_heads": args.training_heads, "validation": validation_record(validation)}
    saved = root / "transfer.json"
    rows = [r for r in (json.loads(saved.read_text()) if saved.exists() else []) if r.get("made_with") == made_with]
    for seed in args.seeds:
        for candidate in args.candidate or CANDIDATES:
            if not any(r["seed"] == seed and r["candidate"] == candidate for r in rows):
                rows.append(score(seed, candidate, root, training, validation, made_with))
                saved.write_text(json.dumps(rows, indent=2) + "\n")
    table = pd.DataFrame(rows).drop(columns="made_with")
    print(f"{cpu_description()}; {load_description()}")
    print(table.to_string(index=False, float_format="%.3f"))
    print(table.groupby("candidate").mean(numeric_only=True).drop(columns="seed").to_string(float_format="%.3f"))
    return table


if __name__ == "__main__":
    main()
