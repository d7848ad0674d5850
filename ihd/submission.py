"""Submission files: per-image probabilities to the challenge's ``ID,Label`` CSV, checked, then sent.

Kaggle scores a file with exactly the sample submission's IDs (every test image x the six subtypes).
The file is written in the sample's row order and validated before it is written: every sample ID
present once, no other ID, no missing value, every value in [0, 1]. A failure names the ID at fault.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ihd.io import atomic_path, named
from ihd.kaggle_api import COMPETITION, KaggleAccessError, kaggle_api, network_hint
from ihd.labels import SUBTYPES, to_long

FLOAT_FORMAT = "%.6g"
NAMES_SHOWN = 10


class SubmissionError(ValueError):
    """A submission table that Kaggle would reject or mis-score."""


def read_sample_submission(path: str | Path) -> pd.DataFrame:
    """The sample submission's ``ID,Label`` table (IDs as strings, in Kaggle's order)."""
    sample = pd.read_csv(path, dtype={"ID": str})
    if list(sample.columns) != ["ID", "Label"]:
        raise SubmissionError(f"{path}: header must be ID,Label, found {','.join(sample.columns)}")
    return sample


def sample_image_ids(sample: pd.DataFrame) -> pd.Index:
    """The test image IDs of a sample submission, in their first-appearance order."""
    return pd.Index(pd.unique(sample["ID"].str.rpartition("_")[0]))


def submission_table(predictions: pd.DataFrame, sample: pd.DataFrame, prior: np.ndarray) -> pd.DataFrame:
    """The long ``ID,Label`` table in the sample's row order from wide per-image predictions.

    ``predictions``: index image_id, columns SUBTYPES. Test images the sample lists but the
    predictions lack (unreadable DICOM files left out of the index) get the training ``prior``
    (six label means) and a warning naming them. A sample of another test set is refused: one that
    lacks a predicted image, or shares none with the predictions.
    """
    images = sample_image_ids(sample)
    missing = images.difference(predictions.index, sort=False)
    if len(missing) == len(images):
        raise SubmissionError(f"none of the sample submission's {len(images)} images has a prediction: it lists "
                              f"another test set ({named(images, NAMES_SHOWN)})")
    unlisted = predictions.index.difference(images, sort=False)
    if len(unlisted):
        raise SubmissionError(f"{len(unlisted)} predicted test images are not in the sample submission, which must "
                              f"be the test set's own: {named(unlisted, NAMES_SHOWN)}")
    if len(missing):
        warnings.warn(f"{len(missing)} test images have no prediction and get the training prior: "
                      f"{named(missing, NAMES_SHOWN)}")
    wide = predictions.reindex(images)[list(SUBTYPES)]
    wide.loc[missing] = np.broadcast_to(np.asarray(prior, np.float64), (len(missing), len(SUBTYPES)))
    long = to_long(wide).set_index("ID")
    return long.reindex(sample["ID"]).reset_index()


def validate_submission(table: pd.DataFrame, sample: pd.DataFrame) -> None:
    """Raise SubmissionError naming the first ID at fault unless ``table`` matches the sample's IDs
    once each, in its order, with values in [0, 1]."""
    if list(table.columns) != ["ID", "Label"]:
        raise SubmissionError(f"columns must be ID,Label, found {','.join(map(str, table.columns))}")
    ids = table["ID"].astype(str)
    repeated = ids[ids.duplicated()]
    if len(repeated):
        raise SubmissionError(f"ID {repeated.iloc[0]} appears more than once "
                              f"({named(pd.unique(repeated), NAMES_SHOWN)})")
    expected = set(sample["ID"])
    extra = ids[~ids.isin(expected)]
    if len(extra):
        raise SubmissionError(f"ID {extra.iloc[0]} is not in the sample submission ({named(extra, NAMES_SHOWN)})")
    missing = sample["ID"][~sample["ID"].isin(set(ids))]
    if len(missing):
        raise SubmissionError(f"ID {missing.iloc[0]} of the sample submission is missing "
                              f"({named(missing, NAMES_SHOWN)})")
    out_of_order = np.flatnonzero(ids.to_numpy() != sample["ID"].to_numpy())
    if len(out_of_order):
        raise SubmissionError(f"ID {ids.iloc[out_of_order[0]]} is out of the sample submission's row order")
    labels = pd.to_numeric(table["Label"], errors="coerce").to_numpy(np.float64)
    nan = np.flatnonzero(np.isnan(labels))
    if len(nan):
        raise SubmissionError(f"ID {ids.iloc[nan[0]]} has no numeric label ({named(ids.iloc[nan], NAMES_SHOWN)})")
    outside = np.flatnonzero((labels < 0) | (labels > 1))
    if len(outside):
        raise SubmissionError(f"ID {ids.iloc[outside[0]]} has label {labels[outside[0]]}, outside [0, 1]")


def write_submission(
    predictions: pd.DataFrame, sample_path: str | Path, out_path: str | Path, prior: np.ndarray
) -> pd.DataFrame:
    """Build, validate and atomically write a submission CSV; returns the table written."""
    sample = read_sample_submission(sample_path)
    try:
        table = submission_table(predictions, sample, prior)
        validate_submission(table, sample)
    except SubmissionError as error:
        raise SubmissionError(f"{sample_path}: {error}") from error
    with atomic_path(out_path) as tmp:
        table.to_csv(tmp, index=False, float_format=FLOAT_FORMAT)
    return table


def submit(path: str | Path, message: str, competition: str = COMPETITION) -> None:
    """Send a submission file to Kaggle; raises ``KaggleAccessError`` saying what is missing offline."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"submission {path} does not exist")
    api = kaggle_api()
    try:
        api.competition_submit(str(path), message, competition)
    except Exception as error:
        raise KaggleAccessError(network_hint(f"submission of {path} to {competition}", error)) from None
