"""Study models at prediction time: one row per study (verdict, probabilities, flagged slices), and test scores.

A trained study model (``train_lstm.py --study-labels``) reads the same selected CNN features as the
per-slice LSTM, so ``predict.py --study`` computes the CNN once and writes both tables. A study with
several series takes, per label, the highest probability over its series (sigmoids) or their mean
(softmax). The verdict is "hemorrhage" when the bleed label reaches the threshold chosen on the
validation exams (recorded with the model), else "no_hemorrhage" (subtype labels) or the likelier of
"no_finding" and "other" (exam labels). Flagged slices follow ``ihd.study_metrics.flag_slices``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from ihd.gradcam import draw_montage, gradcam_heatmaps
from ihd.inputs import neighbour_rows, stack_hu
from ihd.fingerprint import file_sha256
from ihd.inference import ChainError
from ihd.io import read_json
from ihd.labels import ANY, SUBTYPES
from ihd.sequence import predict_series, series_set
from ihd.series_inputs import transform_sha256
from ihd.study_labels import STUDY_ID, LabelSet, label_set, read_study_labels
from ihd.study_metrics import binary_scores, exam_scores, flag_slices, keep_runs, localization_scores
from ihd.study_models import EVIDENCE_LAYERS
from ihd.study_training import StudySeries, load_study_model, outputs_and_weights, slice_weights, study_series

SLICE_FLAG_PROBABILITY = 0.5


@dataclass
class StudyModel:
    """A trained study model with the record that made it (label set, thresholds, frames)."""

    name: str
    model: keras.Model
    record: dict

    @property
    def labels(self) -> LabelSet:
        return label_set(self.record["label_set"])

    @property
    def frames(self) -> int | None:
        return self.record["frames"]

    @property
    def evidence_layer(self) -> str | None:
        """None for attention weights, else the layer temporal Grad-CAM reads."""
        return EVIDENCE_LAYERS[self.record["model"]]

    @property
    def threshold(self) -> float:
        """The validation threshold of the bleed label; refuses (ChainError) a model trained without one."""
        positive = self.labels.positive
        if positive not in self.record["thresholds"]:
            raise ChainError(f"study model {self.name} has no validated {positive} threshold: its validation "
                             "exams held one class only; train it on a fold with both")
        return float(self.record["thresholds"][positive])


def load_study(models_dir: str | Path, run: str, name: str | None = None) -> StudyModel:
    """Study model ``name`` (the file stem, such as study-attention-subtypes-pca32-pretrained) of a run;
    None takes the one with the lowest validation study loss (refused, ChainError, when the run's study
    models learn different label sets, whose losses do not compare)."""
    folder = Path(models_dir) / run
    if name is None:
        records = sorted(folder.glob("study-*.json"))
        if not records:
            raise FileNotFoundError(f"no study-*.json in {folder}: run train_lstm.py --run {run} --study-labels ... first")
        loaded = {path.stem: read_json(path) for path in records}
        sets = sorted({record["label_set"] for record in loaded.values()})
        if len(sets) > 1:
            raise ChainError(f"{folder} holds study models of the label sets {', '.join(sets)}, whose losses do not "
                             f"compare: name one with --study ({', '.join(loaded)})")
        name = min(loaded, key=lambda stem: min(h["val_study_log_loss"] for h in loaded[stem]["history"]))
    record_path, model_path = folder / f"{name}.json", folder / f"{name}.keras"
    for path in (record_path, model_path):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: train the study model with train_lstm.py --study-labels")
    return StudyModel(name, load_study_model(model_path), read_json(record_path))


def check_study_belongs(study: StudyModel, chain, models_dir: str | Path) -> None:
    """Refuse (ChainError, naming the command to run) a study model trained on other features than the
    chain's, or whose file is not the one its record describes."""
    again = f"train_lstm.py --run {chain.run} --selection {study.record['selection']} --study-labels ... again"
    if study.record.get("features_fingerprint") != chain.features_fingerprint:
        raise ChainError(f"study model {study.name} was trained on other features than the run holds now: run {again}")
    if study.record.get("selection_transform_sha256") != transform_sha256(chain.selection):
        raise ChainError(f"study model {study.name} was trained on another fit of {study.record['selection']} than the "
                         f"chain's (its record: {study.record.get('selection_inputs')}; now: {chain.selection.inputs}): "
                         f"run {again}")
    if file_sha256(Path(models_dir) / chain.run / f"{study.name}.keras") != study.record.get("model_sha256"):
        raise ChainError(f"{study.name}.keras is not the model its record describes (file replaced): run {again}")


