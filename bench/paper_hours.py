"""Hours the paper's chain (`make paper`: every stage with --preset paper) should take on one GPU, worked out
on paper from what its units of work cost on this CPU and from published GPU throughputs.

    python bench/paper_hours.py --lock /tmp/ihd-cpu.lock     # a few minutes on 2 cores, under 2 of them timed alone
    python bench/paper_hours.py --quick                      # fewer steps, for a smoke run
    python bench/paper_hours.py --cores 16 --download-mb-s 100 --disk-mb-s 1000

Measured here, on the kit's own code: the paper's CNN (ResNeXt-101 32x8d at 256x256, `ihd.cnn.build_cnn`,
compiled as `--preset paper` compiles it) for a few training steps and inference batches after a warm-up;
its multiply-adds, counted from its layers; the paper's LSTM (3 bidirectional layers of 256, the paper's
head, 126 inputs) for training steps of one series, and a model of no size on the same loop (the fixed
cost of a step, which stays on the host when a GPU computes); the PCA fit on 32,000 rows of 2,048 and
the transform of every row; unpacking a zip of real RSNA files as `prepare_data.py --download` does.
Taken from BENCHMARKS.md: the preparation, input pipeline and cache-check rates. Published: training
and inference throughputs of ResNeXt-101 on A100 and H100 GPUs (sources in PUBLISHED). Assumed, and
said so in the output: the download bandwidth, the disk's read rate, the core count of the GPU machine
and the latency of one recurrent step of a batch-1 LSTM on a GPU.

Every GPU figure this prints is an estimate, not a measurement. With --lock PATH the setup and warm-ups
hold a shared lock on PATH and only the timed part an exclusive one.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import statistics
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.fixtures import REAL_SLICES  # noqa: E402
from bench.lstm import TRAIN_SLICES, BatchClock, series_lengths  # noqa: E402
from bench.machine import cpu_description, load_description  # noqa: E402
from ihd.presets import stage_values  # noqa: E402

# The challenge's data. The series count is about that of Kaggle's stage-2 training set; the index counts
# them exactly, and the figures below move by under 0.3% if it is 40 off.
TEST_SLICES = 121_232
ALL_SLICES = TRAIN_SLICES + TEST_SLICES  # 874,035
TRAIN_SERIES = 21_744
TEST_SERIES = 3_518
REAL_SERIES = (REAL_SLICES, REAL_SLICES.parent / "rsna_series")  # uncompressed real RSNA files, as Kaggle ships them

PAPER = {stage: stage_values("paper", stage) for stage in ("prepare", "cnn", "lstm")}
EMBEDDING_WIDTH = 2048  # ResNeXt-101's pooled output
LSTM_INPUTS = 120 + 6  # pca:120 and the CNN's six probabilities


@dataclass(frozen=True)
class Published:
    """A published figure, what it measured and where it is written."""

    value: float
    what: str
    source: str


NVIDIA_TF = ("https://github.com/NVIDIA/DeepLearningExamples/blob/06298be8c3ef5b5aba94ced1f8aff980c4c7ae73/"
             "TensorFlow/Classification/ConvNets/resnext101-32x4d/README.md")
NVIDIA_PT = ("https://github.com/NVIDIA/DeepLearningExamples/blob/48dc9adacd401a3f414400bee061dc9e0fc86b3f/"
             "PyTorch/Classification/ConvNets/resnext101-32x4d/README.md")
TIMM = "https://github.com/huggingface/pytorch-image-models/blob/aa4b5850c1543fa488abf260f18390eda46cf85d/results/"
LAMBDA = ("https://github.com/lambdal/deeplearning-benchmark/blob/0551cb70ffdc155dc4cb2c10dddebb65651c3883/"
          "pytorch/pytorch-train-throughput-fp16.csv")
APPIAN42 = "https://github.com/appian42/kaggle-rsna-intracranial-hemorrhage/blob/master/README.md"

PUBLISHED = {
    "a100_train": Published(1132, "ResNeXt-101 32x4d training, img/s at 224x224: TensorFlow, 1x A100 40GB, mixed "
                            "precision + XLA, batch 256 (NVIDIA DeepLearningExamples)", NVIDIA_TF),
    "a100_infer": Published(2138.11, "ResNeXt-101 32x4d inference, img/s at 224x224: TensorFlow, 1x A100 40GB, "
                            "mixed precision, batch 64 (NVIDIA DeepLearningExamples)", NVIDIA_TF),
    "a100_train_pytorch": Published(1211, "ResNeXt-101 32x4d training, img/s at 224x224: PyTorch, 1x A100 80GB, "
                                    "mixed precision (NVIDIA DeepLearningExamples; a cross-check)", NVIDIA_PT),
    "train_32x8d_same_gpu": Published(312.8, "ResNeXt-101 32x8d training, img/s at 224x224: PyTorch AMP, "
                                      "channels-last, RTX 3090 (timm)", TIMM + "benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv"),
    "train_32x4d_same_gpu": Published(609.01, "ResNeXt-101 32x4d training, the same run",
                                      TIMM + "benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv"),
    "infer_32x8d_same_gpu": Published(1792.69, "ResNeXt-101 32x8d inference, img/s at 224x224: PyTorch AMP, "
                                      "channels-last, RTX 4090 (timm)", TIMM + "benchmark-infer-amp-nhwc-pt240-cu124-rtx4090.csv"),
    "infer_32x4d_same_gpu": Published(2746.89, "ResNeXt-101 32x4d inference, the same run",
                                      TIMM + "benchmark-infer-amp-nhwc-pt240-cu124-rtx4090.csv"),
    "gmacs_32x8d_224": Published(16.48, "ResNeXt-101 32x8d multiply-adds at 224x224, G (timm)",
                                 TIMM + "benchmark-infer-amp-nhwc-pt240-cu124-rtx4090.csv"),
    "gmacs_32x4d_224": Published(8.01, "ResNeXt-101 32x4d multiply-adds at 224x224, G (timm)",
                                 TIMM + "benchmark-infer-amp-nhwc-pt240-cu124-rtx4090.csv"),
    "a100_resnet50": Published(1582, "ResNet-50 training, img/s: PyTorch fp16, 1x A100 80GB SXM4 (Lambda)", LAMBDA),
    "h100_resnet50": Published(2616, "ResNet-50 training, img/s: PyTorch fp16, 1x H100 80GB SXM5 (Lambda)", LAMBDA),
    "zip_gb": Published(180, "the competition's stage-2 zip, GB before unzipping (appian42's README)", APPIAN42),
}

# Figures measured earlier and recorded in BENCHMARKS.md (section named in each comment).
PREPARE_MS_PER_SLICE = 0.51  # Preprocessing: whole preparation, one process, glibc malloc defaults
# Training input: augmented batches, TensorFlow ops, one core, a GPU machine's threads
TRAIN_INPUT_SLICES_S_PER_CORE = 2519
READ_INPUT_SLICES_S_PER_CORE = 2749  # Training input: extraction's input (inference_dataset), one core
CACHE_CHECK_GB_S = 0.70  # Checking the feature cache: verified_rows over the memory-mapped cache
STORE_KB_PER_SLICE = 55.1  # Preprocessing: bytes per stored slice

# Assumed: one dependent recurrent time step of a batch-1 LSTM layer on a GPU (a small matrix product and
# the gate arithmetic, launched one after another). No published batch-1 cuDNN figure was found; a kernel
# launch alone takes a few microseconds.
GPU_RECURRENT_STEP_S = 10e-6
BACKWARD_OVER_FORWARD = 2  # a backward pass costs about twice the forward one


@dataclass
class Settings:
    """What the benchmark measures and what it assumes."""

    train_batch: int = 2  # slices per CPU training step: one slice takes about 20 s on 2 cores (see report)
    train_steps: int = 2  # timed after one warm-up step
    infer_batch: int = 8  # slices per CPU inference batch
    infer_batches: int = 3  # timed after one warm-up batch
    lstm_series: int = 60  # batch-1 LSTM steps timed, after a warm-up epoch of 8
    pca_rows: int = 32_000  # the paper's PCA sample (--selection-sample-rows of the preset)
    transform_rows: int = 65_536  # rows transformed to 120 components, timed and scaled to every row
    zip_copies: int = 4  # copies of the real files in the zip (about 30 MB each)
    cores: int = 16  # CPU cores of the GPU machine: preparation and the input pipeline
    download_mb_s: float = 100.0  # assumed sustained download from Kaggle
    disk_mb_s: float = 1000.0  # assumed read rate of the disk holding the DICOM files (an NVMe SSD)
    lock: str = ""  # lock file: shared while setting up, exclusive while timing
    quick: bool = False  # fewer steps, for a smoke run


class CpuLock:
    """A lock on a file, shared while setting up and exclusive while timing; nothing without a path."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666) if path else None

    def hold(self, mode: int) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, mode)

    @contextlib.contextmanager
    def exclusive(self):
        """Time alone, then go back to sharing; prints the load at both ends."""
        self.hold(fcntl.LOCK_EX)
        print(f"timing alone from here: {load_description()}", flush=True)
        started = time.perf_counter()
        try:
            yield
        finally:
            print(f"timing done after {time.perf_counter() - started:.0f} s: {load_description()}", flush=True)
            self.hold(fcntl.LOCK_SH)


