"""Training on one machine or several: the strategy, each machine's share of an epoch, the loop, the chief.

Strategy. `distribution_strategy` returns `tf.distribute.MultiWorkerMirroredStrategy` when the
TF_CONFIG environment variable names several machines (a chief and/or workers), MirroredStrategy
when one machine sees several GPUs, else the default strategy. TensorFlow configures the collective
ops of several machines when that strategy is created, which must come before any TensorFlow op
runs in the process; creating it waits until every machine named in TF_CONFIG has started.

Batches. The batch size is global: one optimizer step reads that many slices, split evenly over all
replicas (every GPU, or the CPU, of every machine). An epoch's slices (positives repeated) are dealt
round-robin to the input pipelines, one per machine: machine m of M reads slices m, m + M, m + 2M, ...
of the epoch, shuffles its share every epoch with its own seed, and cuts it into per-replica
batches. Every machine takes the same number of steps, the epoch's slices divided by the global
batch (rounded down), so within an epoch no slice is read twice, and the fewer than one global
batch of slices left over (a different few each epoch, as the shares are reshuffled) wait for the
next epoch, as on one machine. With one machine and one replica this is the single-process
pipeline, batch for batch.

Step. Keras' own `Model.train_step` (forward pass, the compiled loss scaled for the replicas, loss
scaling under mixed precision, gradients summed over replicas by the optimizer) runs under
`strategy.run`, on each replica's batch as laid out there for the model (``lay_out``: a recipe's
channels from its distinct slices, `ihd.inputs.channel_layout`), XLA-compiled wherever `Model.fit`
would compile it. `Model.fit` itself does not run under MultiWorkerMirroredStrategy in Keras 3
(https://github.com/keras-team/keras/issues/20585), so
`train_epochs` is the loop for every strategy: it drives the callbacks `fit` would (the caller's,
a progress bar with rate and ETA, TensorBoard) with the same calls, and its logged loss is the mean
over every replica's slices, not one replica's.

Mixed float16 scales the loss with `ReplicaSyncedLossScaleOptimizer`, which skips a step on every
replica when any replica's gradients overflow.

BatchNormalization normalises with each replica's own batch statistics and each replica updates its
own moving statistics; at the end of every epoch the moving statistics are replaced by their mean
over replicas, so every replica, and whatever is saved, holds the same model.

Roles. The chief (TF_CONFIG's chief, or worker 0 without one) writes the run. Every other worker runs
the same code into a scratch folder deleted when it exits, because saving and validating take
part in collectives that every machine must join. When training resumes, the chief restores the
last committed epoch and `train_epochs` then sends its weights and optimizer state to every worker,
so no other machine needs a copy of the run folder. Before training, `check_same_on_every_machine`
compares a fingerprint of each machine's settings and dataset with the chief's, and stops every
machine when one differs.
"""

import atexit
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from ihd.fingerprint import fingerprint

TASK_TYPES = ("chief", "worker")  # the TF_CONFIG task types that train
TF_CONFIG_EXAMPLE = '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'


def cluster_size() -> int:
    """How many machines TF_CONFIG names (its chief and workers); 1 when TF_CONFIG is unset or empty."""
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return 1
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        task_type, task_index = task["type"], int(task["index"])
        sizes = {kind: len(cluster.get(kind, [])) for kind in TASK_TYPES}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"TF_CONFIG is not a cluster description ({type(error).__name__}: {error}): "
                         f"expected JSON such as {TF_CONFIG_EXAMPLE}") from error
    others = sorted(set(cluster) - set(TASK_TYPES))
    if others:
        raise ValueError(f"TF_CONFIG names task types {others}: training runs only on 'chief' and 'worker' tasks")
    if task_type not in TASK_TYPES or not 0 <= task_index < sizes[task_type]:
        raise ValueError(f"TF_CONFIG's task {task!r} is not one of its cluster's {sizes} tasks")
    return sum(sizes.values())


def distribution_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy for several machines in TF_CONFIG, MirroredStrategy for several GPUs, else the default."""
    if cluster_size() > 1:
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as error:
            if "program startup" not in str(error):
                raise
            raise RuntimeError("TF_CONFIG names several machines, but TensorFlow ran ops before the strategy was "
                               "created: call distribution_strategy() first in the process") from error
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run: always on one machine, only the chief's among several."""
    return strategy.extended.should_checkpoint


