"""Fingerprints: what an artifact was made from, so that a stale artifact is noticed instead of used.

Every artifact's record keeps the values that define it: the sha256 of the files it was made from
(the CNN weights, the index) or the fingerprint of the artifact it was made from (a selection
keeps its features' fingerprint, an LSTM its selection's), and the settings that shape it. Its
fingerprint is the sha256 of those values written as canonical JSON. A later stage computes the
values it would use now, compares, and on a difference refits or refuses, naming what changed.
Hashing records and single files instead of the data keeps this cheap on 874,035 slices.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

SHORT = 12  # hex digits of a sha256 shown in messages


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, hex."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def array_sha256(array: np.ndarray) -> str:
    """sha256 of an array's bytes in C order, hex."""
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def fingerprint(inputs: dict) -> str:
    """sha256 of ``inputs`` (JSON values) written as canonical JSON, hex."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _shown(value) -> str:
    """A value for a message: a sha256 shortened, anything else as repr."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:SHORT] + "…"
    return repr(value)


def what_changed(recorded: dict, current: dict) -> str:
    """``"key: old -> new"`` for every key whose value differs between two sets of inputs, comma-separated."""
    keys = sorted(set(recorded) | set(current))
    return ", ".join(
        f"{key}: {_shown(recorded.get(key))} -> {_shown(current.get(key))}"
        for key in keys
        if recorded.get(key) != current.get(key)
    )
