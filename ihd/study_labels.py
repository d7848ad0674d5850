"""Study labels: one row per exam, the way hospitals have their data (a report says "hemorrhage" or not).

A study-label file is a CSV with a ``study_id`` column and one column per label of a label set:

- ``subtypes``: the challenge's five subtypes plus ``any`` (independent sigmoids);
- ``exam``: three exclusive classes ``hemorrhage``, ``no_finding``, ``other`` (one softmax), the
  output of the RSNA 2021 exam classifier (paper 000), "other" being a non-hemorrhagic finding.

A file may hold the columns of both sets; the caller says which one to learn. Every label is 0 or 1.
From the Kaggle data, subtype study labels are derived from the slice labels (a study is positive
for a subtype when any of its slices is), so the challenge's data can train and score exam-level
models without handing them its slice labels. The exam set cannot be derived that way (Kaggle marks
no other findings): it comes from a file, such as the one the synthetic generator writes.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ihd.io import atomic_path
from ihd.labels import SUBTYPES

STUDY_ID = "study_id"
EXAM_CLASSES = ("hemorrhage", "no_finding", "other")


class StudyLabelError(ValueError):
    """A study-label file that cannot be read as one label per study and label."""


@dataclass(frozen=True)
class LabelSet:
    """The labels a study model learns: their names, whether they exclude one another (softmax),
    and the one that means "this exam holds a bleed" (scored as the exam-level verdict)."""

    name: str
    columns: tuple[str, ...]
    exclusive: bool
    positive: str

    @property
    def activation(self) -> str:
        """The output activation: softmax over exclusive classes, else a sigmoid per label."""
        return "softmax" if self.exclusive else "sigmoid"

    @property
    def positive_column(self) -> int:
        """Column number of the bleed label."""
        return self.columns.index(self.positive)


LABEL_SETS = {
    "subtypes": LabelSet("subtypes", SUBTYPES, exclusive=False, positive="any"),
    "exam": LabelSet("exam", EXAM_CLASSES, exclusive=True, positive="hemorrhage"),
}


def label_set(name: str) -> LabelSet:
    """The label set called ``name``; raises ValueError naming the known ones."""
    if name not in LABEL_SETS:
        raise ValueError(f"unknown label set {name!r}: use one of {', '.join(LABEL_SETS)}")
    return LABEL_SETS[name]


def derive_study_labels(index: pd.DataFrame) -> pd.DataFrame:
    """Subtype study labels from slice labels: the highest label of each subtype over the study's slices.

    Only training rows with labels count. A study with some labeled and some unlabeled slices is left
    out with a warning naming it: its highest label is unknown, not zero.
    """
    train = index[index["split"] == "train"]
    labeled = train["any"].notna()
    partly = sorted(set(train.loc[labeled, STUDY_ID]) & set(train.loc[~labeled, STUDY_ID]))
    if partly:
        warnings.warn(f"{len(partly)} studies have unlabeled slices and get no study label: {', '.join(partly[:5])}")
    rows = train[labeled & ~train[STUDY_ID].isin(partly)]
    table = rows.groupby(STUDY_ID)[list(SUBTYPES)].max().astype(np.float32)
    table.columns.name = None
    return table


def exam_classes(any_bleed: np.ndarray, other_finding: np.ndarray) -> np.ndarray:
    """One-hot (n, 3) exam classes: hemorrhage when the exam bleeds (whatever else it shows), else
    other when it holds another finding, else no finding."""
    any_bleed = np.asarray(any_bleed, bool)
    other = np.asarray(other_finding, bool) & ~any_bleed
    return np.stack([any_bleed, ~any_bleed & ~other, other], axis=1).astype(np.float32)


def _refuse_row(path: Path, table: pd.DataFrame, bad: np.ndarray, what: str) -> None:
    """Raise naming the first row where ``bad`` holds (rows counted as in the file, header = 1)."""
    if bad.any():
        row = int(np.argmax(bad))
        raise StudyLabelError(f"{path}: row {table.index[row] + 2} (study {table[STUDY_ID].iloc[row]}): {what}")


def read_study_labels(path: str | Path, set_name: str | None = None) -> tuple[pd.DataFrame, LabelSet]:
    """Read a study-label CSV: a table indexed by study_id with the label set's columns (float32), and the set.

    ``set_name`` None takes the one set whose columns the file holds (and refuses a file holding both).
    Refused, naming the file and row: no ``study_id`` column, unknown columns, a missing or empty
    study id, a label other than 0 or 1, a study given two different rows, exam classes that are not
    exactly one per study, ``any`` lower than one of the subtypes. Exactly repeated rows are dropped.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype={STUDY_ID: str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise StudyLabelError(f"{path}: cannot be read as CSV ({error})") from None
    if STUDY_ID not in table.columns:
        raise StudyLabelError(f"{path}: no {STUDY_ID} column (found {', '.join(map(str, table.columns))})")
    known = {STUDY_ID, *SUBTYPES, *EXAM_CLASSES}
    unknown = [c for c in table.columns if c not in known]
    if unknown:
        sets = " or ".join(f"{s.name} ({' '.join(s.columns)})" for s in LABEL_SETS.values())
        raise StudyLabelError(f"{path}: unknown columns {', '.join(map(str, unknown))}: a study-label file holds "
                              f"{STUDY_ID} and the columns of {sets}")
    present = [s for s in LABEL_SETS.values() if set(s.columns) <= set(table.columns)]
    if set_name is None:
        if len(present) != 1:
            held = "both label sets" if present else "no complete label set"
            raise StudyLabelError(f"{path}: holds {held}: say which one to use ({', '.join(LABEL_SETS)})")
        chosen = present[0]
    else:
        chosen = label_set(set_name)
        missing = [c for c in chosen.columns if c not in table.columns]
        if missing:
            raise StudyLabelError(f"{path}: label set {chosen.name} needs the columns {', '.join(missing)}")
    table = table[[STUDY_ID, *chosen.columns]].drop_duplicates()
    _refuse_row(path, table, (table[STUDY_ID].isna() | (table[STUDY_ID].str.strip() == "")).to_numpy(), "no study id")
    values = table[list(chosen.columns)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    _refuse_row(path, table, ~np.isin(values, (0.0, 1.0)).all(axis=1), "every label must be 0 or 1")
    _refuse_row(path, table, table[STUDY_ID].duplicated(keep=False).to_numpy(), "the study is given two different rows")
    if chosen.exclusive:
        _refuse_row(path, table, values.sum(axis=1) != 1, f"exactly one of {', '.join(chosen.columns)} must be 1")
    else:
        _refuse_row(path, table, values[:, -1] < values[:, :-1].max(axis=1), "any is 0 but a subtype is 1")
    labels = pd.DataFrame(values.astype(np.float32), index=pd.Index(table[STUDY_ID], name=STUDY_ID),
                          columns=list(chosen.columns))
    return labels, chosen


def write_study_labels(labels: pd.DataFrame, path: str | Path) -> Path:
    """Write a table indexed by study_id as a study-label CSV (labels as integers), atomically."""
    out = labels.astype(int).reset_index().rename(columns={labels.index.name or "index": STUDY_ID})
    with atomic_path(path) as tmp:
        out.to_csv(tmp, index=False)
    return Path(path)


def series_labels(index: pd.DataFrame, starts: np.ndarray, labels: pd.DataFrame) -> np.ndarray:
    """The study label of every series (given by its first row in ``index``), float32 (n, K); NaN where
    the series' study has no label. Every series of a study carries that study's label."""
    studies = index[STUDY_ID].to_numpy()[np.asarray(starts, np.int64)]
    return labels.reindex(studies).to_numpy(np.float32)
