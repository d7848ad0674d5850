"""The slice index: one row per readable DICOM slice, grouped into series and ordered along them.

``build_index`` scans folders of DICOM files by header only (in parallel, with a progress bar),
merges the challenge's long ``ID,Label`` CSV, orders every series by the slice position along its
normal (``ImagePositionPatient`` projected on the normal of ``ImageOrientationPatient``, so a tilted
gantry still sorts right; ties broken by image id) and deals labeled patients into k folds so that
no patient's slices sit on both sides of a split.

Outputs in the dataset folder:

- ``index.parquet``: columns ``INDEX_COLUMNS``, rows sorted by (split, series_id, position);
- ``index_config.json``: the settings and counts that made it;
- ``bad_files.csv``: ``path,reason`` for every file that could not be indexed (or later, stored);
- ``headers.parquet`` (with ``resume``): every header read so far, so a rerun reads only new files.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ihd.dicom import DicomError, read_header
from ihd.io import atomic_path, read_json, write_json
from ihd.labels import SUBTYPES, read_long_labels
from ihd.parallel import parallel_map

INDEX_FILE = "index.parquet"
CONFIG_FILE = "index_config.json"
HEADERS_FILE = "headers.parquet"
BAD_FILES = "bad_files.csv"
SPLITS = ("train", "test")
FOLD_BALANCES = ("slices", "patients")
ID_COLUMNS = ["image_id", "patient_id", "study_id", "series_id", "split", "path"]
INDEX_COLUMNS = [*ID_COLUMNS, "z", "position", "series_length", *SUBTYPES, "fold"]
SCAN_COLUMNS = [*ID_COLUMNS, "z", "rows", "cols", "folder"]
SCAN_CHUNK_FILES = 50_000  # how often a resumable header scan saves what it has read


def list_files(folder: str | Path) -> list[Path]:
    """Every regular, non-hidden file under ``folder`` (recursive), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of DICOM files")
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def header_row(item: tuple[str, str, str]) -> dict:
    """Read one file's header into an index row; ``reason`` says why when it is unreadable."""
    path, split, folder = item
    try:
        row = asdict(read_header(path))
        row["reason"] = None
    except DicomError as error:
        row = {"reason": error.reason}
    row.update(split=split, path=path, folder=folder)
    return row


