"""Stored stage-2 inputs: equal to the inputs computed in memory, written once, resumed, checked, refused when stale."""
import numpy as np
import pandas as pd
import pytest

import ihd.series_inputs as series_inputs_module
from ihd.features import fitted_selection, load_features, selected_features
from ihd.fingerprint import array_sha256, file_sha256
from ihd.io import write_json
from ihd.labels import SUBTYPES
from ihd.sequence import sequence_inputs
from ihd.series_inputs import inputs_paths, stored_inputs

SERIES, LENGTH, DIM = 10, 6, 12


@pytest.fixture
def features(tmp_path):
    """A complete feature cache of 60 random rows (10 series of 6), written the way extraction writes it."""
    rng = np.random.default_rng(0)
    rows = SERIES * LENGTH
    index = pd.DataFrame({
        "image_id": [f"ID_{n:03d}" for n in range(rows)],
        "series_id": np.repeat([f"S{s}" for s in range(SERIES)], LENGTH),
        "position": np.tile(np.arange(LENGTH), SERIES),
        "split": "train",
        "fold": np.repeat(np.arange(SERIES) % 5, LENGTH),
        **{name: (rng.random(rows) < 0.3).astype(np.float32) for name in SUBTYPES},
    })
    folder = tmp_path / "features" / "run"
    folder.mkdir(parents=True)
    index.to_parquet(tmp_path / "index.parquet")
    embeddings = rng.normal(size=(rows, DIM)).astype(np.float16)
    probabilities = rng.uniform(0.01, 0.99, (rows, 6)).astype(np.float16)
    np.save(folder / "embeddings.npy", embeddings)
    np.save(folder / "probabilities.npy", probabilities)
    np.save(folder / "pred_kernel.npy", rng.normal(size=(DIM, 6)).astype(np.float32))
    write_json(folder / "progress.json", {
        "rows_done": rows, "chunks": [[0, rows, array_sha256(embeddings), array_sha256(probabilities)]],
        "bytes": {name: (folder / name).stat().st_size for name in ("embeddings.npy", "probabilities.npy")}})
    write_json(folder / "config.json", {"rows": rows, "embedding_dim": DIM, "fold": 0, "fingerprint": "f" * 64,
                                        "index_path": "../../index.parquet",
                                        "index_sha256": file_sha256(tmp_path / "index.parquet")})
    return load_features(folder)


def _in_memory(features, selection):
    return sequence_inputs(selected_features(selection, features.embeddings), features.probabilities)


@pytest.mark.parametrize("name", ["pca:3", "all", "variance:4"])
def test_stored_inputs_equal_the_inputs_computed_in_memory(features, name):
    selection = fitted_selection(features, name)
    rows = stored_inputs(features, selection, chunk_rows=16)
    path, record_path = inputs_paths(features.path, name)
    assert np.load(path).dtype == np.float16 and rows.dtype == np.float32
    np.testing.assert_array_equal(rows[0 : len(rows)], _in_memory(features, selection))
    record = pd.read_json(record_path, typ="series")
    assert record["rows_done"] == len(rows) and len(record["chunks"]) == 4
    assert record["inputs"]["features"] == features.fingerprint


def test_a_second_open_reads_the_file_without_writing_it(features, capsys):
    selection = fitted_selection(features, "pca:3")
    stored_inputs(features, selection)
    path, _ = inputs_paths(features.path, "pca:3")
    written = path.stat().st_mtime_ns
    capsys.readouterr()
    stored_inputs(features, selection)
    assert "writing" not in capsys.readouterr().out and path.stat().st_mtime_ns == written


def test_a_killed_write_resumes_after_its_last_recorded_chunk(features, monkeypatch, capsys):
    selection = fitted_selection(features, "pca:3")
    real_write_json, calls = series_inputs_module.write_json, []

    def killed_after_two_chunks(path, record):
        calls.append(record["rows_done"])
        if record["rows_done"] == 32:
            raise KeyboardInterrupt
        real_write_json(path, record)

    monkeypatch.setattr(series_inputs_module, "write_json", killed_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        stored_inputs(features, selection, chunk_rows=16)
    monkeypatch.setattr(series_inputs_module, "write_json", real_write_json)
    capsys.readouterr()
    rows = stored_inputs(features, selection, chunk_rows=16)
    assert "writing 44 rows" in capsys.readouterr().out
    np.testing.assert_array_equal(rows[0:60], _in_memory(features, selection))


def test_a_damaged_chunk_is_written_again_from_where_it_starts(features, capsys):
    selection = fitted_selection(features, "all")
    stored_inputs(features, selection, chunk_rows=16)
    path, _ = inputs_paths(features.path, "all")
    damaged = np.load(path)
    damaged[40, 5] += 1
    np.save(path, damaged)
    capsys.readouterr()
    rows = stored_inputs(features, selection, chunk_rows=16)
    out = capsys.readouterr().out
    assert "rows 32 to 47 differ from what was written" in out and "writing inputs-all.npy again from row 32" in out
    np.testing.assert_array_equal(rows[0:60], _in_memory(features, selection))


def test_inputs_of_another_transform_are_written_again_whole(features, capsys):
    selection = fitted_selection(features, "pca:3")
    stored_inputs(features, selection)
    selection.components = -selection.components
    capsys.readouterr()
    rows = stored_inputs(features, selection)
    assert "holds inputs of other selections or features (transform_sha256:" in capsys.readouterr().out
    np.testing.assert_array_equal(rows[0:60], _in_memory(features, selection))


def test_a_selection_without_its_record_is_refused(features):
    selection = fitted_selection(features, "pca:3")
    selection.inputs = None
    with pytest.raises(ValueError, match="does not record what it was fitted on"):
        stored_inputs(features, selection)
