"""Slices per second of the CNN's training input alone, slice store to augmented batch: the store's own
PNG decoder, the augmentation in the `tf.data` graph and batches of distinct sources against the path
they replaced (TensorFlow's PNG decoder, albumentations, batches of three channels), on one core and
on two; and, beside them, the input of feature extraction.

    python bench/input.py            # about 7 minutes on 2 cores
    python bench/input.py --quick    # under a minute

Every side reads the same 256x256 slice store (real RSNA slices, repeated), 64 rows per Python
call; the training sides shuffle, augment (flip, shift-scale-rotate, brightness/contrast in HU) and
batch. The batches are pulled and dropped, so only the input pipeline is timed. The baseline is
the path the kit had before: the checked PNG bytes of 64 rows per Python call, each decoded by
TensorFlow's ``decode_png``, then albumentations per element inside `tf.numpy_function`: one seeded
`Compose` per tf.data thread, reseeded per element, under the Python lock, on the recipe's three
channels (laid out per element by `StackReader.expand`, as inference still does), batched as three
channels. The second line is the same with the store's own decoder (`SliceStore.tf_read_rows`:
64 rows read, inflated and unfiltered per Python call, the words made HU per slice in the graph). Ours is `ihd.inputs.training_dataset`: the store's
decoder, parameters drawn per element from stateless seeds, the affine resampled by
`ihd.augment.resample_bilinear` (compiled by XLA), batched as the recipe's one distinct source (the
training step lays out the three channels on the device that trains, `ihd.inputs.channel_layout`,
which is not timed here). The next line is ours with TensorFlow's intra-op pool cut to one thread,
as `train_cnn.py` sets it on a GPU machine (`ihd.inputs.limit_intra_op_threads_on_gpu`); a CPU-only
run keeps the pool for its model, as the line above does. The next runs ours without augmentation
(read, decode, batch): the floor that augmentation adds to. The last line is not training's: the
input of feature extraction and validation (`ihd.inputs.inference_dataset`: rows in order, no
augmentation, three channels laid out in tf.data), with a GPU machine's threads. Every measurement
runs in a fresh process confined to its cores (its affinity is set before TensorFlow starts, so
TensorFlow sizes its thread pools to them); rounds alternate the sides and the core counts, and
each figure is the median of its rounds.
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
SIDES = ("albumentations in tf.numpy_function, PNGs decoded by TensorFlow (baseline: the path before)",
         "albumentations in tf.numpy_function, PNGs decoded by the store",
         "ihd.inputs: the store's decoder, augmentation in the graph (ours)",
         "ours, TensorFlow's threads as train_cnn.py sets them on a GPU machine (one intra-op thread)",
         "ihd.inputs without augmentation (read, decode, batch)",
         "ihd.inputs.inference_dataset: extraction's input (read, decode, three channels, batch, in order)")
BASELINE, OURS, OURS_ON_GPU_MACHINE, FLOOR, INFERENCE = 0, 2, 3, 4, 5


@dataclass
class Settings:
    """What the benchmark measures."""

    slices: int = 512  # distinct slices in the store; the pipeline cycles through them
    batches: int = 60  # batches timed per measurement, after one warm-up batch
    batch_size: int = 32
    image_size: int = 256  # the store and model size of a real run
    rounds: int = 3  # alternating rounds; the median counts
    quick: bool = False  # fewer batches and rounds, for a smoke run


def tensorflow_png_reader(reader):
    """The read path the kit had before the store decoded its own PNGs, as (read, decode): ``read`` maps
    a batch of row numbers to the checked PNG bytes of their sources (one Python call, tf.string
    (B, S)), ``decode`` one row's PNG bytes to HU (size, size, S) with TensorFlow's ``decode_png``."""
    import tensorflow as tf

    from bench.fixtures import tf_decode_png_hu, tf_read_png_bytes

    def read(rows):
        return tf_read_png_bytes(reader.store, tf.gather(reader.slots, tf.gather(reader.neighbours, rows)))

    def decode(pngs):
        stack = tf.stack([tf_decode_png_hu(pngs[s]) for s in range(reader.neighbours.shape[1])], axis=-1)
        return tf.ensure_shape(stack, (reader.store.size, reader.store.size, reader.neighbours.shape[1]))

    return read, decode


def baseline_dataset(index, store, rows, image_size: int, batch_size: int, seed: int, store_decoder: bool):
    """The albumentations path: per-element augmentation of three channels in `tf.numpy_function`, then
    batching; the slices decoded by TensorFlow as before (or by the store's own decoder, ``store_decoder``)."""
    import albumentations as A
    import numpy as np
    import tensorflow as tf

    from ihd.augment import AIR_HU, Augmentation
    from ihd.inputs import READ_BATCH, StackReader
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
    data = tf.data.Dataset.zip(data, tf.data.Dataset.random(seed=seed))
    read, decode = (reader.read_sources, reader.decode_sources) if store_decoder else tensorflow_png_reader(reader)
    data = data.batch(READ_BATCH).map(lambda rows, seeds: (rows, seeds, read(rows)),
                                      num_parallel_calls=tf.data.AUTOTUNE).unbatch()

    def augmented(row, element_seed, read_out):
        stack = reader.expand(decode(read_out))
        out = tf.numpy_function(augment, [stack, element_seed], tf.float32, stateful=False)
        return tf.ensure_shape(out, stack.shape), tf.zeros(6)

    return data.map(augmented, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def measure(side: int, cores: list[int], store_root: str, settings: Settings) -> float:
    """Slices per second of one side's pipeline in this process, confined to ``cores``."""
    os.sched_setaffinity(0, cores)
    import numpy as np
    import pandas as pd
    import tensorflow as tf

    from ihd.inputs import inference_dataset, limit_intra_op_threads_on_gpu, training_dataset
    from ihd.labels import SUBTYPES
    from ihd.slices import SliceStore
    from ihd.windows import RECIPES

    store = SliceStore(store_root)
    image_ids = [f"ID_{n:09x}" for n in range(settings.slices)]
    index = pd.DataFrame({"image_id": image_ids, "series_id": image_ids, "position": 0})
    for subtype in SUBTYPES:
        index[subtype] = 0.0
    rows = np.arange(settings.slices)
    limit_intra_op_threads_on_gpu(on_gpu=side in (OURS_ON_GPU_MACHINE, INFERENCE))
    if side < OURS:
        data = baseline_dataset(index, store, rows, settings.image_size, settings.batch_size, seed=0,
                                store_decoder=side == 1)
    elif side == INFERENCE:
        data = inference_dataset(index, store, RECIPES["windows"], rows, settings.image_size,
                                 settings.batch_size).repeat()
    else:
        data = training_dataset(index, store, RECIPES["windows"], rows, settings.image_size,
                                settings.batch_size, seed=0, augment=side != FLOOR).repeat()
    batches = iter(data)
    next(batches)
    start = time.perf_counter()
    for _ in range(settings.batches):
        stacks = next(batches)
    if side != INFERENCE:
        stacks, _ = stacks
    channels = 3 if side in (BASELINE, 1, INFERENCE) else len(RECIPES["windows"].sources)
    assert stacks.shape == (settings.batch_size, settings.image_size, settings.image_size, channels)
    del tf
    return settings.batches * settings.batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    """Time every side on one core and on two and print a Markdown table with the bar verdicts."""
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
          f"the windows recipe, batch {settings.batch_size}, median of {settings.rounds} alternating rounds")
    print(f"\nCPU: {cpu_description()}; {load_description()}\n")
    print("| pipeline | 1 core, slices/s | 2 cores, slices/s | 2 cores / 1 |")
    print("|---|---:|---:|---:|")
    for side, name in enumerate(SIDES):
        print(f"| {name} | {median[side, 1]:.0f} | {median[side, 2]:.0f} | {median[side, 2] / median[side, 1]:.2f}x |")
    per_core = median[OURS, 1] / median[BASELINE, 1]
    print(f"\nOne core, ours against the baseline: {per_core:.2f}x "
          f"({'meets' if per_core >= PER_CORE_BAR else 'misses'} the bar of {PER_CORE_BAR}x).")
    for side in (OURS, OURS_ON_GPU_MACHINE):
        scaling = median[side, 2] / median[side, 1]
        print(f"{SIDES[side]}, two cores against one: {scaling:.2f}x "
              f"({'meets' if scaling >= SCALING_BAR else 'misses'} the bar of {SCALING_BAR}x).")
    print(f"end: {load_description()}")


if __name__ == "__main__":
    main()
