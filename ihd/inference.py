"""The trained chain at prediction time: CNN -> feature selection -> series LSTM, per-slice probabilities.

Two routes lead to the same numbers. A prepared dataset's test rows read the cached CNN outputs of
`features/<run>/` (extracted first if the cache is incomplete). A plain folder of DICOM files, indexed
by `ihd.index`, is read one series at a time: `ihd.dicom.read_hu` -> `ihd.slices.model_hu_through_store` ->
`ihd.inputs.stack_hu` (neighbours by `ihd.inputs.neighbour_rows`) -> CNN, so memory holds one series'
images and one batch, never the folder's; the CNN outputs of every slice (an embedding each) are kept
for the selection and the LSTM. Grad-CAM pictures are drawn for the slices with the highest `any`
probability of the studies most likely to bleed (at most `max_studies`), their images read again.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ihd.cnn import MODEL_FILE, embedding_extractor, load_cnn
from ihd.dicom import DicomError, read_hu
from ihd.features import (
    CONFIG_FILE,
    embed_batch,
    Features,
    Selection,
    extract_features,
    extraction_command,
    load_features,
    load_selection,
    selection_fits,
    selection_path,
    selection_slug,
)
from ihd.ensemble import read_ensemble
from ihd.fingerprint import file_sha256, what_changed
from ihd.gradcam import ANY, best_slices, draw_montage, draw_overlay, gradcam_heatmaps
from ihd.index import read_index
from ihd.inputs import neighbour_rows, stack_hu
from ihd.io import read_json
from ihd.labels import SUBTYPES
from ihd.sequence import load_lstm, predict_series, sequence_inputs, series_bounds, series_set
from ihd.slices import SliceStore, model_hu_through_store, to_model_hu
from ihd.windows import parse_recipe


CNN_BATCH = 16
"""Slices per CNN call at prediction time. On a CPU, EfficientNetB0 at 256x256 holds about 25 MB of
activations a slice while it runs: a batch of 16 keeps `predict.py --dicom-dir` under 2 GB, where
the 64 used before took 2.5 GB by themselves (bench/folder.py)."""


@dataclass
class Chain:
    """A trained CNN run with one selection and its LSTM, checked to belong together: the LSTM's
    record names the selection's inputs, which name the features' fingerprint, which names the CNN's sha256."""

    run: str
    selection_name: str
    cnn: keras.Model
    cnn_config: dict
    cnn_sha256: str
    selection: Selection
    lstm: keras.Model
    tta: str = "none"  # the test-time augmentation of the features the selection and the LSTM were fitted on

    @property
    def features_fingerprint(self) -> str:
        """The fingerprint of the feature cache the selection and the LSTM were fitted on."""
        return self.selection.inputs["features"]

    @property
    def slug(self) -> str:
        """The selection's file-name form (`pca:120` -> `pca120`)."""
        return selection_slug(self.selection_name)

    @cached_property
    def extractor(self) -> keras.Model:
        """The CNN with two outputs: the pooled embedding and the six probabilities."""
        return embedding_extractor(self.cnn)

    @property
    def image_size(self) -> int:
        """The CNN's input size in pixels."""
        return int(self.cnn_config["image_size"])

    @property
    def store_size(self) -> int:
        """The side of the slice store the CNN was trained from, which a DICOM read must pass through."""
        return int(self.cnn_config["store_size"])

    @property
    def offsets(self) -> tuple[int, ...]:
        """Which neighbour slice each input channel shows."""
        return parse_recipe(self.cnn_config["recipe"]).offsets


class ChainError(RuntimeError):
    """The parts of a trained chain are missing or do not belong together; the message says what to run."""


def _commands(run: str, selection: str | None, cnn_config: dict, models_dir, features_dir, tta: str | None
              ) -> tuple[str, str]:
    """The commands that rewrite the run's feature cache (with ``tta``, None: the run's) and that (re)train one
    selection's LSTM."""
    return (extraction_command(cnn_config, run, models_dir, features_dir, tta),
            lstm_command(run, selection, models_dir, features_dir))


def lstm_command(run: str, selection: str | None, models_dir, features_dir) -> str:
    """The command that (re)trains the LSTM of ``selection`` (None: train_lstm.py's default) in ``run``."""
    train = f"train_lstm.py --run {run}" + (f" --selection {selection}" if selection else "")
    for flag, value, default in (("--models-dir", models_dir, "models"), ("--features-dir", features_dir, "features")):
        if str(value) != default:
            train += f" {flag} {value}"
    return train


