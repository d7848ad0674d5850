"""Checks for command-line values, as argparse `type=` functions: a bad value stops the command while
its flags are parsed, with a message naming the flag, before anything is read or trained."""
from __future__ import annotations

import argparse

from ihd.cnn import backbone_names
from ihd.features import parse_selection
from ihd.windows import parse_recipe


def positive_int(text: str) -> int:
    """An integer of at least 1 (sizes, epochs, counts)."""
    value = _number(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    """An integer of at least 0 (folds, seeds, picture counts)."""
    value = _number(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0 (learning rates)."""
    value = _number(text, float, "a number")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1) (dropout rates, warmup fractions)."""
    value = _number(text, float, "a number")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not in [0, 1)")
    return value


def selection_spec(text: str) -> str:
    """A feature-selection name that `ihd.features.parse_selection` accepts (`all`, `pca:120`, ...)."""
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
    """`tiny` or a `keras.applications` model name."""
    if text not in backbone_names():
        raise argparse.ArgumentTypeError(
            f"unknown backbone {text!r}: use tiny or a keras.applications name such as MobileNetV2 or EfficientNetB0"
        )
    return text


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
