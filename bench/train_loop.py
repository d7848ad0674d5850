"""Training steps per second of the kit's loop (`ihd.distributed.train_epochs`) against Keras' `Model.fit`.

    python bench/train_loop.py            # about 2 minutes on 2 cores
    python bench/train_loop.py --quick    # under a minute

Stage 1 trains through `train_epochs` on one machine as on several (Model.fit does not run under
MultiWorkerMirroredStrategy). This measures what the loop costs where `fit` would also do: one
process, the default strategy, two copies of the same compiled model (`ihd.cnn.build_cnn` +
`compile_cnn`) on the same batches of random HU held in memory, so only the steps are timed, not the
input pipeline. The epochs interleave: the loop trains one epoch, then `fit` one, and so on, so that
both sides of a pair meet the same load on a shared machine; the first pair (tracing) is left out,
and each figure is the median over the pairs. The bar: the loop at most 5% slower than `fit`.
"""

import argparse
import statistics
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
    pairs: int = 6  # interleaved (loop, fit) epoch pairs timed: shared CPUs vary from minute to minute
    quick: bool = False  # fewer steps and pairs, the tiny network only


def epoch_seconds(backbone: str, image_size: int, steps: int, batch_size: int, pairs: int) -> list[tuple[float, float]]:
    """(fit, loop) seconds of each of ``pairs`` interleaved epochs of ``steps`` batches, after one traced pair."""
    import keras
    import numpy as np
    import tensorflow as tf

    from ihd.cnn import build_cnn, compile_cnn
    from ihd.distributed import train_epochs

    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 1000, (steps * batch_size, image_size, image_size, 3)).astype(np.float32)
    labels = (rng.random((steps * batch_size, 6)) < 0.15).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((hu, labels)).batch(batch_size, drop_remainder=True).cache()
    models = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        models.append(build_cnn(backbone, image_size, "windows", weights=None))
        compile_cnn(models[-1], 1e-4, 2 * (pairs + 1) * steps, 0)
    fitted, looped = models
    seconds = {"fit": [], "loop": []}

    class Clock(keras.callbacks.Callback):
        def __init__(self, side):
            super().__init__()
            self.side = side

        def on_epoch_begin(self, epoch, logs=None):
            seconds[self.side].append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            seconds[self.side][-1] = time.perf_counter() - seconds[self.side][-1]

    class FitAnEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            fitted.fit(data, epochs=1, callbacks=[Clock("fit")], shuffle=False, verbose=0)

    train_epochs(looped, lambda context: data, steps, pairs + 1, 0, [Clock("loop"), FitAnEpoch()], verbose=0)
    return list(zip(seconds["fit"][1:], seconds["loop"][1:]))


def main(argv: list[str] | None = None) -> None:
    """Time both sides for each network and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--pairs", type=int, default=defaults.pairs)
    parser.add_argument("--quick", action="store_true")
    settings = Settings(**vars(parser.parse_args(argv)))
    if settings.quick:
        settings.models, settings.steps, settings.pairs = (("tiny", 64),), 10, 2
    run_header(argv, settings)
    print(f"device: {device_description()}")
    print(f"\n| network | {SIDES[0]}, steps/s | {SIDES[1]}, steps/s | loop / fit |\n|---|---:|---:|---:|")
    for backbone, image_size in settings.models:
        pairs = epoch_seconds(backbone, image_size, settings.steps, settings.batch_size, settings.pairs)
        fit_rate, loop_rate = (settings.steps / statistics.median(side) for side in zip(*pairs))
        ratio = statistics.median(fit / loop for fit, loop in pairs)
        print(f"| {backbone} {image_size}x{image_size}, batch {settings.batch_size} | {fit_rate:.2f} | {loop_rate:.2f} "
              f"| {ratio:.3f}x (bar: at least {1 - BAR:.2f}x) |")


if __name__ == "__main__":
    main()
