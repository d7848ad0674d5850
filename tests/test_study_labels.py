"""ihd.study_labels: derivation from slice labels, the file format and what it refuses."""
import numpy as np
import pandas as pd
import pytest

from ihd.labels import SUBTYPES
from ihd.study_labels import (
    EXAM_CLASSES,
    StudyLabelError,
    derive_study_labels,
    exam_classes,
    read_study_labels,
    series_labels,
    write_study_labels,
)


def _index():
    rows = []
    # study A: a subdural slice and an epidural slice in two series; study B: clean; study C: test, unlabeled
    for study, series, labels, split in [
        ("A", "A1", [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]], "train"),
        ("A", "A2", [[1, 0, 0, 0, 0, 1]], "train"),
        ("B", "B1", [[0] * 6, [0] * 6], "train"),
        ("C", "C1", [[np.nan] * 6], "test"),
    ]:
        for position, label in enumerate(labels):
            rows.append({"study_id": study, "series_id": series, "split": split, "position": position,
                         **dict(zip(SUBTYPES, label))})
    return pd.DataFrame(rows)


def test_derived_labels_are_the_highest_over_every_slice_of_the_study():
    derived = derive_study_labels(_index())
    assert derived.index.tolist() == ["A", "B"]
    assert derived.loc["A"].tolist() == [1, 0, 0, 0, 1, 1]  # max over both series, not the first one
    assert derived.loc["B"].tolist() == [0] * 6


def test_a_partly_labeled_study_is_left_out_with_a_warning():
    index = _index()
    index.loc[1, list(SUBTYPES)] = np.nan  # a slice of study A
    with pytest.warns(UserWarning, match="A"):
        derived = derive_study_labels(index)
    assert derived.index.tolist() == ["B"]


def test_exam_classes_put_hemorrhage_before_other():
    classes = exam_classes(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]))
    assert classes.tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]]


def test_round_trip_and_the_set_is_found_from_the_columns(tmp_path):
    derived = derive_study_labels(_index())
    path = write_study_labels(derived, tmp_path / "labels.csv")
    labels, chosen = read_study_labels(path)
    assert chosen.name == "subtypes" and not chosen.exclusive
    pd.testing.assert_frame_equal(labels, derived.rename_axis("study_id"), check_dtype=False)
    both = pd.DataFrame({"study_id": ["A", "B"], **{c: [1, 0] for c in SUBTYPES},
                         "hemorrhage": [1, 0], "no_finding": [0, 0], "other": [0, 1]})
    both.to_csv(tmp_path / "both.csv", index=False)
    with pytest.raises(StudyLabelError, match="both label sets"):
        read_study_labels(tmp_path / "both.csv")
    exam, chosen = read_study_labels(tmp_path / "both.csv", "exam")
    assert chosen.columns == EXAM_CLASSES and chosen.activation == "softmax"
    assert exam.loc["B"].tolist() == [0, 0, 1]


@pytest.mark.parametrize("rows, message", [
    ("study_id,hemorrhage,no_finding,other\nA,1,1,0\n", "row 2 \\(study A\\): exactly one"),
    ("study_id,hemorrhage,no_finding,other\nA,1,0,0\nB,0.5,0.5,0\n", "row 3 \\(study B\\): every label must be 0 or 1"),
    ("study_id,hemorrhage,no_finding,other\nA,1,0,0\nA,1,0,0\nB,0.5,0.5,0\n", "row 4 \\(study B\\): every label"),
    ("study_id,hemorrhage,no_finding,other\nA,1,0,0\nA,0,1,0\n", "study A\\): the study is given two different rows"),
    ("study_id,hemorrhage,no_finding,other,finding\nA,1,0,0,x\n", "unknown columns finding"),
    ("id,hemorrhage,no_finding,other\nA,1,0,0\n", "no study_id column"),
    ("study_id,hemorrhage,no_finding,other\n,1,0,0\n", "row 2 .*no study id"),
    ("study_id," + ",".join(SUBTYPES) + "\nA,0,0,0,0,1,0\n", "any is 0 but a subtype is 1"),
])
def test_bad_files_are_refused_naming_file_and_row(tmp_path, rows, message):
    path = tmp_path / "bad.csv"
    path.write_text(rows)
    with pytest.raises(StudyLabelError, match=f"bad.csv.*{message}"):
        read_study_labels(path)


def test_exact_repeats_are_dropped_and_each_series_carries_its_study_label(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("study_id,hemorrhage,no_finding,other\nA,1,0,0\nA,1,0,0\nB,0,0,1\n")
    labels, _ = read_study_labels(path)
    index = _index()
    values = series_labels(index, np.array([0, 2, 3, 5]), labels)
    assert values[:3].tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 1]]
    assert np.isnan(values[3]).all()  # study C has no label
