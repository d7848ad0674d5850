"""Stage 2 at real-data size on the CPU: the LSTM's inputs, training and the validation pass, for the
route that held every row's inputs in memory as float32 (the baseline) and for the stored float16 file.

    python bench/lstm.py --prepare /tmp/lstm-bench    # write the feature cache (2.3 GB) and fit pca:120, once
    python bench/lstm.py --cache /tmp/lstm-bench      # measure both routes on pca:120 and all
    python bench/lstm.py --quick                      # a tenth of the rows, in a temporary folder
    python bench/lstm.py --cache DIR --selection all --batches 24 --padded

The feature cache has the real data's layout: 874,035 rows, of them 752,803 training slices in about
20,689 series of 24 to 60 slices (folds 0 to 4 by series; fold 0 validates) and 121,232 test slices;
random float16 embeddings of EfficientNetB0's 1,280 dimensions, six random probabilities, random
labels, and an index with the real one's columns: the figures are about speed and memory, not
learning. Every route and selection runs in a fresh process, which

- opens the cache (`load_features`, every chunk checked) and the fitted selection;
- builds the inputs: "memory", the route before the file (every row's selected features and
  probabilities concatenated into one float32 array), or "file" (`ihd.series_inputs.stored_inputs`,
  the file deleted before so that its one-time writing is measured too);
- computes the standardisation moments over the training series and builds the paper's LSTM (3
  bidirectional layers of 256 units);
- trains on the first `--batches` batches (128 series of similar length) of the shuffled epoch, the
  first batch untimed (it traces the graph). The epoch time is extrapolated from the steady seconds
  per slice of those batches (both routes train on the same batches), not measured over an epoch;
- predicts every validation series (`predict_series`): the whole pass, measured.

Peak memory is the process's peak resident set (ru_maxrss), which counts every page of a
memory-mapped file the process touched. Bars: the file route at most 3 GB on pca:120 and on all, and
its epoch no slower than the memory route's in the same run (and than 3.0 min, recorded before).
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
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.cache_check import write_cache  # noqa: E402
from bench.machine import device_description, load_description  # noqa: E402
from ihd.features import fitted_selection, load_features, selected_features  # noqa: E402
from ihd.fingerprint import file_sha256  # noqa: E402
from ihd.index import INDEX_COLUMNS  # noqa: E402
from ihd.inputs import fold_rows, label_array  # noqa: E402
from ihd.io import write_json  # noqa: E402
from ihd.labels import SUBTYPES  # noqa: E402
from ihd.sequence import (PAD_VALUE, SeriesBatches, build_lstm, compile_lstm, input_moments, pad_batch,  # noqa: E402
                          plan_batches, predict_series, series_set)
from ihd.series_inputs import inputs_paths, stored_inputs  # noqa: E402

TRAIN_SLICES = 752_803
TEST_SLICES = 121_232
EMBEDDING_DIM = 1280  # EfficientNetB0
FOLDS = 5
MEMORY_BAR_BYTES = 3 * 2**30
RECORDED_EPOCH_S = 3.0 * 60  # pca:120, length-bucketed, measured before the stored inputs (BENCHMARKS.md)
ROUTES = ("memory", "file")


@dataclass
class Settings:
    fraction: float = 1.0  # share of the real row count (1.0 = the bar's size)
    selections: tuple[str, ...] = ("pca:120", "all")  # the paper's choice and every dimension
    batch_size: int = 128  # series per batch, as train_lstm.py
    batches: int = 16  # training batches per process: the first traces, the rest are timed
    layers: int = 3  # the paper's shape
    units: int = 256
    jit: bool = False  # XLA recompiles for every padded length; measured no faster per batch here
    padded: bool = False  # also time batches padded to the longest series (extrapolated)
    seed: int = 0


def series_lengths(total_slices: int, rng: np.random.Generator) -> np.ndarray:
    """Series lengths between 24 and 60, skewed short like the real data, summing to `total_slices`."""
    lengths = np.rint(rng.triangular(24, 24, 61, size=total_slices // 24 + 1)).clip(24, 60).astype(np.int64)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), total_slices) + 1]
    lengths[-1] -= lengths.sum() - total_slices
    return lengths[lengths > 0]


def bench_index(train_slices: int, test_slices: int, seed: int) -> pd.DataFrame:
    """An index with the real one's columns: training series in folds 0-4 (random labels), then test series."""
    rng = np.random.default_rng(seed)
    parts = []
    for split, total in (("train", train_slices), ("test", test_slices)):
        lengths = series_lengths(total, rng)
        series = np.repeat(np.arange(len(lengths)), lengths)
        first = np.repeat(np.cumsum(lengths) - lengths, lengths)
        ids = rng.integers(0, 16**10, size=(len(lengths), 3))
        part = pd.DataFrame({
            "image_id": [f"ID_{v:09x}" for v in rng.integers(0, 16**9, size=total)],
            "patient_id": [f"ID_{v:08x}" for v in ids[series, 0] % 16**8],
            "study_id": [f"ID_{v:010x}" for v in ids[series, 1]],
            "series_id": [f"ID_{split}{v:010x}" for v in ids[series, 2]],
            "split": split,
            "z": (np.arange(total) - first) * 5.0,
            "position": (np.arange(total) - first).astype(np.int32),
            "series_length": np.repeat(lengths, lengths).astype(np.int32),
        })
        part["path"] = f"data/rsna/raw/stage_2_{split}/" + part["image_id"] + ".dcm"
        for name in SUBTYPES:
            part[name] = (rng.random(total) < 0.1).astype(np.float32) if split == "train" else np.float32(np.nan)
        part["fold"] = (rng.permutation(len(lengths)) % FOLDS)[series].astype(np.int8) if split == "train" else np.int8(-1)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)[INDEX_COLUMNS]


