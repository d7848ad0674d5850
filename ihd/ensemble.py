"""Fold ensembles: one CNN run per validation fold, under one name.

``train_cnn.py --fold all --run NAME`` trains the member runs ``NAME-fold0``, ``NAME-fold1``, ... (each a
complete run of its own, resumable as any run), caches each one's features, and then writes
``models/NAME/ensemble.json``: the members, their folds and the settings. Later stages given
``--run NAME`` read that record and work on the members together.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ihd.io import read_json, write_json

ALL_FOLDS = "all"
ENSEMBLE_FILE = "ensemble.json"


def labeled_folds(index: pd.DataFrame) -> list[int]:
    """The folds of an index's labeled training rows, ascending."""
    folds = index["fold"].to_numpy()
    known = sorted(set(folds[(index["split"].to_numpy() == "train") & (folds >= 0)].tolist()))
    if len(known) < 2:
        raise ValueError(f"a fold ensemble needs at least two folds of labeled training rows; the index has {known}")
    return [int(fold) for fold in known]


def member_runs(name: str, folds: list[int]) -> list[str]:
    """The run names of an ensemble's members: ``NAME-fold<k>``."""
    return [f"{name}-fold{fold}" for fold in folds]


def ensemble_path(models_dir: str | Path, name: str) -> Path:
    """Where the record of the ensemble ``name`` is."""
    return Path(models_dir) / name / ENSEMBLE_FILE


def write_ensemble(models_dir: str | Path, name: str, members: list[str], folds: list[int], settings: dict) -> Path:
    """Write the ensemble's record, atomically, once every member has trained and extracted."""
    path = ensemble_path(models_dir, name)
    write_json(path, {"members": members, "folds": folds, "settings": settings})
    return path


def read_ensemble(models_dir: str | Path, name: str) -> dict | None:
    """The record of the ensemble ``name``, or None when ``name`` is not one."""
    path = ensemble_path(models_dir, name)
    return read_json(path) if path.is_file() else None
