"""What Grad-CAM pictures cost per study on the CPU, and what that makes of a whole test set.

    python bench/gradcam.py            # 5 rounds
    python bench/gradcam.py --quick    # 2 rounds

One 40-slice 512x512 study (the real RSNA series plus shifted copies, as bench/study_latency.py
writes it), EfficientNetB0 at 256x256 untrained (the real run's backbone: speed does not depend on
the weights), and the pictures `predict.py --gradcam 3` draws for a study: Grad-CAM of its 3 slices
most likely to bleed, an overlay of each and a montage of all 40, the study's images read again
from its DICOM files. Ours: `ihd.inference.draw_study_pictures` (one Grad-CAM pass for the study's 3
slices). Baseline in the same run, rounds alternating: the same pictures with one Grad-CAM pass per
slice, as the kit drew them before. Medians over the rounds after a warm-up; the stages of ours are
also timed apart. The test set (121,232 slices in about 3,500 studies) is carried from the per-study
figures, with every study pictured and with `--gradcam-studies` at its default of 50.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import predict  # noqa: E402
from bench.machine import device_description, load_description  # noqa: E402
from bench.study_latency import Settings as ChainSettings, untrained_chain, write_study  # noqa: E402
from ihd.gradcam import best_slices, draw_montage, draw_overlay, gradcam_heatmap, gradcam_heatmaps  # noqa: E402
from ihd.index import build_index  # noqa: E402
from ihd.inference import Predictions, dicom_hu_reader, draw_study_pictures  # noqa: E402
from ihd.inputs import neighbour_rows, stack_hu  # noqa: E402

PER_STUDY = 3
TEST_STUDIES = 3_500
TEST_SLICES = 121_232


def per_slice_pictures(chain, predictions: Predictions, hu_of_rows, out_dir: Path) -> None:
    """The baseline: the same pictures of one study, one Grad-CAM pass per slice."""
    rows = np.arange(len(predictions.index))
    hu = hu_of_rows(rows)
    stacks = stack_hu(hu, neighbour_rows(predictions.index, chain.offsets))
    heatmaps = {}
    for slot in best_slices(predictions.lstm, PER_STUDY):
        heatmaps[slot] = gradcam_heatmap(chain.cnn, stacks[slot])
        draw_overlay(hu[slot], heatmaps[slot], predictions.lstm[slot], out_dir / f"{slot}.png", "baseline")
    draw_montage(list(hu), predictions.lstm, out_dir / "montage.png", heatmaps, "baseline")


def stages(chain, predictions: Predictions, hu_of_rows, out_dir: Path) -> dict[str, float]:
    """Ours, step by step as draw_study_pictures takes them: seconds of each."""
    clock = [time.perf_counter()]
    timed = {}

    def lap(name):
        clock.append(time.perf_counter())
        timed[name] = clock[-1] - clock[-2]

    hu = hu_of_rows(np.arange(len(predictions.index)))
    lap("read the study's DICOM again")
    slots = best_slices(predictions.lstm, PER_STUDY)
    heatmaps = gradcam_heatmaps(chain.cnn, stack_hu(hu, neighbour_rows(predictions.index, chain.offsets)[slots]))
    lap(f"Grad-CAM of {PER_STUDY} slices, one pass")
    for slot, heatmap in zip(slots, heatmaps):
        draw_overlay(hu[slot], heatmap, predictions.lstm[slot], out_dir / f"stage{slot}.png", "stage")
    lap(f"{PER_STUDY} overlays")
    draw_montage(list(hu), predictions.lstm, out_dir / "stage_montage.png", dict(zip(slots, heatmaps)), "stage")
    lap("montage")
    return timed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    print(f"start: {load_description()}", flush=True)
    keras.utils.set_random_seed(0)
    settings = ChainSettings(backbone="EfficientNetB0")
    chain = untrained_chain(settings)
    with tempfile.TemporaryDirectory() as scratch:
        folder, out_dir = Path(scratch) / "study", Path(scratch) / "out"
        folder.mkdir()
        write_study(folder, settings.slices)
        index = build_index([(folder, "test")], out_dir / "index", workers=1)
        probabilities = np.random.default_rng(0).random((len(index), 6)).astype(np.float32)
        predictions = Predictions(index, probabilities, probabilities)
        hu_of_rows = dicom_hu_reader(index, chain.image_size, chain.store_size)
        runs = {"ours": lambda: draw_study_pictures(chain, predictions, hu_of_rows, out_dir, PER_STUDY),
                "baseline": lambda: per_slice_pictures(chain, predictions, hu_of_rows, out_dir)}
        for run in runs.values():
            run()  # warm-up: traces and clones the model for Grad-CAM
        seconds = {name: [] for name in runs}
        parts = []
        for number in range(rounds):
            for name in (list(runs) if number % 2 == 0 else list(runs)[::-1]):
                started = time.perf_counter()
                runs[name]()
                seconds[name].append(time.perf_counter() - started)
            parts.append(stages(chain, predictions, hu_of_rows, out_dir))
    ours, baseline = (statistics.median(seconds[name]) for name in ("ours", "baseline"))
    median_parts = {name: statistics.median(p[name] for p in parts) for name in parts[0]}

    print(f"\nmachine: {device_description()}")
    print(f"study: {len(index)} slices of 512x512; EfficientNetB0 at 256x256; --gradcam {PER_STUDY}; "
          f"median of {rounds} rounds after a warm-up\n")
    print("| pictures of one study | median seconds |")
    print("|---|---:|")
    print(f"| one Grad-CAM pass per slice (baseline) | {baseline:.2f} |")
    print(f"| **one pass per study (ours)** | **{ours:.2f}** |")
    for name, value in median_parts.items():
        print(f"| ours: {name} | {value:.2f} |")
    montage_per_slice = median_parts["montage"] / len(index)
    per_test_study = ours + montage_per_slice * (TEST_SLICES / TEST_STUDIES - len(index))
    cap = predict.Settings.gradcam_studies
    print(f"\nbaseline / ours: {baseline / ours:.2f}x")
    print(f"test set ({TEST_SLICES:,} slices, about {TEST_STUDIES:,} studies of {TEST_SLICES / TEST_STUDIES:.1f} slices): "
          f"{per_test_study:.2f} s a study; every study {TEST_STUDIES * per_test_study / 3600:.1f} h "
          f"(baseline {TEST_STUDIES * (per_test_study + baseline - ours) / 3600:.1f} h), "
          f"the default {cap} studies {cap * per_test_study / 60:.1f} min")
    print(f"\nend: {load_description()}")
    return {"ours": ours, "baseline": baseline, "stages": median_parts, "per_test_study": per_test_study}


if __name__ == "__main__":
    main()
