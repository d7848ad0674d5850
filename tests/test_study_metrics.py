"""ihd.study_metrics: exam scores at a validation threshold, flags from weights, localization."""
import numpy as np
import pytest

from ihd.study_metrics import binary_scores, flag_slices, keep_runs, localization_scores, youden_threshold


def test_youden_picks_the_threshold_that_separates_validation_exams():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])
    assert youden_threshold(y, p) == pytest.approx(0.7)  # J = 2/3 at 0.7 and at 0.4; the higher one wins
    with pytest.raises(ValueError, match="both classes"):
        youden_threshold(np.ones(3), p[:3])


def test_binary_scores_count_at_the_threshold_and_leave_empty_ratios_nan():
    y = np.array([1, 1, 1, 0, 0])
    p = np.array([0.9, 0.5, 0.2, 0.6, 0.1])
    scores = binary_scores(y, p, 0.5)
    assert (scores["tp"], scores["fp"], scores["fn"], scores["tn"]) == (2, 1, 1, 1)
    assert scores["sensitivity"] == pytest.approx(2 / 3) and scores["specificity"] == pytest.approx(0.5)
    assert scores["ppv"] == pytest.approx(2 / 3) and scores["auc"] == pytest.approx(4 / 6)
    assert np.isnan(binary_scores(y, p, 0.95)["ppv"])


def test_flags_need_a_share_of_one_over_n_and_a_run_of_two():
    weights = np.array([0.05, 0.3, 0.25, 0.05, 0.2, 0.05, 0.1])  # 1/N = 0.1429
    assert flag_slices(weights).tolist() == [False, True, True, False, False, False, False]  # slice 4 is alone
    assert flag_slices(weights * 7).tolist() == flag_slices(weights).tolist()  # normalised first
    assert flag_slices(np.full(4, 0.25)).all()  # an even share is flagged
    assert keep_runs(np.array([1, 0, 1, 1, 1, 0, 1], bool), 3).tolist() == [0, 0, 1, 1, 1, 0, 0]


def test_localization_averages_per_bleeding_exam_and_skips_clean_ones():
    flags = [np.array([0, 1, 1, 1, 0], bool), np.array([1, 1, 0, 0], bool), np.array([1, 1, 0], bool)]
    truth = [np.array([0, 0, 1, 1, 1]), np.array([0, 0, 1, 1]), np.array([0, 0, 0])]
    scores = localization_scores(flags, truth)
    assert scores["exams"] == 2
    assert scores["precision"] == pytest.approx((2 / 3 + 0) / 2)
    assert scores["recall"] == pytest.approx((2 / 3 + 0) / 2)
    assert scores["f1"] == pytest.approx((2 / 3 + 0) / 2)
