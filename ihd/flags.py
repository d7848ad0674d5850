"""Types for argparse flags: a value out of range stops the command line as it is parsed, with a message
naming the flag, the value and what it must be."""
from __future__ import annotations

import argparse
from pathlib import Path


def int_in(minimum: int, maximum: int | None = None, meaning: str = ""):
    """An argparse type: a whole number from ``minimum`` to ``maximum`` (no limit when None); ``meaning`` says why."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: it must be {bounds}{meaning}")
        return value

    return parse


def existing_folder(text: str) -> str:
    """An argparse type: a path that is an existing folder."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder" if Path(text).exists() else f"{text} does not exist")
    return text


def dataset_name(text: str) -> str:
    """An argparse type: a folder name (not a path) for the dataset under --data-dir."""
    if text in ("", ".", "..") or "/" in text or "\\" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain name: the dataset lands in <data-dir>/<dataset>/, "
                                         "choose the parent folder with --data-dir")
    return text
