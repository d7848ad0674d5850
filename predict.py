"""Predict with a trained run: the test set to a validated submission, or a plain folder of DICOM files
to per-slice probabilities; Grad-CAM pictures of the slices most likely to bleed.

    python predict.py --run synthetic-tiny-128-windows-fold0 --gradcam 1
    python predict.py --run rsna-efficientnetb0-256-windows-fold0 --selection pca:120 --submit --message "pca120"
    python predict.py --run rsna-efficientnetb0-256-windows-fold0 --dicom-dir /path/to/exported/studies --gradcam 3
    python predict.py --run demo --dicom-dir ../shared/data/real/rsna_labeled/stage_2_train \
        --labels ../shared/data/real/rsna_labeled/stage_2_train.csv
    python predict.py --run demo-fold0 --study study-attention-subtypes-weights32-pretrained --dicom-dir /path/to/studies
    python predict.py --run demo --dicom-dir /path/to/exported/studies --segment seg-plain-128

Dataset route: reads the run's cached CNN outputs (extracting them first if the cache is incomplete),
applies the selection and its LSTM to every test slice (without --selection, the one of lowest validation
loss; for a fold ensemble, out of fold, among those scored with its members' LSTMs of now) and writes
submissions/<run>-<slug>.csv in the sample submission's order, validated; with the dataset's test truth
present (synthetic data) it also prints and saves the test weighted log loss of the prior, the CNN alone
and CNN + LSTM (submissions/<run>-<slug>-scores.json). Pictures go to submissions/<run>-gradcam/.
DICOM route: the folder is read one series at a time (a progress bar counts its slices), so memory
holds one series' images, not the folder's; probabilities.csv, the folder's index and pictures go to
--out (default submissions/<run>-<slug>-<folder name>/). Files that cannot be read as HU are listed there in
bad_files.csv with the reason; --read-non-ct-as-hu reads modalities other than CT as HU instead. With
--labels (the challenge's long ID,Label format) the probabilities are scored beside them
(scores.json): weighted log loss, slice-level AUC of every subtype and `any`, study-level AUC, for
CNN+LSTM, the CNN alone and the training prior.
Study mode (--study NAME, or --study best): a study model trained by train_lstm.py --study-labels reads
the same CNN outputs and writes one row per study (verdict at the validation threshold, probabilities,
flagged slices) to studies.csv beside probabilities.csv, or submissions/<run>-<study>-studies.csv for
the test set, scored against the dataset's study and slice truth when it has them (with the per-slice
LSTM read at study level beside it; a DICOM folder's studies are scored the same way against
--labels, in studies-scores.json); --gradcam N draws the N slices of strongest study evidence of
each study called hemorrhage (of the --gradcam-studies most likely) as one montage, every tile
with the CNN's `any`, whose Grad-CAM it shows.
Pictures: --gradcam N draws them for the --gradcam-studies studies (default 50) most likely to bleed
(highest `any` of a slice, or study probability in study mode); --gradcam-studies 0 draws every study,
which takes an hour for the real test set on a CPU (BENCHMARKS.md, "Grad-CAM on a whole test set").
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ihd.cli import run_command
from ihd.flags import folder_of_files, non_negative_int, selection_spec
from ihd.gradcam import METHODS
from ihd.index import build_index, drop_unreadable, read_index
from ihd.inference import (
    Chain,
    ChainError,
    average_predictions,
    cached_test_features,
    chain_inputs,
    chain_predictions,
    dicom_hu_reader,
    draw_study_pictures,
    folder_cnn_outputs,
    load_chains,
    predict_test_split,
    store_hu_reader,
)
from ihd.inputs import fold_rows, label_array
from ihd.io import atomic_path, run_header, write_json
from ihd.kaggle_api import KaggleAccessError
from ihd.labels import SUBTYPES, LabelFileError, read_long_labels
from ihd.study_stage import held_out_score_table, score_table_text
from ihd.study_inference import (
    StudyModel,
    check_study_belongs,
    draw_best_slices,
    held_out_study_truth,
    load_study,
    predict_index_studies,
    score_test,
    study_table,
    study_truth_from_slices,
)
from ihd.metrics import prior_baseline
from ihd.ensemble import read_ensemble
from ihd.features import load_features
from ihd.report import (
    folder_scores,
    format_folder_scores,
    format_scores,
    intervals_on_truth,
    scores_on_truth,
    truth_path,
)
from ihd.seg_inference import segment_index
from ihd.segmentation import unet_file
from ihd.slices import SliceStore
from ihd.submission import SubmissionError, submit, write_submission

SAMPLE_SUBMISSION = "stage_2_sample_submission.csv"


@dataclass
class Settings:
    """What to predict and where the results go; every field is a command-line flag."""

    run: str = ""  # the CNN run (models/<run>/, features/<run>/) whose LSTMs were trained by train_lstm.py
    selection: str | None = None  # which LSTM; None takes the one with the best validation loss
    dicom_dir: str | None = None  # a plain folder of DICOM files instead of the prepared dataset's test set
    out: str | None = None  # output folder of the DICOM route; None: submissions/<run>-<slug>-<folder name>
    gradcam: int = 0  # Grad-CAM overlays for this many slices per study (highest `any` first), plus a montage
    gradcam_method: str = "gradcam"  # gradcam or gradcam++ (sharper when a bleed has several parts)
    gradcam_studies: int = 50  # pictures for this many studies, the likeliest to bleed: about 1 s each on a CPU; 0: all
    segment: str = ""  # DICOM route: a train_seg.py run in models/; masks (PNG, NIfTI, DICOM SEG) and bleeds.csv
    sample: str | None = None  # sample submission; None: data/<dataset>/raw/stage_2_sample_submission.csv
    truth: str | None = None  # test labels for the scores report; None: the dataset's raw/truth/ file if present
    labels: str | None = None  # with --dicom-dir: the folder's labels (long ID,Label CSV) to score the probabilities
    submit: bool = False  # send the submission to Kaggle (needs the internet and credentials)
    message: str = ""  # Kaggle submission description; empty: the run and selection
    data_dir: str = "data"  # where prepared datasets live (index, slice store, raw files)
    models_dir: str = "models"  # where the CNN run and its LSTMs are
    features_dir: str = "features"  # where the run's cached CNN outputs and fitted selections are
    submissions_dir: str = "submissions"  # where submissions, scores and pictures go
    read_non_ct_as_hu: bool = False  # DICOM route: read modalities other than CT (e.g. OT exports of raw HU) as HU
    study: str | None = None  # a study model of the run (file stem) or "best": one row per study as well


def parse_args(argv: list[str] | None) -> Settings:
    """Command-line flags into Settings."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--selection", type=selection_spec, default=Settings.selection)
    parser.add_argument("--gradcam", type=non_negative_int, default=Settings.gradcam)
    parser.add_argument("--gradcam-method", choices=sorted(METHODS), default=Settings.gradcam_method)
    parser.add_argument("--gradcam-studies", type=non_negative_int, default=Settings.gradcam_studies)
    parser.add_argument("--submit", action="store_true")
    parser.add_argument("--read-non-ct-as-hu", action="store_true")
    parser.add_argument("--dicom-dir", type=folder_of_files, default=Settings.dicom_dir)
    for field in dataclasses.fields(Settings):
        if field.name not in ("run", "selection", "gradcam", "gradcam_method", "gradcam_studies", "submit",
                              "read_non_ct_as_hu", "dicom_dir"):
            parser.add_argument("--" + field.name.replace("_", "-"), default=field.default)
    return Settings(**vars(parser.parse_args(argv)))


