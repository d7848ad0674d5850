import numpy as np
import pandas as pd
import pytest

from ihd.labels import SUBTYPES
from ihd.metrics import weighted_log_loss
from ihd.report import aligned, format_intervals, format_scores, scores_on_truth, span_text


def _wide(values, images):
    return pd.DataFrame(np.asarray(values, np.float64), index=pd.Index(images, name="image_id"), columns=list(SUBTYPES))


def test_scores_use_the_prior_for_images_without_prediction():
    truth = _wide([[0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 1]], ["ID_a", "ID_b"])
    prior = np.full(6, 0.2)
    model = _wide([[0.9] * 6], ["ID_b"])
    with pytest.warns(UserWarning, match="1 of the truth's 2 images have no cnn prediction"):
        scores = scores_on_truth(truth, {"cnn": model}, prior)
    expected_cnn = weighted_log_loss(truth.to_numpy(), np.array([[0.2] * 6, [0.9] * 6]))
    assert scores["cnn"] == pytest.approx(expected_cnn)
    assert scores["prior"] == pytest.approx(weighted_log_loss(truth.to_numpy(), np.full((2, 6), 0.2)))


def test_a_truth_of_another_test_set_is_refused():
    truth = _wide(np.zeros((2, 6)), ["ID_a", "ID_b"])
    with pytest.raises(ValueError, match="none of the truth's 2 images has a cnn prediction"):
        scores_on_truth(truth, {"cnn": _wide([[0.9] * 6], ["ID_c"])}, np.full(6, 0.2))


def test_aligned_follows_the_truth_order():
    truth = _wide(np.zeros((2, 6)), ["ID_b", "ID_a"])
    model = _wide([[0.1] * 6, [0.7] * 6], ["ID_a", "ID_b"])
    np.testing.assert_allclose(aligned(model, truth, np.zeros(6))[:, 0], [0.7, 0.1])


def test_format_scores_gives_changes_against_the_cnn():
    text = format_scores({"prior": 0.3, "cnn": 0.2, "cnn+lstm": 0.15})
    assert "| cnn+lstm | 0.15000 | -25.0% |" in text
    assert "| prior | 0.30000 | +50.0% |" in text


def test_folder_scores_score_labeled_images_only_with_study_auc_from_the_highest_slice():
    from ihd.report import folder_scores, format_folder_scores

    # study A (no bleed): slices 0.1 and 0.7; study B (bleed on one slice): 0.6 and 0.05; study C (no bleed): 0.5, 0.5
    images = ["ID_a1", "ID_a2", "ID_b1", "ID_b2", "ID_c1", "ID_c2", "ID_unlabeled"]
    any_prob = [0.1, 0.7, 0.6, 0.05, 0.5, 0.5, 0.9]
    probabilities = pd.DataFrame({"image_id": images, "study_id": ["A", "A", "B", "B", "C", "C", "C"]})
    for column, subtype in enumerate(SUBTYPES):
        probabilities[subtype] = any_prob if subtype == "any" else 0.2
        probabilities[f"cnn_{subtype}"] = 0.3
    truth_any = [0, 0, 1, 0, 0, 0]
    truth = _wide([[0, 0, 0, 0, y, y] for y in truth_any] + [[0] * 6], images[:6] + ["ID_not_predicted"])
    prior = np.full(6, 0.1)
    report = folder_scores(probabilities, truth, prior)
    assert report["images_scored"] == 6 and report["studies_scored"] == 2 and report["studies_with_bleed"] == 1
    assert report["unlabeled_images"] == ["ID_unlabeled"] and report["labels_without_prediction"] == ["ID_not_predicted"]
    assert report["partly_labeled_studies"] == ["C"]  # its unlabeled slice could bleed: no study label, no study score
    lstm = report["models"]["cnn+lstm"]
    assert lstm["slice_auc"]["any"] == pytest.approx(0.8)  # 0.6 beats 4 of the 5 negative slices
    assert lstm["study_auc"]["any"] == pytest.approx(0.0)  # B (0.6) below A (0.7): the highest slice, not the mean
    assert lstm["slice_auc"]["epidural"] is None  # no positive epidural slice
    expected = np.array([[0.2, 0.2, 0.2, 0.2, 0.2, p] for p in any_prob[:6]])
    assert lstm["weighted_log_loss"] == pytest.approx(weighted_log_loss(truth.iloc[:6].to_numpy(), expected))
    assert report["models"]["prior"]["weighted_log_loss"] == pytest.approx(
        weighted_log_loss(truth.iloc[:6].to_numpy(), np.full((6, 6), 0.1)))
    assert report["models"]["cnn"]["slice_auc"]["any"] == pytest.approx(0.5)
    text = format_folder_scores(report)
    assert "| cnn+lstm |" in text and "1 images have no label and are not scored" in text
    assert "1 studies with an unlabeled slice have no study label" in text
    intervals = report["intervals"]  # over the 6 scored slices: study C's unlabeled slice takes no part
    assert intervals["studies"] == 3 and intervals["studies_with_bleed"] == 1
    assert set(intervals["models"]["cnn+lstm"]) == {"weighted_log_loss", "slice_auc_any", "loss_minus_prior",
                                                     "loss_minus_cnn"}
    assert "95% intervals over 2,000 resamples of the 3 studies with a scored slice (1 with a bleed)" in text
    assert "from 1 studies with a bleed (under 30) such intervals are likely too narrow" in text
    lstm_row = (f"| cnn+lstm | {span_text(intervals['models']['cnn+lstm']['weighted_log_loss'], 4)} | "
                f"{span_text(intervals['models']['cnn+lstm']['loss_minus_prior'], 4)} | "
                f"{span_text(intervals['models']['cnn+lstm']['loss_minus_cnn'], 4)} | "
                f"{span_text(intervals['models']['cnn+lstm']['slice_auc_any'], 3)} |")
    assert lstm_row in text.splitlines()  # each difference under its own baseline's column


