"""Small file helpers every stage shares: atomic writes, JSON configs, the run header."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling name of ``path`` for the caller to write; on success it is
    renamed over ``path``, on error removed.

    Readers therefore see either the old file or the complete new one, never a half-written file.
    The name is unique to this process and call, and keeps the suffix so that writers choosing a
    format by suffix still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def named(items, shown: int = 5) -> str:
    """The first ``shown`` of ``items`` for a message, and how many more there are."""
    items = [str(item) for item in items]
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def file_state(path: str | Path) -> tuple[int, int] | None:
    """A file's (size in bytes, modification time in ns): what says it changed; None when it cannot be seen."""
    try:
        state = os.stat(path)
    except OSError:
        return None
    return state.st_size, state.st_mtime_ns


def is_temporary(path: Path) -> bool:
    """True for the leftovers of an interrupted ``atomic_path`` write."""
    return path.name.startswith(".") and ".tmp" in path.name


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` (dicts, lists, dataclasses, paths, numpy values) as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def run_header(argv: list[str] | None, settings: Any) -> None:
    """Print the command line and the resolved settings, the first lines of every stage's log."""
    command = [Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))
    print("$ " + " ".join(command))
    print(json.dumps(settings, indent=2, default=_jsonable), flush=True)
