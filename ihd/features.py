"""The embedding cache and the feature-selection methods.

Extraction runs the trained CNN once over every slice of the index (train, validation and test) and
keeps, per slice and in index order, the pooled `"embedding"` vector and the six `"pred"`
probabilities as float16 in `features/<run>/embeddings.npy` and `probabilities.npy`. Batches are
streamed into memory-mapped files and flushed in chunks; `progress.json` says how many leading rows
are final, so a killed extraction resumes where it stopped and memory does not grow with the data.
`pred_kernel.npy` keeps the head's Dense kernel (D, 6) for the `weights:k` selection.

A selection reduces the D embedding dimensions to k, fitted on training rows only and saved as
`selection-<slug>.npz` next to the features, so validation and test rows get the same transform:

- `all`: every dimension.
- `pca:k`: the top k principal components (the paper's choice, k=120), from a streamed covariance.
- `weights:k`: the k dimensions with the largest summed |kernel| in the `"pred"` Dense layer.
- `variance:k`: the k dimensions of largest variance.
- `random:k`: k seeded random dimensions, the control every method must beat.
- `mi:k`: the k dimensions of largest mutual information with the labels (weighted like the metric),
  estimated on a seeded sample of training rows.
"""

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from sklearn.feature_selection import mutual_info_classif
from tqdm.auto import tqdm

from ihd.cnn import embedding_extractor
from ihd.inputs import fold_rows, inference_dataset, label_array
from ihd.io import atomic_path, read_json, write_json
from ihd.labels import LABEL_WEIGHTS, SUBTYPES
from ihd.slices import SliceStore
from ihd.windows import parse_recipe

EMBEDDINGS_FILE = "embeddings.npy"
PROBABILITIES_FILE = "probabilities.npy"
PROGRESS_FILE = "progress.json"
KERNEL_FILE = "pred_kernel.npy"
METHODS = ("all", "pca", "weights", "variance", "random", "mi")
STATS_CHUNK_ROWS = 8192


def _open_arrays(out_dir: Path, rows: int, dim: int, fresh: bool) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings and probabilities memmaps, created when ``fresh``, else opened for update."""
    mode = "w+" if fresh else "r+"
    shapes = {EMBEDDINGS_FILE: (rows, dim), PROBABILITIES_FILE: (rows, len(SUBTYPES))}
    arrays = []
    for name, shape in shapes.items():
        kwargs = {"dtype": np.float16, "shape": shape} if fresh else {}
        array = np.lib.format.open_memmap(out_dir / name, mode=mode, **kwargs)
        if array.shape != shape:
            raise ValueError(f"{out_dir / name} has shape {array.shape}, expected {shape}: delete {out_dir} and rerun")
        arrays.append(array)
    return arrays[0], arrays[1]


def rows_done(out_dir: str | Path) -> int:
    """Leading rows of ``out_dir``'s feature files that are final (0 when extraction has not started)."""
    progress = Path(out_dir) / PROGRESS_FILE
    return int(read_json(progress)["rows_done"]) if progress.exists() else 0


