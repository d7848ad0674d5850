"""Training under tf.distribute: the loop against Model.fit, TF_CONFIG, each machine's share of an epoch;
two CPU workers on loopback that resume a run and train one epoch to the same weights, refuse to train
different runs, and skip together a step that overflows on one; two replicas on one machine."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import train_cnn
from ihd.cnn import build_cnn, compile_cnn
from ihd.distributed import (
    _replica_sum_function,
    chief_value,
    cluster_size,
    pipeline_seed,
    pipeline_share,
    steps_per_epoch,
    train_epochs,
)
from ihd.inputs import channel_layout, fold_rows, inference_dataset, label_array
from ihd.io import read_json
from ihd.metrics import weighted_log_loss
from ihd.slices import SliceStore
from ihd.windows import parse_recipe

ROOT = Path(__file__).resolve().parents[1]


class EpochLosses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_epoch_end(self, epoch, logs=None):
        self.losses.append(logs["loss"])


def _trained_tiny(with_loop: bool, epochs: int):
    """A tiny CNN (with dropout) after ``epochs`` over 40 random 16x16 slices, shuffled, in 5 batches of 8."""
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(0)
    hu = rng.uniform(-100, 200, (40, 16, 16, 3)).astype(np.float32)
    labels = (rng.random((40, 6)) < 0.4).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((hu, labels)).shuffle(40, seed=3).batch(8, drop_remainder=True)
    model = build_cnn("tiny", 16, "windows", dropout=0.5)
    compile_cnn(model, learning_rate=3e-2, total_steps=10, warmup_steps=2)
    record = EpochLosses()
    if with_loop:
        train_epochs(model, lambda context: data, 5, epochs, 0, [record], verbose=0)
    else:
        model.fit(data, epochs=epochs, callbacks=[record], shuffle=False, verbose=0)
    return model, record.losses


def test_the_step_lays_out_source_batches_as_the_model_reads_them_and_refuses_them_left_as_sources():
    # A recipe whose three channels show two slices: batches of the two sources, laid out in the step,
    # must train exactly as batches laid out beforehand; left as sources they are refused by name.
    recipe = parse_recipe("0:40/80,0:80/200,1:40/80")
    sources = np.random.default_rng(0).uniform(-100, 200, (16, 16, 16, 2)).astype(np.float32)
    labels = (np.random.default_rng(1).random((16, 6)) < 0.4).astype(np.float32)

    def trained(hu, lay_out=tf.identity):
        keras.utils.set_random_seed(1)
        model = build_cnn("tiny", 16, recipe)
        compile_cnn(model, learning_rate=3e-2, total_steps=2, warmup_steps=0)
        data = tf.data.Dataset.from_tensor_slices((hu, labels)).batch(8)
        train_epochs(model, lambda context: data, 2, 1, 0, [], verbose=0, lay_out=lay_out)
        return model

    in_the_step = trained(sources, channel_layout(recipe))
    beforehand = trained(sources[..., [0, 0, 1]])
    for mine, expected in zip(in_the_step.weights, beforehand.weights):
        np.testing.assert_array_equal(mine.numpy(), expected.numpy(), err_msg=mine.path)
    with pytest.raises(ValueError, match="lay them out for the model"):
        trained(sources)


def test_an_epoch_of_the_loop_is_an_epoch_of_model_fit():
    # Same data, seed, dropout draws: the loop must step and log exactly as Keras' own fit does.
    looped, looped_losses = _trained_tiny(with_loop=True, epochs=1)
    fitted, fitted_losses = _trained_tiny(with_loop=False, epochs=1)
    assert looped_losses == fitted_losses
    for mine, keras_own in zip(looped.weights + looped.optimizer.variables,
                               fitted.weights + fitted.optimizer.variables):
        np.testing.assert_array_equal(mine.numpy(), keras_own.numpy(), err_msg=mine.path)
    assert int(looped.optimizer.iterations) == 5
    # a second epoch moves on (each epoch reshuffles), and a rerun repeats it exactly
    again, again_losses = _trained_tiny(with_loop=True, epochs=2)
    rerun, rerun_losses = _trained_tiny(with_loop=True, epochs=2)
    assert again_losses[0] == looped_losses[0] and again_losses == rerun_losses
    assert not np.array_equal(again.get_weights()[0], looped.get_weights()[0])
    np.testing.assert_array_equal(again.get_weights()[0], rerun.get_weights()[0])


@pytest.mark.parametrize("tf_config, size", [
    (None, 1),
    ("", 1),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}', 2),
    ('{"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "task": {"type": "chief", "index": 0}}', 3),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}', 1),
])
def test_cluster_size_counts_the_machines_tf_config_names(tf_config, size, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    if tf_config is not None:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    assert cluster_size() == size


@pytest.mark.parametrize("tf_config, message", [
    ("{worker: a:1}", "TF_CONFIG is not a cluster description"),
    ('{"cluster": {"worker": ["a:1"]}}', "TF_CONFIG is not a cluster description (KeyError: 'task')"),
    ('{"cluster": {"ps": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 0}}', "task types ['ps']"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}', "is not one of its cluster's"),
])
def test_a_tf_config_that_is_not_a_cluster_is_refused_by_name(tf_config, message, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ValueError, match=re.escape(message)):
        cluster_size()


def test_only_training_runs_across_machines(monkeypatch, capsys):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}')
    for flag in ("--extract-only", "--study-labels=derive"):
        with pytest.raises(SystemExit, match="run --extract-only and --study-labels on one machine"):
            train_cnn.main([flag])


class FakeStrategy:
    def __init__(self, replicas):
        self.num_replicas_in_sync = replicas


def test_an_epoch_is_whole_global_batches_split_evenly_over_replicas():
    assert steps_per_epoch(103, 8, FakeStrategy(1)) == 12
    assert steps_per_epoch(103, 8, FakeStrategy(4)) == 12
    with pytest.raises(ValueError, match="--batch-size 6 does not split evenly over 4 replicas.*multiple of 4"):
        steps_per_epoch(103, 6, FakeStrategy(4))
    with pytest.raises(ValueError, match="an epoch of 7 training slices cannot fill one batch of 8"):
        steps_per_epoch(7, 8, FakeStrategy(2))


def test_machines_share_an_epoch_without_overlap_and_every_one_can_take_the_same_steps():
    epoch_rows = np.concatenate([np.arange(50), np.arange(0, 50, 7)])  # positives repeated, as oversampled() leaves them
    for machines in (1, 2, 3, 4):
        contexts = [tf.distribute.InputContext(machines, m, 2 * machines) for m in range(machines)]
        shares = [pipeline_share(epoch_rows, context) for context in contexts]
        np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.sort(epoch_rows))
        steps = steps_per_epoch(len(epoch_rows), 4 * machines, FakeStrategy(2 * machines))
        replica_batch = contexts[0].get_per_replica_batch_size(4 * machines)
        assert all(len(share) >= steps * 2 * replica_batch for share in shares)  # 2 local replicas per machine
        assert len({pipeline_seed(5, context) for context in contexts}) == machines
    assert pipeline_seed(5, tf.distribute.InputContext()) == 5  # one machine: the run's own seed


def test_the_chief_value_is_shared_through_one_collective_traced_once():
    strategy = tf.distribute.get_strategy()
    values = [3, 2**59 + 1, 0, 7, 11, 13, 17]  # a 60-bit fingerprint, and more calls than a run makes
    assert [chief_value(strategy, value) for value in values] == values
    assert _replica_sum_function(strategy, True).experimental_get_tracing_count() == 1


# Runs train_cnn.main as one worker of a cluster (TF_CONFIG in the environment) and records, for the
# test, the rows its input pipeline was given and every weight and optimizer variable after training.
WORKER = """
import sys
import numpy as np
import train_cnn

