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

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # where the stages' scripts are run from


class FolderTaken(SystemExit):
    """An output folder holds other work than a stage was asked for; the message names the folder and the flag
    that picks another. A SystemExit, so a command line ends with the message alone."""


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


def invocation(module_globals: dict) -> list[str]:
    """How a user runs, from the project root, the script or module whose globals are ``module_globals``:
    ``python -m package.module`` for a module of a package, else ``python path/to/script.py``."""
    spec = module_globals.get("__spec__")
    if spec is not None and spec.parent:
        return ["python", "-m", spec.name]
    script = Path(module_globals["__file__"]).resolve()
    return ["python", str(script.relative_to(PROJECT_ROOT) if script.is_relative_to(PROJECT_ROOT) else script)]


def run_header(argv: list[str] | None, settings: Any) -> None:
    """Print the command that runs the calling stage with ``argv`` (``None``: this process's arguments) and the
    resolved settings, the first lines of every stage's log.

    The command names the caller's own script or module, not this process's: demo.py runs the stages in its
    process, and each stage's log still shows the command that reruns that stage alone.
    """
    command = invocation(sys._getframe(1).f_globals) + (sys.argv[1:] if argv is None else list(argv))
    print("$ " + " ".join(command))
    print(json.dumps(settings, indent=2, default=_jsonable), flush=True)