def worker_folder(folder: str | Path, strategy: tf.distribute.Strategy) -> Path:
    """``folder`` on the chief; on any other worker a new scratch folder, deleted when the process exits."""
    if is_chief(strategy):
        return Path(folder)
    scratch = Path(tempfile.mkdtemp(prefix=f"ihd-worker-{Path(folder).name}-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return scratch


def steps_per_epoch(epoch_size: int, batch_size: int, strategy: tf.distribute.Strategy) -> int:
    """Optimizer steps per epoch of ``epoch_size`` slices in global batches of ``batch_size``; refuses a
    batch that does not split evenly over the replicas, or that the epoch cannot fill once."""
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ValueError(f"--batch-size {batch_size} does not split evenly over {replicas} replicas "
                         f"(the GPUs or CPUs of every machine): use a multiple of {replicas}")
    if epoch_size < batch_size:
        raise ValueError(f"an epoch of {epoch_size} training slices cannot fill one batch of {batch_size}: "
                         "lower --batch-size")
    return epoch_size // batch_size


def pipeline_share(epoch_rows: np.ndarray, context: tf.distribute.InputContext) -> np.ndarray:
    """The rows of the epoch that this input pipeline (one per machine) reads: every M-th from its own."""
    return np.asarray(epoch_rows)[context.input_pipeline_id::context.num_input_pipelines]


def pipeline_seed(seed: int, context: tf.distribute.InputContext) -> int:
    """A shuffling and augmentation seed for this input pipeline: ``seed`` itself with one pipeline,
    distinct for each pipeline of a run."""
    return seed * context.num_input_pipelines + context.input_pipeline_id


def broadcast_from_chief(strategy: tf.distribute.Strategy, variables: list) -> None:
    """Set ``variables`` on every replica of every machine to their values on replica 0, the chief's first.

    A sum over replicas of the values on replica 0 and zeros elsewhere: exact, and a collective that
    every machine must join at the same point.
    """
    def replica_fn():
        context = tf.distribute.get_replica_context()
        source = tf.equal(context.replica_id_in_sync_group, 0)
        for variable in variables:  # one collective each: a batched one needs a single dtype
            mine = tf.where(source, variable, tf.zeros_like(variable))
            variable.assign(context.all_reduce(tf.distribute.ReduceOp.SUM, mine))

    tf.function(lambda: strategy.run(replica_fn))()


def replica_averager(strategy: tf.distribute.Strategy, variables: list) -> Callable[[], None]:
    """A function that sets ``variables`` (float32) on every replica to their mean over all replicas, in one
    batched collective."""
    def replica_fn():
        context = tf.distribute.get_replica_context()
        means = context.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(variable) for variable in variables])
        for variable, mean in zip(variables, means):
            variable.assign(mean)

    return tf.function(lambda: strategy.run(replica_fn))


def _replica_sum(strategy: tf.distribute.Strategy, value: int, chief_only: bool) -> int:
    """The sum over replicas of an int, ``value`` on each (or on replica 0 only, the chief's first, and 0
    elsewhere), on every machine: a collective that all must join at the same point."""
    result = _replica_sum_function(strategy, chief_only)(tf.constant(int(value), tf.int64))
    return int(strategy.experimental_local_results(result)[0])


@functools.lru_cache(maxsize=8)
def _replica_sum_function(strategy: tf.distribute.Strategy, chief_only: bool):
    """`_replica_sum`'s collective as a tf.function of the value, traced once per strategy and ``chief_only``."""
    def replica_fn(value):
        context = tf.distribute.get_replica_context()
        mine = tf.identity(value)  # this replica's copy, on its device: what the collective sums
        if chief_only:
            mine = tf.where(tf.equal(context.replica_id_in_sync_group, 0), mine, tf.zeros_like(mine))
        return context.all_reduce(tf.distribute.ReduceOp.SUM, mine)

    return tf.function(lambda value: strategy.run(replica_fn, args=(value,)))


def chief_value(strategy: tf.distribute.Strategy, value: int) -> int:
    """The chief's ``value`` of an int, on every machine (all must call this at the same point)."""
    return _replica_sum(strategy, value, chief_only=True)