def extract_features(
    model: keras.Model,
    cnn_config: dict,
    index: pd.DataFrame,
    index_path: str | Path,
    store: SliceStore,
    out_dir: str | Path,
    batch_size: int = 64,
    chunk_rows: int = 2048,
) -> Path:
    """Write embeddings and probabilities of every index row to ``out_dir``, resuming a partial run.

    ``cnn_config`` is the CNN run's config.json (image_size, recipe); it goes to the features'
    config.json with the embedding size and the index path. Flushes every ``chunk_rows`` rows.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extractor = embedding_extractor(model)
    dim = int(extractor.outputs[0].shape[-1])
    config = {**cnn_config, "embedding_dim": dim, "rows": len(index), "index_path": str(index_path)}
    config_path = out_dir / "config.json"
    start = rows_done(out_dir)
    if start and (not config_path.exists() or read_json(config_path) != config):
        print(f"{out_dir} holds features of other settings: extracting again from the first row")
        start = 0
    if start == 0:
        write_json(out_dir / PROGRESS_FILE, {"rows_done": 0})
    embeddings, probabilities = _open_arrays(out_dir, len(index), dim, fresh=start == 0)
    write_json(config_path, config)
    np.save(out_dir / KERNEL_FILE, model.get_layer("pred").get_weights()[0].astype(np.float32))
    data = inference_dataset(
        index, store, parse_recipe(cnn_config["recipe"]), np.arange(start, len(index)),
        int(cnn_config["image_size"]), batch_size,
    )
    row = flushed = start
    with tqdm(total=len(index), initial=start, desc="features", unit="slice", dynamic_ncols=True) as bar:
        for batch in data:
            embedding, probability = extractor.predict_on_batch(batch)
            embeddings[row : row + len(embedding)] = embedding
            probabilities[row : row + len(embedding)] = probability
            row += len(embedding)
            bar.update(len(embedding))
            if row - flushed >= chunk_rows or row == len(index):
                embeddings.flush()
                probabilities.flush()
                write_json(out_dir / PROGRESS_FILE, {"rows_done": row})
                flushed = row
    return out_dir


@dataclass
class Features:
    """A complete feature store: arrays in index order, the index, and how they were made."""

    embeddings: np.ndarray
    probabilities: np.ndarray
    index: pd.DataFrame
    config: dict


def load_features(run_dir: str | Path) -> Features:
    """Open ``features/<run>/`` (memory-mapped); raises if its extraction is incomplete."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: extract features with train_cnn.py --extract-only")
    config = read_json(config_path)
    if rows_done(run_dir) != config["rows"]:
        raise RuntimeError(
            f"{run_dir}: extraction stopped at row {rows_done(run_dir)} of {config['rows']}: "
            "rerun train_cnn.py --extract-only to finish it"
        )
    return Features(
        embeddings=np.load(run_dir / EMBEDDINGS_FILE, mmap_mode="r"),
        probabilities=np.load(run_dir / PROBABILITIES_FILE, mmap_mode="r"),
        index=pd.read_parquet(config["index_path"]),
        config=config,
    )


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
    """A fitted selection: either kept ``columns`` or a PCA projection (``mean``, ``components``)."""

    name: str
    columns: np.ndarray | None = None
    mean: np.ndarray | None = None
    components: np.ndarray | None = None

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Selected features of the rows ``x`` (n, D) as float32 (n, k)."""
        x = np.asarray(x, dtype=np.float32)
        if self.components is not None:
            return ((x - self.mean) @ self.components.T).astype(np.float32)
        return x[:, self.columns]

    def save(self, path: str | Path) -> None:
        """Write the fitted selection to an .npz file, atomically."""
        arrays = {k: v for k, v in vars(self).items() if k != "name" and v is not None}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, name=np.array(self.name), **arrays)


def load_selection(path: str | Path) -> Selection:
    """Read a selection written by `Selection.save`."""
    with np.load(path) as saved:
        arrays = {k: saved[k] for k in saved.files if k != "name"}
        return Selection(name=str(saved["name"]), **arrays)


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
        raise ValueError(f"feature selection {name!r} asks for {k} dimensions but the embedding has {dim}")
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


def selected_features(run_dir: str | Path, name: str, seed: int = 0) -> np.ndarray:
    """Every row's selected features, float32 (N, k); fits and saves the selection first if missing."""
    run_dir = Path(run_dir)
    features = load_features(run_dir)
    path = run_dir / f"selection-{selection_slug(name)}.npz"
    if path.exists():
        selection = load_selection(path)
    else:
        selection = fit_selection(
            name,
            features.embeddings,
            training_rows_of(features),
            labels=label_array(features.index),
            dense_kernel=np.load(run_dir / KERNEL_FILE),
            seed=seed,
        )
        selection.save(path)
    rows = np.arange(len(features.index))
    return np.concatenate([selection.transform(features.embeddings[chunk]) for chunk in _chunks(rows)])