def training_prior(features) -> np.ndarray:
    """The six label means of the run's training rows: the answer for a test image nothing is known about."""
    train_rows, _ = fold_rows(features.index, int(features.config["fold"]))
    return prior_baseline(label_array(features.index)[train_rows], 1)[0]


def studies_left_out(settings: Settings, index) -> str:
    """A note for the pictures' summary line when --gradcam-studies left studies out, else ""."""
    studies = index["study_id"].nunique()
    if not settings.gradcam_studies or settings.gradcam_studies >= studies:
        return ""
    return (f" (the {settings.gradcam_studies} of {studies} studies most likely to bleed; --gradcam-studies 0 "
            "draws every study)")


def chains_prior(settings: Settings, chains: list[Chain]) -> np.ndarray:
    """The training prior of the chains' runs (the mean of the members' for a fold ensemble)."""
    return np.mean([training_prior(load_features(Path(settings.features_dir) / chain.run)) for chain in chains], axis=0)


def predict_dataset(settings: Settings, chains: list[Chain]) -> Path:
    """Test split -> validated submission, scores against the truth if known, Grad-CAM pictures; a fold
    ensemble's members are averaged."""
    chain = chains[0]
    predictions = average_predictions([
        predict_test_split(member, cached_test_features(member, settings.data_dir, settings.features_dir,
                                                        settings.models_dir))
        for member in chains])
    prior = chains_prior(settings, chains)
    dataset_dir = Path(settings.data_dir) / chain.cnn_config["dataset"]
    sample_path = Path(settings.sample) if settings.sample else dataset_dir / "raw" / SAMPLE_SUBMISSION
    out_path = Path(settings.submissions_dir) / f"{settings.run}-{chain.slug}.csv"
    write_submission(predictions.wide(), sample_path, out_path, prior)
    print(f"submission: {out_path} ({len(predictions.index)} test slices, validated against {sample_path})")

    truth = Path(settings.truth) if settings.truth else truth_path(dataset_dir)
    if truth.is_file():
        labels = read_long_labels(truth)
        try:
            models = {"cnn": predictions.wide("cnn"), "cnn+lstm": predictions.wide()}
            scores = scores_on_truth(labels, models, prior)
        except ValueError as error:
            raise SystemExit(f"{truth}: {error}") from None
        intervals = intervals_on_truth(labels, models, prior, read_index(dataset_dir).set_index("image_id")["study_id"])
        print(f"test scores ({truth}):\n{format_scores(scores, intervals=intervals)}")
        write_json(out_path.with_name(f"{out_path.stem}-scores.json"),
                   {"scores": scores, "intervals": intervals, "truth": truth, "selection": chain.selection_name,
                    "members": [member.run for member in chains], "settings": settings})

    if settings.gradcam > 0:
        out_dir = Path(settings.submissions_dir) / f"{settings.run}-gradcam"
        store = SliceStore(dataset_dir / "slices")
        reader = store_hu_reader(predictions.index, store, chain.image_size)
        pictures = draw_study_pictures(chains, predictions, reader, out_dir, settings.gradcam, settings.gradcam_method,
                                       settings.gradcam_studies)
        write_json(out_dir / "config.json", {"selection": chain.selection_name, "settings": settings})
        print(f"grad-cam: {len(pictures)} pictures in {out_dir}{studies_left_out(settings, predictions.index)}")
    if settings.submit:
        try:
            submit(out_path, settings.message or f"{settings.run} {chain.selection_name}")
        except KaggleAccessError as error:
            raise SystemExit(f"--submit: {out_path} was written but not sent. {error}") from None
        print(f"submitted {out_path}")
    return out_path


