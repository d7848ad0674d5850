import numpy as np
import pandas as pd
import pytest

from ihd.kaggle_api import KaggleAccessError
from ihd.labels import SUBTYPES
from ihd.submission import (
    SubmissionError,
    read_sample_submission,
    submission_table,
    submit,
    validate_submission,
    write_submission,
)

IMAGES = ["ID_00000000c", "ID_00000000a", "ID_00000000b"]


@pytest.fixture
def sample_path(tmp_path):
    ids = [f"{image}_{subtype}" for image in IMAGES for subtype in SUBTYPES]
    path = tmp_path / "stage_2_sample_submission.csv"
    pd.DataFrame({"ID": ids, "Label": 0.5}).to_csv(path, index=False)
    return path


def _predictions(images=IMAGES):
    values = np.arange(len(images) * 6, dtype=np.float64).reshape(-1, 6) / 100
    return pd.DataFrame(values, index=pd.Index(images, name="image_id"), columns=list(SUBTYPES))


def test_written_file_follows_the_sample_order_with_six_rows_per_image(sample_path, tmp_path):
    shuffled = _predictions().iloc[[2, 0, 1]]
    out = tmp_path / "sub.csv"
    write_submission(shuffled, sample_path, out, prior=np.zeros(6))
    written = pd.read_csv(out)
    sample = pd.read_csv(sample_path)
    assert written["ID"].tolist() == sample["ID"].tolist()
    assert written.loc[written["ID"] == "ID_00000000a_any", "Label"].item() == pytest.approx(0.11)
    assert written.loc[written["ID"] == "ID_00000000c_epidural", "Label"].item() == pytest.approx(0.0)


def test_missing_test_image_gets_the_prior_with_a_warning_naming_it(sample_path):
    prior = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.1])
    sample = read_sample_submission(sample_path)
    with pytest.warns(UserWarning, match="ID_00000000b"):
        table = submission_table(_predictions(IMAGES[:2]), sample, prior)
    rows = table[table["ID"].str.startswith("ID_00000000b")]
    np.testing.assert_allclose(rows["Label"], prior)
    validate_submission(table, sample)


@pytest.mark.parametrize(
    "defect, named",
    [
        (lambda t: t.drop(index=4), "ID_00000000c_subdural"),
        (lambda t: pd.concat([t, t.iloc[[7]]]), "ID_00000000a_intraparenchymal"),
        (lambda t: t.assign(ID=t["ID"].replace("ID_00000000b_any", "ID_00000000d_any")), "ID_00000000d_any"),
        (lambda t: t.assign(Label=t["Label"].where(t["ID"] != "ID_00000000a_epidural")), "ID_00000000a_epidural"),
        (lambda t: t.assign(Label=t["Label"].mask(t["ID"] == "ID_00000000b_subdural", 1.5)), "ID_00000000b_subdural"),
        (lambda t: t.assign(Label=t["Label"].mask(t["ID"] == "ID_00000000c_any", -0.1)), "ID_00000000c_any"),
        (lambda t: t.iloc[[1, 0] + list(range(2, len(t)))], "ID_00000000c_intraparenchymal"),
    ],
    ids=["missing", "repeated", "foreign", "nan", "above-one", "below-zero", "order"],
)
def test_validation_names_the_id_at_fault(sample_path, defect, named):
    sample = read_sample_submission(sample_path)
    table = submission_table(_predictions(), sample, np.zeros(6))
    validate_submission(table, sample)
    with pytest.raises(SubmissionError, match=named):
        validate_submission(defect(table).reset_index(drop=True), sample)


def test_invalid_predictions_stop_before_writing(sample_path, tmp_path):
    bad = _predictions()
    bad.loc["ID_00000000a", "any"] = np.nan
    out = tmp_path / "sub.csv"
    with pytest.raises(SubmissionError, match="ID_00000000a_any"):
        write_submission(bad, sample_path, out, prior=np.zeros(6))
    assert not out.exists()


def test_submit_without_credentials_says_so(sample_path, tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.delenv("KAGGLE_API_TOKEN", raising=False)
    with pytest.raises(KaggleAccessError, match="needs credentials"):
        submit(sample_path, "test")


@pytest.mark.parametrize("dropped", [[0], [17], list(range(6, 12))], ids=["first-row", "last-row", "whole-image"])
def test_a_missing_id_raises_the_packages_own_error_naming_it(sample_path, dropped):
    sample = read_sample_submission(sample_path)
    table = submission_table(_predictions(), sample, np.zeros(6)).drop(index=dropped).reset_index(drop=True)
    first_missing = sample["ID"][dropped[0]]
    with pytest.raises(SubmissionError, match=f"ID {first_missing} of the sample submission is missing") as caught:
        validate_submission(table, sample)
    assert type(caught.value) is SubmissionError


@pytest.mark.parametrize(
    "images, named",
    [(IMAGES + ["ID_00000000d"], "ID_00000000d"), (["ID_00000000d", "ID_00000000e"], "none of the sample submission's 3")],
    ids=["a predicted image it lacks", "no image in common"],
)
def test_a_sample_of_another_test_set_is_refused_naming_the_file(sample_path, tmp_path, images, named):
    out = tmp_path / "submission.csv"
    with pytest.raises(SubmissionError, match=named) as caught:
        write_submission(_predictions(images), sample_path, out, prior=np.zeros(6))
    assert str(sample_path) in str(caught.value)
    assert not out.exists()
