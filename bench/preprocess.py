"""Seconds per slice from a 512x512 DICOM file to a training input: the kit's whole preparation
against what each peer's code does for every slice.

    python bench/preprocess.py            # 1.5 minutes on 2 quiet cores, 4 minutes on busy ones
    python bench/preprocess.py --quick    # about a minute, short rounds

The peers, written here from the logic their repositories describe (none of their code is copied):

- paper: Burduja et al.'s released code (github.com/warchildmd/ihd, ``datasets.py``,
  ``train_cnn.py``) stores no image: every epoch, each slice is read with pydicom, the RSNA
  12-bit fix is checked, and for each of the windows 40/80, 80/200 and 40/380 the pixels are
  rescaled to HU (``pixel_array * slope + intercept``, float64), clipped and scaled to 0..1; the
  three are stacked and resized to 256x256 (albumentations ``Resize``: cv2 bilinear).
- appian42 (11th place, ``src/cnn/dataset/custom_dataset.py``, ``src/utils/misc.py``) stores no
  image either: every epoch, pydicom read, the RSNA fix, float32 rescale, three windows (each on a
  copy, clamped through masks), stacked and resized to the network's 480x480 (model110's crop is a
  cv2 resize; here of the whole slice). Its one-time pass that reads every file's header and pixels
  into a table of statistics is measured on its own line, not added to it, which flatters it.
- SeuTao (1st place, ``2DNet/src/prepare_data.py``) converts each slice once: pydicom read, the
  file's own window (first ``WindowCenter``/``WindowWidth``, integer slope and intercept), min-max
  to 0..255, an 8-bit 512x512 PNG written by Pillow (resized later, when training reads it). Its
  integer arithmetic is done in int32, as numpy 1 promoted it (numpy 2 would overflow uint16).

Ours is the whole preparation of ``prepare_data.py`` for each slice: the index pass's header read
(``ihd.index.header_row``: one pass over the file's first bytes by ``ihd.dicom_header``, pydicom only
for files outside the common form; it notes where the pixel words lie), then ``ihd.slices.write_pack``
for a series with those readings (one ``pread`` per file and no second parse, HU + 1024 in uint16,
INTER_AREA resize, 16-bit PNG, CRC-32, one pack file per series). Beside it: the same with every
file parsed a second time for its pixels (``read_hu``, as before the header pass kept the pixel
layout), and one PNG file per slice written atomically instead of packs.

Work: the uncompressed real 512x512 RSNA files of ../shared/data/real/rsna_slices and rsna_series
(rsna_labeled is JPEG 2000 re-encoded, unlike the challenge's files, so it is left out), repeated
in series of 36 under new ids, hot in the page cache for every method. Each measurement is a warm
process pool on one or two cores (the workers and the process handing out work confined to them,
one OpenCV thread a worker) under one glibc malloc setting: its defaults, or tuned (no mmap for
arrays under 32 MiB, no trimming under 256 MiB), which makes numpy code that allocates many
large arrays up to twice as fast. In each round every method gets the same slices, in an order
rotated round by round; the table gives each method's median over the rounds.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from PIL import Image  # noqa: E402

from bench.fixtures import tf_decode_png_hu, tf_read_png_bytes  # noqa: E402
from bench.machine import cpu_description, load_description  # noqa: E402
from ihd.dicom import read_header, read_hu  # noqa: E402
from ihd.index import header_row, pixel_reading  # noqa: E402
from ihd.io import atomic_path, run_header  # noqa: E402
from ihd.parallel import available_cores  # noqa: E402
from ihd.slices import (  # noqa: E402
    SliceStore, decode_pngs, encode_uint16_png, read_manifest, shard_name, slice_png, stored_values, tf_hu_of_rows,
    to_model_hu, write_pack, write_slices,
)

REAL_DATA = ROOT.parent / "shared" / "data" / "real"
SIZE = 256
SERIES_LENGTH = 36  # a typical RSNA series: 24 to 60 slices
PAPER_WINDOWS = ((40, 80), (80, 200), (40, 380))  # (center, width), one a channel
APPIAN42_SIZE = 480  # model110's input
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
ALLOCATORS = {
    "glibc defaults": {},
    "glibc tuned": {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 256 << 20},
}
PREPARATION_BAR = 3.0  # ours over the fastest peer, one core
SCALING_BAR = 1.7  # ours, two processes over one


@dataclass
class Settings:
    rounds: int = 9  # alternating rounds per measurement; the median counts
    series_per_round: int = 3  # series per worker per round, for every method: seconds of work a round
    quick: bool = False  # 3 rounds of one series: a smoke run
    data: str = str(REAL_DATA)  # folder holding rsna_slices/ and rsna_series/


def rsna_fix_needed(ds: pydicom.Dataset, intercept: float) -> bool:
    """The peers' test for the RSNA 12-bit wrap."""
    return ds.BitsStored == 12 and ds.PixelRepresentation == 0 and intercept > -100


