"""Time per scan of `predict.py --dicom-dir` in study mode: 40 DICOM files of 512x512 to studies.csv.

    python bench/study_mode_latency.py
    python bench/study_mode_latency.py --quick       # 3 timed runs instead of 7

The command's work per scan (`predict.predict_folder`: index, read, CNN, both sequence models, tables,
pictures) with its models in memory, as a server keeps them, after one warm-up scan that traces the
graphs. The study is the 40-slice one of bench/study_latency.py; the models, untrained, have the real
sizes: MobileNetV2 at 256x256, pca:120, the paper-shaped per-slice LSTM (3 x 256) and the attention BiLSTM
(3 x 256, gated attention, six sigmoids) over the same features. Its threshold is set to 0 so that
every study is called hemorrhage and draws its best-slice montage with Grad-CAM of 3 slices (the slow
case). Baseline in the same run, alternating: the same command without --study (per-slice table and
Grad-CAM pictures of 3 slices). Paper 001 reports 5.04 s per scan; the goal here is under 2 s.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import predict  # noqa: E402
from bench.machine import device_description  # noqa: E402
from bench.study_latency import Settings, untrained_chain, write_study  # noqa: E402
from ihd.study_inference import StudyModel  # noqa: E402
from ihd.study_labels import LABEL_SETS  # noqa: E402
from ihd.study_models import build_attention_lstm  # noqa: E402

RUN = "bench"
STUDY = "study-attention-subtypes-pca120-pretrained"
GOAL_S = 2.0


def untrained_study() -> StudyModel:
    """The paper-shaped attention BiLSTM over pca:120 and the six CNN probabilities, untrained, threshold 0."""
    record = {"model": "attention", "label_set": "subtypes", "selection": "pca:120", "frames": None,
              "thresholds": {"any": 0.0}}
    return StudyModel(STUDY, build_attention_lstm(126, LABEL_SETS["subtypes"]), record)


def timed(work) -> float:
    """Wall seconds of one call, its output swallowed."""
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        work()
    return time.perf_counter() - started


def scan_work(argv: list[str], chain, study: StudyModel | None):
    """What `predict.py` does per scan once its models are loaded: ``predict_folder``."""
    settings = predict.parse_args(argv)
    return lambda: predict.predict_folder(settings, chain, study)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 timed runs")
    parser.add_argument("--runs", type=int, default=Settings.runs)
    args = parser.parse_args(argv)
    settings = Settings(runs=3 if args.quick else args.runs)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folder = root / "study"
        folder.mkdir()
        write_study(folder, settings.slices)
        chain, study = untrained_chain(settings), untrained_study()
        common = ["--run", RUN, "--dicom-dir", str(folder), "--gradcam", "3"]
        works = {"study mode (--study)": scan_work([*common, "--out", str(root / "study_out")], chain, study),
                 "per-slice mode (baseline)": scan_work([*common, "--out", str(root / "slice_out")], chain, None)}
        times = {name: [] for name in works}
        for work in works.values():
            timed(work)  # warm-up: traces the graphs
        for _ in range(settings.runs):
            for name, work in works.items():
                times[name].append(timed(work))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\nmachine: {device_description()}")
    print(f"predict.py --dicom-dir, {settings.slices} DICOM slices 512x512, MobileNetV2 at 256, pca:120, 3 x 256 "
          f"LSTMs, Grad-CAM of 3 slices; median of {settings.runs} alternating runs after a warm-up\n")
    print("| command | median seconds per scan |")
    print("|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.3f} |")
    verdict = "meets" if medians["study mode (--study)"] < GOAL_S else "MISSES"
    print(f"\ngoal (< {GOAL_S:.0f} s per scan in study mode): {verdict}")
    return medians


if __name__ == "__main__":
    main()