def lstm_records(models_dir: str | Path, run: str, features_fingerprint: str) -> list[dict]:
    """The finished LSTM records of models/<run>/ trained on the features of ``features_fingerprint``."""
    records = [read_json(p) for p in sorted((Path(models_dir) / run).glob("lstm-*.json"))]
    return [r for r in records if r.get("inputs", {}).get("features") == features_fingerprint]


def finished_lstm(run_dir: Path, selection: str, features_fingerprint: str, train: str) -> tuple[Path, dict]:
    """The per-slice LSTM file of ``selection`` in ``run_dir`` and its record; refused (ChainError, naming
    ``train``, the command to run) unless its training finished on the features of ``features_fingerprint``
    and the file is the one the record describes."""
    slug = selection_slug(selection)
    lstm_path, record_path = run_dir / f"lstm-{slug}.keras", run_dir / f"lstm-{slug}.json"
    if not record_path.exists():
        state = "exists but training never finished" if lstm_path.exists() else "not found"
        raise ChainError(f"{record_path} {state}: run {train} first")
    record = read_json(record_path)
    trained_on = record.get("inputs", {}).get("features")
    if trained_on != features_fingerprint:
        raise ChainError(f"{lstm_path} was trained on other features than the run holds now "
                         f"({what_changed({'features': trained_on}, {'features': features_fingerprint})}): run {train} first")
    if not lstm_path.exists() or file_sha256(lstm_path) != record.get("model_sha256"):
        raise ChainError(f"{lstm_path} is not the model its record {record_path} describes "
                         f"(training interrupted or file replaced): run {train} first")
    return lstm_path, record


def load_chain(run: str, selection: str | None = None, models_dir="models", features_dir="features") -> Chain:
    """The CNN, the fitted selection and the LSTM of a run; `selection=None` takes the best validated one.

    Refuses (ChainError, naming the command to run) a chain whose parts do not belong together: features
    extracted from another cnn.keras, an LSTM file without its finished record or not the file the record
    describes, a selection fitted on other inputs than the LSTM's.
    """
    run_dir, features_run_dir = Path(models_dir) / run, Path(features_dir) / run
    if not (run_dir / MODEL_FILE).exists():
        config_path = run_dir / "config.json"
        dataset = read_json(config_path)["dataset"] if config_path.exists() else "DATASET"
        models = "" if str(models_dir) == "models" else f" --models-dir {models_dir}"
        raise ChainError(f"{run_dir / MODEL_FILE} not found (give --models-dir the folder that holds {run}/ if it is "
                         f"elsewhere): train the CNN first (train_cnn.py --dataset {dataset} --run {run}{models}), "
                         f"then its LSTMs ({lstm_command(run, None, models_dir, features_dir)})")
    cnn, cnn_config = load_cnn(run_dir)
    cnn_sha256 = file_sha256(run_dir / MODEL_FILE)
    features_config_path = features_run_dir / CONFIG_FILE
    features_config = read_json(features_config_path) if features_config_path.exists() else {}
    extract, train = _commands(run, selection, cnn_config, models_dir, features_dir, features_config.get("tta"))
    if features_config.get("cnn_sha256") != cnn_sha256:
        elsewhere = "not found (give --features-dir the folder that holds it if it is elsewhere)"
        found = (elsewhere if not features_config else
                 f"was extracted from another {run_dir / MODEL_FILE} "
                 f"({what_changed({'cnn_sha256': features_config.get('cnn_sha256')}, {'cnn_sha256': cnn_sha256})})")
        raise ChainError(f"{features_config_path} {found}: run {extract}, then {train}")
    if selection is None:
        records = lstm_records(models_dir, run, features_config["fingerprint"])
        if not records:
            raise ChainError(f"no LSTM in {run_dir} was trained on the current features {features_run_dir}: run {train} first")
        selection = min(records, key=lambda r: r["validation"]["weighted_log_loss"])["selection"]
        extract, train = _commands(run, selection, cnn_config, models_dir, features_dir, features_config.get("tta"))
    lstm_path, record = finished_lstm(run_dir, selection, features_config["fingerprint"], train)
    fitted_path = selection_path(features_run_dir, selection)
    fitted = load_selection(fitted_path) if fitted_path.exists() else None
    if fitted is None or fitted.inputs is None or not selection_fits(fitted.inputs, record["inputs"]):
        raise ChainError(f"{fitted_path} is missing or was fitted on other inputs than {lstm_path}: run {train} first")
    return Chain(run, selection, cnn, cnn_config, cnn_sha256, fitted, load_lstm(lstm_path),
                 features_config.get("tta", "none"))


