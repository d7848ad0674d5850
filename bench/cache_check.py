"""How long checking a feature cache takes: `ihd.features.verified_rows` (every flushed chunk's sha256
compared with the one recorded at extraction) against sha256 of the same bytes already in memory.

    python bench/cache_check.py                       # 200,000 rows of 1280 (EfficientNetB0's embedding)
    python bench/cache_check.py --rows 50000 --dim 1280 --repeats 5

Writes a cache of random float16 rows the way extraction does (memmaps, chunks of 2048 rows and
their checksums in progress.json) under a temporary folder, then alternates the two measurements
and keeps each one's best round; the files are in the page cache, as they are right after extraction.
"""
import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import cpu_description  # noqa: E402
from ihd.features import EMBEDDINGS_FILE, PROBABILITIES_FILE, PROGRESS_FILE, verified_rows  # noqa: E402
from ihd.fingerprint import array_sha256  # noqa: E402
from ihd.io import write_json  # noqa: E402

CHUNK_ROWS = 2048


def write_cache(folder: Path, rows: int, dim: int) -> dict:
    """A complete cache of random rows with its progress.json; returns the config verified_rows needs."""
    arrays = [np.lib.format.open_memmap(folder / name, "w+", np.float16, shape)
              for name, shape in ((EMBEDDINGS_FILE, (rows, dim)), (PROBABILITIES_FILE, (rows, 6)))]
    rng = np.random.default_rng(0)
    chunks = []
    for begin in range(0, rows, CHUNK_ROWS):
        end = min(begin + CHUNK_ROWS, rows)
        for array in arrays:
            array[begin:end] = rng.random((end - begin, array.shape[1]), np.float32)
        chunks.append([begin, end, *(array_sha256(array[begin:end]) for array in arrays)])
    for array in arrays:
        array.flush()
    sizes = {name: (folder / name).stat().st_size for name in (EMBEDDINGS_FILE, PROBABILITIES_FILE)}
    write_json(folder / PROGRESS_FILE, {"rows_done": rows, "chunks": chunks, "bytes": sizes})
    return {"rows": rows, "embedding_dim": dim}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--repeats", type=int, default=3)
    settings = parser.parse_args(argv)
    print(f"machine: {cpu_description()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = write_cache(folder, settings.rows, settings.dim)
        in_memory = np.load(folder / EMBEDDINGS_FILE)
        size_gb = in_memory.nbytes / 1e9
        baseline, ours = [], []
        for _ in range(settings.repeats):
            start = time.perf_counter()
            hashlib.sha256(in_memory.data).hexdigest()
            baseline.append(size_gb / (time.perf_counter() - start))
            start = time.perf_counter()
            rows, _, problem = verified_rows(folder, config)
            ours.append(size_gb / (time.perf_counter() - start))
            assert rows == settings.rows and not problem, problem
    print(f"\n### Checking the feature cache: {settings.rows} rows of {settings.dim} float16 ({size_gb:.2f} GB)\n")
    print("| | GB/s |\n|---|---:|")
    print(f"| sha256 of the bytes in memory (baseline) | {max(baseline):.2f} |")
    print(f"| `verified_rows` over the memory-mapped cache | {max(ours):.2f} |")
    print(f"\n874,035 rows of 1280 ({874_035 * 1280 * 2 / 1e9:.2f} GB) would take {874_035 * 1280 * 2 / 1e9 / max(ours):.1f} s")


if __name__ == "__main__":
    main()
