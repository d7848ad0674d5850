"""Row files: reads by row ranges equal the array, nothing stays mapped, chunks are checked."""
from pathlib import Path

import numpy as np
import pytest

from ihd.fingerprint import array_sha256
from ihd.row_files import RowFile, create_row_file, verified_chunks


@pytest.fixture
def stored(tmp_path):
    array = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float16)
    np.save(tmp_path / "rows.npy", array)
    return array, tmp_path / "rows.npy"


def test_every_kind_of_row_index_reads_what_numpy_reads(stored):
    array, path = stored
    rows = RowFile(path, read_as=np.float32)
    assert rows.shape == array.shape and len(rows) == 50 and rows.dtype == np.float32
    np.testing.assert_array_equal(rows[3:17], array[3:17].astype(np.float32))
    np.testing.assert_array_equal(rows[-5:], array[-5:].astype(np.float32))
    np.testing.assert_array_equal(rows[10:3], np.zeros((0, 7), np.float32))
    np.testing.assert_array_equal(rows[-1], array[-1].astype(np.float32))
    scattered = np.array([40, 2, 3, 4, 40, 19, 0])
    np.testing.assert_array_equal(rows[scattered], array[scattered].astype(np.float32))
    mask = np.arange(50) % 3 == 0
    np.testing.assert_array_equal(rows[mask], array[mask].astype(np.float32))
    assert RowFile(path).stored(0, 50).dtype == np.float16
    for refused in (slice(0, 10, 2), (slice(0, 3), 1)):
        with pytest.raises(IndexError):
            rows[refused]
    with pytest.raises(IndexError, match="outside"):
        rows.read(40, 51)


def test_written_rows_read_back_and_hash_like_the_array(tmp_path):
    array = np.arange(60, dtype=np.float32).reshape(12, 5)
    out = create_row_file(tmp_path / "new.npy", array.shape, np.float16, "free some space")
    assert (tmp_path / "new.npy").stat().st_blocks * 512 >= (tmp_path / "new.npy").stat().st_size
    out.write(0, array[:8])
    out.write(8, array[8:])
    np.testing.assert_array_equal(np.load(tmp_path / "new.npy"), array.astype(np.float16))
    assert out.sha256(2, 9) == array_sha256(array[2:9].astype(np.float16))
    with pytest.raises(ValueError, match="cannot write"):
        out.write(10, array[:4])


def test_a_truncated_or_foreign_file_is_refused_by_name(stored, tmp_path):
    _, path = stored
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 14)
    with pytest.raises(ValueError, match="rows.npy has .* bytes, its header says"):
        RowFile(path)
    (tmp_path / "text.npy").write_text("not an array")
    with pytest.raises(ValueError, match="text.npy is not a .npy file"):
        RowFile(tmp_path / "text.npy")


def _file_pages_in_memory() -> int:
    """Bytes of file-backed pages this process holds (RssFile)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_a_pass_over_every_row_leaves_no_pages_of_the_file_in_the_process(tmp_path):
    path = tmp_path / "big.npy"
    np.save(path, np.ones((4096, 4096), np.float16))  # 32 MiB
    size = path.stat().st_size
    rows = RowFile(path)
    before = _file_pages_in_memory()
    total = sum(float(rows.read(begin, begin + 256).sum(dtype=np.float64)) for begin in range(0, 4096, 256))
    read_growth = _file_pages_in_memory() - before
    mapped = np.load(path, mmap_mode="r")
    before = _file_pages_in_memory()
    assert sum(float(mapped[begin : begin + 256].sum(dtype=np.float64)) for begin in range(0, 4096, 256)) == total
    mapped_growth = _file_pages_in_memory() - before
    assert mapped_growth > size // 2, "a memory map keeps the pages it touched: the check can tell the two apart"
    assert read_growth < size // 16


def test_verified_chunks_stop_at_the_first_damaged_chunk(tmp_path):
    array = np.random.default_rng(1).normal(size=(30, 4)).astype(np.float16)
    np.save(tmp_path / "a.npy", array)
    chunks = [[begin, min(begin + 10, 30), array_sha256(array[begin : begin + 10])] for begin in range(0, 30, 10)]
    progress = {"rows_done": 30, "chunks": chunks, "bytes": {"a.npy": (tmp_path / "a.npy").stat().st_size}}
    shapes = {"a.npy": (30, 4)}
    assert verified_chunks(tmp_path, progress, "record.json", shapes) == (30, chunks, "")
    damaged = array.copy()
    damaged[14, 2] += 1
    np.save(tmp_path / "a.npy", damaged)
    rows, good, problem = verified_chunks(tmp_path, progress, "record.json", shapes)
    assert rows == 10 and good == chunks[:1] and "a.npy rows 10 to 19 differ" in problem
    np.save(tmp_path / "a.npy", array[:20])
    assert verified_chunks(tmp_path, progress, "record.json", shapes)[2].endswith("(truncated or replaced)")
    assert "record.json records no checksums" in verified_chunks(tmp_path, {"rows_done": 3}, "record.json", shapes)[2]