def multiply_adds(model) -> int:
    """Multiply-adds of one forward pass of one image: every Conv2D (grouped ones included, the kernel
    holds in/groups channels) and Dense layer, output positions times kernel size."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, _ = layer.output.shape
            total += height * width * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, keras.layers.Dense):
            total += int(np.prod(layer.kernel.shape))
    return total


def paper_cnn(image_size: int):
    """The paper's CNN as `--preset paper` builds it (untrained: speed does not depend on the weights)."""
    from ihd.cnn import build_cnn

    cnn = PAPER["cnn"]
    return build_cnn(cnn["backbone"], image_size, cnn["recipe"], weights=None, dropout=cnn["dropout"])


def hu_batch(rng: np.random.Generator, batch: int, size: int) -> np.ndarray:
    """Random slices in Hounsfield units, three channels."""
    return rng.uniform(-1024, 1500, (batch, size, size, 3)).astype(np.float32)


def random_series(total_slices: int, selected: int, seed: int):
    """Random float16 inputs (``selected`` features + 6 probabilities) and binary labels in series of the
    real data's lengths, as an ``ihd.sequence.SeriesSet``."""
    from ihd.labels import SUBTYPES
    from ihd.sequence import SeriesSet

    rng = np.random.default_rng(seed)
    lengths = series_lengths(total_slices, rng)
    inputs = rng.standard_normal((total_slices, selected + len(SUBTYPES)), dtype=np.float32).astype(np.float16)
    inputs[:, selected:] = rng.random((total_slices, len(SUBTYPES)), dtype=np.float32)
    labels = (rng.random((total_slices, len(SUBTYPES))) < 0.1).astype(np.float32)
    return SeriesSet(inputs, np.r_[0, np.cumsum(lengths)[:-1]], lengths, labels)