out = sys.argv[1]
real_fit, real_dataset = train_cnn.fit_cnn, train_cnn.training_dataset

def recorded_fit(model, *args, **kwargs):
    real_fit(model, *args, **kwargs)
    np.savez(out + "-weights.npz", **{v.path: v.numpy() for v in model.weights + model.optimizer.variables})

def recorded_dataset(index, store, recipe, rows, *args, **kwargs):
    np.save(out + "-rows.npy", rows)
    return real_dataset(index, store, recipe, rows, *args, **kwargs)

train_cnn.fit_cnn, train_cnn.training_dataset = recorded_fit, recorded_dataset
train_cnn.main(sys.argv[2:])
"""


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _run_workers(script, worker_args, tmp_path, timeout_s=300):
    """Run ``script`` as one worker per entry of ``worker_args`` (its command-line arguments after the
    output prefix) on loopback; returns their output prefixes, exit codes and logs."""
    count = len(worker_args)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(count)]}
    workers = []
    for index in range(count):
        scratch = tmp_path / f"tmp{index}"
        scratch.mkdir()
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
               "TMPDIR": str(scratch), "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
               "PYTHONPATH": str(ROOT)}
        log = open(tmp_path / f"worker{index}.log", "w")
        command = [sys.executable, "-c", script, str(tmp_path / f"worker{index}"), *worker_args[index]]
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        workers.append((process, log))
    try:
        for process, _ in workers:
            process.wait(timeout=timeout_s)
    finally:
        for process, log in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    logs = [(tmp_path / f"worker{index}.log").read_text() for index in range(count)]
    return [tmp_path / f"worker{index}" for index in range(count)], [p.returncode for p, _ in workers], logs


def _tiny_flags(prepared_synthetic, tmp_path):
    return ["--dataset", prepared_synthetic.name, "--data-dir", str(prepared_synthetic.parent),
            "--models-dir", str(tmp_path / "models"), "--backbone", "tiny", "--weights", "none",
            "--image-size", "32", "--batch-size", "8", "--run", "tiny", "--no-extract"]


def test_two_cpu_workers_on_loopback_resume_a_run_and_train_an_epoch_to_the_same_weights(prepared_synthetic, tmp_path):
    flags = _tiny_flags(prepared_synthetic, tmp_path)
    run_dir = train_cnn.main([*flags, "--epochs", "1"])  # epoch 1 on this one machine
    first_epoch = pd.read_csv(run_dir / "history.csv")
    epoch_1 = {w.path: w.numpy() for w in keras.models.load_model(run_dir / "cnn.keras", compile=False).weights}

    # epoch 2 on two machines: the chief resumes from its run folder, the other worker has none
    outputs, codes, logs = _run_workers(WORKER, [[*flags, "--epochs", "2"]] * 2, tmp_path)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    chief, worker = (dict(np.load(f"{prefix}-weights.npz")) for prefix in outputs)

    # the same model and optimizer state on both, moved from epoch 1 by one epoch of steps
    assert chief.keys() == worker.keys() and len(chief) > 40
    for path in chief:
        np.testing.assert_array_equal(chief[path], worker[path], err_msg=path)
    index = pd.read_parquet(prepared_synthetic / "index.parquet")
    train_rows, val_rows = fold_rows(index, 0)
    steps = len(train_rows) // 8
    assert int(chief["adam/iteration"]) == 2 * steps
    assert all(np.abs(chief[path] - epoch_1[path]).max() > 1e-4 for path in epoch_1 if "/kernel" in path)
    assert any(np.abs(chief[path] - epoch_1[path]).max() > 1e-3 for path in epoch_1 if "moving_mean" in path)

    # each machine read its own half of the epoch
    shares = [np.load(f"{prefix}-rows.npy") for prefix in outputs]
    assert abs(len(shares[0]) - len(shares[1])) <= 1 and not set(shares[0]) & set(shares[1])
    np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.sort(train_rows))

    # both printed the same epoch line: the loss over both machines' slices, the whole validation set's score
    lines = [re.findall(r"^epoch 2: .*$", log, re.MULTILINE) for log in logs]
    assert len(lines[0]) == 1 and lines[0][0].removesuffix(" (best, saved)") == lines[1][0], lines
    assert "worker done" in logs[1] and "worker done" not in logs[0]

    # the chief's run folder holds both epochs; the worker wrote nothing there and left no scratch behind
    history = pd.read_csv(run_dir / "history.csv")
    assert history["epoch"].tolist() == [0, 1] and history.iloc[:1].equals(first_epoch)
    assert f"{history['loss'].iloc[1]:.4f}" in lines[0][0]
    config = read_json(run_dir / "config.json")
    assert config["machines"] == 2 and config["replicas"] == 2
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.json", "checkpoint", "cnn.keras", "config.json",
                                                        "history.csv", "tb"]
    assert [p.name for p in (run_dir / "checkpoint").iterdir()] == ["epoch-2"]
    assert f"{run_dir}: resuming at epoch 2 of 2" in logs[0]
    scratch = re.findall(rf"^({re.escape(str(tmp_path / 'tmp1'))}/ihd-worker-tiny-\w+): resuming at epoch 2 of 2$", logs[1],
                         re.MULTILINE)
    assert len(scratch) == 1 and not Path(scratch[0]).exists()

    # epoch 2's checkpoint is the chief's model, and scores on validation what history.csv says
    model = build_cnn("tiny", 32, "windows")
    compile_cnn(model, 1e-3, 10, 1)
    model.optimizer.build(model.trainable_variables)
    model.load_weights(run_dir / "checkpoint" / "epoch-2" / "training.weights.h5")
    restored = model.weights + model.optimizer.variables  # in the order the worker saved them
    assert len(restored) == len(chief)
    for variable, (path, value) in zip(restored, chief.items()):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=path)
    val_data = inference_dataset(index, SliceStore(prepared_synthetic / "slices"), parse_recipe("windows"), val_rows,
                                 32, 64)
    score = weighted_log_loss(label_array(index)[val_rows], model.predict(val_data, verbose=0))
    assert score == pytest.approx(history["val_weighted_log_loss"].iloc[1], rel=1e-5)


def test_machines_given_different_runs_all_refuse_to_train(prepared_synthetic, tmp_path):
    # another seed on one machine: it would shuffle and augment other batches than the chief expects
    flags = [*_tiny_flags(prepared_synthetic, tmp_path), "--epochs", "1"]
    _, codes, logs = _run_workers(WORKER, [flags, [*flags, "--seed", "1"]], tmp_path)
    assert codes[0] != 0 and codes[1] != 0, "\n".join(log[-3000:] for log in logs)
    for log, mine in zip(logs, ("match", "differ")):
        assert (f"differ from the chief's on 1 of 2 replicas (this machine's {mine}): run the same train_cnn.py "
                "command") in log
    assert not (tmp_path / "models").exists()


# One worker of a cluster training a tiny CNN under mixed float16 for one epoch of 4 steps (global
# batch 8) with ihd.distributed.train_epochs; worker 1's labels in its first batch are NaN, so on the
# first step only its gradients are not finite. Saves every weight and optimizer variable.
OVERFLOW_WORKER = """
import sys
import numpy as np
from ihd.distributed import distribution_strategy, train_epochs