def _members_unchanged(pooled: dict, members: list[str], models_dir, features_dir) -> bool:
    """Whether a fold ensemble's pooled record scored every member's LSTM as it is now: the same file,
    trained on the member's features of now."""
    slug = selection_slug(pooled["selection"])
    for member in members:
        record_path = Path(models_dir) / member / f"lstm-{slug}.json"
        features_path = Path(features_dir) / member / CONFIG_FILE
        if member not in pooled["members"] or not record_path.exists() or not features_path.exists():
            return False
        record = read_json(record_path)
        if (record.get("model_sha256") != pooled["members"][member]["model_sha256"]
                or record.get("inputs", {}).get("features") != read_json(features_path).get("fingerprint")):
            return False
    return True


def load_chains(run: str, selection: str | None = None, models_dir="models", features_dir="features") -> list[Chain]:
    """The trained chains of ``run``: its one chain, or for a fold ensemble one per member run, all with the
    same selection (None: the one with the best out-of-fold validation loss among those whose scores are of
    the members' LSTMs of now).

    Refuses (ChainError) a selection the ensemble's LSTMs were not all trained with, and a member whose
    LSTM is no longer the one the ensemble was scored with.
    """
    ensemble = read_ensemble(models_dir, run)
    if ensemble is None:
        return [load_chain(run, selection, models_dir, features_dir)]
    train = lstm_command(run, selection, models_dir, features_dir)
    records = {record["selection"]: record for record in
               (read_json(path) for path in sorted((Path(models_dir) / run).glob("lstm-*.json")))}
    if not records:
        raise ChainError(f"no LSTM of the fold ensemble {run} was trained: run {train} first")
    if selection is None:  # the best of the selections scored with the members' LSTMs of now, where there are any
        current = [r for r in records.values() if _members_unchanged(r, ensemble["members"], models_dir, features_dir)]
        current = current or list(records.values())  # none: the best is refused below, saying why
        selection = min(current, key=lambda r: r["validation"]["weighted_log_loss"])["selection"]
    if selection not in records:
        raise ChainError(f"the fold ensemble {run} has no LSTMs of selection {selection} "
                         f"(it has {', '.join(sorted(records))}): run {train} first")
    scored = records[selection]["members"]
    chains = []
    for member in ensemble["members"]:
        chain = load_chain(member, selection, models_dir, features_dir)
        member_record = read_json(Path(models_dir) / member / f"lstm-{chain.slug}.json")
        if member not in scored or scored[member]["model_sha256"] != member_record["model_sha256"]:
            raise ChainError(f"the LSTM of {member} ({selection}) is not the one the ensemble {run} was scored with: "
                             f"run {lstm_command(run, selection, models_dir, features_dir)}")
        chains.append(chain)
    return chains


