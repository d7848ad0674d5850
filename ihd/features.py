"""The embedding cache and the feature-selection methods.

Extraction runs the trained CNN once over every slice of the index (train, validation and test) and
keeps, per slice and in index order, the pooled `"embedding"` vector and the six `"pred"`
probabilities as float16 in `features/<run>/embeddings.npy` and `probabilities.npy`. Batches are
streamed into memory-mapped files and flushed in chunks; `progress.json` says how many leading rows
are final and keeps the files' sizes and each flushed chunk's sha256, so a killed extraction resumes
where it stopped, a truncated or overwritten file is noticed (on resume and on every read) and its
rows extracted again, and memory does not grow with the data. The files' blocks are allocated
before any row is written, so a full disk stops the extraction with a message, not a crash.
`pred_kernel.npy` keeps the head's Dense kernel (D, 6) for the `weights:k` selection.

`config.json` holds the cache's fingerprint (`ihd.fingerprint`): the sha256 of the CNN weights file
and of the index, and the settings that shape the rows. Extracting again with other inputs starts
from the first row; the index is found through a path relative to the cache folder.

A selection reduces the D embedding dimensions to k, fitted on training rows only and saved as
`selection-<slug>.npz` next to the features, with the inputs it was fitted on (the features'
fingerprint, the fold, and the seed where the method draws at random), so validation and test rows
get the same transform and a selection whose inputs changed is fitted again:

- `all`: every dimension.
- `pca:k`: the top k principal components (the paper's choice, k=120), from a streamed covariance.
- `weights:k`: the k dimensions with the largest summed |kernel| in the `"pred"` Dense layer.
- `variance:k`: the k dimensions of largest variance.
- `random:k`: k seeded random dimensions, the control every method must beat.
- `mi:k`: the k dimensions of largest mutual information with the labels (weighted like the metric),
  estimated on a seeded sample of training rows.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from sklearn.feature_selection import mutual_info_classif
from tqdm.auto import tqdm

from ihd.cnn import embedding_extractor
from ihd.fingerprint import array_sha256, file_sha256, fingerprint, what_changed
from ihd.inputs import fold_rows, inference_dataset, label_array
from ihd.io import atomic_path, read_json, write_json
from ihd.labels import LABEL_WEIGHTS, SUBTYPES
from ihd.row_files import RowFile, reserve_blocks, verified_chunks
from ihd.slices import CONFIG_FILE as STORE_CONFIG_FILE, SliceStore
from ihd.windows import parse_recipe

CONFIG_FILE = "config.json"
EMBEDDINGS_FILE = "embeddings.npy"
PROBABILITIES_FILE = "probabilities.npy"
PROGRESS_FILE = "progress.json"
KERNEL_FILE = "pred_kernel.npy"
METHODS = ("all", "pca", "weights", "variance", "random", "mi")
SEEDED_METHODS = ("random", "mi")
STATS_CHUNK_ROWS = 8192
FROM_CNN_CONFIG = ("dataset", "image_size", "recipe", "fold")
# What the cached rows are made of; the fingerprint covers exactly these values.
DEFINED_BY = ("cnn_sha256", "index_sha256", "slices_sha256", "store_size", "image_size", "recipe", "fold", "rows",
              "embedding_dim", "tta")
TTAS = ("none", "flip")  # test-time augmentation of every cached row: none, or the mean with the left-right flip
DISK_ADVICE = "free some space or choose another --features-dir"


class FeaturesNotReady(RuntimeError):
    """The feature cache is missing, incomplete, damaged or made from another index."""


def features_config(
    cnn_config: dict, cnn_sha256: str, index_path: Path, store: SliceStore, out_dir: Path, image_ids, dim: int,
    tta: str = "none",
) -> dict:
    """The cache's config.json: the CNN settings it depends on, its inputs' sha256 (the index file, and the
    store's slices of ``image_ids``, one a row) and its fingerprint.

    ``index_path`` is kept relative to ``out_dir``, so the record does not depend on the working directory.
    """
    config = {key: cnn_config[key] for key in FROM_CNN_CONFIG}
    config.update(
        cnn_sha256=cnn_sha256,
        index_sha256=file_sha256(index_path),
        index_path=os.path.relpath(Path(index_path).resolve(), Path(out_dir).resolve()),
        slices_sha256=store.contents_sha256(image_ids),
        store_size=store.size,
        rows=len(image_ids),
        embedding_dim=dim,
        tta=tta,
    )
    config["fingerprint"] = fingerprint(defining_inputs(config))
    return config


def defining_inputs(config: dict) -> dict:
    """The values of a features config.json that its fingerprint covers (None where an old record lacks one)."""
    return {key: config.get(key) for key in DEFINED_BY}


def extraction_command(cnn_config: dict, run: str, models_dir="models", features_dir="features", tta: str | None = None
                       ) -> str:
    """The train_cnn.py command that (re)writes the feature cache of ``run``, with its test-time augmentation:
    ``tta``, or None for the one the CNN's run was started with."""
    command = f"train_cnn.py --dataset {cnn_config['dataset']} --run {run} --extract-only"
    tta = tta or cnn_config.get("tta", "none")
    if tta != "none":
        command += f" --tta {tta}"
    for flag, value, default in (("--models-dir", models_dir, "models"), ("--features-dir", features_dir, "features")):
        if str(value) != default:
            command += f" {flag} {value}"
    return command


def _shapes(config: dict) -> dict[str, tuple[int, int]]:
    """The shape of each feature file of a cache with ``config``."""
    rows = config["rows"]
    return {EMBEDDINGS_FILE: (rows, config["embedding_dim"]), PROBABILITIES_FILE: (rows, len(SUBTYPES))}


def _create_arrays(out_dir: Path, config: dict) -> list[np.memmap]:
    """Fresh feature files of the config's shapes, their blocks allocated."""
    arrays = []
    for name, shape in _shapes(config).items():
        (out_dir / name).unlink(missing_ok=True)
        arrays.append(np.lib.format.open_memmap(out_dir / name, mode="w+", dtype=np.float16, shape=shape))
        reserve_blocks(out_dir / name, DISK_ADVICE)
    return arrays


def _open_arrays(out_dir: Path, config: dict, mode: str) -> list[np.memmap]:
    """The feature files memory-mapped; raises ValueError when one cannot be read as the config says."""
    arrays = []
    for name, shape in _shapes(config).items():
        array = np.load(out_dir / name, mmap_mode=mode)
        if array.shape != shape or array.dtype != np.float16:
            raise ValueError(f"{out_dir / name} holds {array.dtype} {array.shape}, expected float16 {shape}")
        arrays.append(array)
    return arrays


def rows_done(out_dir: str | Path) -> int:
    """Leading rows of ``out_dir``'s feature files that were written (0 when extraction has not started)."""
    progress = Path(out_dir) / PROGRESS_FILE
    return int(read_json(progress)["rows_done"]) if progress.exists() else 0


def verified_rows(out_dir: str | Path, config: dict) -> tuple[int, list, str]:
    """How many leading rows of the cache still match what was written (`ihd.row_files.verified_chunks`
    over progress.json). Returns those rows, the chunks covering them, and what is wrong after them
    ("" when nothing is). A file of the wrong size is never opened for update (that would extend it
    with zeros): its rows count as lost.
    """
    progress_path = Path(out_dir) / PROGRESS_FILE
    progress = read_json(progress_path) if progress_path.exists() else {"rows_done": 0}
    return verified_chunks(out_dir, progress, progress_path, _shapes(config))


def _resume_point(out_dir: Path, config: dict) -> tuple[int, list]:
    """The row to continue from and the verified chunks before it; says why when it is not where the last run stopped."""
    config_path = out_dir / CONFIG_FILE
    if rows_done(out_dir) == 0:
        return 0, []
    recorded = read_json(config_path) if config_path.exists() else {}
    if recorded.get("fingerprint") != config["fingerprint"]:
        changed = what_changed(defining_inputs(recorded), defining_inputs(config))
        print(f"{out_dir} holds features of other inputs ({changed}): extracting again from the first row")
        return 0, []
    start, chunks, problem = verified_rows(out_dir, config)
    if problem:
        print(f"{problem}: extracting again from row {start}")
    return start, chunks


def embed_batch(extractor: keras.Model, batch, tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and probabilities of a batch of HU stacks (B, H, W, C); with ``tta="flip"`` each the mean
    of the stack's and its left-right mirror's (the flip is exact: no pixel is resampled)."""
    embedding, probability = extractor.predict_on_batch(batch)
    if tta == "flip":
        flipped_embedding, flipped_probability = extractor.predict_on_batch(keras.ops.flip(batch, axis=2))
        embedding = (np.asarray(embedding, np.float32) + np.asarray(flipped_embedding, np.float32)) / 2
        probability = (np.asarray(probability, np.float32) + np.asarray(flipped_probability, np.float32)) / 2
    elif tta != "none":
        raise ValueError(f"unknown test-time augmentation {tta!r}: use {' or '.join(TTAS)}")
    return np.asarray(embedding), np.asarray(probability)


def extract_features(
    model: keras.Model,
    cnn_config: dict,
    cnn_sha256: str,
    index: pd.DataFrame,
    index_path: str | Path,
    store: SliceStore,
    out_dir: str | Path,
    batch_size: int = 64,
    chunk_rows: int = 2048,
    tta: str = "none",
) -> Path:
    """Write embeddings and probabilities of every index row to ``out_dir``, resuming a partial run.

    ``cnn_config`` is the CNN run's config.json (dataset, image_size, recipe, fold) and ``cnn_sha256``
    the sha256 of the weights file ``model`` was loaded from; with the index file's sha256 and ``tta``
    (`embed_batch`) they make the cache's fingerprint. A cache of other inputs, or whose rows no longer
    match their checksums, is written again from the first row that differs. Flushes every ``chunk_rows`` rows.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extractor = embedding_extractor(model)
    dim = int(extractor.outputs[0].shape[-1])
    config = features_config(cnn_config, cnn_sha256, Path(index_path), store, out_dir, index["image_id"], dim, tta)
    start, chunks = _resume_point(out_dir, config)
    recorded = out_dir / CONFIG_FILE
    if start == len(index) and (out_dir / KERNEL_FILE).is_file() and read_json(recorded) == config:
        # every row there and checked, and the config (the index's place among it) as this call would write it
        print(f"features: {out_dir} holds all {len(index)} slices already", flush=True)
        return out_dir
    progress = {"rows_done": start, "chunks": chunks}
    if start == 0:
        write_json(out_dir / PROGRESS_FILE, {"rows_done": 0})
        embeddings, probabilities = _create_arrays(out_dir, config)
    else:
        for name in _shapes(config):
            reserve_blocks(out_dir / name, DISK_ADVICE)
        embeddings, probabilities = _open_arrays(out_dir, config, "r+")
    progress["bytes"] = {name: (out_dir / name).stat().st_size for name in (EMBEDDINGS_FILE, PROBABILITIES_FILE)}
    write_json(out_dir / PROGRESS_FILE, progress)
    write_json(out_dir / CONFIG_FILE, config)
    with atomic_path(out_dir / KERNEL_FILE) as tmp:
        np.save(tmp, model.get_layer("pred").get_weights()[0].astype(np.float32))
    data = inference_dataset(
        index, store, parse_recipe(cnn_config["recipe"]), np.arange(start, len(index)),
        int(cnn_config["image_size"]), batch_size,
    )
    row = flushed = start
    with tqdm(total=len(index), initial=start, desc="features", unit="slice", dynamic_ncols=True) as bar:
        for batch in data:
            embedding, probability = embed_batch(extractor, batch, tta)
            embeddings[row : row + len(embedding)] = embedding
            probabilities[row : row + len(embedding)] = probability
            row += len(embedding)
            bar.update(len(embedding))
            if row - flushed >= chunk_rows or row == len(index):
                embeddings.flush()
                probabilities.flush()
                digests = [array_sha256(array[flushed:row]) for array in (embeddings, probabilities)]
                progress["chunks"].append([flushed, row, *digests])
                progress["rows_done"] = flushed = row
                write_json(out_dir / PROGRESS_FILE, progress)
    return out_dir


@dataclass
class Features:
    """A complete feature store: arrays in index order, the index, how they were made, and where they are."""

    embeddings: np.ndarray
    probabilities: np.ndarray
    index: pd.DataFrame
    config: dict
    path: Path

    @property
    def fingerprint(self) -> str:
        """The cache's fingerprint: its CNN weights, index and settings."""
        return self.config["fingerprint"]

    def embedding_rows(self) -> RowFile:
        """The embeddings read by rows from their file (`ihd.row_files`): a pass over every row then
        holds one chunk in memory, where the memory map would keep every page it touched."""
        return RowFile(self.path / EMBEDDINGS_FILE)

    def probability_rows(self) -> RowFile:
        """The CNN probabilities read by rows from their file, like `embedding_rows`."""
        return RowFile(self.path / PROBABILITIES_FILE)


def load_features(run_dir: str | Path) -> Features:
    """Open ``features/<run>/`` (memory-mapped) after checking every row against its recorded checksum.

    Raises FeaturesNotReady when the cache is missing, incomplete, damaged, or its index file changed, or the
    slice store beside the index (when it is still there) holds other pixels for its rows.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        raise FeaturesNotReady(f"{config_path} not found: the CNN's features were never extracted")
    config = read_json(config_path)
    if "fingerprint" not in config:
        raise FeaturesNotReady(f"{config_path} records no fingerprint (written by an older version)")
    rows, _, problem = verified_rows(run_dir, config)
    if problem:
        raise FeaturesNotReady(f"{problem}: the cache cannot be trusted")
    if rows != config["rows"]:
        raise FeaturesNotReady(f"{run_dir}: extraction stopped at row {rows} of {config['rows']}")
    index_path = run_dir / config["index_path"]
    if not index_path.is_file():
        raise FeaturesNotReady(f"{index_path}, the index of {run_dir}, not found")
    if file_sha256(index_path) != config["index_sha256"]:
        raise FeaturesNotReady(f"{index_path} changed since {run_dir} was extracted from it")
    index = pd.read_parquet(index_path)
    store_root = index_path.parent / "slices"
    if (store_root / STORE_CONFIG_FILE).is_file():  # a store deleted to free its disk leaves the cache usable as it is
        try:
            slices_sha256 = SliceStore(store_root).contents_sha256(index["image_id"])
        except KeyError as error:
            raise FeaturesNotReady(f"{store_root} no longer holds every slice {run_dir} was extracted from ({error})") from None
        if slices_sha256 != config.get("slices_sha256"):
            raise FeaturesNotReady(f"{store_root} holds other pixels for the index's slices than when {run_dir} was "
                                   "extracted (a DICOM file stored again)")
    embeddings, probabilities = _open_arrays(run_dir, config, "r")
    return Features(embeddings, probabilities, index, config, run_dir)


def parse_selection(name: str) -> tuple[str, int | None]:
    """``"pca:120"`` -> ("pca", 120); ``"all"`` -> ("all", None); anything else raises ValueError."""
    method, _, size = name.partition(":")
    usage = f"use 'all' or one of {', '.join(m + ':k' for m in METHODS[1:])} (for example pca:120)"
    if method not in METHODS:
        raise ValueError(f"unknown feature selection {name!r}: {usage}")
    if method == "all":
        if size:
            raise ValueError(f"feature selection 'all' takes no size, got {name!r}")
        return method, None
    if not size.isdigit() or int(size) < 1:
        raise ValueError(f"feature selection {name!r} needs a positive size k: {usage}")
    return method, int(size)


def selection_slug(name: str) -> str:
    """The file-name form of a selection: ``pca:120`` -> ``pca120``."""
    return name.replace(":", "")


@dataclass
class Selection:
    """A fitted selection: either kept ``columns`` or a PCA projection (``mean``, ``components``), and
    the ``inputs`` it was fitted on (see `selection_inputs`)."""

    name: str
    columns: np.ndarray | None = None
    mean: np.ndarray | None = None
    components: np.ndarray | None = None
    inputs: dict | None = None

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the inputs the selection was fitted on."""
        return fingerprint(self.inputs or {})

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Selected features of the rows ``x`` (n, D) as float32 (n, k)."""
        x = np.asarray(x, dtype=np.float32)
        if self.components is not None:
            return ((x - self.mean) @ self.components.T).astype(np.float32)
        return x[:, self.columns]

    def save(self, path: str | Path) -> None:
        """Write the fitted selection and its inputs to an .npz file, atomically."""
        arrays = {k: v for k, v in vars(self).items() if k not in ("name", "inputs") and v is not None}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, name=np.array(self.name), inputs=np.array(json.dumps(self.inputs)), **arrays)


def load_selection(path: str | Path) -> Selection:
    """Read a selection written by `Selection.save` (``inputs`` None when it records none)."""
    with np.load(path) as saved:
        arrays = {k: saved[k] for k in saved.files if k not in ("name", "inputs")}
        inputs = json.loads(str(saved["inputs"])) if "inputs" in saved.files else None
        return Selection(name=str(saved["name"]), inputs=inputs, **arrays)


def _chunks(rows: np.ndarray):
    """Consecutive pieces of ``rows`` of at most STATS_CHUNK_ROWS."""
    for begin in range(0, len(rows), STATS_CHUNK_ROWS):
        yield rows[begin : begin + STATS_CHUNK_ROWS]


def _moments(embeddings: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of ``rows``, accumulated chunk by chunk in float64."""
    dim = embeddings.shape[1]
    total, products = np.zeros(dim), np.zeros((dim, dim))
    for chunk in _chunks(rows):
        x = np.asarray(embeddings[chunk], dtype=np.float64)
        total += x.sum(axis=0)
        products += x.T @ x
    mean = total / len(rows)
    return mean, products / len(rows) - np.outer(mean, mean)


def _pca(embeddings: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the top-k principal axes (k, D), each axis signed so its largest entry is positive."""
    mean, covariance = _moments(embeddings, rows)
    _, vectors = np.linalg.eigh(covariance)
    components = vectors[:, ::-1][:, :k].T
    signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
    return mean.astype(np.float32), (components * signs[:, None]).astype(np.float32)


def _variances(embeddings: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Variance of each dimension over ``rows``, streamed."""
    dim = embeddings.shape[1]
    total, squares = np.zeros(dim), np.zeros(dim)
    for chunk in _chunks(rows):
        x = np.asarray(embeddings[chunk], dtype=np.float64)
        total += x.sum(axis=0)
        squares += (x * x).sum(axis=0)
    mean = total / len(rows)
    return squares / len(rows) - mean * mean


def _mutual_information(embeddings, rows, labels, sample_rows: int, seed: int) -> np.ndarray:
    """Per-dimension mutual information with each subtype, summed with the metric's weights."""
    if labels is None:
        raise ValueError("mi:k needs the labels of the training rows")
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(rows, size=min(sample_rows, len(rows)), replace=False))
    x = np.asarray(embeddings[sample], dtype=np.float32)
    y = np.asarray(labels)[sample] >= 0.5
    scores = np.zeros(x.shape[1])
    for column, weight in enumerate(LABEL_WEIGHTS):
        if y[:, column].any() and not y[:, column].all():
            scores += weight * mutual_info_classif(x, y[:, column], random_state=seed)
    return scores


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, ascending (ties broken by the lower index)."""
    return np.sort(np.argsort(-scores, kind="stable")[:k])


def fit_selection(
    name: str,
    embeddings: np.ndarray,
    train_rows: np.ndarray,
    labels: np.ndarray | None = None,
    dense_kernel: np.ndarray | None = None,
    seed: int = 0,
    mi_sample_rows: int = 5000,
) -> Selection:
    """Fit selection ``name`` on ``embeddings[train_rows]`` only.

    ``labels`` (N, 6), aligned with ``embeddings``, is needed by `mi:k`; ``dense_kernel`` (D, 6),
    the `"pred"` layer's kernel, by `weights:k`. ``train_rows``: row numbers or a boolean mask.
    """
    method, k = parse_selection(name)
    dim = embeddings.shape[1]
    train_rows = np.asarray(train_rows)
    train_rows = np.flatnonzero(train_rows) if train_rows.dtype == bool else np.sort(train_rows)
    if k is not None and k > dim:
        raise ValueError(f"feature selection {name!r} asks for {k} dimensions but the embedding has {dim}: "
                         f"choose --selection with at most {dim}, or all")
    if len(train_rows) == 0:
        raise ValueError(f"feature selection {name!r}: no training rows to fit on")
    if method == "all":
        return Selection(name, columns=np.arange(dim))
    if method == "pca":
        mean, components = _pca(embeddings, train_rows, k)
        return Selection(name, mean=mean, components=components)
    if method == "weights":
        if dense_kernel is None or np.shape(dense_kernel) != (dim, len(SUBTYPES)):
            raise ValueError(f"weights:k needs the pred layer's kernel of shape ({dim}, {len(SUBTYPES)})")
        scores = np.abs(np.asarray(dense_kernel)).sum(axis=1)
    elif method == "variance":
        scores = _variances(embeddings, train_rows)
    elif method == "random":
        return Selection(name, columns=np.sort(np.random.default_rng(seed).choice(dim, size=k, replace=False)))
    else:
        scores = _mutual_information(embeddings, train_rows, labels, mi_sample_rows, seed)
    return Selection(name, columns=_top(scores, k))


def training_rows_of(features: Features) -> np.ndarray:
    """The rows a selection may be fitted on: the training folds of the CNN run's validation fold."""
    return fold_rows(features.index, int(features.config["fold"]))[0]


def selection_path(features_run_dir: str | Path, name: str) -> Path:
    """Where the selection ``name`` of a feature cache is saved."""
    return Path(features_run_dir) / f"selection-{selection_slug(name)}.npz"


def selection_inputs(features: Features, name: str, seed: int = 0, mi_sample_rows: int = 5000,
                     sample_rows: int = 0) -> dict:
    """What a selection fitted now would be made of: its name, the features' fingerprint, the fold,
    for the methods that draw at random the seed (and the sample size of `mi:k`), and for a
    selection fitted on a seeded sample of the training rows, that sample's size and seed."""
    method, _ = parse_selection(name)
    inputs = {"selection": name, "features": features.fingerprint, "fold": int(features.config["fold"])}
    if method in SEEDED_METHODS or sample_rows:
        inputs["seed"] = seed
    if method == "mi":
        inputs["mi_sample_rows"] = mi_sample_rows
    if sample_rows:
        inputs["sample_rows"] = sample_rows
    return inputs


def selection_fits(selection_inputs: dict, trained_on: dict) -> bool:
    """Whether a fitted selection's inputs are those a model was trained on (``trained_on``, its record's
    inputs, which hold the selection's and more). A key whose absence means something, a sample of the rows
    (``sample_rows``) or of mutual information's (``mi_sample_rows``), must be absent from both or equal."""
    return (selection_inputs.items() <= trained_on.items()
            and all(selection_inputs.get(key) == trained_on.get(key) for key in ("sample_rows", "mi_sample_rows")))


def sampled_rows(rows: np.ndarray, sample_rows: int, seed: int) -> np.ndarray:
    """``rows`` themselves (``sample_rows`` 0 or at least their number), else a seeded sample of that many, sorted."""
    rows = np.asarray(rows)
    if not sample_rows or sample_rows >= len(rows):
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=sample_rows, replace=False))