def predict_index_studies(study: StudyModel, inputs: np.ndarray, index: pd.DataFrame
                          ) -> tuple[StudySeries, np.ndarray, list[np.ndarray]]:
    """Every series of ``index`` (rows aligned with ``inputs``): outputs (n_series, K) and slice weights."""
    index = index.reset_index(drop=True)
    series = study_series(inputs, index, np.ones(len(index), bool), None, study.frames)
    outputs, weights = outputs_and_weights(study.model, series, study.evidence_layer,
                                           class_index=study.labels.positive_column)
    return series, outputs, weights


def study_table(study: StudyModel, index: pd.DataFrame, series: StudySeries, outputs: np.ndarray,
                weights: list[np.ndarray]) -> pd.DataFrame:
    """One row per study: verdict, each label's probability, and for a study called hemorrhage the slices its
    evidence flags (image ids and positions; a study called otherwise flags none: its evidence points at no bleed)."""
    index = index.reset_index(drop=True)
    labels, threshold = study.labels, study.threshold
    study_of_series = index[STUDY_ID].to_numpy()[series.data.starts]
    rows = []
    for study_id in pd.unique(study_of_series):
        members = np.flatnonzero(study_of_series == study_id)
        probabilities = outputs[members].mean(axis=0) if labels.exclusive else outputs[members].max(axis=0)
        called = probabilities[labels.positive_column] >= threshold
        if called:
            verdict = "hemorrhage"
        elif labels.exclusive:
            others = [c for c in range(len(labels.columns)) if c != labels.positive_column]
            verdict = labels.columns[max(others, key=lambda c: probabilities[c])]
        else:
            verdict = "no_hemorrhage"
        flagged = (np.concatenate([series.slice_rows(n)[flag_slices(weights[n])] for n in members]) if called
                   else np.zeros(0, np.int64))
        rows.append({STUDY_ID: study_id, "series": len(members), "slices": int(series.data.lengths[members].sum()),
                     "verdict": verdict, "threshold": threshold,
                     **{f"p_{c}": float(p) for c, p in zip(labels.columns, probabilities)},
                     "flagged_slices": ";".join(index["image_id"].to_numpy()[flagged]),
                     "flagged_positions": ";".join(str(int(p)) for p in index["position"].to_numpy()[flagged])})
    return pd.DataFrame(rows)


def held_out_study_truth(dataset_dir: Path, index: pd.DataFrame, slice_truth: pd.DataFrame | None, labels: LabelSet
                     ) -> pd.DataFrame | None:
    """The test studies' labels: ``truth/stage_2_test_study_labels.csv`` when the dataset has it, else the
    highest of the test slice truth (subtype labels only); None when neither is known."""
    path = dataset_dir / "raw" / "truth" / "stage_2_test_study_labels.csv"
    if path.is_file():
        return read_study_labels(path, labels.name)[0]
    if slice_truth is None or labels.exclusive:
        return None
    return study_truth_from_slices(index, slice_truth)


def study_truth_from_slices(index: pd.DataFrame, slice_truth: pd.DataFrame) -> pd.DataFrame:
    """Subtype study labels of the index's studies: the highest slice truth over each study's slices
    (a study with a slice missing from the truth is left out: its highest label is unknown)."""
    joined = slice_truth[list(SUBTYPES)].reindex(index["image_id"]).set_axis(index[STUDY_ID].to_numpy())
    complete = joined.notna().all(axis=1).groupby(level=0).all()
    return joined.groupby(level=0).max()[complete]