def prepare(folder: Path, settings: Settings) -> None:
    """A complete feature cache (arrays, checksums, config, index, pred kernel) in `folder`; fits the selections."""
    folder.mkdir(parents=True, exist_ok=True)
    index = bench_index(int(TRAIN_SLICES * settings.fraction), int(TEST_SLICES * settings.fraction), settings.seed)
    index.to_parquet(folder / "index.parquet", index=False)
    config = write_cache(folder, len(index), EMBEDDING_DIM)
    config.update(fold=0, fingerprint="bench" + "0" * 59, index_path="index.parquet",
                  index_sha256=file_sha256(folder / "index.parquet"))
    write_json(folder / "config.json", config)
    np.save(folder / "pred_kernel.npy", np.random.default_rng(settings.seed).normal(size=(EMBEDDING_DIM, 6)).astype(np.float32))
    features = load_features(folder)
    for selection in settings.selections:
        started = time.perf_counter()
        fitted_selection(features, selection)
        print(f"{selection}: fitted in {time.perf_counter() - started:.0f} s", flush=True)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_route_inputs(features, selection) -> np.ndarray:
    """Every row's inputs as one float32 array, as train_lstm.py built them before the stored file."""
    selected = selected_features(selection, features.embeddings)
    return np.concatenate([np.asarray(selected, np.float32), np.asarray(features.probabilities, np.float32)], axis=1)