def fitted_selection(features: Features, name: str, seed: int = 0, mi_sample_rows: int = 5000,
                     sample_rows: int = 0) -> Selection:
    """The selection ``name`` of these features: the saved one when it was fitted on the same inputs,
    else fitted now on the training rows (a seeded sample of ``sample_rows`` of them, when not 0) and
    saved (saying what changed)."""
    path = selection_path(features.path, name)
    inputs = selection_inputs(features, name, seed, mi_sample_rows, sample_rows)
    if path.exists():
        saved = load_selection(path)
        if saved.inputs == inputs:
            return saved
        print(f"{path} was fitted on other inputs ({what_changed(saved.inputs or {}, inputs)}): fitting it again")
    selection = fit_selection(
        name,
        features.embedding_rows(),
        sampled_rows(training_rows_of(features), sample_rows, seed),
        labels=label_array(features.index),
        dense_kernel=np.load(features.path / KERNEL_FILE),
        seed=seed,
        mi_sample_rows=mi_sample_rows,
    )
    selection.inputs = inputs
    selection.save(path)
    return selection


def selected_features(selection: Selection, embeddings: np.ndarray) -> np.ndarray:
    """Every row's selected features, float32 (N, k), transformed chunk by chunk."""
    rows = np.arange(len(embeddings))
    return np.concatenate([selection.transform(embeddings[chunk]) for chunk in _chunks(rows)])
