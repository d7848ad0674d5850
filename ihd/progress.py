"""Progress within a training epoch, on a terminal and in a log file alike.

A terminal gets Keras' progress bar. Output that is not a terminal (a log file, a batch job's
output) would get one line per epoch, and an epoch of stage 1 on the real data runs for hours on a
GPU; there ``ProgressLines`` writes a line every ``LOG_INTERVAL_SECONDS`` with the step, the rate,
the time the epoch has left and the running loss.
"""
from __future__ import annotations

import sys
import time

import keras

LOG_INTERVAL_SECONDS = 60.0


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class ProgressLines(keras.callbacks.Callback):
    """A line every ``interval`` seconds within each epoch: step of steps, steps per second, time left, loss."""

    def __init__(self, interval: float = LOG_INTERVAL_SECONDS, stream=None):
        super().__init__()
        self.interval, self.stream = interval, stream
        self.epoch, self.started, self.last = 0, 0.0, 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.started = epoch, time.monotonic()
        self.last = self.started

    def on_train_batch_end(self, batch, logs=None):
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        done, steps = batch + 1, self.params.get("steps")
        rate = done / max(now - self.started, 1e-9)
        line = f"epoch {self.epoch + 1}: step {done:,}"
        if steps:
            line += f"/{steps:,} ({done / steps:.0%}), {rate:.1f} steps/s, {_duration((steps - done) / rate)} left"
        else:
            line += f", {rate:.1f} steps/s"
        if logs and "loss" in logs:
            line += f", loss {float(logs['loss']):.4f}"
        print(line, file=self.stream or sys.stdout, flush=True)


def epoch_progress(show: bool = True) -> tuple[int, list[keras.callbacks.Callback]]:
    """The ``verbose`` and extra callbacks of a training run: Keras' bar on a terminal, ``ProgressLines``
    elsewhere; nothing where ``show`` is False (a worker that is not the chief)."""
    if not show:
        return 0, []
    return (1, []) if sys.stdout.isatty() else (0, [ProgressLines()])
