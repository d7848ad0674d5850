"""What the sequence model should be trained on: each fold CNN's own features, or out-of-fold features.

    python bench/stage2_inputs.py                      # development seeds 1 2 3 of bench/demo_choices.py
    python bench/stage2_inputs.py --seeds 1 --selections pca:32

A CNN's outputs on the slices it trained on are more confident than on slices it never saw, so an LSTM
trained on them may learn to trust the CNN more than it should at test time. Two ways to train the
LSTM of fold k's member, compared on the demo's fold ensemble (bench/demo_choices.py prepares it):

- **own** (the kit's): the member's own CNN features of its training folds, as `train_lstm.py` does;
- **out of fold**: every training slice's features from the member whose CNN never saw it (the top
  RSNA 2019 solutions' stacking), the selection fitted on those rows.

Both validate on fold k's slices through member k's CNN (which never saw them) and predict the test
slices through member k's CNN; the ensemble averages the members. Reported per seed and selection: the
pooled out-of-fold validation loss (the number a choice may use), then the test loss of one member
(mean over members) and of the ensemble, each against the CNNs alone. The LSTM settings are the demo's.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import keras
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import demo  # noqa: E402
import train_lstm  # noqa: E402
from bench.machine import cpu_description, load_description  # noqa: E402
from ihd.ensemble import read_ensemble  # noqa: E402
from ihd.features import KERNEL_FILE, fit_selection, load_features  # noqa: E402
from ihd.inputs import label_array  # noqa: E402
from ihd.labels import SUBTYPES, read_long_labels  # noqa: E402
from ihd.metrics import weighted_log_loss  # noqa: E402
from ihd.sequence import (build_lstm, compile_lstm, fit_lstm, predict_series, sequence_inputs,  # noqa: E402
                          series_set, standardizing_moments)


def member_lstm(settings, index, labels, embeddings, probabilities, train_rows, val_rows, kernel, selection,
                scratch: Path):
    """One member's LSTM trained as train_lstm.py trains it, on the given per-row features; returns the model."""
    chosen = fit_selection(selection, embeddings, train_rows, labels=labels, dense_kernel=kernel, seed=settings.seed)
    inputs = sequence_inputs(chosen.transform(embeddings), probabilities)
    every = np.arange(len(inputs))
    train = series_set(inputs, index, np.isin(every, train_rows), labels)
    val = series_set(inputs, index, np.isin(every, val_rows), labels)
    keras.utils.set_random_seed(settings.seed)
    model = build_lstm(inputs.shape[1], settings.layers, settings.units, settings.dropout,
                       standardizing_moments(train, settings.standardize), head=settings.head,
                       neighbour_differences=settings.neighbour_differences)
    compile_lstm(model, settings.learning_rate, loss=settings.loss, clipnorm=settings.clipnorm)
    batch_size = max(1, min(settings.batch_size, len(train.lengths) // settings.min_steps))
    fit_lstm(model, train, val, scratch / "lstm.keras", settings.epochs, batch_size, settings.patience, settings.seed,
             settings.keep)
    return model, inputs


def compare(root: Path, selection: str) -> dict:
    """Both ways of training the members' LSTMs on one development seed's fold ensemble."""
    settings = train_lstm.parse_args(["--run", demo.RUN, *demo.LSTM])
    members = read_ensemble(root / "models", demo.RUN)["members"]
    caches = [load_features(root / "features" / member) for member in members]
    index = caches[0].index
    folds = index["fold"].to_numpy()
    labeled = folds >= 0
    test = np.flatnonzero(index["split"].to_numpy() == "test")
    truth = read_long_labels(root / "data" / demo.DATASET / "raw" / "truth" / "stage_2_test_labels.csv")
    labels = label_array(index)
    test_labels = truth.loc[index["image_id"].iloc[test], list(SUBTYPES)].to_numpy()
    embeddings = [np.asarray(c.embeddings, np.float32) for c in caches]
    probabilities = [np.asarray(c.probabilities, np.float32) for c in caches]
    member_folds = [int(c.config["fold"]) for c in caches]
    out_of_fold_embeddings, out_of_fold_probabilities = np.zeros_like(embeddings[0]), np.zeros_like(probabilities[0])
    for number, fold in enumerate(member_folds):
        out_of_fold_embeddings[folds == fold] = embeddings[number][folds == fold]
        out_of_fold_probabilities[folds == fold] = probabilities[number][folds == fold]
    result = {"cnn_validation": weighted_log_loss(labels[labeled], out_of_fold_probabilities[labeled]),
              "cnn_test_one": float(np.mean([weighted_log_loss(test_labels, p[test]) for p in probabilities])),
              "cnn_test_ensemble": weighted_log_loss(test_labels, np.mean([p[test] for p in probabilities], axis=0))}
    for way in ("own", "out_of_fold"):
        validation = np.zeros_like(probabilities[0])
        tests = []
        for number, fold in enumerate(member_folds):
            rows_from_member = (~labeled)[:, None] if way == "out_of_fold" else np.ones((len(index), 1), bool)
            member_embeddings = np.where(rows_from_member, embeddings[number], out_of_fold_embeddings)
            member_probabilities = np.where(rows_from_member, probabilities[number], out_of_fold_probabilities)
            train_rows = np.flatnonzero(labeled & (folds != fold))
            val_rows = np.flatnonzero(folds == fold)
            with tempfile.TemporaryDirectory() as scratch:
                model, inputs = member_lstm(settings, index, labels, member_embeddings, member_probabilities, train_rows,
                                            val_rows, np.load(caches[number].path / KERNEL_FILE), selection, Path(scratch))
            every = np.arange(len(inputs))
            validation[val_rows] = predict_series(model, series_set(inputs, index, np.isin(every, val_rows)))[val_rows]
            tests.append(predict_series(model, series_set(inputs, index, np.isin(every, test)))[test])
        result[f"{way}_validation"] = weighted_log_loss(labels[labeled], validation[labeled])
        result[f"{way}_test_one"] = float(np.mean([weighted_log_loss(test_labels, t) for t in tests]))
        result[f"{way}_test_ensemble"] = weighted_log_loss(test_labels, np.mean(tests, axis=0))
    return result


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--root", default="/tmp/ihd-choices", help="bench/demo_choices.py's folder")
    parser.add_argument("--selections", nargs="+", default=[*demo.SELECTIONS, "random:32"])
    args = parser.parse_args(argv)
    print(f"{cpu_description()}; {load_description()}", flush=True)
    rows = []
    for seed in args.seeds:
        root = Path(args.root) / f"seed-{seed}"
        if read_ensemble(root / "models", demo.RUN) is None:
            raise SystemExit(f"{root}: no demo fold ensemble; run bench/demo_choices.py --seeds {seed} first")
        for selection in args.selections:
            rows.append({"seed": seed, "selection": selection, **compare(root, selection)})
            print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows).set_index(["seed", "selection"])
    print(f"{cpu_description()}; {load_description()}")
    print(table.to_string(float_format="%.4f"))
    print("mean over seeds and selections:")
    print(table.mean().to_string(float_format="%.4f"))
    return table


if __name__ == "__main__":
    main()
