"""Trained on synthetic data, scored on real labeled scans: the demo's chain on each synthetic mode.

    python bench/synthetic_to_real.py                                   # both modes, about 15 minutes on 2 cores
    python bench/synthetic_to_real.py --modes inserted --work /tmp/s2r  # one mode; datasets and runs kept in --work
    python bench/synthetic_to_real.py --modes phantom --seed 101        # another seed of the synthetic dataset

For each mode (``phantom``: the pure phantom; ``inserted``: bleeds inserted into the bleed-free
series of ``--backgrounds``) demo.py's stages run unchanged (`demo.stages`: 80 training and 30 test
studies, a fold ensemble of tiny CNNs, an LSTM per member for each of the demo's selections, the
selection with the better out-of-fold validation loss kept; no Grad-CAM). The chain then
predicts the synthetic test split (in-domain reference) and the real labeled series of ``--labeled``
(``predict.py --dicom-dir --labels``), which take no part in training or in any choice. The prior is
each run's training label means. Prints one Markdown table and writes ``<work>/synthetic_to_real-seed<seed>.json``
(one file a seed, so that runs of several seeds in one --work keep each other's scores).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import demo  # noqa: E402
import predict  # noqa: E402
from bench.machine import device_description  # noqa: E402
from ihd.io import read_json, write_json  # noqa: E402
from ihd.report import score_text, interval_notes, span_text  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "real"


def run_mode(mode: str, work: Path, backgrounds: Path, labeled: Path, seed: int = 0) -> dict:
    """Prepare, train and score one synthetic mode on the synthetic dataset of ``seed`` (in <work>/<mode>-seed<seed>);
    returns its scores and stage times."""
    settings = demo.parse_args(["--root", str(work / f"{mode}-seed{seed}"), "--seed", str(seed), "--gradcam", "0",
                                "--score-real", str(labeled),
                                *(["--backgrounds", str(backgrounds)] if mode == "inserted" else [])])
    (prepare, prepare_flags), (cnn, cnn_flags), (lstm, lstm_flags), (_, predict_flags), (_, real_flags) = \
        demo.stages(settings)
    times = {}
    start = time.perf_counter()
    prepare.main(prepare_flags)
    times["prepare"] = time.perf_counter() - start
    start = time.perf_counter()
    cnn.main(cnn_flags)
    lstm.main(lstm_flags)
    times["train"] = time.perf_counter() - start
    submission = predict.main(predict_flags)
    synthetic = read_json(submission.with_name(f"{submission.stem}-scores.json"))
    real_csv = predict.main(real_flags)
    real = read_json(real_csv.parent / "scores.json")
    return {"seed": seed, "selection": real["selection"], "synthetic_test": synthetic["scores"], "real": real["scores"],
            "seconds": {k: round(v, 1) for k, v in times.items()}}


def table(results: dict) -> str:
    """One row per mode: real loss against the prior's, slice and study AUC, synthetic test loss; the real scores'
    95% intervals from resampling the labeled studies (`ihd.intervals`; n/a below two studies)."""
    lines = ["| trained on | selection | synthetic test loss | real: prior loss | real: CNN+LSTM loss | "
             "real: CNN+LSTM loss minus the prior's (interval) | real: CNN alone loss | "
             "real: slice AUC any (interval) | real: study AUC any | real: slice AUC IPH / IVH / SAH |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for mode, result in results.items():
        models = result["real"]["models"]
        lstm = models["cnn+lstm"]
        intervals = result["real"]["intervals"]
        bounds = intervals["models"]["cnn+lstm"] if intervals else {"loss_minus_prior": None, "slice_auc_any": None}
        subtypes = " / ".join(score_text(lstm["slice_auc"][s]) for s in ("intraparenchymal", "intraventricular",
                                                                        "subarachnoid"))
        difference = lstm["weighted_log_loss"] - models["prior"]["weighted_log_loss"]
        lines.append(f"| {mode} | {result['selection']} | {result['synthetic_test']['cnn+lstm']:.4f} | "
                     f"{models['prior']['weighted_log_loss']:.4f} | {lstm['weighted_log_loss']:.4f} | "
                     f"{difference:+.4f} ({span_text(bounds['loss_minus_prior'], 4)}) | "
                     f"{models['cnn']['weighted_log_loss']:.4f} | {score_text(lstm['slice_auc']['any'])} "
                     f"({span_text(bounds['slice_auc_any'], 3)}) | {score_text(lstm['study_auc']['any'])} | "
                     f"{subtypes} |")
    intervals = next(iter(results.values()))["real"]["intervals"]
    if intervals:
        lines += ["", "; ".join([f"Intervals: {intervals['level']:.0%}, {intervals['resamples']:,} resamples of the "
                                 f"{intervals['studies']} real studies ({intervals['studies_with_bleed']} with a "
                                 "bleed), each study's slices drawn together", *interval_notes(intervals)]) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=("phantom", "inserted"), default=["phantom", "inserted"])
    parser.add_argument("--work", default=None, help="datasets, runs and scores go here (default: a temporary folder)")
    parser.add_argument("--backgrounds", default=str(REAL / "rsna_normal"))
    parser.add_argument("--labeled", default=str(REAL / "rsna_labeled"))
    parser.add_argument("--seed", type=int, default=0, help="the synthetic dataset's seed (demo.py --seed)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        results = {mode: run_mode(mode, work, Path(args.backgrounds), Path(args.labeled), args.seed)
                   for mode in args.modes}
        write_json(work / f"synthetic_to_real-seed{args.seed}.json",
                   {"device": device_description(), "results": results})
    print(f"device: {device_description()}")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