def timed_calls(call, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return seconds


def batch_seconds(model, data) -> list[float]:
    """Seconds between consecutive training steps of one epoch of ``model.fit`` over ``data`` (the first
    step, which sets up the epoch, dropped)."""
    clock = BatchClock()
    model.fit(data.dataset(), epochs=1, shuffle=False, verbose=0, callbacks=[clock])
    return list(np.diff(clock.ends))


def zip_of_real_files(work_dir: Path, copies: int) -> tuple[Path, int, int, int]:
    """A deflated zip of the uncompressed real RSNA files, ``copies`` times under new names; returns it with
    the files' total and mean 512x512 size and the zip's size, in bytes."""
    files = sorted(f for folder in REAL_SERIES for f in folder.rglob("*.dcm"))
    sizes = [f.stat().st_size for f in files]
    full_size = [size for size in sizes if size > 400_000]  # 512x512 slices; one fixture was shrunk to 256x256
    archive = work_dir / "stage_2.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        for copy in range(copies):
            for number, path in enumerate(files):
                zipped.write(path, f"stage_2_train/ID_{copy:02d}{number:07d}.dcm")
    return archive, copies * sum(sizes), int(np.mean(full_size)), archive.stat().st_size


def unzip_seconds(archive: Path, work_dir: Path, rounds: int) -> float:
    """Median seconds of `zipfile.ZipFile.extractall`, as prepare_data.py unpacks the download."""
    seconds = []
    for round_number in range(rounds):
        target = work_dir / f"unpacked-{round_number}"
        started = time.perf_counter()
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(target)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def grouped_convolution_seconds(groups: int, repeats: int = 2) -> tuple[float, float]:
    """Median seconds of one 3x3 convolution of 512 to 512 channels on 2 x 32 x 32 (a stage of ResNeXt-101)
    in ``groups`` groups: forward alone, and forward with the gradient of its weights."""
    import keras
    import tensorflow as tf

    x = tf.random.normal((2, 32, 32, 512))
    layer = keras.layers.Conv2D(512, 3, padding="same", groups=groups, use_bias=False)
    layer.build(x.shape)
    forward = tf.function(lambda: layer(x))

    @tf.function
    def with_gradient():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x))
        return tape.gradient(loss, layer.kernel)

    forward(), with_gradient()
    return (statistics.median(timed_calls(forward, repeats)), statistics.median(timed_calls(with_gradient, repeats)))