def scan_headers(
    sources: Sequence[tuple[str | Path, str]],
    workers: int | None = None,
    cache: str | Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Headers of every file in the (folder, split) sources -> (readable rows, bad files with reasons).

    With a ``cache`` parquet file the scan is resumable: what was scanned before (readable or not)
    is taken from it, only new files are read, and the cache is rewritten after every
    ``SCAN_CHUNK_FILES`` files, so a killed scan loses at most one chunk.
    """
    items = []
    for folder, split in sources:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        folder = Path(folder).resolve()
        items += [(str(path), split, str(folder)) for path in list_files(folder)]
    scanned = _read_scan_cache(cache, items)
    done = set(zip(scanned["path"], scanned["split"]))
    todo = [item for item in items if item[:2] not in done]
    if len(done):
        print(f"headers: {len(done)} files known from {cache}, {len(todo)} to read")
    for start in range(0, len(todo), SCAN_CHUNK_FILES):
        chunk = todo[start : start + SCAN_CHUNK_FILES]
        rows = pd.DataFrame(list(parallel_map(header_row, chunk, workers=workers, desc="headers", unit="file")))
        scanned = pd.concat([scanned, rows], ignore_index=True)
        if cache is not None:
            with atomic_path(cache) as tmp:
                scanned.to_parquet(tmp, index=False)
    unreadable = scanned["reason"].notna()
    good = scanned[~unreadable].drop(columns="reason")
    bad = scanned.loc[unreadable, ["path", "reason"]]
    return good.sort_values("path", ignore_index=True), bad.sort_values("path", ignore_index=True)


def _read_scan_cache(cache: str | Path | None, items: list[tuple[str, str, str]]) -> pd.DataFrame:
    """Cached header rows of the files still present in ``items`` (an empty frame without a cache)."""
    columns = [*SCAN_COLUMNS, "reason"]
    if cache is None or not Path(cache).exists():
        return pd.DataFrame(columns=columns).astype({c: str for c in columns})
    cached = pd.read_parquet(cache)
    present = pd.MultiIndex.from_tuples([item[:2] for item in items], names=["path", "split"])
    return cached[pd.MultiIndex.from_frame(cached[["path", "split"]]).isin(present)].reset_index(drop=True)


def make_ids_unique(headers: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Give files that share a name distinct ids (their path under the scanned folder); drop true clashes.

    Image ids are file stems (the challenge's ``ID_<hex>``). Plain exports often reuse names such as
    ``IM0001.dcm`` in every series folder: those get ``<sub>_<folders>_<name>`` ids instead. Files
    whose ids still clash are returned as bad files.
    """
    headers = headers.copy()
    shared = headers["image_id"].duplicated(keep=False)
    if shared.any():
        relative = [
            "_".join(Path(path).relative_to(folder).with_suffix("").parts)
            for path, folder in zip(headers.loc[shared, "path"], headers.loc[shared, "folder"])
        ]
        headers.loc[shared, "image_id"] = relative
    clash = headers["image_id"].duplicated(keep="first")
    first_path = headers.drop_duplicates("image_id").set_index("image_id")["path"]
    bad = pd.DataFrame({
        "path": headers.loc[clash, "path"],
        "reason": [f"image id {i} already used by {first_path[i]}" for i in headers.loc[clash, "image_id"]],
    })
    return headers[~clash].reset_index(drop=True), bad


def order_series(headers: pd.DataFrame) -> pd.DataFrame:
    """Sort by (split, series, z, image id); add ``position`` (0..n-1) and ``series_length``."""
    ordered = headers.sort_values(["split", "series_id", "z", "image_id"], ignore_index=True)
    groups = ordered.groupby(["split", "series_id"], sort=False)
    ordered["position"] = groups.cumcount().astype(np.int32)
    ordered["series_length"] = groups["image_id"].transform("size").astype(np.int32)
    return ordered


def merge_labels(index: pd.DataFrame, labels: pd.DataFrame | None) -> tuple[pd.DataFrame, int]:
    """Attach the six labels to training rows (NaN elsewhere); returns the index and the unmatched label count."""
    index = index.copy()
    for subtype in SUBTYPES:
        index[subtype] = np.float32(np.nan)
    if labels is None:
        return index, 0
    train = index["split"] == "train"
    matched = labels.reindex(index.loc[train, "image_id"])
    index.loc[train, list(SUBTYPES)] = matched.to_numpy(dtype=np.float32)
    for subtype in SUBTYPES:
        index[subtype] = index[subtype].astype(np.float32)
    unmatched = int((~labels.index.isin(index.loc[train, "image_id"])).sum())
    return index, unmatched


def _patient_order_key(patient_id: str, seed: int) -> str:
    return hashlib.sha1(f"{seed}:{patient_id}".encode()).hexdigest()


def assign_folds(index: pd.DataFrame, folds: int = 5, balance: str = "slices", seed: int = 0) -> np.ndarray:
    """Fold numbers (int8) grouped by patient for labeled training rows, -1 for the rest.

    Deterministic greedy dealing: patients in decreasing size (ties in a seeded hash order) each go
    to the fold that holds the fewest slices (``balance="slices"``) or patients (``"patients"``).
    """
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if balance not in FOLD_BALANCES:
        raise ValueError(f"balance must be one of {FOLD_BALANCES}, got {balance!r}")
    fold = np.full(len(index), -1, dtype=np.int8)
    labeled = (index["split"] == "train").to_numpy() & index["any"].notna().to_numpy()
    sizes = index.loc[labeled, "patient_id"].value_counts()
    patients = sorted(sizes.index, key=lambda p: (-sizes[p], _patient_order_key(p, seed)))
    load = np.zeros(folds, dtype=np.int64)
    patient_fold = {}
    for patient in patients:
        target = int(np.argmin(load))
        patient_fold[patient] = target
        load[target] += sizes[patient] if balance == "slices" else 1
    fold[labeled] = index.loc[labeled, "patient_id"].map(patient_fold).to_numpy(dtype=np.int8)
    if 0 < len(patients) < folds:
        warnings.warn(f"{len(patients)} labeled patients cannot fill {folds} folds: folds "
                      f"{', '.join(map(str, range(len(patients), folds)))} are empty and cannot validate")
    return fold


def write_bad_files(dataset_dir: str | Path, bad: pd.DataFrame, append: bool = False) -> Path:
    """Write (or add to) ``bad_files.csv`` in the dataset folder, atomically; one row per path."""
    path = Path(dataset_dir) / BAD_FILES
    if append and path.is_file():
        bad = pd.concat([pd.read_csv(path, dtype=str), bad], ignore_index=True)
    bad = bad[["path", "reason"]].drop_duplicates("path", keep="last").sort_values("path")
    with atomic_path(path) as tmp:
        bad.to_csv(tmp, index=False)
    return path


def build_index(
    sources: Iterable[tuple[str | Path, str]],
    dataset_dir: str | Path,
    labels_csv: str | Path | None = None,
    folds: int = 5,
    balance: str = "slices",
    seed: int = 0,
    workers: int | None = None,
    extra_config: dict | None = None,
    resume: bool = False,
) -> pd.DataFrame:
    """Scan (folder, split) sources into ``<dataset_dir>/index.parquet``; returns the index.

    Unreadable files are listed in ``bad_files.csv`` (the scan goes on); the settings and counts
    go to ``index_config.json``. With ``resume`` the headers already read by an earlier run (kept
    in ``headers.parquet``) are not read again.
    """
    sources = [(str(Path(folder).resolve()), split) for folder, split in sources]
    dataset_dir = Path(dataset_dir)
    cache = dataset_dir / HEADERS_FILE if resume else None
    labels = None if labels_csv is None else read_long_labels(labels_csv)  # a bad label file stops us before any write
    headers, bad = scan_headers(sources, workers=workers, cache=cache)
    headers, clashes = make_ids_unique(headers)
    index, unmatched_labels = merge_labels(order_series(headers), labels)
    index["fold"] = assign_folds(index, folds=folds, balance=balance, seed=seed)
    index = index[INDEX_COLUMNS].astype({c: str for c in ID_COLUMNS} | {"z": np.float64})

    dataset_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(dataset_dir / INDEX_FILE) as tmp:
        index.to_parquet(tmp, index=False)
    bad_path = write_bad_files(dataset_dir, pd.concat([bad, clashes], ignore_index=True))
    labeled = index["fold"] >= 0
    write_json(dataset_dir / CONFIG_FILE, {
        "sources": [{"folder": folder, "split": split} for folder, split in sources],
        "labels_csv": None if labels_csv is None else str(Path(labels_csv).resolve()),
        "folds": folds,
        "fold_balance": balance,
        "seed": seed,
        "rows": len(index),
        "rows_by_split": index["split"].value_counts().sort_index().to_dict(),
        "series": int(index.groupby(["split", "series_id"]).ngroups),
        "patients": int(index["patient_id"].nunique()),
        "slices_by_fold": index.loc[labeled, "fold"].value_counts().sort_index().to_dict(),
        "patients_by_fold": index[labeled].groupby("fold")["patient_id"].nunique().to_dict(),
        "labels_without_image": unmatched_labels,
        "unlabeled_train_rows": int(((index["split"] == "train") & ~labeled).sum()),
        "bad_files": len(bad) + len(clashes),
        **(extra_config or {}),
    })
    print(f"index: {len(index)} slices in {index.groupby(['split', 'series_id']).ngroups} series -> "
          f"{dataset_dir / INDEX_FILE}; {len(bad) + len(clashes)} bad files -> {bad_path}")
    return index


def drop_unreadable(dataset_dir: str | Path, failures: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """Remove files found unreadable after the scan (say, truncated pixel data) from the index.

    Positions and series lengths are recomputed, folds kept; the files join ``bad_files.csv``.
    """
    dataset_dir = Path(dataset_dir)
    index = read_index(dataset_dir)
    if not failures:
        return index
    bad = pd.DataFrame(list(failures), columns=["path", "reason"])
    kept = index[~index["path"].isin(bad["path"])].drop(columns=["position", "series_length"])
    index = order_series(kept)[INDEX_COLUMNS]
    with atomic_path(dataset_dir / INDEX_FILE) as tmp:
        index.to_parquet(tmp, index=False)
    write_bad_files(dataset_dir, bad, append=True)
    config = read_json(dataset_dir / CONFIG_FILE)
    config.update(rows=len(index), bad_files=config["bad_files"] + len(bad),
                  rows_by_split=index["split"].value_counts().sort_index().to_dict())
    write_json(dataset_dir / CONFIG_FILE, config)
    print(f"index: dropped {len(bad)} unreadable slices -> {dataset_dir / BAD_FILES}")
    return index


def read_index(dataset_dir: str | Path) -> pd.DataFrame:
    """Read ``<dataset_dir>/index.parquet``."""
    path = Path(dataset_dir) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run prepare_data.py first")
    return pd.read_parquet(path)
