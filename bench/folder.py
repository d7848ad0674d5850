"""Peak memory of `predict.py --dicom-dir` on a folder of 10,000 real-size slices: the route that reads
one series at a time against the route before it, which read the whole folder into one array.

    python bench/folder.py                          # 10,000 slices (5 GB of DICOM in a temporary folder)
    python bench/folder.py --quick                  # 1,000 slices
    python bench/folder.py --keep /tmp/folder       # build the folder there and keep it (reused if complete)

The folder is made of the real RSNA series under ../shared/data/real (rsna_series, rsna_labeled,
rsna_normal: 22 series of 24 to 47 slices), copied as often as needed with new patient, study, series
and instance UIDs, one study per subfolder, written uncompressed like the challenge's files (512x512,
about 0.5 MB each); a temporary folder is deleted at the end. The chain has the real run's sizes,
untrained (memory does not depend on the weights): EfficientNetB0 at 256x256, pca:120, the paper's
3 x 256 LSTM. Every measurement is a fresh process:

- "streamed": `predict.predict_folder`, what `predict.py --dicom-dir DIR --gradcam 2` runs after
  loading its chain: index, read and CNN one series at a time, LSTM, probabilities.csv, Grad-CAM
  pictures of 2 slices for the 50 studies most likely to bleed (the default cap);
- "whole folder": the route before it, every slice read into one array, stacked, the CNN over all of
  it in batches of 64 (the streamed route's are 16), the same table and pictures. It needs about 1 MB a slice at 256x256, so it is measured on
  1,000 and 2,000 slices only and its 10,000-slice figure is the straight line through those two,
  said as such.

Peak memory is the process's peak resident set (ru_maxrss). Bar: the streamed route at most 2 GB on
10,000 slices, and no more on 10,000 than on 1,000 (bounded by the largest study). The streamed and
whole-folder tables of the 1,000-slice folder are compared: they must be the same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import predict  # noqa: E402
from bench.machine import device_description, load_description  # noqa: E402
from bench.study_latency import Settings as ChainSettings, untrained_chain  # noqa: E402
from ihd.dicom import read_header  # noqa: E402
from ihd.index import build_index  # noqa: E402
from ihd.inference import (Predictions, cnn_outputs, draw_study_pictures, lstm_probabilities,  # noqa: E402
                           read_model_hu)
from ihd.inputs import neighbour_rows, stack_hu  # noqa: E402
from ihd.io import atomic_path  # noqa: E402
from ihd.labels import SUBTYPES  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "real"
SOURCES = (REAL / "rsna_series", REAL / "rsna_labeled" / "stage_2_train", REAL / "rsna_normal" / "stage_2_train")
MEMORY_BAR_BYTES = 2 * 2**30
WHOLE_FOLDER_SIZES = (1000, 2000)
BATCH_BEFORE = 64  # slices per CNN call of the route before streaming


@dataclass
class Settings:
    slices: int = 10_000  # the bar's folder
    backbone: str = "EfficientNetB0"  # the real run's backbone
    gradcam: int = 2  # slices per pictured study
    seed: int = 0


def source_series() -> list[list[pydicom.Dataset]]:
    """Every real RSNA series of the fixtures, slices in z order, pixel data uncompressed."""
    by_series: dict[str, list[Path]] = {}
    for folder in SOURCES:
        for path in sorted(folder.glob("*.dcm")):
            by_series.setdefault(read_header(path).series_id, []).append(path)
    series = []
    for paths in by_series.values():
        datasets = [pydicom.dcmread(path) for path in sorted(paths, key=lambda p: read_header(p).z)]
        for ds in datasets:
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        series.append(datasets)
    return series


def build_folder(folder: Path, slices: int) -> None:
    """`slices` files in study subfolders, copies of the real series under new UIDs (kept when already complete)."""
    done = folder / "complete.json"
    if done.exists() and json.loads(done.read_text())["slices"] == slices:
        return
    shutil.rmtree(folder, ignore_errors=True)
    sources = source_series()
    written, study = 0, 0
    while written < slices:
        series = sources[study % len(sources)][: slices - written]
        study_dir = folder / f"study{study:05d}"
        study_dir.mkdir(parents=True)
        patient, study_uid, series_uid = f"ID_bench{study:05d}", generate_uid(), generate_uid()
        for ds in series:
            ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient, study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(study_dir / f"ID_{written:09x}.dcm", enforce_file_format=True)
            written += 1
        study += 1
    done.write_text(json.dumps({"slices": slices, "studies": study}))


def subset(folder: Path, slices: int, out: Path) -> Path:
    """A folder of links to the first `slices` files of `folder` (whole studies first, the last one cut)."""
    shutil.rmtree(out, ignore_errors=True)
    linked = 0
    for study_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(study_dir.glob("*.dcm")):
            if linked == slices:
                return out
            (out / study_dir.name).mkdir(parents=True, exist_ok=True)
            (out / study_dir.name / path.name).symlink_to(path)
            linked += 1
    return out


def whole_folder_route(settings: predict.Settings, chain) -> Path:
    """The DICOM route before streaming: the folder in one array, then the same table and pictures."""
    out_dir = Path(settings.out)
    index = build_index([(settings.dicom_dir, "test")], out_dir, workers=1)
    hu, failures = read_model_hu(index, chain.image_size, chain.store_size)
    assert not failures
    embeddings, cnn = cnn_outputs(chain, stack_hu(hu, neighbour_rows(index, chain.offsets)), BATCH_BEFORE)
    predictions = Predictions(index, cnn, lstm_probabilities(chain, embeddings, cnn, index), embeddings)
    table = index[["image_id", "patient_id", "study_id", "series_id", "position", "z", "path"]].copy()
    table[list(SUBTYPES)] = predictions.lstm
    table[[f"cnn_{s}" for s in SUBTYPES]] = predictions.cnn
    with atomic_path(out_dir / "probabilities.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    draw_study_pictures(chain, predictions, lambda rows: hu[rows], out_dir, settings.gradcam, settings.gradcam_method,
                        settings.gradcam_studies)
    return out_dir / "probabilities.csv"


def measure(route: str, folder: Path, out: Path, settings: Settings) -> dict:
    """One route over one folder in this process: seconds, slices and peak memory."""
    keras.utils.set_random_seed(settings.seed)
    chain = untrained_chain(ChainSettings(backbone=settings.backbone, seed=settings.seed))
    options = predict.Settings(run="bench", dicom_dir=str(folder), out=str(out), gradcam=settings.gradcam)
    started = time.perf_counter()
    csv_path = predict.predict_folder(options, [chain]) if route == "streamed" else whole_folder_route(options, chain)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    pictures = len(list(out.glob("*_montage.png")))
    return {"route": route, "seconds": seconds, "peak_rss_bytes": peak, "csv": str(csv_path), "studies_pictured": pictures,
            "slices": sum(1 for line in open(csv_path)) - 1}


def run_child(route: str, folder: Path, out: Path, settings: Settings) -> dict:
    """`measure` in a fresh process (its own peak memory)."""
    command = [sys.executable, __file__, "--child", route, str(folder), str(out), "--backbone", settings.backbone]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise SystemExit(f"{route} on {folder} failed:\n{finished.stderr[-3000:]}")
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    print(f"{route}, {result['slices']:,} slices: {result['seconds']:.0f} s, peak {result['peak_rss_bytes'] / 2**30:.2f} GB "
          f"({load_description()})", flush=True)
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 slices")
    parser.add_argument("--slices", type=int, default=Settings.slices)
    parser.add_argument("--backbone", default=Settings.backbone)
    parser.add_argument("--keep", type=Path, help="build the folder here and keep it")
    parser.add_argument("--child", nargs=3, metavar=("ROUTE", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = Settings(slices=1000 if args.quick else args.slices, backbone=args.backbone)
    if args.child:
        route, folder, out = args.child
        print(json.dumps(measure(route, Path(folder), Path(out), settings)))
        return []

    print(f"start: {load_description()}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="folder-bench-"))
    folder = args.keep or scratch / "folder"
    results = []
    try:
        started = time.perf_counter()
        build_folder(folder, settings.slices)
        size = sum(p.stat().st_size for p in folder.rglob("*.dcm"))
        print(f"folder: {settings.slices:,} slices, {size / 2**30:.1f} GiB, built in {time.perf_counter() - started:.0f} s",
              flush=True)
        sizes = sorted({n for n in WHOLE_FOLDER_SIZES if n < settings.slices} | {settings.slices})
        for slices in sizes:
            part = folder if slices == settings.slices else subset(folder, slices, scratch / f"part{slices}")
            routes = ["streamed"] + (["whole folder"] if slices in WHOLE_FOLDER_SIZES else [])
            for route in routes:
                result = run_child(route, part, scratch / f"out-{route.replace(' ', '-')}-{slices}", settings)
                results.append({**result, "folder_slices": slices})
        pairs = [r for r in results if r["folder_slices"] == min(sizes)]
        tables = {r["route"]: Path(r["csv"]).read_bytes() for r in pairs}
        same = len(set(tables.values())) == 1 if len(tables) == 2 else None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"\nmachine: {device_description()}")
    print(f"chain: {settings.backbone} at 256x256 (untrained), pca:120, LSTM 3 x 256; pictures: Grad-CAM of "
          f"{settings.gradcam} slices and a montage for at most 50 studies\n")
    print("| folder slices | route | seconds | studies pictured | peak RSS |")
    print("|---:|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['folder_slices']:,} | {r['route']} | {r['seconds']:.0f} | {r['studies_pictured']} | "
              f"{r['peak_rss_bytes'] / 2**30:.2f} GB |")
    whole = {r["folder_slices"]: r["peak_rss_bytes"] for r in results if r["route"] == "whole folder"}
    streamed = {r["folder_slices"]: r["peak_rss_bytes"] for r in results if r["route"] == "streamed"}
    if len(whole) == 2:
        (small, low), (large, high) = sorted(whole.items())
        per_slice = (high - low) / (large - small)
        print(f"\nwhole folder: {per_slice / 2**20:.2f} MiB more per slice; on {settings.slices:,} slices about "
              f"{(low + per_slice * (settings.slices - small)) / 2**30:.1f} GB (extrapolated, not measured)")
    if same is not None:
        print(f"tables of the {min(sizes):,}-slice folder, streamed and whole folder: {'the same bytes' if same else 'DIFFERENT'}")
    if settings.slices == Settings.slices:
        peak = streamed[settings.slices]
        verdict = "meets" if peak <= MEMORY_BAR_BYTES and peak <= streamed[min(streamed)] * 1.1 else "MISSES"
        print(f"bar (streamed, 10,000 slices: <= {MEMORY_BAR_BYTES / 2**30:.0f} GB and no more than on "
              f"{min(streamed):,}): {verdict}")
    print(f"\nend: {load_description()}")
    return results


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