def measure(settings: Settings, lock: CpuLock) -> dict:
    """Set up and warm up every measurement under the shared lock, then time them alone."""
    import keras

    from ihd.cnn import compile_cnn, embedding_extractor
    from ihd.features import fit_selection, selected_features
    from ihd.sequence import SeriesBatches, build_lstm, compile_lstm

    cnn, lstm = PAPER["cnn"], PAPER["lstm"]
    rng = np.random.default_rng(0)
    found: dict = {}
    found["macs_224"] = multiply_adds(paper_cnn(224))
    keras.backend.clear_session()
    model = paper_cnn(cnn["image_size"])
    found["macs"] = multiply_adds(model)
    compile_cnn(model, cnn["learning_rate"], total_steps=1, warmup_steps=0, loss=cnn["loss"], schedule=cnn["schedule"])
    extractor = embedding_extractor(model)
    x_train = hu_batch(rng, settings.train_batch, cnn["image_size"])
    y_train = (rng.random((settings.train_batch, 6)) < 0.15).astype(np.float32)
    x_infer = hu_batch(rng, settings.infer_batch, cnn["image_size"])
    model.train_on_batch(x_train, y_train)
    extractor.predict_on_batch(x_infer)

    paper_lstm = compile_lstm(build_lstm(LSTM_INPUTS, lstm["layers"], lstm["units"], lstm["dropout"], head=lstm["head"]),
                              lstm["learning_rate"], loss=lstm["loss"], clipnorm=lstm["clipnorm"])
    step_only = keras.Sequential([keras.Input((None, LSTM_INPUTS)), keras.layers.Dense(6, activation="sigmoid")])
    step_only.compile(optimizer=keras.optimizers.Adam(lstm["learning_rate"]), loss="binary_crossentropy")
    series = random_series(int(settings.lstm_series * 36.3), 120, seed=0)  # 36.3: the mean length drawn there
    warm_up = random_series(8 * 36, 120, seed=1)
    for sequence_model in (paper_lstm, step_only):
        sequence_model.fit(SeriesBatches(warm_up, lstm["batch_size"]).dataset(), epochs=1, verbose=0)
    batches = SeriesBatches(series, lstm["batch_size"], shuffle=True)
    found["lstm_series_length"] = float(series.lengths.mean())

    embeddings = rng.standard_normal((settings.pca_rows, EMBEDDING_WIDTH), dtype=np.float32).astype(np.float16)
    many_rows = rng.standard_normal((settings.transform_rows, EMBEDDING_WIDTH), dtype=np.float32).astype(np.float16)
    pca_name = lstm["selections"][0]

    with tempfile.TemporaryDirectory(prefix="paper-hours-") as scratch:
        work = Path(scratch)
        archive, found["dicom_bytes"], found["dicom_file_bytes"], found["zip_bytes"] = zip_of_real_files(
            work, settings.zip_copies)
        with lock.exclusive():
            found["train_s"] = statistics.median(
                timed_calls(lambda: model.train_on_batch(x_train, y_train), settings.train_steps))
            found["infer_s"] = statistics.median(
                timed_calls(lambda: extractor.predict_on_batch(x_infer), settings.infer_batches))
            found["lstm_step_s"] = statistics.median(batch_seconds(paper_lstm, batches))
            found["host_step_s"] = statistics.median(batch_seconds(step_only, batches))
            started = time.perf_counter()
            selection = fit_selection(pca_name, embeddings, np.arange(settings.pca_rows))
            found["pca_fit_s"] = time.perf_counter() - started
            started = time.perf_counter()
            selected_features(selection, many_rows)
            found["transform_s_per_row"] = (time.perf_counter() - started) / settings.transform_rows
            found["unzip_s"] = unzip_seconds(archive, work, rounds=3)
            found["conv_s"] = {groups: grouped_convolution_seconds(groups) for groups in (1, 32)}
    return found


