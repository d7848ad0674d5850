"""The challenge's labels: the subtype order, the metric weights and the long ``ID,Label`` format.

Every other module imports these facts from here. Kaggle writes one row per image and subtype,
``ID_<image>_<subtype>,<label>``, in the order below; the metric weighs ``any`` twice.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ihd.io import atomic_path

SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
LABEL_WEIGHTS = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 2.0])
ANY = SUBTYPES.index("any")  # the column of "any bleed"


class LabelFileError(ValueError):
    """A label or submission CSV that does not follow the challenge's long format."""


def long_id(image_id: str, subtype: str) -> str:
    """``ID_abc`` and ``epidural`` -> ``ID_abc_epidural``."""
    return f"{image_id}_{subtype}"


def read_long_labels(path: str | Path) -> pd.DataFrame:
    """Read a long ``ID,Label`` CSV into a wide table: index ``image_id``, columns SUBTYPES, float32.

    Exactly repeated rows are dropped (the real ``stage_2_train.csv`` repeats a few); an ID given
    two different labels, an unknown subtype, a missing subtype, a label other than 0 or 1, or an
    image whose ``any`` is 0 beside a subtype of 1 raises ``LabelFileError`` naming the file and the
    row or image.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype={"ID": str, "Label": str})
    except (OSError, ValueError) as error:  # a missing file, a row of other fields, bytes that are not text
        raise LabelFileError(f"{path}: cannot be read as the challenge's ID,Label CSV ({error})") from None
    if list(table.columns) != ["ID", "Label"]:
        raise LabelFileError(f"{path}: header must be ID,Label, found {','.join(table.columns)}")
    table = table.drop_duplicates()  # keeps each row's number in the file (its index, header = row 1)
    parts = table["ID"].str.rpartition("_")
    bad = ~parts[2].isin(SUBTYPES) | (parts[0] == "")
    if bad.any():
        row = bad.idxmax()
        raise LabelFileError(f"{path}: row {row + 2}: {table['ID'][row]!r} is not ID_<image>_<subtype>")
    if table["Label"].isna().any():
        raise LabelFileError(f"{path}: row {table['Label'].isna().idxmax() + 2}: no label")
    labels = pd.to_numeric(table["Label"], errors="coerce")
    if labels.isna().any():
        row = labels.isna().idxmax()
        raise LabelFileError(f"{path}: row {row + 2}: label {table['Label'][row]!r} is not a number")
    if not labels.isin((0, 1)).all():
        row = (~labels.isin((0, 1))).idxmax()
        raise LabelFileError(f"{path}: row {row + 2}: label {table['Label'][row]!r} is not 0 or 1")
    long = pd.DataFrame({"image_id": parts[0], "subtype": parts[2], "label": labels.astype(np.float32)})
    conflicting = long.duplicated(["image_id", "subtype"])
    if conflicting.any():
        row = long[conflicting].iloc[0]
        raise LabelFileError(f"{path}: {long_id(row.image_id, row.subtype)} is given two different labels")
    wide = long.pivot(index="image_id", columns="subtype", values="label").reindex(columns=list(SUBTYPES))
    incomplete = wide.isna().any(axis=1)
    if incomplete.any():
        image_id = wide.index[incomplete.to_numpy().argmax()]
        missing = [s for s in SUBTYPES if np.isnan(wide.loc[image_id, s])]
        raise LabelFileError(f"{path}: image {image_id} has no row for {', '.join(missing)}")
    contradicted = wide["any"] < wide[list(SUBTYPES[:-1])].max(axis=1)
    if contradicted.any():
        raise LabelFileError(f"{path}: image {contradicted.idxmax()} has any 0 but a subtype 1")
    wide.columns.name = None
    return wide.astype(np.float32)


def to_long(wide: pd.DataFrame) -> pd.DataFrame:
    """Wide table (index image_id, columns SUBTYPES) -> long table ``ID,Label``, image by image."""
    image_ids = wide.index.to_numpy(dtype=str)
    ids = np.char.add(np.repeat(np.char.add(image_ids, "_"), len(SUBTYPES)), np.tile(SUBTYPES, len(image_ids)))
    return pd.DataFrame({"ID": ids, "Label": wide[list(SUBTYPES)].to_numpy().reshape(-1)})


def write_long(wide: pd.DataFrame, path: str | Path, float_format: str | None = None) -> None:
    """Write a wide table as the challenge's long CSV, atomically."""
    with atomic_path(path) as tmp:
        to_long(wide).to_csv(tmp, index=False, float_format=float_format)
