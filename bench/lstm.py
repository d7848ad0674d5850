"""One training epoch of the paper-sized series LSTM over cached features of real-data size, on the CPU.

    python bench/lstm.py                      # full size: 752,803 slices in about 21,000 series
    python bench/lstm.py --quick              # a tenth of the series
    python bench/lstm.py --batch-size 128 --jit

The features are random (float16, k=120 selected features plus six probabilities) and so are the
labels: the figures are about speed and memory, not learning. Bars: one epoch in at most 12
minutes and 4 GB peak memory (RSS). Beside it, the same model on batches that are not bucketed
by length but padded to the longest series, timed on a subset and extrapolated to the epoch.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import device_description
from ihd.labels import SUBTYPES
from ihd.sequence import PAD_VALUE, SeriesBatches, SeriesSet, build_lstm, compile_lstm, pad_batch, plan_batches

TRAIN_SLICES = 752_803
EPOCH_BAR_S = 12 * 60
MEMORY_BAR_BYTES = 4 * 2**30


@dataclass
class Settings:
    fraction: float = 1.0  # share of the real training set's series to run (1.0 = the bar's size)
    batch_size: int = 128  # series per batch, as train_lstm.py: 64 ran slower per slice, 512 needed 3.3 GB
    selected: int = 120  # the paper's pca:120
    layers: int = 3  # the paper's shape
    units: int = 256
    jit: bool = False  # XLA recompiles for every padded length; measured no faster per batch here
    padded_batches: int = 12  # batches timed for the padded-to-longest comparison
    seed: int = 0


def series_lengths(total_slices: int, rng: np.random.Generator) -> np.ndarray:
    """Series lengths between 24 and 60, skewed short like the real data, summing to `total_slices`."""
    lengths = np.rint(rng.triangular(24, 24, 61, size=total_slices // 24 + 1)).clip(24, 60).astype(np.int64)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), total_slices) + 1]
    lengths[-1] -= lengths.sum() - total_slices
    return lengths[lengths > 0]


def random_series(total_slices: int, selected: int, seed: int) -> SeriesSet:
    """Random float16 features (selected + 6 probabilities) and binary labels, as a SeriesSet."""
    rng = np.random.default_rng(seed)
    lengths = series_lengths(total_slices, rng)
    features = rng.standard_normal((total_slices, selected), dtype=np.float32).astype(np.float16)
    probabilities = rng.random((total_slices, len(SUBTYPES)), dtype=np.float32).astype(np.float16)
    inputs = np.concatenate([features, probabilities], axis=1)
    labels = (rng.random((total_slices, len(SUBTYPES))) < 0.1).astype(np.float32)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    return SeriesSet(inputs, starts, lengths, labels)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class BatchClock(keras.callbacks.Callback):
    """Records when every training batch ends."""

    def __init__(self):
        super().__init__()
        self.ends: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())


def steady_seconds_per_slice(clock: BatchClock, data: SeriesSet, settings: Settings) -> float:
    """Seconds per slice of the bucketed epoch after its first batch (which includes tracing)."""
    plan = plan_batches(data.lengths, settings.batch_size, shuffle=True, seed=settings.seed)
    slices = sum(int(data.lengths[series].sum()) for series in plan[1:])
    return (clock.ends[-1] - clock.ends[0]) / slices


def time_padded_batches(model, data: SeriesSet, settings: Settings) -> float:
    """Seconds per slice of training on random (unbucketed) batches padded to the longest series."""
    rng = np.random.default_rng(settings.seed + 1)
    longest = int(data.lengths.max())
    batches = [rng.choice(len(data.lengths), settings.batch_size, replace=False) for _ in range(settings.padded_batches + 1)]
    seconds, slices = 0.0, 0
    for number, series in enumerate(batches):
        x, y = pad_batch(data, series)
        x = np.pad(x, ((0, 0), (0, longest - x.shape[1]), (0, 0)), constant_values=PAD_VALUE)
        y = np.pad(y, ((0, 0), (0, longest - y.shape[1]), (0, 0)))
        started = time.perf_counter()
        model.train_on_batch(x, y)
        if number:
            seconds += time.perf_counter() - started
            slices += int(data.lengths[series].sum())
    return seconds / slices


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tenth of the series")
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size)
    parser.add_argument("--jit", action="store_true", help="XLA-compile the training step")
    args = parser.parse_args(argv)
    settings = Settings(fraction=0.1 if args.quick else 1.0, batch_size=args.batch_size, jit=args.jit)

    data = random_series(int(TRAIN_SLICES * settings.fraction), settings.selected, settings.seed)
    model = compile_lstm(
        build_lstm(data.inputs.shape[1], settings.layers, settings.units), jit_compile=settings.jit
    )
    batches = SeriesBatches(data, settings.batch_size, shuffle=True, seed=settings.seed)
    clock = BatchClock()
    started = time.perf_counter()
    model.fit(batches.dataset(), epochs=1, shuffle=False, verbose=0, callbacks=[clock])
    epoch_s = time.perf_counter() - started
    peak_bytes = peak_rss_bytes()

    bucketed_s_per_slice = steady_seconds_per_slice(clock, data, settings)
    padded_s_per_slice = time_padded_batches(model, data, settings)
    padded_epoch_s = epoch_s + (padded_s_per_slice - bucketed_s_per_slice) * len(data.inputs)
    full_scale = 1.0 / settings.fraction

    print(f"\nmachine: {device_description()}")
    print(f"data: {len(data.inputs):,} slices in {len(data.lengths):,} series of {data.lengths.min()} to "
          f"{data.lengths.max()}; model {settings.layers} x {settings.units} bidirectional, batch {settings.batch_size} series, jit {settings.jit}\n")
    print("| variant | epoch wall time | steady slices/s | full-size epoch | peak RSS |")
    print("|---|---|---|---|---|")
    print(f"| length-bucketed batches (measured) | {epoch_s:.0f} s | {1 / bucketed_s_per_slice:,.0f} | "
          f"{epoch_s * full_scale / 60:.1f} min | {peak_bytes / 2**30:.2f} GB |")
    print(f"| padded to longest (extrapolated from {settings.padded_batches} random batches) | {padded_epoch_s:.0f} s | "
          f"{1 / padded_s_per_slice:,.0f} | {padded_epoch_s * full_scale / 60:.1f} min | |")
    print(f"\npadded / bucketed time per slice: {padded_s_per_slice / bucketed_s_per_slice:.2f}x")
    if settings.fraction == 1.0:
        verdict = "meets" if epoch_s <= EPOCH_BAR_S and peak_bytes <= MEMORY_BAR_BYTES else "MISSES"
        print(f"bar (<= {EPOCH_BAR_S / 60:.0f} min, <= {MEMORY_BAR_BYTES / 2**30:.0f} GB): {verdict}")
    return {"epoch_s": epoch_s, "peak_bytes": peak_bytes, "padded_epoch_s": padded_epoch_s,
            "padded_ratio": padded_s_per_slice / bucketed_s_per_slice}


if __name__ == "__main__":
    main()
