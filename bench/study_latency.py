"""Latency of one study on the CPU: 40 DICOM files of 512x512 to per-slice probabilities plus one Grad-CAM picture.

    python bench/study_latency.py
    python bench/study_latency.py --quick            # 3 timed runs instead of 7
    python bench/study_latency.py --runs 15 --backbone MobileNetV3Small

The study is the real RSNA series of ../shared/data/real/rsna_series (32 slices) plus 8 copies of
its top slices moved further along the slice normal with new ids, 40 slices in all. The chain is what
`predict.py --dicom-dir` does for one series (the folder route reads one at a time): index the folder (`ihd.index`), read HU, resize, stack
channels, CNN (MobileNetV2 at 256x256, untrained weights: speed does not depend on them), pca:120,
the paper-shaped LSTM (untrained), then Grad-CAM of the most likely slice drawn to a PNG. Median of
several runs after one warm-up run (which traces the graphs). Bar: at most 3 seconds. The bare CNN
on the same 40 inputs already in memory is timed beside it as the baseline.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.machine import device_description  # noqa: E402
from ihd.cnn import build_cnn  # noqa: E402
from ihd.dicom import read_header  # noqa: E402
from ihd.features import Selection  # noqa: E402
from ihd.gradcam import best_slices, draw_overlay, gradcam_heatmap  # noqa: E402
from ihd.index import build_index  # noqa: E402
from ihd.inference import Chain, cnn_outputs, lstm_probabilities, read_model_hu  # noqa: E402
from ihd.inputs import neighbour_rows, stack_hu  # noqa: E402
from ihd.sequence import build_lstm  # noqa: E402

SERIES = ROOT.parent / "shared" / "data" / "real" / "rsna_series"
BAR_S = 3.0


@dataclass
class Settings:
    slices: int = 40  # a typical RSNA series holds 24 to 60 slices
    backbone: str = "MobileNetV2"  # the CPU-friendly backbone of the bar
    image_size: int = 256  # the paper's downsampled size
    selected: int = 120  # pca:120, the paper's selection
    runs: int = 7  # timed runs after the warm-up; the median is reported
    seed: int = 0


def write_study(folder: Path, slices: int) -> None:
    """The real 32-slice series, plus copies of its top slices shifted along the normal, as `slices` files."""
    files = sorted(SERIES.glob("*.dcm"), key=lambda p: read_header(p).z)
    for path in files[:slices]:
        (folder / path.name).write_bytes(path.read_bytes())
    first = np.array(pydicom.dcmread(files[-2], stop_before_pixels=True).ImagePositionPatient, float)
    last = np.array(pydicom.dcmread(files[-1], stop_before_pixels=True).ImagePositionPatient, float)
    for extra in range(slices - len(files)):
        ds = pydicom.dcmread(files[-1 - extra % len(files)])
        ds.ImagePositionPatient = [float(v) for v in last + (extra + 1) * (last - first)]
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"ID_bench{extra:04d}.dcm")


def untrained_chain(settings: Settings) -> Chain:
    """MobileNetV2 + a random pca:k projection + the paper-shaped LSTM, none of them trained."""
    cnn = build_cnn(settings.backbone, settings.image_size, weights=None)
    dim = int(cnn.get_layer("embedding").output.shape[-1])
    rng = np.random.default_rng(settings.seed)
    components = np.linalg.qr(rng.standard_normal((dim, settings.selected)))[0].T.astype(np.float32)
    selection = Selection(f"pca:{settings.selected}", mean=np.zeros(dim, np.float32), components=components)
    lstm = build_lstm(settings.selected + 6)
    config = {"image_size": settings.image_size, "store_size": settings.image_size, "recipe": "windows"}
    return Chain("bench", selection.name, cnn, config, "untrained", selection, lstm)


def one_study(chain: Chain, folder: Path, out_dir: Path) -> dict[str, float]:
    """Seconds per stage of DICOM folder -> probabilities -> one Grad-CAM picture."""
    clock = [time.perf_counter()]
    stages = {}

    def lap(name):
        clock.append(time.perf_counter())
        stages[name] = clock[-1] - clock[-2]

    index = build_index([(folder, "test")], out_dir / "index", workers=1)
    lap("index headers")
    hu, _ = read_model_hu(index, chain.image_size, chain.store_size)
    stacks = stack_hu(hu, neighbour_rows(index, chain.offsets))
    lap("read DICOM + resize + stack")
    embeddings, cnn = cnn_outputs(chain, stacks)
    lap("CNN")
    lstm = lstm_probabilities(chain, embeddings, cnn, index)
    lap("selection + LSTM")
    slot = int(best_slices(lstm, 1)[0])
    heatmap = gradcam_heatmap(chain.cnn, stacks[slot])
    draw_overlay(hu[slot], heatmap, lstm[slot], out_dir / "gradcam.png", index["image_id"].iloc[slot])
    lap("Grad-CAM + picture")
    stages["total"] = clock[-1] - clock[0]
    return stages


def bare_cnn_seconds(chain: Chain, stacks: np.ndarray) -> float:
    """The CNN alone on inputs already in memory (baseline)."""
    started = time.perf_counter()
    cnn_outputs(chain, stacks)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 timed runs")
    parser.add_argument("--runs", type=int, default=Settings.runs)
    parser.add_argument("--backbone", default=Settings.backbone)
    args = parser.parse_args(argv)
    settings = Settings(runs=3 if args.quick else args.runs, backbone=args.backbone)

    chain = untrained_chain(settings)
    with tempfile.TemporaryDirectory() as scratch:
        folder, out_dir = Path(scratch) / "study", Path(scratch) / "out"
        folder.mkdir()
        write_study(folder, settings.slices)
        one_study(chain, folder, out_dir)
        runs = [one_study(chain, folder, out_dir) for _ in range(settings.runs)]
        index = build_index([(folder, "test")], out_dir / "index", workers=1)
        stacks = stack_hu(read_model_hu(index, chain.image_size, chain.store_size)[0], neighbour_rows(index, chain.offsets))
        bare = statistics.median(bare_cnn_seconds(chain, stacks) for _ in range(settings.runs))

    medians = {name: statistics.median(run[name] for run in runs) for name in runs[0]}
    print(f"\nmachine: {device_description()}")
    print(f"study: {settings.slices} DICOM slices 512x512; {settings.backbone} at {settings.image_size}, "
          f"pca:{settings.selected}, LSTM 3 x 256 bidirectional; median of {settings.runs} runs after a warm-up\n")
    print("| stage | median seconds |")
    print("|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.3f} |")
    print(f"| baseline: bare CNN on {settings.slices} in-memory inputs | {bare:.3f} |")
    verdict = "meets" if medians["total"] <= BAR_S else "MISSES"
    print(f"\nbar (<= {BAR_S:.0f} s per study): {verdict}")
    return {"medians": medians, "bare_cnn_s": bare}


if __name__ == "__main__":
    main()
