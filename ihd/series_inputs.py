"""Each feature selection's stage-2 inputs, written once beside the feature cache and read by row ranges.

`features/<run>/inputs-<slug>.npy` holds, for every row of the cache in index order, the selection's
features of the slice's embedding followed by the CNN's six probabilities (`ihd.sequence.sequence_inputs`),
as float16: the real data's 874,035 rows of `all` (1,280 + 6 columns) take 2.2 GB of disk, where the
float32 array held in memory took 4.5 GB and about twice that while it was built.
`inputs-<slug>.json` keeps what made the file (the fitted selection's inputs, which name the features'
fingerprint, and the sha256 of its transform), its fingerprint, and the progress record of
`ihd.row_files` (each written chunk's sha256). The file is written chunk by chunk from the embeddings
read by rows, resumed where a killed run stopped, checked on every open and written again from its
first damaged chunk, and written again whole when what made it changed. Training reads it as a
`RowFile`: memory holds the rows of the batch being assembled, not the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ihd.features import DISK_ADVICE, Features, Selection, selection_slug
from ihd.fingerprint import SHORT, array_sha256, fingerprint, what_changed
from ihd.io import read_json, write_json
from ihd.labels import SUBTYPES
from ihd.row_files import RowFile, create_row_file, reserve_blocks, verified_chunks
from ihd.sequence import INPUT_DTYPE, sequence_inputs

CHUNK_ROWS = 8192  # rows per written and checked chunk: about 20 MB of `all`


def inputs_paths(features_run_dir: str | Path, selection_name: str) -> tuple[Path, Path]:
    """The stored inputs of one selection of a feature cache, and their record."""
    stem = Path(features_run_dir) / f"inputs-{selection_slug(selection_name)}"
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def transform_sha256(selection: Selection) -> str:
    """sha256 of what a fitted selection does to a row: its kept columns or its projection."""
    arrays = {name: getattr(selection, name) for name in ("columns", "mean", "components")}
    return fingerprint({name: array_sha256(array) for name, array in arrays.items() if array is not None})


def defining_inputs(features: Features, selection: Selection) -> dict:
    """What the stored inputs of ``selection`` over ``features`` are made of; their fingerprint covers these."""
    if selection.inputs is None:
        raise ValueError(f"selection {selection.name} does not record what it was fitted on: fit it with "
                         "ihd.features.fitted_selection")
    width = selection.transform(features.embedding_rows().read(0, 1)).shape[1] + len(SUBTYPES)
    return {**selection.inputs, "transform_sha256": transform_sha256(selection), "dtype": np.dtype(INPUT_DTYPE).name,
            "shape": [int(features.config["rows"]), int(width)]}


def stored_inputs(features: Features, selection: Selection, chunk_rows: int = CHUNK_ROWS) -> RowFile:
    """The per-slice inputs of ``selection`` (fitted on ``features``) for every row of the cache, as a
    `RowFile` read as float32; written first where missing, unfinished, damaged or made of other inputs."""
    path, record_path = inputs_paths(features.path, selection.name)
    defining = defining_inputs(features, selection)
    shapes = {path.name: tuple(defining["shape"])}
    record = read_json(record_path) if record_path.exists() else {}
    start, chunks = 0, []
    if record.get("fingerprint") == fingerprint(defining):
        start, chunks, problem = verified_chunks(features.path, record, record_path, shapes)
        if problem:
            print(f"{problem}: writing {path.name} again from row {start}")
    elif record:
        print(f"{path} holds inputs of other selections or features "
              f"({what_changed(record.get('inputs', {}), defining)}): writing it again")
    if start < defining["shape"][0] or not path.exists():
        _write(features, selection, path, record_path, defining, start, chunks, chunk_rows)
    return RowFile(path, read_as=np.float32)


def _write(features: Features, selection: Selection, path: Path, record_path: Path, defining: dict, start: int,
           chunks: list, chunk_rows: int) -> None:
    """Write rows ``start:`` of the stored inputs, recording each chunk's sha256 once it is written."""
    rows, width = defining["shape"]
    record = {"inputs": defining, "fingerprint": fingerprint(defining), "rows_done": start, "chunks": chunks}
    if start == 0:
        write_json(record_path, {**record, "chunks": []})  # no earlier record outlives the rows it describes
        out = create_row_file(path, (rows, width), INPUT_DTYPE, DISK_ADVICE)
    else:
        reserve_blocks(path, DISK_ADVICE)
        out = RowFile(path, writable=True)
    record["bytes"] = {path.name: path.stat().st_size}
    write_json(record_path, record)
    embeddings, probabilities = features.embedding_rows(), features.probability_rows()
    print(f"{selection.name}: writing {rows - start:,} rows of {width} inputs to {path} "
          f"(fingerprint {record['fingerprint'][:SHORT]})", flush=True)
    with tqdm(total=rows, initial=start, desc=f"inputs {selection.name}", unit="slice", dynamic_ncols=True) as bar:
        for begin in range(start, rows, chunk_rows):
            end = min(begin + chunk_rows, rows)
            chunk = sequence_inputs(selection.transform(embeddings.read(begin, end)), probabilities.read(begin, end))
            stored = chunk.astype(INPUT_DTYPE)
            out.write(begin, stored)
            record["chunks"].append([begin, end, array_sha256(stored)])
            record["rows_done"] = end
            write_json(record_path, record)
            bar.update(end - begin)
    out.close()
