"""Every script under bench/ imports: a name moved or removed elsewhere in the kit breaks it here, not in a
benchmark run hours later."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted(path.stem for path in (Path(__file__).resolve().parents[1] / "bench").glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_script_imports(name):
    module = importlib.import_module(f"bench.{name}")
    assert callable(getattr(module, "main", None)) or name in ("fixtures", "machine")