def predict_dataset_studies(settings: Settings, chain: Chain, study: StudyModel) -> Path:
    """Test split -> one row per study, scores against the dataset's study and slice truth, best-slice montages."""
    features = cached_test_features(chain, settings.data_dir, settings.features_dir, settings.models_dir)
    rows = np.flatnonzero(features.index["split"].to_numpy() == "test")
    index = features.index.iloc[rows].reset_index(drop=True)
    inputs = chain_inputs(chain, features.embeddings[rows], features.probabilities[rows])
    series, outputs, weights = predict_index_studies(study, inputs, index)
    table = study_table(study, index, series, outputs, weights)
    out_path = Path(settings.submissions_dir) / f"{chain.run}-{study.name}-studies.csv"
    with atomic_path(out_path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    print(f"studies: {out_path} ({len(table)} test studies, {int((table['verdict'] == 'hemorrhage').sum())} called hemorrhage)")
    dataset_dir = Path(settings.data_dir) / chain.cnn_config["dataset"]
    truth_file = Path(settings.truth) if settings.truth else truth_path(dataset_dir)
    slice_truth = read_long_labels(truth_file) if truth_file.is_file() else None
    truth = held_out_study_truth(dataset_dir, index, slice_truth, study.labels)
    if truth is not None:
        scores = score_test(study, chain.lstm, inputs, index, series, table, truth, slice_truth)
        write_json(out_path.with_name(f"{out_path.stem}-scores.json"), {"scores": scores, "settings": settings})
        table_of_scores = held_out_score_table(study.name, study.labels.positive, scores)
        print(f"test study scores:\n{score_table_text(table_of_scores)}")
    if settings.gradcam > 0:
        out_dir = Path(settings.submissions_dir) / f"{chain.run}-{study.name}-best-slices"
        probabilities = np.asarray(features.probabilities[rows], np.float32)
        reader = store_hu_reader(index, SliceStore(dataset_dir / "slices"), chain.image_size)
        pictures = draw_best_slices(chain, index, pictured_studies(table, study, settings.gradcam_studies), series,
                                    weights, probabilities, reader, out_dir, settings.gradcam, settings.gradcam_method)
        print(f"best slices: {len(pictures)} montages in {out_dir}")
    return out_path


def pictured_studies(table, study: StudyModel, limit: int):
    """The rows of a study table whose best slices are drawn: the `limit` studies called hemorrhage with
    the highest bleed probability (every one when `limit` is 0)."""
    called = table[table["verdict"] == "hemorrhage"]
    return called.nlargest(limit, f"p_{study.labels.positive}") if limit else called


def write_folder_studies(settings: Settings, chain: Chain, study: StudyModel, predictions, hu_of_rows,
                         out_dir: Path, labels: pd.DataFrame | None) -> Path:
    """A DICOM folder's studies -> studies.csv (one row per study) and best-slice montages; scored against
    ``labels`` (the wide table of --labels) where given."""
    inputs = chain_inputs(chain, predictions.embeddings, predictions.cnn)
    series, outputs, weights = predict_index_studies(study, inputs, predictions.index)
    table = study_table(study, predictions.index, series, outputs, weights)
    csv_path = out_dir / "studies.csv"
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    print(f"studies: {csv_path}\n{table[['study_id', 'verdict', 'flagged_positions']].to_string(index=False)}")
    if labels is not None and study.labels.exclusive:
        print(f"{settings.labels}: slice labels do not give the {study.labels.name} label set's study labels "
              f"({', '.join(study.labels.columns)}): studies not scored (the slice probabilities are)")
    elif labels is not None:
        truth = study_truth_from_slices(predictions.index, labels)
        scores = score_test(study, chain.lstm, inputs, predictions.index, series, table, truth, labels)
        write_json(out_dir / "studies-scores.json", {"scores": scores, "labels": settings.labels, "settings": settings})
        table_of_scores = held_out_score_table(study.name, study.labels.positive, scores)
        print(f"study scores against {settings.labels}:\n{score_table_text(table_of_scores)}")
    if settings.gradcam > 0:
        draw_best_slices(chain, predictions.index, pictured_studies(table, study, settings.gradcam_studies), series,
                         weights, predictions.cnn, hu_of_rows, out_dir, settings.gradcam, settings.gradcam_method)
    return csv_path


def predict_folder(settings: Settings, chains: list[Chain], study: StudyModel | None = None,
                   labels: pd.DataFrame | None = None) -> Path:
    """A plain DICOM folder -> per-slice probabilities CSV (CNN+LSTM and CNN alone) and pictures;
    with a study model, studies.csv beside it; with ``labels`` (the wide table of --labels), the scores.
    A fold ensemble's members are averaged."""
    chain = chains[0]
    folder = Path(settings.dicom_dir)
    out_dir = Path(settings.out) if settings.out else Path(settings.submissions_dir) / f"{settings.run}-{chain.slug}-{folder.name}"
    index = build_index([(folder, "test")], out_dir, workers=1, non_ct_as_hu=settings.read_non_ct_as_hu)
    outputs, failures = folder_cnn_outputs(chains, index, settings.read_non_ct_as_hu)
    if failures:
        index = drop_unreadable(out_dir, failures)
    if index.empty:
        raise SystemExit(f"{folder}: no readable DICOM slices (see {out_dir / 'bad_files.csv'})")
    predictions = average_predictions([chain_predictions(member, index, embeddings, cnn)
                                       for member, (embeddings, cnn) in zip(chains, outputs)])
    hu_of_rows = dicom_hu_reader(index, chain.image_size, chain.store_size, settings.read_non_ct_as_hu)
    table = index[["image_id", "patient_id", "study_id", "series_id", "position", "z", "path"]].copy()
    table[list(SUBTYPES)] = predictions.lstm
    table[[f"cnn_{s}" for s in SUBTYPES]] = predictions.cnn
    csv_path = out_dir / "probabilities.csv"
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    write_json(out_dir / "config.json", {"selection": chain.selection_name, "settings": settings})
    print(f"probabilities: {csv_path} ({len(table)} slices in {index['study_id'].nunique()} studies)")
    print(table.groupby("study_id")["any"].max().rename("highest any probability").to_string(name=True))
    if labels is not None:
        score_folder(settings, chains, table, out_dir, labels)
    if study is not None:
        write_folder_studies(settings, chain, study, predictions, hu_of_rows, out_dir, labels)
    elif settings.gradcam > 0:
        pictures = draw_study_pictures(chains, predictions, hu_of_rows, out_dir, settings.gradcam,
                                       settings.gradcam_method, settings.gradcam_studies)
        print(f"grad-cam: {len(pictures)} pictures in {out_dir}{studies_left_out(settings, index)}")
    if settings.segment:
        segment_index(Path(settings.models_dir) / settings.segment, index, out_dir, settings.read_non_ct_as_hu)
    return csv_path


def score_folder(settings: Settings, chains: list[Chain], table, out_dir: Path, labels: pd.DataFrame) -> Path:
    """Score the folder's probabilities against ``labels`` (read from --labels), next to the training prior;
    saved beside them."""
    chain = chains[0]
    prior = chains_prior(settings, chains)
    report = folder_scores(table, labels, prior)
    path = out_dir / "scores.json"
    write_json(path, {"scores": report, "labels": settings.labels, "selection": chain.selection_name,
                      "prior": dict(zip(SUBTYPES, prior.tolist()))})
    if not report["models"]:
        print(f"{settings.labels}: none of the {len(table)} predicted images has a label; nothing scored ({path})")
        return path
    print(f"scores against {settings.labels} ({path}):\n{format_folder_scores(report)}")
    return path


def main(argv: list[str] | None = None) -> Path:
    settings = parse_args(argv)
    run_header(argv, settings)
    if settings.labels and not settings.dicom_dir:
        raise SystemExit("--labels scores a --dicom-dir folder (the dataset route reads its test labels from --truth)")
    if settings.truth and settings.dicom_dir:
        raise SystemExit("--truth scores the dataset's test split; a --dicom-dir folder is scored with --labels")
    if settings.segment and not settings.dicom_dir:
        raise SystemExit("--segment works on --dicom-dir folders (the test set has no series to write masks for)")
    try:
        labels = read_long_labels(settings.labels) if settings.labels else None  # refused before any prediction
    except LabelFileError as error:
        raise SystemExit(f"--labels {error}") from None
    try:
        if settings.segment:
            unet_file(Path(settings.models_dir) / settings.segment)  # before the CNN reads the whole folder
        study = None
        if settings.study:
            ensemble = read_ensemble(settings.models_dir, settings.run)
            if ensemble is not None:
                raise SystemExit(f"{settings.run} is a fold ensemble, and study models train on one run: give --run one "
                                 f"of its members ({', '.join(ensemble['members'])})")
            study = load_study(settings.models_dir, settings.run, None if settings.study == "best" else settings.study)
            if settings.selection and settings.selection != study.record["selection"]:
                raise SystemExit(f"--study {study.name} reads selection {study.record['selection']}, "
                                 f"not {settings.selection}")
            settings.selection = study.record["selection"]
            print(f"study model: {study.name}")
        chains = load_chains(settings.run, settings.selection, settings.models_dir, settings.features_dir)
        members = f" (fold ensemble of {', '.join(chain.run for chain in chains)})" if len(chains) > 1 else ""
        print(f"chain: {settings.run}, selection {chains[0].selection_name}{members}")
        if study is not None:
            check_study_belongs(study, chains[0], settings.models_dir)
        if settings.dicom_dir:
            return predict_folder(settings, chains, study, labels)
        if study is not None:
            return predict_dataset_studies(settings, chains[0], study)
        return predict_dataset(settings, chains)
    except (ChainError, SubmissionError, FileNotFoundError, LabelFileError) as error:
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    run_command(main, "rerun the same command (features already extracted into the run's cache are kept)")
