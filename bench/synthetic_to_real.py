"""Trained on synthetic data, scored on real labeled scans: the demo's chain on each synthetic mode.

    python bench/synthetic_to_real.py                                   # both modes, about 15 minutes on 2 cores
    python bench/synthetic_to_real.py --modes inserted --work /tmp/s2r  # one mode; datasets and runs kept in --work

For each mode (``phantom``: the pure phantom; ``inserted``: bleeds inserted into the bleed-free
series of ``--backgrounds``) the demo's settings run unchanged: 80 training and 30 test studies,
slices stored at 128, the tiny CNN from scratch for 6 epochs, LSTMs on pca:32 and weights:32 (2x128),
the one with the better validation loss kept (validation folds of the synthetic data). The chain then
predicts the synthetic test split (in-domain reference) and the real labeled series of ``--labeled``
(``predict.py --dicom-dir --labels``), which take no part in training or in any choice. The prior is
each run's training label means. Prints one Markdown table and writes ``<work>/synthetic_to_real.json``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import predict  # noqa: E402
import prepare_data  # noqa: E402
import train_cnn  # noqa: E402
import train_lstm  # noqa: E402
from bench.machine import device_description  # noqa: E402
from ihd.io import read_json, write_json  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "real"
DEMO_CNN = ["--backbone", "tiny", "--weights", "none", "--image-size", "128", "--epochs", "6"]
DEMO_LSTM = ["--selection", "pca:32", "--selection", "weights:32", "--layers", "2", "--units", "128"]


def run_mode(mode: str, work: Path, backgrounds: Path, labeled: Path) -> dict:
    """Prepare, train and score one synthetic mode; returns its scores and stage times."""
    dirs = ["--data-dir", str(work / "data"), "--models-dir", str(work / "models"),
            "--features-dir", str(work / "features")]
    times = {}
    start = time.perf_counter()
    source = ["--backgrounds", str(backgrounds)] if mode == "inserted" else []
    prepare_data.main(["--synthetic", *source, "--dataset", mode, "--size", "128", *dirs[:2]])
    times["prepare"] = time.perf_counter() - start
    start = time.perf_counter()
    train_cnn.main(["--dataset", mode, "--run", mode, *DEMO_CNN, *dirs])
    train_lstm.main(["--run", mode, *DEMO_LSTM, *dirs[2:]])
    times["train"] = time.perf_counter() - start
    submission = predict.main(["--run", mode, "--submissions-dir", str(work / "submissions"), *dirs])
    synthetic = read_json(submission.with_name(f"{submission.stem}-scores.json"))
    real_csv = predict.main(["--run", mode, "--dicom-dir", str(labeled / "stage_2_train"), "--labels",
                             str(labeled / "stage_2_train.csv"), "--out", str(work / "real" / mode), *dirs])
    real = read_json(real_csv.parent / "scores.json")
    return {"selection": real["selection"], "synthetic_test": synthetic["scores"], "real": real["scores"],
            "seconds": {k: round(v, 1) for k, v in times.items()}}


def table(results: dict) -> str:
    """One row per mode: real loss against the prior's, slice and study AUC, synthetic test loss."""
    lines = ["| trained on | selection | synthetic test loss | real: prior loss | real: CNN+LSTM loss | "
             "real: CNN alone loss | real: slice AUC any | real: study AUC any | real: slice AUC IPH / IVH / SAH |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for mode, result in results.items():
        models = result["real"]["models"]
        lstm = models["cnn+lstm"]

        def auc(value):
            return "n/a" if value is None else f"{value:.3f}"

        subtypes = " / ".join(auc(lstm["slice_auc"][s]) for s in ("intraparenchymal", "intraventricular", "subarachnoid"))
        lines.append(f"| {mode} | {result['selection']} | {result['synthetic_test']['cnn+lstm']:.4f} | "
                     f"{models['prior']['weighted_log_loss']:.4f} | {lstm['weighted_log_loss']:.4f} | "
                     f"{models['cnn']['weighted_log_loss']:.4f} | {auc(lstm['slice_auc']['any'])} | "
                     f"{auc(lstm['study_auc']['any'])} | {subtypes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=("phantom", "inserted"), default=["phantom", "inserted"])
    parser.add_argument("--work", default=None, help="datasets, runs and scores go here (default: a temporary folder)")
    parser.add_argument("--backgrounds", default=str(REAL / "rsna_normal"))
    parser.add_argument("--labeled", default=str(REAL / "rsna_labeled"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        results = {mode: run_mode(mode, work, Path(args.backgrounds), Path(args.labeled)) for mode in args.modes}
        write_json(work / "synthetic_to_real.json", {"device": device_description(), "results": results})
    print(f"device: {device_description()}")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