def chain_inputs(chain: Chain, embeddings: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """The sequence models' per-slice inputs: the selection's features of the embeddings, then the CNN probabilities."""
    return sequence_inputs(chain.selection.transform(embeddings), probabilities)


def lstm_probabilities(chain: Chain, embeddings: np.ndarray, probabilities: np.ndarray, index: pd.DataFrame,
                       batch_size: int = 64) -> np.ndarray:
    """Per-slice LSTM probabilities (N, 6) in the order of `index` (contiguous, position-sorted series)."""
    inputs = chain_inputs(chain, embeddings, probabilities)
    data = series_set(inputs, index.reset_index(drop=True), np.ones(len(index), bool))
    return predict_series(chain.lstm, data, batch_size)


def cached_test_features(chain: Chain, data_dir="data", features_dir="features", models_dir="models") -> Features:
    """The run's feature cache, extracted first (resumably) where it is incomplete or damaged; refuses
    features that are no longer the ones the chain's selection and LSTM were fitted on."""
    run_dir = Path(features_dir) / chain.run
    dataset_dir = Path(data_dir) / chain.cnn_config["dataset"]
    index = read_index(dataset_dir)
    extract_features(chain.cnn, chain.cnn_config, chain.cnn_sha256, index, dataset_dir / "index.parquet",
                     SliceStore(dataset_dir / "slices"), run_dir, tta=chain.tta)
    features = load_features(run_dir)
    if features.fingerprint != chain.features_fingerprint:
        _, train = _commands(chain.run, chain.selection_name, chain.cnn_config, models_dir, features_dir, chain.tta)
        raise ChainError(f"{run_dir} now holds features of another index or CNN than {chain.selection_name} "
                         f"was trained on: run {train} first")
    return features


@dataclass
class Predictions:
    """Per-slice probabilities of some index rows: the CNN alone and CNN + LSTM, rows as in `index`."""

    index: pd.DataFrame
    cnn: np.ndarray
    lstm: np.ndarray
    embeddings: np.ndarray | None = None  # the CNN embeddings, kept where a study model reads them too

    def wide(self, which: str = "lstm") -> pd.DataFrame:
        """One model's probabilities as a table: index image_id, columns SUBTYPES."""
        values = self.lstm if which == "lstm" else self.cnn
        return pd.DataFrame(values, index=pd.Index(self.index["image_id"], name="image_id"), columns=list(SUBTYPES))


def average_predictions(parts: list[Predictions]) -> Predictions:
    """The members' probabilities averaged, row by row (every part must cover the same rows in the same order)."""
    first = parts[0]
    for part in parts[1:]:
        if not np.array_equal(part.index["image_id"].to_numpy(), first.index["image_id"].to_numpy()):
            raise ValueError("ensemble members predicted different images: they must share one index")
    if len(parts) == 1:
        return first
    return Predictions(first.index, np.mean([p.cnn for p in parts], axis=0), np.mean([p.lstm for p in parts], axis=0))


def predict_test_split(chain: Chain, features: Features) -> Predictions:
    """Both models' probabilities for every test row of a prepared dataset, from cached CNN outputs."""
    rows = np.flatnonzero(features.index["split"].to_numpy() == "test")
    index = features.index.iloc[rows].reset_index(drop=True)
    cnn = np.asarray(features.probabilities[rows], np.float32)
    return Predictions(index, cnn, lstm_probabilities(chain, features.embeddings[rows], cnn, index))


def cnn_outputs(chain: Chain, stacks: np.ndarray, batch_size: int = CNN_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (N, D) and probabilities (N, 6) of model inputs (N, size, size, C) in HU."""
    parts = [embed_batch(chain.extractor, stacks[begin : begin + batch_size], chain.tta)
             for begin in range(0, len(stacks), batch_size)]
    if not parts:
        return (np.zeros((0, int(chain.extractor.outputs[0].shape[-1])), np.float32),
                np.zeros((0, len(SUBTYPES)), np.float32))
    return np.concatenate([np.asarray(p[0]) for p in parts]), np.concatenate([np.asarray(p[1]) for p in parts])


def read_model_hu(index: pd.DataFrame, size: int, store_size: int, non_ct_as_hu: bool = False
                  ) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """The readable rows' DICOM files as HU for a model of ``size`` trained from a store of ``store_size``
    (`model_hu_through_store`: as training read them), (n, size, size) float32 in index order, and (path,
    reason) for each file that could not be read (left out of the array). ``non_ct_as_hu`` reads modalities
    other than CT as HU (``ihd.dicom.read_hu``)."""
    slices, failures = [], []
    for path in index["path"]:
        try:
            slices.append(model_hu_through_store(read_hu(path, non_ct_as_hu), store_size, size))
        except DicomError as error:
            failures.append((path, error.reason))
    return np.stack(slices) if slices else np.zeros((0, size, size), np.float32), failures


def folder_cnn_outputs(chains: list[Chain], index: pd.DataFrame, non_ct_as_hu: bool = False,
                       batch_size: int = CNN_BATCH) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[str, str]]]:
    """Per chain (the members of a fold ensemble, or one), embeddings (n, D) and probabilities (n, 6) of
    the readable rows of a DICOM folder's index, in index order; and (path, reason) for each file that
    could not be read (see `read_model_hu`).

    Reads the folder once, one series at a time, so memory holds the largest series' images and stacks
    and one batch; each CNN still sees the batches `cnn_outputs` would give it on the whole folder's
    stacks at once (`batch_size` consecutive readable rows, across series).
    """
    if len({(chain.image_size, chain.store_size, chain.offsets) for chain in chains}) > 1:
        raise ValueError("the chains read slices at different sizes or channel offsets: predict with each alone")
    starts, lengths = series_bounds(index)
    pending, outputs, failures = [], [[] for _ in chains], []

    def run(stacks):
        for chain, parts in zip(chains, outputs):
            parts.append(cnn_outputs(chain, stacks, batch_size))

    with tqdm(total=len(index), desc="cnn", unit="slice", dynamic_ncols=True, disable=len(starts) < 3) as bar:
        for start, length in zip(starts, lengths):
            series = index.iloc[start : start + length]
            hu, failed = read_model_hu(series, chains[0].image_size, chains[0].store_size, non_ct_as_hu)
            failures += failed
            readable = series[~series["path"].isin([path for path, _ in failed])]
            pending.append(stack_hu(hu, neighbour_rows(readable, chains[0].offsets)))
            if sum(map(len, pending)) >= batch_size:
                stacks = np.concatenate(pending)
                whole = len(stacks) // batch_size * batch_size
                run(stacks[:whole])
                pending = [stacks[whole:]]
            bar.update(length)
    run(np.concatenate(pending) if pending else np.zeros((0,)))
    return [(np.concatenate([o[0] for o in parts]), np.concatenate([o[1] for o in parts])) for parts in outputs], failures


def chain_predictions(chain: Chain, index: pd.DataFrame, embeddings: np.ndarray, cnn: np.ndarray) -> Predictions:
    """Both models' probabilities for the rows of `index` from their CNN outputs (embeddings kept)."""
    return Predictions(index, cnn, lstm_probabilities(chain, embeddings, cnn, index), embeddings)


def dicom_hu_reader(index: pd.DataFrame, size: int, store_size: int, non_ct_as_hu: bool = False):
    """`hu_of_rows` over a DICOM folder's (readable) index: rows -> (n, size, size) HU, read again from the files
    as `read_model_hu` reads them."""
    def hu_of_rows(rows):
        hu, failures = read_model_hu(index.iloc[np.asarray(rows)], size, store_size, non_ct_as_hu)
        if failures:
            path, reason = failures[0]
            raise DicomError(path, f"{reason} (it was readable earlier in this run: changed since?)")
        return hu

    return hu_of_rows


def strongest_studies(index: pd.DataFrame, probabilities: np.ndarray, limit: int | None) -> dict[str, np.ndarray]:
    """Row numbers of each study (in the order studies first appear), keeping only the `limit` studies
    with the highest `any` probability of any slice (all of them when `limit` is None or 0)."""
    studies = index.groupby("study_id", sort=False).indices
    if not limit or limit >= len(studies):
        return studies
    highest = {study: float(np.max(probabilities[rows, ANY])) for study, rows in studies.items()}
    kept = set(sorted(highest, key=lambda study: -highest[study])[:limit])
    return {study: rows for study, rows in studies.items() if study in kept}


def draw_study_pictures(
    chains: Chain | list[Chain],
    predictions: Predictions,
    hu_of_rows,
    out_dir: str | Path,
    per_study: int,
    method: str = "gradcam",
    max_studies: int | None = None,
) -> list[Path]:
    """For the `max_studies` studies most likely to bleed (every study when None or 0): Grad-CAM overlays
    of the `per_study` slices most likely to bleed, computed in one pass per study, and a montage. A fold
    ensemble's pictures show the mean of its members' heatmaps (each normalised to [0, 1] first).

    `hu_of_rows(rows)` returns the model-size HU slices (len(rows), size, size) of those index rows.
    """
    chains = [chains] if isinstance(chains, Chain) else list(chains)
    offsets = chains[0].offsets
    if any(chain.offsets != offsets for chain in chains):
        raise ValueError("the ensemble's CNNs read different channel recipes: their Grad-CAM cannot be averaged")
    source = method if len(chains) == 1 else f"{method}, mean of {len(chains)} CNNs"
    out_dir = Path(out_dir)
    written = []
    studies = strongest_studies(predictions.index, predictions.lstm, max_studies)
    for study, rows in tqdm(studies.items(), desc="grad-cam", unit="study", disable=len(studies) < 3):
        rows = np.sort(rows)
        study_index = predictions.index.iloc[rows]
        hu = hu_of_rows(rows)
        slots = best_slices(predictions.lstm[rows], per_study)
        stacks = stack_hu(hu, neighbour_rows(study_index, offsets)[slots])
        mean = np.mean([gradcam_heatmaps(chain.cnn, stacks, method=method) for chain in chains], axis=0)
        heatmaps = dict(zip(slots.tolist(), mean))
        for slot in slots:
            image_id = study_index["image_id"].iloc[slot]
            written.append(draw_overlay(hu[slot], heatmaps[slot], predictions.lstm[rows[slot]],
                                        out_dir / f"{study}_{image_id}.png", f"{study} {image_id} ({source}, CNN+LSTM)"))
        written.append(draw_montage(list(hu), predictions.lstm[rows], out_dir / f"{study}_montage.png", heatmaps,
                                    f"{study}: {len(rows)} slices, any probability (CNN+LSTM)"))
    return written


def store_hu_reader(index: pd.DataFrame, store: SliceStore, size: int):
    """`hu_of_rows` over a slice store: rows of `index` -> (n, size, size) HU at the model's size."""
    return lambda rows: np.stack([to_model_hu(store.read_hu(i), size) for i in index["image_id"].iloc[rows]])
