"""Slices per second of the CNN's training input alone, slice store to augmented batch: the augmentation
in the `tf.data` graph against the albumentations path it replaced, on one core and on two.

    python bench/input.py            # about 5 minutes on 2 cores
    python bench/input.py --quick    # under a minute

Both sides read the same 256x256 slice store (real RSNA slices, repeated) through
`ihd.inputs.StackReader` (one Python call reads and checks 64 rows' PNGs, TensorFlow decodes them),
shuffle, augment (flip, shift-scale-rotate, brightness/contrast in HU) and batch; the batches are
pulled and dropped, so only the input pipeline is timed. The baseline runs albumentations per
element inside `tf.numpy_function`, as the kit did before: one seeded `Compose` per tf.data thread,
reseeded per element, under the Python lock. Ours is `ihd.inputs.training_dataset`: parameters
drawn per element from stateless seeds, the affine resampled by `ihd.augment.resample_bilinear`
(compiled by XLA). A third line runs ours without augmentation (read, decode, three channels,
batch): the floor that augmentation adds to. Every measurement runs in a fresh process confined to
its cores (its affinity is set before TensorFlow starts, so TensorFlow sizes its thread pools to
them); rounds alternate the sides and the core counts, and each figure is the median of its rounds.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fixtures import store_of_real_slices  # noqa: E402
from bench.machine import cpu_description, load_description  # noqa: E402
from ihd.io import run_header  # noqa: E402

PER_CORE_BAR = 3.0  # ours against the baseline, one core
SCALING_BAR = 1.8  # ours, two cores against one
SIDES = ("albumentations in tf.numpy_function (baseline)", "TensorFlow ops in the graph (ihd.inputs)",
         "ihd.inputs without augmentation (read, decode, channels)")


@dataclass
class Settings:
    """What the benchmark measures."""

    slices: int = 512  # distinct slices in the store; the pipeline cycles through them
    batches: int = 60  # batches timed per measurement, after one warm-up batch
    batch_size: int = 32
    image_size: int = 256  # the store and model size of a real run
    rounds: int = 3  # alternating rounds; the median counts
    quick: bool = False  # fewer batches and rounds, for a smoke run


def baseline_dataset(index, store, rows, image_size: int, batch_size: int, seed: int):
    """The albumentations path: per-element augmentation in `tf.numpy_function`, then batching."""
    import albumentations as A
    import numpy as np
    import tensorflow as tf

    from ihd.augment import AIR_HU, Augmentation
    from ihd.inputs import StackReader
    from ihd.windows import RECIPES

    settings = Augmentation()
    local = threading.local()

    def brightness_contrast(image, **_):
        rng = np.random.default_rng(local.seed)
        if rng.uniform() >= settings.intensity_p:
            return image
        shift = rng.uniform(-settings.brightness_hu, settings.brightness_hu)
        factor = 1.0 + rng.uniform(-settings.contrast, settings.contrast)
        return ((image - settings.pivot_hu) * factor + settings.pivot_hu + shift).astype(np.float32)

    def augment(stack, element_seed):
        if not hasattr(local, "transform"):
            local.transform = A.Compose([
                A.HorizontalFlip(p=settings.flip_p),
                A.Affine(translate_percent=(-settings.shift_fraction, settings.shift_fraction),
                         scale=(1 - settings.scale_fraction, 1 + settings.scale_fraction),
                         rotate=(-settings.rotate_deg, settings.rotate_deg), fill=AIR_HU, p=settings.affine_p),
                A.Lambda(image=brightness_contrast),
            ])
        local.seed = int(element_seed) % 2**32
        local.transform.set_random_seed(local.seed)
        return np.ascontiguousarray(local.transform(image=stack)["image"], dtype=np.float32)

    reader = StackReader(index, store, RECIPES["windows"], image_size)
    data = tf.data.Dataset.from_tensor_slices(rows).shuffle(len(rows), seed=seed).repeat()
    data = reader.read_batches(tf.data.Dataset.zip(data, tf.data.Dataset.random(seed=seed)))

    def read(row, element_seed, pngs):
        stack = reader.expand(reader.decode_sources(pngs))
        out = tf.numpy_function(augment, [stack, element_seed], tf.float32, stateful=False)
        return tf.ensure_shape(out, stack.shape), tf.zeros(6)

    return data.map(read, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def measure(side: int, cores: list[int], store_root: str, settings: Settings) -> float:
    """Slices per second of one side's pipeline in this process, confined to ``cores``."""
    os.sched_setaffinity(0, cores)
    import numpy as np
    import pandas as pd
    import tensorflow as tf

    from ihd.inputs import training_dataset
    from ihd.labels import SUBTYPES
    from ihd.slices import SliceStore
    from ihd.windows import RECIPES

    store = SliceStore(store_root)
    image_ids = [f"ID_{n:09x}" for n in range(settings.slices)]
    index = pd.DataFrame({"image_id": image_ids, "series_id": image_ids, "position": 0})
    for subtype in SUBTYPES:
        index[subtype] = 0.0
    rows = np.arange(settings.slices)
    if side == 0:
        data = baseline_dataset(index, store, rows, settings.image_size, settings.batch_size, seed=0)
    else:
        data = training_dataset(index, store, RECIPES["windows"], rows, settings.image_size,
                                settings.batch_size, seed=0, augment=side == 1).repeat()
    batches = iter(data)
    next(batches)
    start = time.perf_counter()
    for _ in range(settings.batches):
        stacks, _ = next(batches)
    assert stacks.shape == (settings.batch_size, settings.image_size, settings.image_size, 3)
    del tf
    return settings.batches * settings.batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    """Time both sides on one core and on two and print a Markdown table with the bar verdicts."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    for name in ("slices", "batches", "batch_size", "image_size", "rounds"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    parser.add_argument("--quick", action="store_true")
    settings = Settings(**vars(parser.parse_args(argv)))
    if settings.quick:
        settings.batches, settings.rounds = 10, 1
    run_header(argv, settings)
    print(f"start: {load_description()}", flush=True)
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        raise SystemExit("bench/input.py compares one core with two: this process may use only one")
    core_sets = {1: available[:1], 2: available[:2]}

    context = multiprocessing.get_context("spawn")
    rates: dict[tuple[int, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        _, store = store_of_real_slices(Path(tmp), settings.slices, settings.image_size)
        for round_number in range(settings.rounds):
            order = [(side, cores) for cores in core_sets for side in range(len(SIDES))]
            if round_number % 2:
                order.reverse()
            for side, cores in order:
                with context.Pool(1) as pool:
                    rate = pool.apply(measure, (side, core_sets[cores], str(store.root), settings))
                rates.setdefault((side, cores), []).append(rate)
                print(f"round {round_number + 1}: {SIDES[side]}, {cores} core(s): {rate:.0f} slices/s", flush=True)

    median = {key: statistics.median(values) for key, values in rates.items()}
    print(f"\n### Training input, slice store to augmented batch: {settings.image_size}x{settings.image_size}, "
          f"3 channels, batch {settings.batch_size}, median of {settings.rounds} alternating rounds")
    print(f"\nCPU: {cpu_description()}; {load_description()}\n")
    print("| augmentation | 1 core, slices/s | 2 cores, slices/s | 2 cores / 1 |")
    print("|---|---:|---:|---:|")
    for side, name in enumerate(SIDES):
        print(f"| {name} | {median[side, 1]:.0f} | {median[side, 2]:.0f} | {median[side, 2] / median[side, 1]:.2f}x |")
    per_core = median[1, 1] / median[0, 1]
    scaling = median[1, 2] / median[1, 1]
    print(f"\nOne core, ours against the baseline: {per_core:.2f}x "
          f"({'meets' if per_core >= PER_CORE_BAR else 'misses'} the bar of {PER_CORE_BAR}x).")
    print(f"Ours, two cores against one: {scaling:.2f}x "
          f"({'meets' if scaling >= SCALING_BAR else 'misses'} the bar of {SCALING_BAR}x).")
    print(f"end: {load_description()}")


if __name__ == "__main__":
    main()
