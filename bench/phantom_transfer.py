"""How well a chain trained on the pure phantom finds bleeds in real heads, scored without the labeled real set.

    python bench/phantom_transfer.py                    # development seeds 0 1 2, the demo's CNN and one candidate
    python bench/phantom_transfer.py --seeds 0 --candidate "--epochs 12"

The validation set is built once: bleeds inserted into the bleed-free real series of ``--backgrounds``
(``prepare_data.py --synthetic --backgrounds``, 40 studies, seed ``--validation-seed``). Its slices without
a bleed are real anatomy, its bleeds have known masks, and the labeled real series (``rsna_labeled/``)
are never read: they are kept for the one report of "Trained on synthetic, scored on real".

For each phantom seed, the phantom dataset (``--train-studies``, the demo's 80 by default; its test split
is not used), then for each candidate (train_cnn.py flags laid over the demo's): one CNN on fold 0, its
LSTM on pca:32 with the demo's settings, and ``predict.py --dicom-dir --labels`` on the validation set.
Reported per seed: the slice AUC for ``any`` and the weighted log loss of the CNN and of CNN+LSTM on the
validation set, and the CNN's own validation loss on its phantom fold. Results are saved to
<root>/transfer.json as they come; a rerun resumes. Printed beside them, real heads (the validation set's
slices without a bleed) against each phantom: how many pixels are as dense as blood without touching
bone, by fifth of the series (`blood_dense_by_fifth`), how dense the brain is against the inner table
(`inner_table_profile`), and how many slices hold a dense spot inside the skull (`dense_spot_share`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import demo  # noqa: E402
import predict  # noqa: E402
import prepare_data  # noqa: E402
import train_cnn  # noqa: E402
import train_lstm  # noqa: E402
from bench.inner_table import cavity_rings, cranial_cavity  # noqa: E402
from bench.machine import cpu_description, load_description  # noqa: E402
from ihd import synthetic  # noqa: E402
from ihd.index import read_index  # noqa: E402
from ihd.io import read_json  # noqa: E402
from ihd.slices import SliceStore  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "real"
VALIDATION_STUDIES = 40
SELECTION = "pca:32"
CANDIDATES = ["", "--batch-size 32 --learning-rate 5e-4"]  # "": the demo's CNN as it is; then the kit's default rate
DEMOS_CNN = "(the demo's)"
DEMOS_STUDIES = synthetic.DEFAULT_SIZE["train_studies"]  # the phantom datasets' training studies in the demo
PROFILE_PIXELS = (1, 2, 3, 6)  # distances from bone at which `inner_table_profile` reads a slice


def blood_dense_pixels(hu: np.ndarray) -> int:
    """Pixels at 55-90 HU (fresh blood's range) that do not touch bone (over 250 HU) on a slice."""
    bone = cv2.dilate((hu > 250).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    return int(((hu >= 55) & (hu <= 90) & ~bone).sum())


def bleed_free_slices(dataset: Path) -> tuple[pd.DataFrame, SliceStore]:
    """A prepared dataset's training slices without a bleed (index rows) and its slice store."""
    index = read_index(dataset)
    return index[(index["split"] == "train") & (index["any"] == 0)], SliceStore(dataset / "slices")


def blood_dense_by_fifth(dataset: Path) -> list[float]:
    """Median `blood_dense_pixels` of a prepared dataset's training slices without a bleed, at the store's
    size, by fifth of the series from the first slice (the skull base) to the last."""
    rows, store = bleed_free_slices(dataset)
    counts = pd.Series([blood_dense_pixels(store.read_hu(image_id)) for image_id in rows["image_id"]])
    fifth = np.minimum(rows["position"].to_numpy() * 5 // rows["series_length"].to_numpy(), 4)
    return counts.groupby(fifth).median().tolist()


def inner_table_profile(dataset: Path) -> list[float]:
    """Median over a prepared dataset's training slices without a bleed, in the middle three fifths of their
    series, of the cranial cavity's median HU at each of `PROFILE_PIXELS` from bone, at the store's size
    (`bench.inner_table.cavity_rings`): how dense a head is against the inner table, where a thin subdural lies."""
    rows, store = bleed_free_slices(dataset)
    middle = rows[(rows["position"] * 5 // rows["series_length"]).between(1, 3)]
    rings = [cavity_rings(store.read_hu(image_id), PROFILE_PIXELS, ring_px=0.5, closing_px=3, min_cavity_px=500)
             for image_id in middle["image_id"]]
    return [round(float(v), 1) for v in np.nanmedian(np.array(rings), axis=0)]


def dense_spot_share(dataset: Path) -> float:
    """Share of a prepared dataset's training slices without a bleed, in the middle three fifths of their series,
    that hold a pixel over 100 HU at least 3 pixels inside the cranial cavity (`bench.inner_table.cranial_cavity`),
    at the store's size: calcifications, vessels and bone inside the cavity, which are no bleed."""
    rows, store = bleed_free_slices(dataset)
    middle = rows[(rows["position"] * 5 // rows["series_length"]).between(1, 3)]
    held = []
    for image_id in middle["image_id"]:
        hu = store.read_hu(image_id)
        cavity = cranial_cavity(hu, closing_px=3, min_cavity_px=500)
        if cavity is not None:
            held.append(bool((hu[ndimage.binary_erosion(cavity, iterations=3)] > 100).any()))
    return round(float(np.mean(held)), 2)


def validation_set(root: Path, backgrounds: Path, seed: int) -> Path:
    """The inserted-bleed validation set's raw folder (built once)."""
    prepare_data.main(["--synthetic", "--backgrounds", str(backgrounds), "--dataset", "validation",
                       "--data-dir", str(root), "--seed", str(seed), "--train-studies", str(VALIDATION_STUDIES),
                       "--test-studies", "2", "--size", "128", "--folds", str(demo.FOLDS)])
    return root / "validation" / "raw"


def made_with(validation: Path) -> dict:
    """What a saved row depends on besides its seed and candidate: the demo's chain, the phantom's generator and what
    made the validation set (`validation_record`); rows made with other ones are scored again."""
    return {"chain": demo.chain_record("cnn", "lstm"), "generator": synthetic.generator_version(),
            "validation": validation_record(validation)}


def validation_record(validation: Path) -> dict:
    """What made the validation set in the raw folder ``validation``: its settings (backgrounds, seed) and the
    inserting code's version, so that rows scored on a set made otherwise are scored again."""
    config = read_json(validation / "config.json")
    return {"settings": config["settings"], "generator": config["generator"]}


def phantom_folder(root: Path, seed: int, studies: int) -> Path:
    """Where the phantom dataset of ``seed`` with ``studies`` training studies is prepared."""
    return root / (f"phantom-{seed}" if studies == DEMOS_STUDIES else f"phantom-{seed}-{studies}")


def score(seed: int, candidate: str, root: Path, validation: Path, studies: int) -> dict:
    """Train one fold's chain on the phantom of ``seed`` (``studies`` training studies) under ``candidate`` and score
    it on ``validation``."""
    data = phantom_folder(root, seed, studies)
    prepare_data.main(["--synthetic", "--dataset", demo.DATASET, "--size", "128", "--folds", str(demo.FOLDS),
                       "--seed", str(seed), "--train-studies", str(studies), "--test-studies", "2",
                       "--data-dir", str(data)])
    work = data / ("run-" + ("_".join(candidate.replace("--", "").split()) or "demo"))
    scores = fold_chain_scores(data, work, [*demo.cnn_flags(), *candidate.split()], validation)
    return {"seed": seed, "candidate": candidate or DEMOS_CNN, "train_studies": studies,
            "made_with": made_with(validation),
            "phantom_fold_loss": scores.pop("fold_loss"), **scores}


def fold_chain_scores(data: Path, work: Path, cnn_flags: list[str], validation: Path) -> dict:
    """Train one chain on fold 0 of the synthetic dataset under ``data`` (a CNN with ``cnn_flags``, its LSTM on
    `SELECTION` with the demo's settings; models and features under ``work``), score it with ``predict.py
    --dicom-dir --labels`` on the raw folder ``validation``: the CNN's own validation loss on its fold
    (``fold_loss``), then the weighted log loss and the slice AUC for ``any`` of the prior, the CNN and CNN+LSTM."""
    dirs = ["--data-dir", str(data), "--models-dir", str(work / "models"), "--features-dir", str(work / "features")]
    train_cnn.main(["--dataset", demo.DATASET, "--run", demo.RUN, "--fold", "0", *cnn_flags, *dirs])
    train_lstm.main(["--run", demo.RUN, "--selection", SELECTION, *demo.LSTM, *dirs[2:]])
    predict.main(["--run", demo.RUN, "--dicom-dir", str(validation / "stage_2_train"),
                  "--labels", str(validation / "stage_2_train.csv"), "--out", str(work / "validation"), *dirs])
    models = read_json(work / "validation" / "scores.json")["scores"]["models"]
    row = {"fold_loss": read_json(work / "models" / demo.RUN / "best.json")["val_weighted_log_loss"]}
    for model in ("prior", "cnn", "cnn+lstm"):
        row[f"{model} loss"] = models[model]["weighted_log_loss"]
        row[f"{model} auc"] = models[model]["slice_auc"]["any"]
    return row


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--candidate", action="append", help="train_cnn.py flags over the demo's; repeatable")
    parser.add_argument("--root", default="/tmp/ihd-transfer")
    parser.add_argument("--backgrounds", default=str(REAL / "rsna_normal"))
    parser.add_argument("--validation-seed", type=int, default=101)
    parser.add_argument("--train-studies", type=int, default=DEMOS_STUDIES,
                        help="the phantom datasets' training studies")
    args = parser.parse_args(argv)
    root = Path(args.root)
    print(f"{cpu_description()}; {load_description()}", flush=True)
    validation = validation_set(root, Path(args.backgrounds), args.validation_seed)
    print("pixels at 55-90 HU not next to bone, median on a slice without a bleed, by fifth from the skull base up:")
    print(f"  real heads (the validation set): {blood_dense_by_fifth(validation.parent)}", flush=True)
    print(f"median HU inside the skull {', '.join(map(str, PROFILE_PIXELS))} pixels from bone, middle three fifths, "
          "slices without a bleed:")
    print(f"  real heads (the validation set): {inner_table_profile(validation.parent)}", flush=True)
    print("share of those slices with a pixel over 100 HU 3 pixels or more inside the skull:")
    print(f"  real heads (the validation set): {dense_spot_share(validation.parent)}", flush=True)
    saved = root / "transfer.json"
    # rows saved before --train-studies were made with the demo's
    rows = [{"train_studies": DEMOS_STUDIES} | r for r in (json.loads(saved.read_text()) if saved.exists() else [])
            if r.get("made_with") == made_with(validation)]
    for seed in args.seeds:
        for candidate in args.candidate or CANDIDATES:
            if not any(r["seed"] == seed and r["candidate"] == (candidate or DEMOS_CNN)
                       and r["train_studies"] == args.train_studies for r in rows):
                rows.append(score(seed, candidate, root, validation, args.train_studies))
                saved.write_text(json.dumps(rows, indent=2) + "\n")
        phantom = phantom_folder(root, seed, args.train_studies) / demo.DATASET
        print(f"  phantom seed {seed}: blood-dense {blood_dense_by_fifth(phantom)}, "
              f"against the inner table {inner_table_profile(phantom)}, dense spots {dense_spot_share(phantom)}",
              flush=True)
    table = pd.DataFrame(rows).drop(columns="made_with")
    print(f"{cpu_description()}; {load_description()}")
    print(table.to_string(index=False, float_format="%.3f"))
    means = table.groupby(["train_studies", "candidate"]).mean(numeric_only=True).drop(columns="seed")
    print(means.to_string(float_format="%.3f"))
    return table


if __name__ == "__main__":
    main()