@dataclass
class Line:
    """One stage of the estimate: its work, how its time was worked out, and the hours on each GPU."""

    stage: str
    work: str
    arithmetic: str
    a100_h: float
    h100_h: float


def published_rates(image_size: int) -> dict:
    """Slices/s of ResNeXt-101 32x8d at ``image_size`` on one A100 and one H100, training and inference,
    carried from the published 32x4d figures: times the 32x8d/32x4d ratio measured on one GPU, times the
    pixels (multiply-adds scale with them exactly: 224 and 256 are both multiples of the network's stride 32),
    and for the H100 times its ResNet-50 training speed-up over the A100."""
    pixels = (224 / image_size) ** 2
    train_ratio = PUBLISHED["train_32x8d_same_gpu"].value / PUBLISHED["train_32x4d_same_gpu"].value
    infer_ratio = PUBLISHED["infer_32x8d_same_gpu"].value / PUBLISHED["infer_32x4d_same_gpu"].value
    h100 = PUBLISHED["h100_resnet50"].value / PUBLISHED["a100_resnet50"].value
    a100_train = PUBLISHED["a100_train"].value * train_ratio * pixels
    a100_infer = PUBLISHED["a100_infer"].value * infer_ratio * pixels
    return {"pixels": pixels, "train_ratio": train_ratio, "infer_ratio": infer_ratio, "h100": h100,
            "a100_train": a100_train, "a100_infer": a100_infer, "h100_train": a100_train * h100,
            "h100_infer": a100_infer * h100}