def measure(folder: Path, route: str, selection_name: str, settings: Settings) -> dict:
    """One route on one selection, in this process: inputs, moments, timed batches, the validation pass."""
    result = {"route": route, "selection": selection_name}
    started = time.perf_counter()
    features = load_features(folder)
    selection = fitted_selection(features, selection_name)
    result["open_s"] = time.perf_counter() - started
    started = time.perf_counter()
    if route == "file":
        for path in inputs_paths(folder, selection_name):
            path.unlink(missing_ok=True)
        inputs = stored_inputs(features, selection)
    else:
        inputs = memory_route_inputs(features, selection)
    result["inputs_s"] = time.perf_counter() - started
    result["input_dim"] = int(inputs.shape[1])

    labels = label_array(features.index)
    train_rows, val_rows = fold_rows(features.index, 0)
    everything = np.arange(len(features.index))
    train = series_set(inputs, features.index, np.isin(everything, train_rows), labels)
    val = series_set(inputs, features.index, np.isin(everything, val_rows), labels)
    started = time.perf_counter()
    moments = input_moments(train)
    result["moments_s"] = time.perf_counter() - started

    keras.utils.set_random_seed(settings.seed)
    model = compile_lstm(build_lstm(inputs.shape[1], settings.layers, settings.units, moments=moments),
                         jit_compile=settings.jit)
    clock = BatchClock()
    batches = SeriesBatches(train, settings.batch_size, shuffle=True, seed=settings.seed)
    model.fit(batches.dataset().take(settings.batches), epochs=1, shuffle=False, verbose=0, callbacks=[clock])
    plan = plan_batches(train.lengths, settings.batch_size, shuffle=True, seed=settings.seed)[: settings.batches]
    timed_slices = sum(int(train.lengths[series].sum()) for series in plan[1:])
    result["train_s_per_slice"] = (clock.ends[-1] - clock.ends[0]) / timed_slices
    result["timed_slices"] = timed_slices
    result["train_slices"] = int(train.lengths.sum())
    if settings.padded:
        result["padded_s_per_slice"] = time_padded_batches(model, train, settings)

    started = time.perf_counter()
    predicted = predict_series(model, val, settings.batch_size)
    result["validation_s"] = time.perf_counter() - started
    result["validation_slices"] = int(val.lengths.sum())
    assert np.isfinite(predicted[val.rows]).all()
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


class BatchClock(keras.callbacks.Callback):
    """Records when every training batch ends."""

    def __init__(self):
        super().__init__()
        self.ends: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())


def time_padded_batches(model, data, settings: Settings) -> float:
    """Seconds per slice of training on random (unbucketed) batches padded to the longest series."""
    rng = np.random.default_rng(settings.seed + 1)
    longest = int(data.lengths.max())
    seconds, slices = 0.0, 0
    for number in range(settings.batches):
        series = rng.choice(len(data.lengths), settings.batch_size, replace=False)
        x, y = pad_batch(data, series)
        x = np.pad(x, ((0, 0), (0, longest - x.shape[1]), (0, 0)), constant_values=PAD_VALUE)
        y = np.pad(y, ((0, 0), (0, longest - y.shape[1]), (0, 0)))
        started = time.perf_counter()
        model.train_on_batch(x, y)
        if number:
            seconds += time.perf_counter() - started
            slices += int(data.lengths[series].sum())
    return seconds / slices


def room_for_memory_route(folder: Path, selection: str) -> bool:
    """Whether this machine has the memory the memory route needs (its inputs twice over as float32, and
    the embeddings' pages); says so when it does not."""
    config = json.loads((folder / "config.json").read_text())
    rows, dim = config["rows"], config["embedding_dim"]
    columns = dim if selection == "all" else int(selection.partition(":")[2])
    needed = 2 * rows * (columns + 6) * 4 + rows * dim * 2
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > 0.9 * available:
        print(f"memory {selection}: skipped, it needs about {needed / 2**30:.1f} GB and {available / 2**30:.1f} GB are free")
        return False
    return True


