"""ihd.labels: the long format both ways, on the real label file and on broken ones."""
import numpy as np
import pandas as pd
import pytest

from ihd.labels import (LABEL_WEIGHTS, SUBTYPES, LabelFileError, read_long_labels, to_long,
                        write_long)


def test_real_labels_parse_into_the_known_positives(real_data):
    wide = read_long_labels(real_data / "rsna_slices" / "labels.csv")
    assert list(wide.columns) == list(SUBTYPES) and len(wide) == 15
    assert wide.dtypes.unique().tolist() == [np.float32]
    positives = wide[wide["any"] == 1]
    assert sorted(positives.index) == ["ID_0fe31b044", "ID_1b5ac170c", "ID_2008dd408", "ID_4f3e8c5c1", "ID_afb1bcdab"]
    assert wide.loc["ID_2008dd408"].tolist() == [1, 0, 0, 1, 1, 1]


def test_round_trip_and_duplicated_rows(tmp_path):
    wide = pd.DataFrame(np.array([[1, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 1]], np.float32), index=pd.Index(["ID_a1", "ID_b2"], name="image_id"),
                        columns=list(SUBTYPES))
    path = tmp_path / "labels.csv"
    write_long(wide, path)
    lines = path.read_text().splitlines()
    assert lines[:3] == ["ID,Label", "ID_a1_epidural,1.0", "ID_a1_intraparenchymal,0.0"]
    with path.open("a") as file:
        file.write("ID_a1_epidural,1.0\n")
    pd.testing.assert_frame_equal(read_long_labels(path), wide, check_names=False)


@pytest.mark.parametrize("row, message", [
    ("ID_a1_epidural,0", "two different labels"),
    ("ID_a1_bleed,0", "not ID_<image>_<subtype>"),
    ("ID_a1_epidural,yes", "not a number"),
    ("ID_a1_epidural,", "row 8: no label"),
    ("ID_a1_epidural,1,1", "cannot be read as the challenge's ID,Label CSV"),
])
def test_broken_label_files_name_the_file(tmp_path, row, message):
    wide = pd.DataFrame(np.ones((1, 6), np.float32), index=["ID_a1"], columns=list(SUBTYPES))
    path = tmp_path / "bad.csv"
    path.write_text(to_long(wide).to_csv(index=False) + row + "\n")
    with pytest.raises(LabelFileError, match=message) as caught:
        read_long_labels(path)
    assert str(path) in str(caught.value)


def test_missing_subtype_is_reported(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("ID,Label\nID_a1_epidural,0\n")
    with pytest.raises(LabelFileError, match="ID_a1 has no row for intraparenchymal"):
        read_long_labels(path)


def test_ids_split_at_the_last_underscore_and_any_weighs_twice(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("ID,Label\n" + "".join(f"ID_a_b_{subtype},1\n" for subtype in SUBTYPES))
    assert read_long_labels(path).index.tolist() == ["ID_a_b"]
    path.write_text("ID,Label\nID_0fe31b044,1\n")
    with pytest.raises(LabelFileError, match="row 2: 'ID_0fe31b044' is not ID_<image>_<subtype>"):
        read_long_labels(path)
    assert LABEL_WEIGHTS[SUBTYPES.index("any")] == 2 and LABEL_WEIGHTS.sum() == 7


def test_a_bad_row_is_numbered_as_in_the_file_after_repeated_rows(tmp_path):
    path = tmp_path / "labels.csv"
    rows = [f"ID_a1_{subtype},0" for subtype in SUBTYPES]
    path.write_text("ID,Label\n" + "\n".join(rows + rows[:2] + ["ID_a2_epidural,maybe"]) + "\n")
    with pytest.raises(LabelFileError, match="row 10: label 'maybe' is not a number"):
        read_long_labels(path)


@pytest.mark.parametrize("value, message", [
    ("2", "row 4: label '2' is not 0 or 1"), ("0.5", "row 4: label '0.5' is not 0 or 1"),
    ("-1", "row 4: label '-1' is not 0 or 1"), ("inf", "row 4: label 'inf' is not 0 or 1"),
])
def test_a_label_other_than_0_or_1_is_refused_by_row(tmp_path, value, message):
    path = tmp_path / "labels.csv"
    values = ["0", "0", value, "0", "0", "1"]
    path.write_text("ID,Label\n" + "".join(f"ID_a1_{s},{v}\n" for s, v in zip(SUBTYPES, values)))
    with pytest.raises(LabelFileError, match=message):
        read_long_labels(path)


def test_an_image_whose_any_is_0_beside_a_bleeding_subtype_is_refused(tmp_path):
    path = tmp_path / "labels.csv"
    values = [0, 1, 0, 0, 0, 0]
    path.write_text("ID,Label\n" + "".join(f"ID_a1_{s},{v}\n" for s, v in zip(SUBTYPES, values)))
    with pytest.raises(LabelFileError, match="image ID_a1 has any 0 but a subtype 1"):
        read_long_labels(path)


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    wide = pd.DataFrame(np.zeros((1, 6), np.float32), index=["ID_a1"], columns=list(SUBTYPES))
    write_long(wide, tmp_path / "labels.csv")
    assert (tmp_path / "labels.csv").stat().st_mode & 0o644 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["labels.csv"]