def estimate(found: dict, settings: Settings) -> tuple[list[Line], dict]:
    """The chain's stages in hours on one A100 and one H100, each with its arithmetic."""
    cnn, lstm, prepare = PAPER["cnn"], PAPER["lstm"], PAPER["prepare"]
    rates = published_rates(cnn["image_size"])
    slices_per_series = TRAIN_SLICES / TRAIN_SERIES
    train_slices = prepare["train_series"] * slices_per_series
    val_slices = TRAIN_SLICES - train_slices
    trained = cnn["epochs"] * train_slices
    dicom_gb = ALL_SLICES * found["dicom_file_bytes"] / 1e9
    zip_gb = PUBLISHED["zip_gb"].value
    unzip_mb_s = found["dicom_bytes"] / 1e6 / found["unzip_s"]
    prepare_cpu_s = ALL_SLICES * PREPARE_MS_PER_SLICE / 1e3 / settings.cores
    prepare_disk_s = dicom_gb * 1e3 / settings.disk_mb_s
    lstm_steps = prepare["train_series"] * lstm["epochs"] // lstm["batch_size"]
    recurrent_steps = 2 * lstm["layers"] * slices_per_series * (1 + BACKWARD_OVER_FORWARD)
    gpu_lstm_step_s = found["host_step_s"] + recurrent_steps * GPU_RECURRENT_STEP_S
    val_series = TRAIN_SERIES - prepare["train_series"]
    pca_s = found["pca_fit_s"] + ALL_SLICES * found["transform_s_per_row"]
    cache_s = ALL_SLICES * (EMBEDDING_WIDTH + 6) * 2 / 1e9 / CACHE_CHECK_GB_S

    def on_both(seconds_a100: float, seconds_h100: float | None = None) -> tuple[float, float]:
        return seconds_a100 / 3600, (seconds_a100 if seconds_h100 is None else seconds_h100) / 3600

    lines = [
        Line("download", f"{zip_gb:.0f} GB zip", f"{zip_gb:.0f} GB / {settings.download_mb_s:.0f} MB/s (assumed)",
             *on_both(zip_gb * 1e3 / settings.download_mb_s)),
        Line("unpack", f"{dicom_gb:.0f} GB of DICOM", f"{dicom_gb:.0f} GB / {unzip_mb_s:.0f} MB/s "
             "(zipfile on one core, measured here)", *on_both(dicom_gb * 1e3 / unzip_mb_s)),
        Line("prepare", f"{ALL_SLICES:,} slices", f"max(CPU {ALL_SLICES:,} x {PREPARE_MS_PER_SLICE} ms / "
             f"{settings.cores} cores = {prepare_cpu_s / 60:.1f} min, disk {dicom_gb:.0f} GB / "
             f"{settings.disk_mb_s:.0f} MB/s = {prepare_disk_s / 60:.1f} min)",
             *on_both(max(prepare_cpu_s, prepare_disk_s))),
        Line("CNN training", f"{cnn['epochs']} x {train_slices:,.0f} slices",
             f"{trained:,.0f} / ({rates['a100_train']:.0f} or {rates['h100_train']:.0f} slices/s)",
             *on_both(trained / rates["a100_train"], trained / rates["h100_train"])),
        Line("CNN validation", f"{cnn['epochs']} x {val_slices:,.0f} slices",
             f"{cnn['epochs'] * val_slices:,.0f} / ({rates['a100_infer']:.0f} or {rates['h100_infer']:.0f} slices/s)",
             *on_both(cnn["epochs"] * val_slices / rates["a100_infer"], cnn["epochs"] * val_slices / rates["h100_infer"])),
        Line("extraction", f"{ALL_SLICES:,} slices",
             f"{ALL_SLICES:,} / ({rates['a100_infer']:.0f} or {rates['h100_infer']:.0f} slices/s)",
             *on_both(ALL_SLICES / rates["a100_infer"], ALL_SLICES / rates["h100_infer"])),
        Line("PCA", f"fit on {settings.pca_rows:,} rows, {ALL_SLICES:,} rows transformed, cache checked",
             f"{found['pca_fit_s']:.1f} s + {ALL_SLICES:,} x {found['transform_s_per_row'] * 1e6:.1f} us + "
             f"{cache_s:.0f} s (CPU, measured here on 2 cores)", *on_both(pca_s + cache_s)),
        Line("LSTM training", f"{prepare['train_series']:,} series x {lstm['epochs']} epochs = {lstm_steps:,} steps "
             f"+ {val_series:,} validation series x {lstm['epochs']} (counted as steps)",
             f"{lstm_steps + val_series * lstm['epochs']:,} x ({found['host_step_s'] * 1e3:.1f} ms host + "
             f"{recurrent_steps:.0f} recurrent steps x {GPU_RECURRENT_STEP_S * 1e6:.0f} us) = "
             f"{gpu_lstm_step_s * 1e3:.1f} ms a step", *on_both((lstm_steps + val_series * lstm["epochs"]) * gpu_lstm_step_s)),
        Line("predict", f"{TEST_SERIES:,} test series, {TEST_SLICES:,} slices from the cache",
             f"{TEST_SERIES:,} / 64 series a batch x {gpu_lstm_step_s * 1e3:.1f} ms", *on_both(TEST_SERIES / 64 * gpu_lstm_step_s)),
    ]
    extra = {"rates": rates, "train_slices": train_slices, "trained": trained, "dicom_gb": dicom_gb,
             "zip_ratio": found["zip_bytes"] / found["dicom_bytes"], "unzip_mb_s": unzip_mb_s,
             "lstm_steps": lstm_steps, "gpu_lstm_step_s": gpu_lstm_step_s, "recurrent_steps": recurrent_steps,
             "slices_per_series": slices_per_series}
    return lines, extra