strategy = distribution_strategy()
import keras
import tensorflow as tf
from ihd.cnn import build_cnn, compile_cnn

keras.mixed_precision.set_global_policy("mixed_float16")
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
hu = rng.uniform(-100, 200, (32, 16, 16, 3)).astype(np.float32)
labels = (rng.random((32, 6)) < 0.4).astype(np.float32)

def share(context):
    mine = slice(context.input_pipeline_id, None, context.num_input_pipelines)
    share_labels = labels[mine].copy()
    if context.input_pipeline_id == 1:
        share_labels[0] = np.nan
    return tf.data.Dataset.from_tensor_slices((hu[mine], share_labels)).batch(4)

with strategy.scope():
    model = build_cnn("tiny", 16, "windows")
    compile_cnn(model, 1e-2, 4, 0)
train_epochs(model, share, 4, 1, 0, [], verbose=0)
np.savez(sys.argv[1] + "-weights.npz", **{v.path: v.numpy() for v in model.weights + model.optimizer.variables})
"""


def test_a_step_whose_gradients_overflow_on_one_machine_is_skipped_on_every_machine(tmp_path):
    outputs, codes, logs = _run_workers(OVERFLOW_WORKER, [[], []], tmp_path, timeout_s=180)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    first, second = (dict(np.load(f"{prefix}-weights.npz")) for prefix in outputs)
    for path in first:
        np.testing.assert_array_equal(first[path], second[path], err_msg=path)
        assert np.isfinite(first[path]).all(), path
    scale = next(value for path, value in first.items() if path.endswith("loss_scale_optimizer/dynamic_scale"))
    assert scale == 2.0 ** 14  # halved once, from 2 ** 15
    assert first["adam/iteration"] == 3  # the step with the overflow was skipped, the other three applied


# One machine with two replicas (MirroredStrategy over two logical CPUs, as over two GPUs): one input
# pipeline feeds both, each step takes a batch of 4 for each replica. Saves every variable's values on
# both replicas, and the tiny CNN's weights before training.
TWO_REPLICAS = """
import sys
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
import keras
from ihd.cnn import build_cnn, compile_cnn
from ihd.distributed import train_epochs

keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
hu = rng.uniform(-100, 200, (32, 16, 16, 3)).astype(np.float32)
labels = (rng.random((32, 6)) < 0.4).astype(np.float32)
data = tf.data.Dataset.from_tensor_slices((hu, labels)).shuffle(32, seed=0)
with strategy.scope():
    model = build_cnn("tiny", 16, "windows")
    compile_cnn(model, 1e-2, 4, 0)
before = {v.path: v.numpy() for v in model.weights}
train_epochs(model, lambda context: data.batch(context.get_per_replica_batch_size(8)), 4, 1, 0, [], verbose=0)
replicas = {}
for v in model.weights + model.optimizer.variables:
    local = strategy.experimental_local_results(strategy.run(lambda: tf.identity(v)))
    replicas.update({f"{v.path}@{k}": value.numpy() for k, value in enumerate(local)})
np.savez(sys.argv[1] + "-replicas.npz", **replicas)
np.savez(sys.argv[1] + "-before.npz", **before)
"""


def test_two_replicas_of_one_machine_share_its_input_pipeline_and_keep_the_same_model(tmp_path):
    outputs, codes, logs = _run_workers(TWO_REPLICAS, [[]], tmp_path, timeout_s=180)
    assert codes == [0], logs[0][-3000:]
    replicas = dict(np.load(f"{outputs[0]}-replicas.npz"))
    before = dict(np.load(f"{outputs[0]}-before.npz"))
    paths = sorted({key.rsplit("@", 1)[0] for key in replicas})
    for path in paths:
        np.testing.assert_array_equal(replicas[f"{path}@0"], replicas[f"{path}@1"], err_msg=path)
    assert replicas["adam/iteration@0"] == 4  # 32 slices in global batches of 8, two replicas of 4
    assert all(np.abs(replicas[f"{path}@0"] - before[path]).max() > 1e-4 for path in before if "moving" in path)
