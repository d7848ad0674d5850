"""ihd.progress: the lines a training run writes within an epoch when its output is not a terminal."""
import io

import keras
import numpy as np
import tensorflow as tf

from ihd.progress import ProgressLines, epoch_progress


def test_a_line_per_interval_with_step_rate_time_left_and_loss():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    stream = io.StringIO()
    model.fit(np.ones((10, 3)), np.zeros(10), batch_size=2, epochs=2, verbose=0,
              callbacks=[ProgressLines(interval=0, stream=stream)])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("epoch 1: step 1/5 (20%), ") and lines[-1].startswith("epoch 2: step 5/5 (100%), ")
    assert "steps/s" in lines[0] and "left" in lines[0] and "loss " in lines[0]
    assert lines[-1].split(", ")[2] == "0m00s left"


def test_quiet_between_intervals_and_with_tensor_logs():
    lines = ProgressLines(interval=3600, stream=io.StringIO())
    lines.set_params({"steps": 4})
    lines.on_epoch_begin(0)
    lines.on_train_batch_end(0, {"loss": tf.constant(0.25)})
    assert lines.stream.getvalue() == ""
    lines.interval = 0
    lines.on_train_batch_end(1, {"loss": tf.constant(0.25)})
    assert lines.stream.getvalue().startswith("epoch 1: step 2/4 (50%)") and "loss 0.2500" in lines.stream.getvalue()


def test_a_terminal_gets_the_bar_a_file_the_lines_a_worker_nothing(monkeypatch):
    monkeypatch.setattr("sys.stdout", io.StringIO())
    verbose, callbacks = epoch_progress()
    assert verbose == 0 and isinstance(callbacks[0], ProgressLines)
    assert epoch_progress(show=False) == (0, [])
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert epoch_progress() == (1, [])