def run_child(folder: Path, route: str, selection: str, settings: Settings) -> dict:
    """`measure` in a fresh process (its own peak memory); returns its result."""
    command = [sys.executable, __file__, "--child", route, selection, "--cache", str(folder),
               "--settings", json.dumps(asdict(settings))]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise SystemExit(f"{route} {selection} failed:\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def report(results: list[dict], settings: Settings) -> None:
    """The table, the extrapolations and the bars."""
    full_epoch = TRAIN_SLICES * settings.fraction
    print(f"\n| selection | route | inputs built | moments | training slices/s (steady) | epoch of {full_epoch:,.0f} slices "
          f"(extrapolated) | validation pass ({results[0]['validation_slices']:,} slices, measured) | peak RSS |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        epoch_min = full_epoch * r["train_s_per_slice"] / 60
        print(f"| {r['selection']} ({r['input_dim']} inputs) | {r['route']} | {r['inputs_s']:.0f} s | {r['moments_s']:.1f} s | "
              f"{1 / r['train_s_per_slice']:,.0f} | {epoch_min:.1f} min | {r['validation_s']:.0f} s | "
              f"{r['peak_rss_bytes'] / 2**30:.2f} GB |")
    if settings.padded:
        for r in results:
            print(f"{r['route']} {r['selection']}: padded to the longest / bucketed time per slice "
                  f"{r['padded_s_per_slice'] / r['train_s_per_slice']:.2f}x")
    by = {(r["route"], r["selection"]): r for r in results}
    print()
    for selection in settings.selections:
        memory, stored = by.get(("memory", selection)), by.get(("file", selection))
        if memory and stored:
            print(f"{selection}: file / memory time per training slice {stored['train_s_per_slice'] / memory['train_s_per_slice']:.2f}x, "
                  f"peak memory {stored['peak_rss_bytes'] / 2**30:.2f} GB against {memory['peak_rss_bytes'] / 2**30:.2f} GB")
    if settings.fraction == 1.0:
        for selection in settings.selections:
            stored = by.get(("file", selection))
            if stored:
                verdict = "meets" if stored["peak_rss_bytes"] <= MEMORY_BAR_BYTES else "MISSES"
                print(f"bar, {selection}, file route peak memory <= {MEMORY_BAR_BYTES / 2**30:.0f} GB: {verdict}")
        memory, stored = by.get(("memory", "pca:120")), by.get(("file", "pca:120"))
        if memory and stored:
            epoch_s = full_epoch * stored["train_s_per_slice"]
            verdict = "meets" if stored["train_s_per_slice"] <= memory["train_s_per_slice"] * 1.05 else "MISSES"
            print(f"bar, pca:120 file route epoch no slower than the memory route in this run (5% noise allowed): {verdict}; "
                  f"{epoch_s / 60:.1f} min against the {RECORDED_EPOCH_S / 60:.1f} min recorded before")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", type=Path, help="write the feature cache here, fit the selections, stop")
    parser.add_argument("--cache", type=Path, help="a cache written by --prepare (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the rows")
    parser.add_argument("--selection", action="append", help="repeatable; default pca:120 and all")
    parser.add_argument("--route", action="append", choices=ROUTES, help="repeatable; default both")
    parser.add_argument("--batches", type=int, default=Settings.batches)
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size)
    parser.add_argument("--jit", action="store_true", help="XLA-compile the training step")
    parser.add_argument("--padded", action="store_true", help="also time batches padded to the longest series")
    parser.add_argument("--child", nargs=2, metavar=("ROUTE", "SELECTION"), help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        settings = Settings(**{**json.loads(args.settings), "selections": tuple(json.loads(args.settings)["selections"])})
        print(json.dumps(measure(args.cache, *args.child, settings)))
        return []
    settings = Settings(fraction=0.1 if args.quick else 1.0, selections=tuple(args.selection or Settings.selections),
                        batch_size=args.batch_size, batches=args.batches, jit=args.jit, padded=args.padded)
    if args.prepare:
        prepare(args.prepare, settings)
        return []
    print(f"start: {load_description()}", flush=True)
    scratch = None if args.cache else Path(tempfile.mkdtemp(prefix="lstm-bench-"))
    folder = args.cache or scratch
    try:
        if scratch:
            prepare(folder, settings)
        results = []
        for selection in settings.selections:
            for route in args.route or ROUTES:
                if route == "memory" and not room_for_memory_route(folder, selection):
                    continue
                results.append(run_child(folder, route, selection, settings))
                print(f"{route} {selection}: done ({load_description()})", flush=True)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nmachine: {device_description()}")
    print(f"data: {TRAIN_SLICES * settings.fraction:,.0f} training slices (fold 0 validates) and "
          f"{TEST_SLICES * settings.fraction:,.0f} test slices, {EMBEDDING_DIM}-dim float16 embeddings; model "
          f"{settings.layers} x {settings.units} bidirectional, {settings.batch_size} series per batch, "
          f"{settings.batches} batches per process (the first untimed), jit {settings.jit}")
    report(results, settings)
    print(f"\nend: {load_description()}")
    return results


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