def check_same_on_every_machine(strategy: tf.distribute.Strategy, inputs: dict) -> None:
    """Refuse, on every machine at once, a run whose ``inputs`` (the settings, the dataset's fingerprints)
    differ between machines: each would read other slices or take other steps than the chief's."""
    mine = int(fingerprint(inputs)[:15], 16)  # 60 bits: fits an int64
    differs = mine != chief_value(strategy, mine)
    differing = _replica_sum(strategy, int(differs), chief_only=False)
    if differing:
        raise ValueError(f"the machines were not given the same run: its settings or dataset differ from the chief's "
                         f"on {differing} of {strategy.num_replicas_in_sync} replicas (this machine's "
                         f"{'differ' if differs else 'match'}): run the same train_cnn.py command on copies of the "
                         "same prepared dataset on every machine")


@keras.saving.register_keras_serializable(package="ihd")
class ReplicaSyncedLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Keras' dynamic loss scaling for mixed float16, whose skip-or-apply decision every replica shares.

    Keras 3 decides from the gradients of one local replica, before they are summed over replicas:
    with several replicas, one machine could skip a step that another applies (their collectives no
    longer match), or a replica's non-finite gradients could be summed into everyone's weights. Here
    a step is skipped on every replica, and the scale halved, when any replica's gradients are not
    finite.
    """

    def check_finite(self, grads):
        """Whether the gradients of every replica are finite."""
        finite = super().check_finite(grads)
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return finite
        nonfinite = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(finite), tf.float32))
        return tf.equal(nonfinite, 0.0)


def moving_statistics(model: keras.Model) -> list:
    """The moving means and variances of the model's BatchNormalization layers (the model is flat)."""
    return [weight for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
            for weight in (layer.moving_mean, layer.moving_variance)]


def train_epochs(
    model: keras.Model,
    train_data: Callable[[tf.distribute.InputContext], tf.data.Dataset],
    steps: int,
    epochs: int,
    initial_epoch: int,
    callbacks: list[keras.callbacks.Callback],
    verbose: int,
    lay_out: Callable[[tf.Tensor], tf.Tensor] = tf.identity,
) -> None:
    """Train the compiled ``model`` from ``initial_epoch`` up to ``epochs`` under its own strategy.

    ``train_data(context)`` is one input pipeline's dataset of per-replica (inputs, labels) batches for
    one epoch (iterated once per epoch), holding at least ``steps`` of them per local replica; ``steps``
    is the number of optimizer steps per epoch, each on one global batch. ``lay_out`` turns a batch's
    inputs into the model's, inside the step, on each replica's own device (`ihd.inputs.channel_layout`
    lays out a recipe's channels there). The callbacks get what
    `Model.fit` gives them; ``verbose`` 1 adds the progress bar. After the callbacks' `on_train_begin`
    (where a resumed run restores its state) every worker takes the chief's weights and optimizer state.
    """
    strategy = model.distribute_strategy
    with strategy.scope():
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)

    def pipeline_data(context):
        local_replicas = context.num_replicas_in_sync // context.num_input_pipelines
        return train_data(context).take(steps * local_replicas)

    data = strategy.distribute_datasets_from_function(pipeline_data)

    def replica_step(inputs, labels):
        inputs = lay_out(inputs)
        expected = tf.TensorShape(model.inputs[0].shape)
        if not inputs.shape[1:].is_compatible_with(expected[1:]):
            raise ValueError(f"training batches of shape {inputs.shape[1:]} do not fit {model.name}'s input "
                             f"{expected[1:]}: lay them out for the model (see ihd.inputs.channel_layout)")
        return model.train_step((inputs, labels))

    @tf.function(jit_compile=model.jit_compile, autograph=False)  # as Model.fit: Keras' code traced as written
    def step_on_batch(batch):
        strategy.run(replica_step, args=batch)
        return model.get_metrics_result()  # read across replicas: means over every replica's slices

    @tf.function(autograph=False)
    def step(batches):
        return step_on_batch(next(batches))

    callback_list = keras.callbacks.CallbackList(callbacks, add_progbar=verbose != 0, model=model, verbose=verbose,
                                                 epochs=epochs, steps=steps)
    callback_list.on_train_begin()
    broadcast_from_chief(strategy, model.weights + model.optimizer.variables)
    average_moving_statistics = replica_averager(strategy, moving_statistics(model))
    epoch_logs = None
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        batches = iter(data)
        for batch in range(steps):
            callback_list.on_train_batch_begin(batch)
            logs = step(batches)
            callback_list.on_train_batch_end(batch, logs)
        average_moving_statistics()
        epoch_logs = {name: float(value) for name, value in logs.items()}
        callback_list.on_epoch_end(epoch, epoch_logs)
    callback_list.on_train_end(logs=epoch_logs)
