"""Training steps per second of the kit's loop (`ihd.distributed.train_epochs`) against Keras' `Model.fit`.

    python bench/train_loop.py            # about 4 minutes on 2 cores
    python bench/train_loop.py --quick    # about a minute

Stage 1 trains through `train_epochs` on one machine as on several (Model.fit does not run under
MultiWorkerMirroredStrategy). This measures what the loop costs where `fit` would also do: the
default strategy, the same compiled model (`ihd.cnn.build_cnn` + `compile_cnn`) on the same batches
of random HU held in memory, so only the steps are timed, not the input pipeline. Every measurement
is a fresh process (one side's leftovers, such as the iterator `fit` opens for an epoch it never
runs, must not slow the other): one untimed epoch that traces the step, then timed epochs, the
fastest kept. Rounds alternate the sides; each figure is the median of its rounds. The bar: the
loop at most 5% slower than `fit`.
"""

import argparse
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import device_description  # noqa: E402
from ihd.io import run_header  # noqa: E402

BAR = 0.05
SIDES = ("Model.fit (baseline)", "ihd.distributed.train_epochs")


@dataclass
class Settings:
    """What the benchmark measures."""

    models: tuple = (("tiny", 64), ("MobileNetV2", 64))  # (backbone, image size): a small and a paper-sized network
    steps: int = 24  # steps per timed epoch
    batch_size: int = 32
    epochs: int = 2  # timed epochs per measurement, the fastest kept
    rounds: int = 3  # alternating rounds, the median kept: shared CPUs vary from minute to minute
    quick: bool = False  # fewer steps, one round, the tiny network only


def epoch_seconds(side: str, backbone: str, image_size: int, steps: int, batch_size: int, epochs: int) -> float:
    """Seconds of the fastest of ``epochs`` epochs of ``steps`` batches on ``side``, after one traced epoch."""
    import keras
    import numpy as np
    import tensorflow as tf

    from ihd.cnn import build_cnn, compile_cnn
    from ihd.distributed import train_epochs

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 1000, (steps * batch_size, image_size, image_size, 3)).astype(np.float32)
    labels = (rng.random((steps * batch_size, 6)) < 0.15).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((hu, labels)).batch(batch_size, drop_remainder=True).cache()
    model = build_cnn(backbone, image_size, "windows", weights=None)
    compile_cnn(model, 1e-4, (epochs + 1) * steps, 0)
    seconds = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seconds.append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            seconds[-1] = time.perf_counter() - seconds[-1]

    if side == SIDES[1]:
        train_epochs(model, lambda context: data, steps, epochs + 1, 0, [Clock()], verbose=0)
    else:
        model.fit(data, epochs=epochs + 1, callbacks=[Clock()], shuffle=False, verbose=0)
    return min(seconds[1:])


def measured(side: str, backbone: str, image_size: int, settings) -> float:
    """``epoch_seconds`` in a fresh process."""
    command = [sys.executable, __file__, "--child", side, backbone, str(image_size), "--steps", str(settings.steps),
               "--batch-size", str(settings.batch_size), "--epochs", str(settings.epochs)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """Time both sides for each network and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "BACKBONE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        side, backbone, image_size = args.child
        print(epoch_seconds(side, backbone, int(image_size), args.steps, args.batch_size, args.epochs))
        return
    del args.child
    settings = Settings(**vars(args))
    if settings.quick:
        settings.models, settings.steps, settings.rounds = (("tiny", 64),), 10, 1
    run_header(argv, settings)
    print(f"device: {device_description()}", flush=True)
    rows = []
    for backbone, image_size in settings.models:
        seconds = {side: [] for side in SIDES}
        for _ in range(settings.rounds):
            for side in SIDES:
                seconds[side].append(measured(side, backbone, image_size, settings))
        for side, values in seconds.items():
            print(f"{backbone} {image_size}: {side}: epoch seconds by round {[round(v, 3) for v in values]}", flush=True)
        rows.append((backbone, image_size, {side: statistics.median(values) for side, values in seconds.items()}))
    print(f"\n| network | {SIDES[0]}, steps/s | {SIDES[1]}, steps/s | loop / fit |\n|---|---:|---:|---:|")
    for backbone, image_size, median in rows:
        fit_rate, loop_rate = (settings.steps / median[side] for side in SIDES)
        print(f"| {backbone} {image_size}x{image_size}, batch {settings.batch_size} | {fit_rate:.2f} | {loop_rate:.2f} "
              f"| {loop_rate / fit_rate:.3f}x (bar: at least {1 - BAR:.2f}x) |")


if __name__ == "__main__":
    main()