def test_a_folder_of_one_study_says_why_it_has_no_intervals():
    from ihd.report import folder_scores, format_folder_scores

    images = ["ID_1", "ID_2", "ID_3"]
    probabilities = pd.DataFrame({"image_id": images, "study_id": ["S"] * 3})
    for subtype in SUBTYPES:
        probabilities[subtype] = [0.2, 0.7, 0.4]
        probabilities[f"cnn_{subtype}"] = 0.3
    report = folder_scores(probabilities, _wide([[0] * 6, [1] * 6, [0] * 6], images), np.full(6, 0.1))
    assert report["intervals"] is None
    assert "no intervals: they resample studies, and the scored images come from one" in format_folder_scores(report)


def test_a_folder_whose_studies_are_all_partly_labeled_is_scored_by_slice_only():
    from ihd.report import folder_scores, format_folder_scores

    images = ["ID_1", "ID_2", "ID_3", "ID_4"]
    probabilities = pd.DataFrame({"image_id": images, "study_id": ["S", "S", "T", "T"]})
    for subtype in SUBTYPES:
        probabilities[subtype] = [0.2, 0.7, 0.4, 0.1]
        probabilities[f"cnn_{subtype}"] = 0.3
    report = folder_scores(probabilities, _wide([[0] * 6, [1] * 6], ["ID_1", "ID_3"]), np.full(6, 0.1))
    assert report["studies_scored"] == 0 and report["images_scored"] == 2
    assert report["models"]["cnn+lstm"]["study_auc"] == dict.fromkeys(SUBTYPES)
    assert report["models"]["cnn+lstm"]["slice_auc"]["any"] == pytest.approx(1.0)
    assert "| n/a |" in format_folder_scores(report)


def test_intervals_on_truth_resample_the_studies_and_an_unread_image_alone():
    from ihd.report import intervals_on_truth

    images = [f"ID_{k}" for k in range(9)]
    truth = _wide([[0, 0, 0, 0, y, y] for y in (0, 1, 0, 0, 1, 0, 0, 1, 0)], images)
    cnn = _wide([[0.1, 0.1, 0.1, 0.1, 0.2, p] for p in (0.1, 0.8, 0.3, 0.2, 0.6, 0.4, 0.1)], images[:7])
    study_of_image = pd.Series(["A", "A", "B", "B", "C", "C", "D"], index=images[:7])  # ID_7, ID_8 were not read
    intervals = intervals_on_truth(truth, {"cnn": cnn, "cnn+lstm": cnn}, np.full(6, 0.2), study_of_image)
    assert intervals["studies"] == 6  # each image not read is a study of its own
    assert set(intervals["models"]["cnn+lstm"]) == {"weighted_log_loss", "slice_auc_any", "loss_minus_prior",
                                                     "loss_minus_cnn"}
    assert intervals["models"]["cnn+lstm"]["loss_minus_cnn"] == [0.0, 0.0]
    assert set(intervals["models"]["cnn"]) == {"weighted_log_loss", "slice_auc_any", "loss_minus_prior"}
    assert set(intervals["models"]["prior"]) == {"weighted_log_loss", "slice_auc_any"}  # not against the cnn
    text = format_scores({"prior": 0.3, "cnn": 0.2, "cnn+lstm": 0.2}, intervals=intervals)
    assert "| model | weighted log loss | loss minus the prior's | loss minus the cnn's | slice AUC any |" in text
    assert "2 of the studies are single images whose study is unknown (header not read)" in text


def test_the_warning_names_whichever_side_has_too_few_studies():
    from ihd.intervals import study_intervals

    rng = np.random.default_rng(8)
    study_ids = np.repeat(np.arange(40), 3)
    y_true = np.zeros((120, len(SUBTYPES)))
    y_true[:108] = 1  # 36 studies bleed, 4 do not
    model = np.clip(0.4 * y_true + 0.5 * rng.random(y_true.shape), 0.01, 0.99)
    text = "\n".join(format_intervals(study_intervals(y_true, {"model": model}, study_ids, resamples=200)))
    assert "from 4 studies without a bleed (under 30) such intervals are likely too narrow" in text
    assert "unknown" not in text


def test_an_auc_of_one_class_reads_n_a_not_nan():
    from ihd.report import score_text

    assert [score_text(None), score_text(float("nan")), score_text(0.81234), score_text(0.81234, 4)] == [
        "n/a", "n/a", "0.812", "0.8123"]
