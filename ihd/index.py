"""The slice index: one row per readable DICOM slice, grouped into series and ordered along them.

``build_index`` scans folders of DICOM files by header only (in parallel, with a progress bar),
refuses what cannot be read as Hounsfield units (``ihd.dicom.interpretation_problem``) and second
copies of a SOPInstanceUID, merges the challenge's long ``ID,Label`` CSV, orders every series along
its slice normal (``series_positions``; ties broken by image id) and deals labeled patients into k
folds so that no patient's slices sit on both sides of a split.

How a series is ordered is decided per series, from what all its slices have, never slice by slice:

- every slice has ``ImagePositionPatient``: positions projected on the series' normal (the cross
  product of ``ImageOrientationPatient``'s direction cosines, from the slices that have usable ones;
  a tilted gantry sorts right), or, where no slice has usable orientation tags, on the line the
  positions follow (with a warning);
- some slices lack a position but every slice has a distinct ``InstanceNumber``: instance numbers
  (with a warning);
- otherwise the slices with a position are ordered by it and those without are refused by name
  (all of them where the positions coincide: their order is unknown).

The column ``z`` holds the value the series is sorted by (mm along the normal, or the instance
number); ``index_config.json`` counts the series ordered each way.

Outputs in the dataset folder:

- ``index.parquet``: columns ``INDEX_COLUMNS``, rows sorted by (split, series_id, position);
- ``index_config.json``: the settings and counts that made it;
- ``bad_files.csv``: ``path,reason`` for every file that could not be indexed, read as HU, placed in
  its series (or later, stored);
- ``headers.parquet`` (with ``resume``): every header read so far, so a rerun reads only new files,
  with where each file's pixel words lie (``PIXEL_COLUMNS``): ``pixel_readings`` hands them to the
  slice store, which then reads the pixels without parsing the file again.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from ihd.dicom import (
    MAX_AXIAL_TILT_DEG, DicomError, PixelLayout, interpretation_problem, read_header, slice_normals, tilt_degrees,
)
from ihd.io import atomic_path, file_state, named, read_json, write_json
from ihd.labels import SUBTYPES, read_long_labels
from ihd.parallel import parallel_map

INDEX_FILE = "index.parquet"
CONFIG_FILE = "index_config.json"
HEADERS_FILE = "headers.parquet"
BAD_FILES = "bad_files.csv"
SPLITS = ("train", "test")
FOLD_BALANCES = ("slices", "patients")
ID_COLUMNS = ["image_id", "patient_id", "study_id", "series_id", "split", "path"]
SERIES_PLANE_TOLERANCE_DEG = 2.0  # a slice further from its series' common plane is another reconstruction
MAX_FOLDS = int(np.iinfo(np.int8).max)  # fold numbers are stored as int8, -1 for rows in no fold
INDEX_COLUMNS = [*ID_COLUMNS, "z", "position", "series_length", *SUBTYPES, "fold"]
POSITION_COLUMNS = ["position_x", "position_y", "position_z"]
ORIENTATION_COLUMNS = [f"orientation_{i}" for i in range(6)]
PIXEL_COLUMNS = ["pixel_offset", "pixel_word", "bits_stored", "rsna_wrap", "file_bytes", "file_mtime_ns"]
NO_PIXEL_LAYOUT = {"pixel_offset": -1, "pixel_word": "", "bits_stored": 0,
                   "rsna_wrap": False}  # a file the slice store reads with ``read_hu``
SCAN_COLUMNS = [*ID_COLUMNS, "instance_uid", "modality", "rows", "cols", "rescale_slope", "rescale_intercept",
                *POSITION_COLUMNS, *ORIENTATION_COLUMNS, "instance_number", "folder", *PIXEL_COLUMNS]
SCAN_NUMBERS = ({"rows": np.int64, "cols": np.int64, "rescale_slope": np.float64, "rescale_intercept": np.float64,
                 "instance_number": np.float64, "pixel_offset": np.int64, "bits_stored": np.int64, "rsna_wrap": bool,
                 "file_bytes": np.int64, "file_mtime_ns": np.int64}
                | {c: np.float64 for c in POSITION_COLUMNS + ORIENTATION_COLUMNS})
ORDERINGS = ("normal", "position line", "instance number", "positions of some slices", "unorderable", "single slice")
SCAN_CHUNK_FILES = 50_000  # how often a resumable header scan saves what it has read


def list_files(folder: str | Path) -> list[Path]:
    """Every regular, non-hidden file under ``folder`` (recursive), sorted."""
    return sorted(readable_files(folder))


def readable_files(folder: str | Path) -> Iterator[Path]:
    """The files ``list_files`` lists, as they are found (links to folders are not followed)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of DICOM files")
    return (path for path in folder.rglob("*")
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def header_row(item: tuple[str, str, str]) -> dict:
    """Read one file's header into an index row; ``reason`` says why when it is unreadable. Every row keeps
    the file's size and modification time (``file_bytes``, ``file_mtime_ns``), so a rerun reads a file
    again once it has changed."""
    path, split, folder = item
    size, mtime = file_state(path) or (-1, -1)  # taken first: a file that changes during the read is read again
    try:
        header = read_header(path)
    except DicomError as error:
        row = {"reason": error.reason}
    else:
        row = {field.name: getattr(header, field.name) for field in fields(header)}
        row["reason"] = None
        position, orientation, pixels = row.pop("position"), row.pop("orientation"), row.pop("pixels")
        row.update(zip(POSITION_COLUMNS, position or [np.nan] * 3))
        row.update(zip(ORIENTATION_COLUMNS, orientation or [np.nan] * 6))
        row.update(NO_PIXEL_LAYOUT if pixels is None else {
            "pixel_offset": pixels.offset, "pixel_word": pixels.word, "bits_stored": pixels.bits_stored,
            "rsna_wrap": pixels.rsna_wrap})
    row.update(split=split, path=path, folder=folder, file_bytes=size, file_mtime_ns=mtime)
    return row


def pixel_reading(row: dict) -> tuple | None:
    """What ``ihd.dicom.read_hu_at`` needs after the path, from a header row (a dict with the columns
    of ``pixel_readings``): (``PixelLayout`` or None, rows, cols, slope, intercept); None when the row
    holds no header (a file the scan did not read)."""
    if pd.isna(row.get("rows")):
        return None
    layout = None if pd.isna(row["pixel_offset"]) or row["pixel_offset"] < 0 else PixelLayout(
        offset=int(row["pixel_offset"]), word=str(row["pixel_word"]), bits_stored=int(row["bits_stored"]),
        rsna_wrap=bool(row["rsna_wrap"]), file_bytes=int(row["file_bytes"]), file_mtime_ns=int(row["file_mtime_ns"]))
    return layout, int(row["rows"]), int(row["cols"]), float(row["rescale_slope"]), float(row["rescale_intercept"])


def pixel_readings(dataset_dir: str | Path) -> pd.DataFrame:
    """What the slice store needs to read each scanned file's pixels without parsing it again, from the
    header cache of a resumable scan: columns path, rows, cols, rescale_slope, rescale_intercept and
    ``PIXEL_COLUMNS`` (empty without a cache)."""
    columns = ["path", "rows", "cols", "rescale_slope", "rescale_intercept", *PIXEL_COLUMNS]
    path = Path(dataset_dir) / HEADERS_FILE
    if not path.is_file():
        return pd.DataFrame(columns=columns)
    headers = pd.read_parquet(path)
    if not set(columns) <= set(headers.columns):
        return pd.DataFrame(columns=columns)
    return headers.loc[headers["reason"].isna(), columns].reset_index(drop=True)


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
    good = scanned[~unreadable].drop(columns="reason").astype(SCAN_NUMBERS)
    bad = scanned.loc[unreadable, ["path", "reason"]]
    return good.sort_values("path", ignore_index=True), bad.sort_values("path", ignore_index=True)


def _read_scan_cache(cache: str | Path | None, items: list[tuple[str, str, str]]) -> pd.DataFrame:
    """Cached header rows of the files still present in ``items`` (an empty frame without a cache)."""
    columns = [*SCAN_COLUMNS, "reason"]
    empty = pd.DataFrame(columns=columns).astype({c: str for c in columns})
    if cache is None or not Path(cache).exists():
        return empty
    cached = pd.read_parquet(cache)
    if not set(columns) <= set(cached.columns):
        print(f"headers: {cache} was written by an older version, reading every header again")
        return empty
    present = pd.MultiIndex.from_tuples([item[:2] for item in items], names=["path", "split"])
    cached = cached[pd.MultiIndex.from_frame(cached[["path", "split"]]).isin(present)].reset_index(drop=True)
    unchanged = [file_state(path) == (size, mtime) for path, size, mtime in
                 zip(cached["path"], cached["file_bytes"], cached["file_mtime_ns"])]
    if not all(unchanged):
        print(f"headers: {len(unchanged) - sum(unchanged)} files changed since {cache} was written, reading them again")
    return cached[unchanged].reset_index(drop=True)


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


def refuse_uninterpretable(headers: pd.DataFrame, non_ct_as_hu: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split header rows into those that can be read as HU and bad files naming why the others cannot
    (``ihd.dicom.interpretation_problem``; ``non_ct_as_hu`` takes other modalities' values as HU)."""
    problems = pd.Series([
        interpretation_problem(row.modality, row.rows, row.cols, row.rescale_slope, row.rescale_intercept, non_ct_as_hu)
        for row in headers.itertuples()
    ], index=headers.index, dtype=object)
    refused = problems.notna()
    bad = pd.DataFrame({"path": headers.loc[refused, "path"], "reason": problems[refused]})
    return headers[~refused].reset_index(drop=True), bad


def refuse_off_plane(headers: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split header rows into axial slices in their series' plane and bad files naming why the others are
    not: a plane more than ``MAX_AXIAL_TILT_DEG`` from axial (a coronal or sagittal image, a localizer),
    or one more than ``SERIES_PLANE_TOLERANCE_DEG`` from the plane most of its series' slices share (another
    reconstruction mixed in). The models read axial slices in order along one normal. Slices without a
    usable orientation stay, for the fallbacks of ``series_positions``."""
    normals = slice_normals(headers[ORIENTATION_COLUMNS].to_numpy(np.float64))
    tilt = tilt_degrees(normals)
    with np.errstate(invalid="ignore"):
        apart = np.degrees(np.arccos(np.minimum(1.0, np.abs(np.einsum("ij,ij->i", normals,
                                                                       _common_normals(headers, normals))))))
    not_axial = tilt > MAX_AXIAL_TILT_DEG
    off_series = ~not_axial & (apart > SERIES_PLANE_TOLERANCE_DEG)
    reasons = pd.Series(None, index=headers.index, dtype=object)
    reasons[not_axial] = [f"not axial: its plane lies {t:.0f} degrees from axial (at most {MAX_AXIAL_TILT_DEG:.0f}): "
                          "a coronal or sagittal image, or a localizer" for t in tilt[not_axial]]
    reasons[off_series] = [f"its plane lies {a:.0f} degrees from the one most slices of series {series} share: "
                           "another reconstruction or a localizer"
                           for a, series in zip(apart[off_series], headers.loc[off_series, "series_id"])]
    refused = reasons.notna()
    bad = pd.DataFrame({"path": headers.loc[refused, "path"], "reason": reasons[refused]})
    return headers[~refused].reset_index(drop=True), bad


def _common_normals(headers: pd.DataFrame, normals: np.ndarray) -> np.ndarray:
    """Per slice, the unit normal most slices of its series share (to 0.01); NaN where its series has none."""
    rounded = pd.DataFrame(np.round(normals, 2), columns=["x", "y", "z"], index=headers.index)
    keyed = pd.concat([headers[["split", "series_id"]], rounded], axis=1).dropna()
    counts = keyed.groupby(["split", "series_id", "x", "y", "z"]).size().sort_values(ascending=False, kind="stable")
    common = counts.reset_index().drop_duplicates(["split", "series_id"]).set_index(["split", "series_id"])
    per_slice = common[["x", "y", "z"]].reindex(pd.MultiIndex.from_frame(headers[["split", "series_id"]])).to_numpy()
    with np.errstate(invalid="ignore"):
        return per_slice / np.linalg.norm(per_slice, axis=1, keepdims=True)


def drop_repeated_instances(headers: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the first file (by path) of each SOPInstanceUID; the other copies become bad files naming it."""
    headers = headers.sort_values("path", ignore_index=True)
    known = headers["instance_uid"].notna() & (headers["instance_uid"] != "")
    repeated = known & headers["instance_uid"].duplicated(keep="first")
    first_path = headers[known].drop_duplicates("instance_uid").set_index("instance_uid")["path"]
    bad = pd.DataFrame({
        "path": headers.loc[repeated, "path"],
        "reason": [f"same SOPInstanceUID {uid} as {first_path[uid]}: read once, from that file"
                   for uid in headers.loc[repeated, "instance_uid"]],
    })
    return headers[~repeated].reset_index(drop=True), bad


def _series_normal(orientations: np.ndarray) -> np.ndarray | None:
    """The mean unit normal of the slices with usable ImageOrientationPatient values; None if none has them."""
    normals = slice_normals(orientations)
    normals = normals[np.isfinite(normals).all(axis=1)]
    if not len(normals):
        return None
    mean = normals.mean(axis=0)
    return mean / np.linalg.norm(mean)


def _position_line(positions: np.ndarray) -> np.ndarray | None:
    """The direction along which slice positions spread (pointing to the head's top, +z, or the
    largest component); None when all positions coincide."""
    centred = positions - positions.mean(axis=0)
    _, spread, directions = np.linalg.svd(centred, full_matrices=False)
    if spread[0] < 1e-3:
        return None
    line = directions[0]
    lead = 2 if abs(line[2]) > 1e-6 else int(np.argmax(np.abs(line)))
    return line if line[lead] > 0 else -line


def _spread(keys: np.ndarray) -> bool:
    """True when sort keys tell slices apart (not all equal within 1 micrometre)."""
    return len(keys) > 0 and np.ptp(keys) > 1e-3


def order_one_series(series: pd.DataFrame) -> tuple[np.ndarray, str]:
    """Sort keys of one series' slices and how they were found (one of ``ORDERINGS``); NaN marks a
    slice that cannot be placed. See the module docstring for the rules; ``series_positions`` orders
    the common series (every slice placed along a known normal) for all series at once."""
    if len(series) == 1:
        return np.zeros(1), "single slice"
    positions = series[POSITION_COLUMNS].to_numpy(np.float64)
    orientations = series[ORIENTATION_COLUMNS].to_numpy(np.float64)
    placed = np.isfinite(positions).all(axis=1)
    instances = series["instance_number"].to_numpy(np.float64)
    if placed.all():
        normal, how = _series_normal(orientations), "normal"
        if normal is None:
            normal, how = _position_line(positions), "position line"
        if normal is not None and _spread(positions @ normal):
            return positions @ normal, how
    if np.isfinite(instances).all() and len(np.unique(instances)) == len(instances):
        return instances, "instance number"
    keys = np.full(len(series), np.nan)
    normal = _series_normal(orientations[placed])
    if normal is None and placed.sum() > 1:
        normal = _position_line(positions[placed])
    if normal is not None and (placed.sum() == 1 or _spread(positions[placed] @ normal)):
        keys[placed] = positions[placed] @ normal
    return keys, "positions of some slices" if np.isfinite(keys).any() else "unorderable"


def _positions_along_series_normals(headers: pd.DataFrame, series: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every slice's position along its series' normal (``_series_normal`` for all series at once) and
    a mask of the series (by number) that this orders: more than one slice, all with a position and
    told apart, the normal known. The other series take ``order_one_series``."""
    normals = pd.DataFrame(slice_normals(headers[ORIENTATION_COLUMNS].to_numpy(np.float64))).groupby(series).mean()
    normals = normals.to_numpy() / np.linalg.norm(normals.to_numpy(), axis=1, keepdims=True)
    positions = headers[POSITION_COLUMNS].to_numpy(np.float64)
    keys = np.einsum("ij,ij->i", positions, normals[series])
    by_series = pd.Series(keys).groupby(series)
    finite = pd.Series(np.isfinite(keys)).groupby(series).all()
    ordered = (by_series.size() > 1) & finite & (by_series.max() - by_series.min() > 1e-3)
    return keys, ordered.to_numpy()


def series_positions(headers: pd.DataFrame) -> tuple[pd.Series, pd.DataFrame, dict[str, int]]:
    """The sort key ``z`` of every placed slice (indexed like ``headers``), bad files for the slices
    that cannot be placed, and how many series were ordered each way; warns about every fallback."""
    groups = headers.groupby(["split", "series_id"], sort=True)
    series = groups.ngroup().to_numpy()
    keys, ordered = _positions_along_series_normals(headers, series)
    names = groups.size().index.get_level_values("series_id")
    orderings: dict[str, list[str]] = {how: [] for how in ORDERINGS}
    orderings["normal"] = [names[g] for g in np.flatnonzero(ordered)]
    for g in np.flatnonzero(~ordered):
        rows = np.flatnonzero(series == g)
        keys[rows], how = order_one_series(headers.iloc[rows])
        orderings[how].append(names[g])
    z = pd.Series(keys, index=headers.index)
    fallbacks = {
        "position line": "no slice has a usable ImageOrientationPatient: ordered along the line their "
                         "ImagePositionPatient values follow",
        "instance number": "ImagePositionPatient missing on some slices or the same on all: ordered by InstanceNumber",
        "positions of some slices": "ImagePositionPatient missing on some slices and InstanceNumbers missing or "
                                    "repeated: the slices with a position ordered by it, the others refused",
        "unorderable": "ImagePositionPatient the same on all slices and InstanceNumbers missing or repeated: "
                       "refused, their order is unknown",
    }
    for how, what in fallbacks.items():
        if orderings[how]:
            warnings.warn(f"{len(orderings[how])} series: {what} ({named(orderings[how])})")
    unplaced = z.isna()
    has_position = headers[POSITION_COLUMNS].notna().all(axis=1)
    bad = pd.DataFrame({
        "path": headers.loc[unplaced, "path"],
        "reason": [
            f"cannot be placed in series {series_id}: "
            + ("its slices share one position" if positioned else "no ImagePositionPatient")
            + ", and the series' InstanceNumbers are missing or repeated"
            for series_id, positioned in zip(headers.loc[unplaced, "series_id"], has_position[unplaced])
        ],
    })
    return z[~unplaced], bad, {how: len(ids) for how, ids in orderings.items()}


def place_slices(headers: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """``headers`` of the slices that can be placed in their series, with their sort key ``z``; bad files
    for the others; how many series were ordered each way (see ``series_positions``)."""
    z, unplaced, orderings = series_positions(headers)
    return headers.loc[z.index].assign(z=z), unplaced, orderings


SAME_PLACE_MM = 1e-3  # slices of one series closer than this along its normal lie at one place


def order_series(headers: pd.DataFrame) -> pd.DataFrame:
    """Sort by (split, series, z, image id); add ``position`` (0..n-1) and ``series_length``. Warns about the
    series with two slices at one place (two reconstructions in one series), which only the image ids order."""
    ordered = headers.sort_values(["split", "series_id", "z", "image_id"], ignore_index=True)
    same_series = ordered[["split", "series_id"]].eq(ordered[["split", "series_id"]].shift()).all(axis=1)
    at_one_place = same_series & (ordered["z"].diff().abs() < SAME_PLACE_MM)
    if at_one_place.any():
        twice = pd.unique(ordered.loc[at_one_place, "series_id"])
        warnings.warn(f"{len(twice)} series hold two slices at one place ({int(at_one_place.sum())} pairs; two "
                      "reconstructions in one series?): ordered by image id there, so a slice's neighbours may "
                      f"show its own place ({named(list(twice))})")
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
    if not 2 <= folds <= MAX_FOLDS:
        raise ValueError(f"folds must be from 2 to {MAX_FOLDS} (fold numbers are int8), got {folds}")
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


def split_sha256(index: pd.DataFrame) -> str:
    """A sha256 of what the index gives training: every labeled training row's image id, fold and six labels
    (test rows and row order aside). A model trained on one split must not be resumed or read on another, where
    its validation fold could hold slices it trained on."""
    labeled = index[(index["split"] == "train") & (index["fold"] >= 0)].sort_values("image_id")
    table = labeled[["image_id", "fold", *SUBTYPES]].reset_index(drop=True)
    return hashlib.sha256(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes()).hexdigest()


def split_by_series_order(index: pd.DataFrame, train_series: int) -> np.ndarray:
    """Fold numbers (int8) of the paper's split: the first ``train_series`` labeled training series, in
    SeriesInstanceUID order, get fold 0 (training), the others fold 1 (validation); -1 for the rest.

    Unlike `assign_folds` it ignores patients, as the paper's code did: one patient's series can sit on
    both sides.
    """
    fold = np.full(len(index), -1, dtype=np.int8)
    labeled = (index["split"] == "train").to_numpy() & index["any"].notna().to_numpy()
    series = np.sort(index.loc[labeled, "series_id"].unique())
    if not 0 < train_series < len(series):
        raise ValueError(f"a split after {train_series} series needs more than {train_series} labeled series to "
                         f"leave some for validation; this dataset has {len(series)}: choose --train-series below it")
    training = set(series[:train_series])
    fold[labeled] = np.where(index.loc[labeled, "series_id"].isin(training), 0, 1)
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
    non_ct_as_hu: bool = False,
    train_series: int = 0,
) -> pd.DataFrame:
    """Scan (folder, split) sources into ``<dataset_dir>/index.parquet``; returns the index.

    Files that cannot be read, read as HU (``non_ct_as_hu`` takes modalities other than CT as HU),
    or placed in their series, and second copies of a SOPInstanceUID, are listed in
    ``bad_files.csv`` with the reason (the scan goes on); the settings and counts go to
    ``index_config.json``. With ``resume`` the headers already read by an earlier run (kept in
    ``headers.parquet``) are not read again. Folds group patients (`assign_folds`), or with
    ``train_series`` follow the paper's split by series order (`split_by_series_order`).
    """
    sources = [(str(Path(folder).resolve()), split) for folder, split in sources]
    dataset_dir = Path(dataset_dir)
    cache = dataset_dir / HEADERS_FILE if resume else None
    labels = None if labels_csv is None else read_long_labels(labels_csv)  # a bad label file stops us before any write
    headers, unreadable = scan_headers(sources, workers=workers, cache=cache)
    headers, refused = refuse_uninterpretable(headers, non_ct_as_hu)
    headers, off_plane = refuse_off_plane(headers)
    headers, repeated = drop_repeated_instances(headers)
    headers, clashes = make_ids_unique(headers)
    headers, unplaced, orderings = place_slices(headers)
    bad = pd.concat([unreadable, refused, off_plane, repeated, clashes, unplaced], ignore_index=True)
    index, unmatched_labels = merge_labels(order_series(headers), labels)
    index["fold"] = (split_by_series_order(index, train_series) if train_series
                     else assign_folds(index, folds=folds, balance=balance, seed=seed))
    index = index[INDEX_COLUMNS].astype({c: str for c in ID_COLUMNS} | {"z": np.float64})

    dataset_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(dataset_dir / INDEX_FILE) as tmp:
        index.to_parquet(tmp, index=False)
    bad_path = write_bad_files(dataset_dir, bad)
    unlabeled_train = index["image_id"][(index["split"] == "train") & (index["fold"] < 0)].tolist()
    if labels_csv is not None and (unlabeled_train or unmatched_labels):
        warnings.warn(f"{labels_csv}: {len(unlabeled_train)} training images have no labels there and are left out of "
                      f"every fold ({named(unlabeled_train)}); {unmatched_labels} labeled images are not among "
                      "those read")
    write_json(dataset_dir / CONFIG_FILE, {
        "sources": [{"folder": folder, "split": split} for folder, split in sources],
        "labels_csv": None if labels_csv is None else str(Path(labels_csv).resolve()),
        "folds": 2 if train_series else folds,
        "fold_balance": balance,
        "train_series": train_series,
        "seed": seed,
        **index_counts(index),
        "labels_without_image": unmatched_labels,
        "bad_files": len(bad),
        "non_ct_as_hu": non_ct_as_hu,
        "non_ct_read_as_hu": int((headers["modality"] != "CT").sum()),
        "series_ordered_by": orderings,
        **(extra_config or {}),
    })
    print(f"index: {len(index)} slices in {index.groupby(['split', 'series_id']).ngroups} series -> "
          f"{dataset_dir / INDEX_FILE}; {len(bad)} files refused by their headers -> {bad_path}")
    return index


def index_counts(index: pd.DataFrame) -> dict:
    """The counts ``index_config.json`` keeps of an index: rows, series, patients, folds, unlabeled training rows."""
    labeled = index["fold"] >= 0
    return {
        "rows": len(index),
        "rows_by_split": index["split"].value_counts().sort_index().to_dict(),
        "series": int(index.groupby(["split", "series_id"]).ngroups),
        "patients": int(index["patient_id"].nunique()),
        "slices_by_fold": index.loc[labeled, "fold"].value_counts().sort_index().to_dict(),
        "patients_by_fold": index[labeled].groupby("fold")["patient_id"].nunique().to_dict(),
        "unlabeled_train_rows": int(((index["split"] == "train") & ~labeled).sum()),
    }


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
    config.update(**index_counts(index), bad_files=config["bad_files"] + len(bad))
    write_json(dataset_dir / CONFIG_FILE, config)
    print(f"index: dropped {len(bad)} slices whose pixels could not be read -> {dataset_dir / BAD_FILES} "
          f"({config['bad_files']} bad files in all)")
    return index


def read_index(dataset_dir: str | Path) -> pd.DataFrame:
    """Read ``<dataset_dir>/index.parquet``."""
    path = Path(dataset_dir) / INDEX_FILE
    if not path.is_file():
        dataset_dir = Path(dataset_dir)
        raise FileNotFoundError(f"{path} not found: prepare it first with prepare_data.py --dataset {dataset_dir.name} "
                                f"--data-dir {dataset_dir.parent} and its source (--synthetic, --download, "
                                "--dicom-dir DIR or --raw DIR)")
    return pd.read_parquet(path)
