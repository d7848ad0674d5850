"""ihd.study_stage: which rows study training uses, and where its labels come from."""
import numpy as np
import pandas as pd
import pytest

from ihd.labels import SUBTYPES
from ihd.study_labels import LABEL_SETS
from ihd.study_stage import load_labels, study_folds


def _index():
    rows = []
    for number, (split, labeled, fold) in enumerate([("train", True, 0), ("train", True, 1), ("train", False, -1),
                                                     ("train", False, -1), ("test", False, -1)]):
        for position in range(2):
            rows.append({"image_id": f"I{number}{position}", "patient_id": f"P{number}", "study_id": f"S{number}",
                         "series_id": f"S{number}", "split": split, "position": position, "fold": fold,
                         **{s: (float(number == 1) if labeled else np.nan) for s in SUBTYPES}})
    return pd.DataFrame(rows)


def test_studies_with_only_a_study_label_get_folds_and_unlabeled_ones_none():
    index = _index()
    labels = pd.DataFrame({"hemorrhage": [1.0, 0.0, 0.0], "no_finding": [0.0, 1.0, 0.0], "other": [0.0, 0.0, 1.0]},
                          index=pd.Index(["S0", "S2", "S4"], name="study_id"))
    folds = study_folds(index, labels, LABEL_SETS["exam"])
    assert folds[:2].tolist() == [0, 0]  # its slice-label fold is kept
    assert folds[2:4].tolist() == [-1, -1]  # S1 has slice labels but no study label
    assert (folds[4:6] >= 0).all() and folds[4] == folds[5]  # S2: dealt a fold, one for the whole study
    assert folds[6:].tolist() == [-1] * 4  # S3 unlabeled, S4 a test study


def test_derived_labels_serve_the_subtype_set_only_and_files_must_match_the_index(tmp_path):
    index = _index()
    derived, chosen = load_labels("derive", index, "subtypes")
    assert derived.index.tolist() == ["S0", "S1"] and chosen.name == "subtypes"
    with pytest.raises(ValueError, match="derive gives the subtypes"):
        load_labels("derive", index, "exam")
    path = tmp_path / "labels.csv"
    path.write_text("study_id,hemorrhage,no_finding,other\nX,1,0,0\n")
    with pytest.raises(ValueError, match="none of its 1 studies is in the index"):
        load_labels(str(path), index, "exam")