def score_test(study: StudyModel, slice_lstm, inputs: np.ndarray, index: pd.DataFrame, series: StudySeries,
               table: pd.DataFrame, truth: pd.DataFrame, slice_truth: pd.DataFrame | None) -> dict:
    """Exam scores at the validation thresholds, localization against slice truth, and both for the
    per-slice LSTM (exam score: its highest p(any); threshold from the study record's validation)."""
    labels = study.labels
    known = table[STUDY_ID].isin(truth.index).to_numpy()
    y = truth.reindex(table.loc[known, STUDY_ID])[list(labels.columns)].to_numpy()
    p = table.loc[known, [f"p_{c}" for c in labels.columns]].to_numpy()
    result = {"exams": int(known.sum()), "thresholds": study.record["thresholds"],
              "exam": exam_scores(y, p, labels.columns, study.record["thresholds"])}
    if slice_truth is None:
        return result
    index = index.reset_index(drop=True)
    truth_any = slice_truth["any"].reindex(index["image_id"]).to_numpy()
    per_series = [truth_any[series.slice_rows(n)] for n in range(len(series))]
    known = [n for n, t in enumerate(per_series) if not np.isnan(t).any()]  # series wholly in the truth
    weights = slice_weights(study.model, series, study.evidence_layer, class_index=labels.positive_column)
    result["localization"] = localization_scores([flag_slices(weights[n]) for n in known], [per_series[n] for n in known])
    if slice_lstm is not None:
        everything = series_set(inputs, index, np.ones(len(index), bool))
        p_any = predict_series(slice_lstm, everything)[:, ANY]
        slice_flags = [keep_runs(p_any[series.slice_rows(n)] >= SLICE_FLAG_PROBABILITY) for n in known]
        exam_any = pd.Series([p_any[series.slice_rows(n)].max() for n in range(len(series))],
                             index=index[STUDY_ID].to_numpy()[series.data.starts]).groupby(level=0).max()
        bleed = truth[labels.positive].reindex(exam_any.index)
        exam_any, bleed = exam_any[bleed.notna()], bleed[bleed.notna()]
        threshold = study.record.get("validation_slice_model", {}).get("exam", {}).get("threshold", 0.5)
        result["slice_model"] = {
            "exam": binary_scores(bleed.to_numpy(), exam_any.to_numpy(), threshold),
            "localization": localization_scores(slice_flags, [per_series[n] for n in known]),
        }
    return result


def draw_best_slices(chain, index: pd.DataFrame, table: pd.DataFrame, series: StudySeries, weights: list[np.ndarray],
                     slice_probabilities: np.ndarray, hu_of_rows, out_dir: str | Path, per_study: int,
                     method: str = "gradcam") -> list[Path]:
    """For every study of ``table`` called hemorrhage: its ``per_study`` slices of strongest evidence (study
    weights), in z order, with the CNN's Grad-CAM of each, labelled with ``slice_probabilities`` (the CNN's,
    whose Grad-CAM it is), as one montage (``<study>_best_slices.png``)."""
    index = index.reset_index(drop=True)
    study_of_series = index[STUDY_ID].to_numpy()[series.data.starts]
    written = []
    for _, row in table[table["verdict"] == "hemorrhage"].iterrows():
        members = np.flatnonzero(study_of_series == row[STUDY_ID])
        rows = np.concatenate([series.slice_rows(n) for n in members])
        evidence = np.concatenate([weights[n] for n in members])
        best = np.sort(rows[np.argsort(-evidence, kind="stable")[:per_study]])
        neighbours = neighbour_rows(index, chain.offsets)[best]
        needed = np.unique(np.r_[best, neighbours.ravel()])
        hu_needed = hu_of_rows(needed)
        stacks = stack_hu(hu_needed, np.searchsorted(needed, neighbours))
        hu = hu_needed[np.searchsorted(needed, best)]
        heatmaps = dict(enumerate(gradcam_heatmaps(chain.cnn, stacks, method=method)))
        positions = ", ".join(str(int(p)) for p in index["position"].to_numpy()[best])
        written.append(draw_montage(list(hu), slice_probabilities[best], Path(out_dir) / f"{row[STUDY_ID]}_best_slices.png",
                                    heatmaps, f"{row[STUDY_ID]}: best slices (positions {positions}) by study evidence",
                                    columns=min(len(best), 4)))
    return written