def report(found: dict, settings: Settings, lines: list[Line], extra: dict) -> None:
    """Print the CPU measurements, the published figures, the arithmetic and the hours."""
    cnn, lstm, prepare = PAPER["cnn"], PAPER["lstm"], PAPER["prepare"]
    rates = extra["rates"]
    train_per_slice = found["train_s"] / settings.train_batch
    infer_per_slice = found["infer_s"] / settings.infer_batch
    macs = found["macs"]
    small_macs = PUBLISHED["gmacs_32x4d_224"].value * 1e9
    print(f"\nmachine: {cpu_description()}; {load_description()}")
    print("\n## Measured on this CPU (the kit's code, untrained weights, random inputs)\n")
    print("| unit of work | seconds | per slice | this CPU's multiply-adds/s |")
    print("|---|---:|---:|---:|")
    print(f"| CNN training step, {settings.train_batch} slice(s) at {cnn['image_size']} (median of {settings.train_steps}) "
          f"| {found['train_s']:.2f} | {train_per_slice:.2f} s | {3 * macs / train_per_slice / 1e9:.0f} G (3 x forward) |")
    print(f"| CNN inference batch, {settings.infer_batch} slices (embedding and probabilities, median of "
          f"{settings.infer_batches}) | {found['infer_s']:.2f} | {infer_per_slice:.3f} s | {macs / infer_per_slice / 1e9:.0f} G |")
    print(f"| LSTM training step, one series of {found['lstm_series_length']:.1f} slices on average (median of "
          f"{settings.lstm_series}) | {found['lstm_step_s'] * 1e3:.1f} ms | | |")
    print(f"| the same loop with a model of no size (the fixed cost of a step) | {found['host_step_s'] * 1e3:.1f} ms | | |")
    print(f"| PCA fit, {settings.pca_rows:,} rows of {EMBEDDING_WIDTH} to 120 | {found['pca_fit_s']:.2f} | | |")
    print(f"| PCA transform | | {found['transform_s_per_row'] * 1e6:.1f} us | |")
    print(f"| unpacking a zip of real RSNA files ({found['dicom_bytes'] / 1e6:.0f} MB, median of 3) | "
          f"{found['unzip_s']:.2f} | {extra['unzip_mb_s']:.0f} MB/s | |")
    print(f"\nResNeXt-101 32x8d multiply-adds counted from the kit's layers: {found['macs_224'] / 1e9:.2f} G at 224x224 "
          f"(published {PUBLISHED['gmacs_32x8d_224'].value} G), {macs / 1e9:.2f} G at {cnn['image_size']}x{cnn['image_size']} "
          f"({macs / found['macs_224']:.3f}x, (256/224)^2 = {(256 / 224) ** 2:.3f}).")
    (plain, plain_grad), (grouped, grouped_grad) = found["conv_s"][1], found["conv_s"][32]
    print(f"Training over inference per slice on this CPU: {train_per_slice / infer_per_slice:.0f}x. The cause is "
          "TensorFlow's CPU kernel for the weight gradient of a grouped convolution: one 3x3 convolution of 512 "
          f"channels in 32 groups took {grouped * 1e3:.0f} ms forward and {grouped_grad * 1e3:.0f} ms with its weight "
          f"gradient ({grouped_grad / grouped:.0f}x); without groups {plain * 1e3:.0f} and {plain_grad * 1e3:.0f} ms "
          f"({plain_grad / plain:.1f}x). On a GPU cuDNN computes both: the published figures train at 1/"
          f"{PUBLISHED['a100_infer'].value / PUBLISHED['a100_train'].value:.1f} of the inference rate.")
    print(f"Real RSNA DICOM: {found['dicom_file_bytes'] / 1e3:.0f} KB a 512x512 file, {ALL_SLICES:,} files = "
          f"{extra['dicom_gb']:.0f} GB; deflated by zipfile to {extra['zip_ratio']:.2f} of that "
          f"({extra['dicom_gb'] * extra['zip_ratio']:.0f} GB; the competition's zip is {PUBLISHED['zip_gb'].value:.0f} GB).")
    cpu_days = (extra["trained"] * train_per_slice + ALL_SLICES * infer_per_slice) / 86400
    print(f"The paper's CNN stage on this CPU would take {cpu_days:.0f} days; its LSTM stage "
          f"{extra['lstm_steps'] * found['lstm_step_s'] / 3600:.1f} hours.")

    print("\n## Published GPU figures used\n")
    for key, figure in PUBLISHED.items():
        print(f"- {key}: {figure.value:g}: {figure.what}. {figure.source}")
    print("\n## Carried to one GPU (estimate, not a measurement)\n")
    print(f"- ResNeXt-101 32x8d / 32x4d on one GPU: training {rates['train_ratio']:.3f}, inference "
          f"{rates['infer_ratio']:.3f}; pixels 224^2 / {cnn['image_size']}^2 = {rates['pixels']:.3f}; "
          f"H100 / A100 (ResNet-50 training) = {rates['h100']:.2f}.")
    print(f"- A100 training: {PUBLISHED['a100_train'].value:g} x {rates['train_ratio']:.3f} x {rates['pixels']:.3f} = "
          f"{rates['a100_train']:.0f} slices/s; H100: x {rates['h100']:.2f} = {rates['h100_train']:.0f}. "
          f"Cross-check by multiply-adds: {PUBLISHED['a100_train'].value:g} img/s x {small_macs / 1e9:g} G x 3 = "
          f"{PUBLISHED['a100_train'].value * small_macs * 3 / 1e12:.1f} T/s, over 3 x {macs / 1e9:.1f} G = "
          f"{PUBLISHED['a100_train'].value * small_macs / macs:.0f} slices/s; from the PyTorch figure, "
          f"{PUBLISHED['a100_train_pytorch'].value:g} x {rates['train_ratio']:.3f} x {rates['pixels']:.3f} = "
          f"{PUBLISHED['a100_train_pytorch'].value * rates['train_ratio'] * rates['pixels']:.0f}.")
    print(f"- A100 inference: {PUBLISHED['a100_infer'].value:g} x {rates['infer_ratio']:.3f} x {rates['pixels']:.3f} = "
          f"{rates['a100_infer']:.0f} slices/s; H100: x {rates['h100']:.2f} (the training speed-up, assumed) = "
          f"{rates['h100_infer']:.0f}.")
    print(f"- Training slices: {prepare['train_series']:,} series x {extra['slices_per_series']:.2f} slices "
          f"({TRAIN_SLICES:,} / {TRAIN_SERIES:,}) = {extra['train_slices']:,.0f}.")
    print(f"- The batch-1 LSTM is latency-bound, not bound by multiply-adds: each step runs "
          f"{extra['recurrent_steps']:.0f} dependent recurrent steps (2 directions x {lstm['layers']} layers x "
          f"{extra['slices_per_series']:.1f} slices x (1 forward + {BACKWARD_OVER_FORWARD} backward)) at an assumed "
          f"{GPU_RECURRENT_STEP_S * 1e6:.0f} us each, after the host's fixed cost of a step measured here.")
    input_rate = rates["h100_train"]
    print(f"- Input pipeline: training must deliver {rates['a100_train']:.0f} to {input_rate:.0f} augmented slices/s: "
          f"{input_rate / TRAIN_INPUT_SLICES_S_PER_CORE:.1f} cores at {TRAIN_INPUT_SLICES_S_PER_CORE} slices/s a core; "
          f"extraction {rates['a100_infer']:.0f} to {rates['h100_infer']:.0f} read slices/s: "
          f"{rates['h100_infer'] / READ_INPUT_SLICES_S_PER_CORE:.1f} cores at {READ_INPUT_SLICES_S_PER_CORE:.0f} a core "
          f"(BENCHMARKS.md). Disk: the slice store is {ALL_SLICES * STORE_KB_PER_SLICE / 1e6:.0f} GB, "
          f"{input_rate * STORE_KB_PER_SLICE / 1e3:.0f} MB/s while training.")
    print("\n| stage | work | arithmetic | A100 hours | H100 hours |")
    print("|---|---|---|---:|---:|")
    def hours(value: float) -> str:
        return f"{value:.2f}" if value >= 0.005 else "< 0.01"

    for line in lines:
        print(f"| {line.stage} | {line.work} | {line.arithmetic} | {hours(line.a100_h)} | {hours(line.h100_h)} |")
    a100, h100 = sum(line.a100_h for line in lines), sum(line.h100_h for line in lines)
    gpu_a100 = sum(line.a100_h for line in lines if line.stage.startswith(("CNN", "extraction")))
    gpu_h100 = sum(line.h100_h for line in lines if line.stage.startswith(("CNN", "extraction")))
    print(f"| **total** | | | **{a100:.1f}** | **{h100:.1f}** |")
    print(f"\nAt half the published CNN throughput (Keras at batch 32 against NVIDIA's tuned scripts at 256): "
          f"A100 {a100 + gpu_a100:.1f} h, H100 {h100 + gpu_h100:.1f} h.")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    for name in ("train_batch", "train_steps", "infer_batch", "infer_batches", "lstm_series", "cores"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("download_mb_s", "disk_mb_s"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    parser.add_argument("--lock", default=defaults.lock)
    parser.add_argument("--quick", action="store_true")
    settings = Settings(**vars(parser.parse_args(argv)))
    if settings.quick:
        settings.train_batch, settings.train_steps, settings.infer_batches, settings.lstm_series = 1, 1, 1, 12
        settings.transform_rows, settings.zip_copies = 8192, 1
    print(f"$ python bench/paper_hours.py {' '.join(sys.argv[1:] if argv is None else argv)}\n{settings}", flush=True)
    lock = CpuLock(settings.lock)
    lock.hold(fcntl.LOCK_SH)
    found = measure(settings, lock)
    lines, extra = estimate(found, settings)
    report(found, settings, lines, extra)
    return {"found": found, "lines": lines, **extra}


if __name__ == "__main__":
    main()
