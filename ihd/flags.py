"""Checks for command-line values, as argparse `type=` functions: a bad value stops the command while
its flags are parsed, with a message naming the flag, the value and what it must be, before anything
is read, written or trained.

The checks that need Keras (backbone names, selection specs) import it only when they run, so the
commands that never build a model (`prepare_data.py`, `python -m ihd.synthetic`) start quickly.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ihd.index import readable_files
from ihd.windows import parse_recipe


def int_in(minimum: int, maximum: int | None = None, meaning: str = ""):
    """An argparse type: a whole number from ``minimum`` to ``maximum`` (no limit when None); ``meaning`` says why."""

    def parse(text: str) -> int:
        value = _number(text, int, "a whole number")
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: it must be {bounds}{meaning}")
        return value

    return parse


positive_int = int_in(1, meaning=" (sizes, epochs, counts)")
non_negative_int = int_in(0, meaning=" (folds, seeds, picture counts)")


def positive_float(text: str) -> float:
    """A finite number above 0 (learning rates)."""
    value = _number(text, float, "a number")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def non_negative_float(text: str) -> float:
    """A finite number of at least 0 (a gradient-clipping norm, where 0 turns clipping off)."""
    value = _number(text, float, "a number")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of at least 0")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1) (dropout rates, warmup fractions)."""
    value = _number(text, float, "a number")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not in [0, 1)")
    return value


def share(text: str) -> float:
    """A number from 0 to 1, both included (shares of slices kept)."""
    value = _number(text, float, "a number")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not in [0, 1]")
    return value


def held_out_share(text: str) -> float:
    """A number strictly between 0 and 1 (a share held out, which leaves some on each side)."""
    value = _number(text, float, "a number")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not in (0, 1)")
    return value


def fold_spec(text: str) -> int | str:
    """A validation fold number, or ``all`` (one run per fold)."""
    if text == "all":
        return text
    return non_negative_int(text)


def existing_folder(text: str) -> str:
    """A path that is an existing folder."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder" if Path(text).exists() else f"{text} does not exist")
    return text


def folder_of_files(text: str) -> str:
    """An existing folder that holds at least one file the index reads (`ihd.index.readable_files`), at any depth."""
    existing_folder(text)
    if next(readable_files(text), None) is None:
        raise argparse.ArgumentTypeError(f"{text} holds no files (hidden files and links to folders are not read)")
    return text


def dataset_name(text: str) -> str:
    """A folder name (not a path) for the dataset under --data-dir."""
    if text in ("", ".", "..") or "/" in text or "\\" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain name: the dataset lands in <data-dir>/<dataset>/, "
                                         "choose the parent folder with --data-dir")
    return text


def selection_spec(text: str) -> str:
    """A feature-selection name that `ihd.features.parse_selection` accepts (`all`, `pca:120`, ...)."""
    from ihd.features import parse_selection

    try:
        parse_selection(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def recipe_spec(text: str) -> str:
    """A channel recipe that `ihd.windows.parse_recipe` accepts (`windows`, `adjacent`, `0:40/80,...`)."""
    try:
        parse_recipe(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def backbone_name(text: str) -> str:
    """A backbone `ihd.backbones` builds: `tiny`, the paper's ResNeXt, or a `keras.applications` model name."""
    from ihd.backbones import RESNEXT_WSL, backbone_names

    if text not in backbone_names():
        raise argparse.ArgumentTypeError(
            f"unknown backbone {text!r}: use tiny, {RESNEXT_WSL} (the paper's) or a keras.applications name such as "
            "MobileNetV2 or EfficientNetB0"
        )
    return text


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