def paper_slice(path: str, out_dir: str) -> np.ndarray:
    """The paper's per-epoch work for one slice: read, fix, three windows in float64, resize to 256."""
    ds = pydicom.dcmread(path)
    channels = []
    for center, width in PAPER_WINDOWS:
        if rsna_fix_needed(ds, int(ds.RescaleIntercept)):
            fixed = ds.pixel_array + 1000
            fixed[fixed >= 4096] -= 4096
            ds.PixelData = fixed.tobytes()
            ds.RescaleIntercept = -1000
        hu = ds.pixel_array * ds.RescaleSlope + ds.RescaleIntercept
        low = center - width // 2
        channels.append((np.clip(hu, low, center + width // 2) - low) / width)
    stacked = np.array(channels).transpose(1, 2, 0)
    return cv2.resize(stacked, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)


def appian42_slice(path: str, out_dir: str) -> np.ndarray:
    """appian42's per-epoch work for one slice: read, fix, float32 HU, three clamped copies, resize to 480."""
    ds = pydicom.dcmread(path)
    image = ds.pixel_array
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    if rsna_fix_needed(ds, intercept):
        image = image.copy() + 1000
        image[image >= 4096] -= 4096
        intercept = -1000
    hu = image.astype(np.float32) * slope + intercept
    windows = []
    for center, width in PAPER_WINDOWS:
        window = hu.copy()
        low, high = center - width // 2, center + width // 2
        window[window < low] = low
        window[window > high] = high
        windows.append(window)
    stacked = np.array(windows).transpose(1, 2, 0)
    return cv2.resize(stacked, (APPIAN42_SIZE, APPIAN42_SIZE))


def appian42_table_row(path: str, out_dir: str) -> dict:
    """appian42's one-time pass for one slice (``dicom_to_dataframe``): every header attribute, then the
    pixels' statistics in HU, in the file's own window and in the brain window."""
    ds = pydicom.dcmread(path)
    row = {name: (tuple(value) if isinstance(value, pydicom.multival.MultiValue) else value)
           for name in dir(ds) if name[0].isupper() and name != "PixelData" for value in [getattr(ds, name)]}
    raw = ds.pixel_array
    intercept = float(ds.RescaleIntercept)
    if rsna_fix_needed(ds, intercept):
        raw = raw.copy() + 1000
        raw[raw >= 4096] -= 4096
        intercept = -1000
    hu = raw.astype(np.float32) * float(ds.RescaleSlope) + intercept
    own = np.clip(hu, *sorted((first_int(ds.WindowCenter) - first_int(ds.WindowWidth) // 2,
                               first_int(ds.WindowCenter) + first_int(ds.WindowWidth) // 2)))
    brain = np.clip(hu, 0, 80)
    for name, image in (("raw", ds.pixel_array), ("doctor", own), ("brain", brain)):
        row.update({f"{name}_max": image.max(), f"{name}_min": image.min(), f"{name}_mean": image.mean(),
                    f"{name}_diff": image.max() - image.min()})
    row["brain_ratio"] = np.count_nonzero((brain > 0) & (brain < 80)) / brain.size
    return row


def first_int(value) -> int:
    """The first of a possibly multi-valued DICOM number, as an int (SeuTao's reading of the tags)."""
    return int(value[0]) if isinstance(value, pydicom.multival.MultiValue) else int(value)


def seutao_slice(path: str, out_dir: str) -> None:
    """SeuTao's one-time work for one slice: read, the file's own window, 0..255, 8-bit PNG by Pillow."""
    ds = pydicom.dcmread(path)
    center, width = first_int(ds.WindowCenter), first_int(ds.WindowWidth)
    image = ds.pixel_array.astype(np.int32) * first_int(ds.RescaleSlope) + first_int(ds.RescaleIntercept)
    low, high = center - width // 2, center + width // 2
    image[image < low] = low
    image[image > high] = high
    image = (image - image.min()) / (image.max() - image.min()) * 255
    Image.fromarray(image.astype(np.int8).view(np.uint8)).save(os.path.join(out_dir, f"{Path(path).stem}.png"))


def index_pass(items: list[tuple[str, str]], out_dir: str | None = None) -> list[tuple]:
    """What the index pass of ``prepare_data.py`` does for each file: read its header into a row; returns
    the (image_id, path, pixel reading) items the store is then given."""
    return [(image_id, path, pixel_reading(header_row((path, "train", str(Path(path).parent)))))
            for image_id, path in items]


def ours_packs(items: list[tuple[str, str]], out_dir: str) -> None:
    """Ours, the whole preparation of a series: the index pass, then one pack of its slices, each file's
    pixels read where the index pass found them."""
    write_pack(index_pass(items), out_dir, SIZE)


def ours_parsed_twice(items: list[tuple[str, str]], out_dir: str) -> None:
    """The same with every file parsed a second time for its pixels (``read_hu``)."""
    index_pass(items)
    write_pack([(image_id, path, None) for image_id, path in items], out_dir, SIZE)


def ours_file_per_slice(items: list[tuple[str, str]], out_dir: str) -> None:
    """The one-file-per-slice layout: the index pass, then one PNG file per slice, each written atomically."""
    for image_id, path, reading in index_pass(items):
        png = slice_png(path, reading, SIZE)
        with atomic_path(Path(out_dir) / shard_name(image_id) / f"{image_id}.png") as tmp:
            tmp.write_bytes(png)


def per_slice(recipe):
    """A peer's per-slice recipe applied to every slice of a series."""
    def each_slice(items: list[tuple[str, str]], out_dir: str) -> None:
        for _, path in items:
            recipe(path, out_dir)
    return each_slice


def run_series(method: str, items: list[tuple[str, str]], out_dir: str) -> None:
    """Pool task: one method on one series."""
    METHODS[method](items, out_dir)


METHODS = {
    "paper (no stored image, per epoch)": per_slice(paper_slice),
    "appian42 (no stored image, per epoch)": per_slice(appian42_slice),
    "SeuTao (8-bit PNG per slice, once)": per_slice(seutao_slice),
    "appian42's one-time table pass (not a bar's baseline)": per_slice(appian42_table_row),
    "ours: index pass + one pack per series": ours_packs,
    "ours, every file parsed again for its pixels": ours_parsed_twice,
    "ours, one PNG file per slice instead of packs": ours_file_per_slice,
    "ours: the index pass alone": index_pass,
}
FILE_PER_SLICE = "ours, one PNG file per slice instead of packs"
PARSED_TWICE = "ours, every file parsed again for its pixels"
OURS = "ours: index pass + one pack per series"
PEERS = [name for name in METHODS if not name.startswith("ours") and "one-time table" not in name]


def worker_setup(cores: set[int], malloc_options: dict[int, int]) -> None:
    """Pool initializer: the measurement's cores, one OpenCV thread, the malloc setting."""
    cv2.setNumThreads(1)
    os.sched_setaffinity(0, cores)
    libc = ctypes.CDLL("libc.so.6")
    for option, value in malloc_options.items():
        if libc.mallopt(option, value) != 1:
            raise RuntimeError(f"mallopt({option}, {value}) refused")


def measure(series: list[list[tuple[str, str]]], workers: int, malloc_options: dict[int, int],
            settings: Settings, work_dir: Path) -> dict[str, list[float]]:
    """Seconds per slice of every method in each round, on one warm pool.

    Every round hands each method the same ``series_per_round`` series per worker; the order of the
    methods rotates from round to round, so none always runs first or last.
    """
    context = multiprocessing.get_context("forkserver")
    all_cores = os.sched_getaffinity(0)
    cores = set(sorted(all_cores)[:workers])
    os.sched_setaffinity(0, cores)
    names = list(METHODS)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    per_round = settings.series_per_round * workers
    try:
        with context.Pool(workers, initializer=worker_setup, initargs=(cores, malloc_options)) as pool:
            for position, name in enumerate(names):
                out_dir = work_dir / f"warm-{position}"
                out_dir.mkdir(parents=True)
                pool.starmap(run_series, [(name, items, str(out_dir)) for items in series[:workers]])
            for round_number in range(settings.rounds):
                chunk = [series[(round_number * per_round + k) % len(series)] for k in range(per_round)]
                slices = sum(len(items) for items in chunk)
                for step in range(len(names)):
                    position = (round_number + step) % len(names)
                    out_dir = work_dir / f"{round_number}-{position}"
                    out_dir.mkdir(parents=True)
                    start = time.perf_counter()
                    pool.starmap(run_series, [(names[position], items, str(out_dir)) for items in chunk], chunksize=1)
                    seconds[names[position]].append((time.perf_counter() - start) / slices)
    finally:
        os.sched_setaffinity(0, all_cores)
        shutil.rmtree(work_dir, ignore_errors=True)
    return seconds


def real_512_files(data: Path) -> list[Path]:
    """The uncompressed real RSNA files of 512x512 pixels."""
    paths = sorted((data / "rsna_slices").glob("*.dcm")) + sorted((data / "rsna_series").glob("*.dcm"))
    return [p for p in paths if (read_header(p).rows, read_header(p).cols) == (512, 512)]


def work_series(files: list[Path], count: int) -> list[list[tuple[str, str]]]:
    """``count`` series of ``SERIES_LENGTH`` (unique image id, path) pairs cycling over ``files``; ids
    are random hex like the challenge's, so writes spread over the store's shard folders."""
    ids = np.random.default_rng(0).choice(16**9, size=count * SERIES_LENGTH, replace=False)
    items = [(f"ID_{image_id:09x}", str(files[i % len(files)])) for i, image_id in enumerate(ids)]
    return [items[start:start + SERIES_LENGTH] for start in range(0, len(items), SERIES_LENGTH)]


def png_tradeoff(files: list[Path]) -> list[tuple[str, float, float, float]]:
    """(encoder, mean KB per slice, encode ms per slice, decode ms per slice) for libpng's settings and ours at
    each ISA-L level on the real slices; decoded by the store's decoder (a batch at once) where it can
    (ours), by libpng (cv2.imdecode) otherwise. Medians of 3 runs."""
    stored = [stored_values(to_model_hu(read_hu(p), SIZE)) for p in files]
    libpng = {
        "level 1, adaptive filters": (cv2.IMWRITE_PNG_COMPRESSION, 1),
        "level 6, adaptive filters": (cv2.IMWRITE_PNG_COMPRESSION, 6),
        "Huffman only, up filter": (cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY,
                                    cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY, cv2.IMWRITE_PNG_FILTER,
                                    cv2.IMWRITE_PNG_FILTER_UP),
        "Huffman only, average filter": (cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY,
                                         cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY, cv2.IMWRITE_PNG_FILTER,
                                         cv2.IMWRITE_PNG_FILTER_AVG),
    }
    encoders = {f"libpng (cv2.imencode), {name}": (lambda image, p=params: cv2.imencode(".png", image, p)[1])
                for name, params in libpng.items()}
    encoders |= {f"ours: up filter, ISA-L deflate level {level}": partial(encode_uint16_png, level=level)
                 for level in range(4)}
    wheres = [str(p) for p in files]
    rows = []
    for name, encode in encoders.items():
        encode_runs, decode_runs = [], []
        for _ in range(3):
            start = time.perf_counter()
            pngs = [bytes(encode(image)) for image in stored]
            encode_runs.append(time.perf_counter() - start)
            start = time.perf_counter()
            if name.startswith("ours"):
                decode_pngs(pngs, wheres, SIZE)
            else:
                [cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED) for png in pngs]
            decode_runs.append(time.perf_counter() - start)
        rows.append((name, float(np.mean([len(png) for png in pngs])) / 1024,
                     statistics.median(encode_runs) / len(stored) * 1e3, statistics.median(decode_runs) / len(stored) * 1e3))
    return rows


def stored_kb(files: list[Path]) -> float:
    """Mean bytes per slice, in KB, of a pack of the real slices."""
    with tempfile.TemporaryDirectory() as tmp:
        rows, _ = write_pack([(f"ID_{p.stem[3:]}", str(p), None) for p in files], tmp, SIZE)
        return sum(row[3] for row in rows) / len(rows) / 1024


def read_rates(files: list[Path], rounds: int) -> dict[str, float]:
    """Slices per second read and decoded by ``tf.data`` in shuffled order, median of ``rounds``
    alternating rounds, the same 360 slices (10 series of 36) each way: from packs, checked and
    decoded by the store (``SliceStore.tf_read_rows``, one Python call per 64 slices, then ``tf_hu_of_rows``: ours); from
    packs, checked, the PNG bytes of 64 slices or of one per Python call, decoded by TensorFlow's
    ``decode_png`` (before); from packs through ``FixedLengthRecordDataset``, TensorFlow's native
    reader of a byte range (no check), which reads the slices before the one it returns; from one PNG
    file per slice (native ``read_file``, no check). All but ours decode with TensorFlow."""
    import pandas as pd
    import tensorflow as tf

    items = [item for items in work_series(files, 10) for item in items]
    with tempfile.TemporaryDirectory() as tmp:
        index = pd.DataFrame({"image_id": [image_id for image_id, _ in items], "path": [path for _, path in items],
                              "series_id": [k // SERIES_LENGTH for k in range(len(items))]})
        write_slices(index, Path(tmp) / "packs", size=SIZE, workers=1)
        ours_file_per_slice(items, str(Path(tmp) / "files"))
        store = SliceStore(Path(tmp) / "packs")
        order = np.random.default_rng(0).permutation(len(items))
        slots = store.slots(index["image_id"])[order]
        paths = np.array([str(Path(tmp) / "files" / shard_name(i) / f"{i}.png") for i in index["image_id"]])[order]
        manifest = read_manifest(store.root)
        pack_bytes = manifest.groupby("pack")["length"].transform("sum").to_numpy()
        pack_paths = tf.constant([str(store.root / pack) for pack in manifest["pack"]])
        offsets, lengths = tf.constant(manifest["offset"].to_numpy()), tf.constant(manifest["length"].to_numpy())
        footers = tf.constant(pack_bytes - manifest["offset"].to_numpy() - manifest["length"].to_numpy())

        def native_range(slot):
            return tf.data.FixedLengthRecordDataset(pack_paths[slot], lengths[slot], header_bytes=offsets[slot],
                                                    footer_bytes=footers[slot],
                                                    buffer_size=lengths[slot]).get_single_element()

        def decoded(data):
            return data.map(tf_decode_png_hu, num_parallel_calls=tf.data.AUTOTUNE)

        def png_bytes(slots):
            return tf_read_png_bytes(store, slots)

        def slot_data(batch):
            return tf.data.Dataset.from_tensor_slices(slots).batch(batch)

        single = tf.data.Dataset.from_tensor_slices(slots)
        hu_of_rows = tf.function(tf_hu_of_rows, jit_compile=True)  # one XLA computation a slice, as ihd.inputs runs it
        readers = {
            "packs, checked and decoded by the store, one Python call per 64 slices (ours)": lambda: slot_data(64).map(
                store.tf_read_rows, num_parallel_calls=tf.data.AUTOTUNE).unbatch().map(hu_of_rows),
            "packs, checked, one Python call per 64 slices, TensorFlow's decode_png (before)": lambda: decoded(
                slot_data(64).map(png_bytes, num_parallel_calls=tf.data.AUTOTUNE).unbatch()),
            "packs, checked, one Python call per slice, TensorFlow's decode_png": lambda: decoded(
                slot_data(1).map(png_bytes, num_parallel_calls=tf.data.AUTOTUNE).unbatch()),
            "packs, FixedLengthRecordDataset (native, reads the pack up to the slice, no check)": lambda: decoded(
                single.map(native_range, num_parallel_calls=tf.data.AUTOTUNE)),
            "one PNG file per slice (native read_file, no check)": lambda: decoded(
                tf.data.Dataset.from_tensor_slices(paths).map(tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE)),
        }
        rates: dict[str, list[float]] = {name: [] for name in readers}
        for round_number in range(rounds):
            for name in (list(readers) if round_number % 2 == 0 else list(readers)[::-1]):
                start = time.perf_counter()
                count = sum(len(batch) for batch in readers[name]().batch(64))
                rates[name].append(count / (time.perf_counter() - start))
    return {name: statistics.median(runs) for name, runs in rates.items()}


def print_tables(medians: dict[tuple[str, int, str], float], worker_counts: list[int], settings: Settings,
                 files: list[Path], slices_per_round: int) -> None:
    """The markdown tables and the bar verdicts."""
    print(f"\n### Preprocessing: 512x512 DICOM -> training input ({SIZE}x{SIZE} for ours and the paper)\n")
    print(f"Machine: {cpu_description()}; {load_description()}. {len(files)} real RSNA files in series of "
          f"{SERIES_LENGTH}, {slices_per_round} slices per method per worker per round, median of "
          f"{settings.rounds} alternating rounds.\n")
    for allocator in ALLOCATORS:
        print(f"\n{allocator}:\n")
        header = " | ".join(f"{w} process{'es' if w > 1 else ''}: ms/slice, slices/s" for w in worker_counts)
        print(f"| method | {header} | its time / ours, 1 process |")
        print("|---|" + "---:|" * (len(worker_counts) + 1))
        ours = medians[OURS, 1, allocator]
        for name in METHODS:
            cells = " | ".join(f"{medians[name, w, allocator] * 1e3:.2f}, {1 / medians[name, w, allocator]:.0f}"
                               for w in worker_counts)
            ratio = "" if name == OURS else f"{medians[name, 1, allocator] / ours:.2f}x"
            print(f"| {name} | {cells} | {ratio} |")
    print("\nBars (each under both malloc settings):")
    for allocator in ALLOCATORS:
        fastest = min(PEERS, key=lambda name: medians[name, 1, allocator])
        ratio = medians[fastest, 1, allocator] / medians[OURS, 1, allocator]
        verdict = "met" if ratio >= PREPARATION_BAR else "NOT met"
        print(f"- {allocator}: whole preparation {ratio:.2f}x the fastest peer's per-slice work on one core "
              f"({fastest}); bar {PREPARATION_BAR:.1f}x: {verdict}")
        if 2 in worker_counts:
            scaling = medians[OURS, 1, allocator] / medians[OURS, 2, allocator]
            verdict = "met" if scaling >= SCALING_BAR else "NOT met"
            print(f"- {allocator}: ours from one process to two {scaling:.2f}x; bar {SCALING_BAR:.1f}x: {verdict}")
        packs = medians[OURS, 1, allocator]
        for name, saving in ((FILE_PER_SLICE, "one pack per series instead of one file per slice"),
                             (PARSED_TWICE, "one parse per file instead of two")):
            print(f"- {allocator}: {saving}: {medians[name, 1, allocator] / packs:.2f}x "
                  f"({(medians[name, 1, allocator] - packs) * 1e3:.2f} ms a slice saved)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=Settings.rounds)
    parser.add_argument("--series-per-round", type=int, default=Settings.series_per_round)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default=Settings.data)
    args = parser.parse_args(argv)
    settings = Settings(rounds=args.rounds, series_per_round=args.series_per_round, quick=args.quick, data=args.data)
    if settings.quick:
        settings.rounds, settings.series_per_round = 3, 1
    run_header(argv, settings)
    print(f"start: {load_description()}", flush=True)
    cv2.setNumThreads(1)
    files = real_512_files(Path(settings.data))
    worker_counts = sorted({1, min(2, available_cores())})
    series = work_series(files, settings.rounds * settings.series_per_round * max(worker_counts))
    medians: dict[tuple[str, int, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for allocator, malloc_options in ALLOCATORS.items():
            for workers in worker_counts:
                seconds = measure(series, workers, malloc_options, settings, Path(tmp) / f"{allocator}-{workers}")
                for name, runs in seconds.items():
                    medians[name, workers, allocator] = statistics.median(runs)
                    print(f"{allocator}, {workers} process(es), {name}: median {medians[name, workers, allocator] * 1e3:.2f} "
                          f"ms/slice, rounds {' '.join(f'{s * 1e3:.2f}' for s in runs)}", flush=True)
    print_tables(medians, worker_counts, settings, files, settings.series_per_round * SERIES_LENGTH)

    print(f"\nStored bytes: {stored_kb(files):.1f} KB per slice on average ({len(files)} real 512x512 RSNA slices "
          f"at {SIZE}x{SIZE}, lossless to 1 HU; bar 64 KB)\n")
    print("| 16-bit PNG encoder | KB per slice | encode ms per slice | decode ms per slice |")
    print("|---|---:|---:|---:|")
    for name, kb, encode_ms, decode_ms in png_tradeoff(files):
        print(f"| {name} | {kb:.1f} | {encode_ms:.2f} | {decode_ms:.2f} |")
    with contextlib.redirect_stdout(io.StringIO()):
        read = read_rates(files, settings.rounds)
    print(f"\nReading in tf.data, shuffled, {available_cores()} cores (median of {settings.rounds} alternating rounds):\n")
    print("| store layout | slices/s |")
    print("|---|---:|")
    for name, rate in read.items():
        print(f"| {name} | {rate:.0f} |")
    print(f"\nend: {load_description()}")


if __name__ == "__main__":
    main()
