import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ihd.intervals import RankedScores, study_draws, study_intervals
from ihd.labels import ANY, SUBTYPES
from ihd.metrics import weighted_log_loss


def test_the_weighted_auc_is_sklearns_auc_of_the_replicated_rows():
    rng = np.random.default_rng(3)
    labels = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + 0.4 * labels, 1)  # rounded: many ties, within and across classes
    ranked = RankedScores(labels, scores)
    for _ in range(20):
        counts = rng.integers(0, 4, size=200)
        expected = roc_auc_score(np.repeat(labels, counts), np.repeat(scores, counts))
        assert ranked.auc(counts.astype(np.float64)) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(ranked.auc(np.where(labels, 0.0, 1.0)))  # no positive drawn: no AUC


def test_every_replicate_draws_as_many_studies_as_there_are_each_once_on_average():
    draws = np.array(list(study_draws(4, resamples=2000, seed=1)))
    assert (draws.sum(axis=1) == 4).all() and (draws >= 0).all()
    np.testing.assert_allclose(draws.mean(axis=0), 1.0, atol=0.08)  # no study left out or favoured
    assert len({tuple(d) for d in draws}) == 35  # every way of drawing 4 of 4 with replacement turns up
    assert (draws[:5] == np.array(list(study_draws(4, 5, seed=1)))).all()


def test_the_intervals_are_those_of_scoring_the_replicated_rows():
    rng = np.random.default_rng(11)
    sizes = rng.integers(1, 15, size=25)  # studies of unequal sizes: a replicate's loss weighs slices, not studies
    study_ids = np.repeat([f"S{k:02d}" for k in range(25)], sizes)
    y_true = (rng.random((len(study_ids), len(SUBTYPES))) < 0.2).astype(np.float64)
    y_true[:, ANY] = y_true[:, :ANY].max(axis=1)
    predictions = {"prior": np.full_like(y_true, 0.2), "model": np.clip(0.6 * y_true + rng.random(y_true.shape) * 0.5,
                                                                         0.01, 0.99)}
    result = study_intervals(y_true, predictions, study_ids, resamples=200, level=0.9, seed=4)
    losses, aucs = {name: [] for name in predictions}, []
    for drawn in study_draws(25, 200, seed=4):
        rows = np.repeat(np.arange(len(study_ids)), drawn[np.unique(study_ids, return_inverse=True)[1]].astype(int))
        for name, values in predictions.items():
            losses[name].append(weighted_log_loss(y_true[rows], values[rows]))
        aucs.append(roc_auc_score(y_true[rows, ANY], predictions["model"][rows, ANY]))
    model = result["models"]["model"]
    np.testing.assert_allclose(model["weighted_log_loss"], np.quantile(losses["model"], [0.05, 0.95]))
    np.testing.assert_allclose(model["loss_minus_prior"],
                               np.quantile(np.subtract(losses["model"], losses["prior"]), [0.05, 0.95]))
    np.testing.assert_allclose(model["slice_auc_any"], np.quantile(aucs, [0.05, 0.95]))
    assert result["models"]["prior"]["slice_auc_any"] is None  # one value everywhere ranks nothing
    assert result["studies"] == 25 and result["studies_with_bleed"] == len(set(study_ids[y_true[:, ANY] == 1]))


def _study_set(rng, studies, slices, offsets):
    """Per-slice labels and `any` scores of ``studies`` studies; each study's scores shifted by its offset."""
    y_true = np.zeros((studies * slices, len(SUBTYPES)))
    y_true[:, ANY] = rng.random(studies * slices) < 0.3
    scores = np.clip(0.2 + 0.3 * y_true[:, ANY] + np.repeat(offsets, slices) + 0.4 * rng.random(len(y_true)), 0, 1)
    y_pred = np.full_like(y_true, 0.1)
    y_pred[:, ANY] = scores
    return y_true, y_pred, np.repeat(np.arange(studies), slices)


def test_studies_that_disagree_widen_the_interval_beyond_resampling_slices_and_the_difference_is_paired():
    rng = np.random.default_rng(5)
    y_true, y_pred, study_ids = _study_set(rng, 12, 20, np.zeros(12))
    _, shifted, _ = _study_set(np.random.default_rng(5), 12, 20, rng.normal(0, 0.25, 12))
    prior = np.full_like(y_pred, 0.3)
    ratio = {}
    for name, predictions in (("alike", y_pred), ("unlike", shifted)):
        by_study, by_slice = (study_intervals(y_true, {"model": predictions, "prior": prior}, ids)
                              for ids in (study_ids, np.arange(len(study_ids))))  # each slice a study of its own
        ratio[name] = (np.diff(by_study["models"]["model"]["slice_auc_any"])[0]
                       / np.diff(by_slice["models"]["model"]["slice_auc_any"])[0])
        low, high = by_study["models"]["model"]["weighted_log_loss"]
        assert low < weighted_log_loss(y_true, predictions) < high
        assert by_study["studies"] == 12 and by_study["resamples_without_auc"] == 0
    assert ratio["alike"] < 1.15 and ratio["unlike"] > 1.25  # 1.06 and 1.41: only disagreeing studies need clusters
    # no bleeds, a baseline that differs by study, and a model that loses 1 minus the baseline's loss in every cell:
    # each replicate's difference is 1 - 2 x the baseline's loss, so its interval mirrors the baseline's (resampling
    # each model apart, or subtracting the intervals' ends, would not give that)
    y_true[:] = 0
    baseline = np.repeat(rng.uniform(0.05, 0.5, 12), 20)[:, None] * np.ones(len(SUBTYPES))
    model = 1 - np.exp(-1.0) / (1 - baseline)
    paired = study_intervals(y_true, {"model": model, "prior": baseline}, study_ids)
    low, high = paired["models"]["prior"]["weighted_log_loss"]
    assert high - low > 0.05
    assert paired["models"]["model"]["loss_minus_prior"] == pytest.approx([1 - 2 * high, 1 - 2 * low])
    assert "loss_minus_prior" not in paired["models"]["prior"]
    assert paired["models"]["model"]["slice_auc_any"] is None and paired["resamples_without_auc"] == paired["resamples"]


def test_one_study_has_nothing_to_resample():
    y_true = np.zeros((4, len(SUBTYPES)))
    assert study_intervals(y_true, {"prior": y_true + 0.1}, ["s"] * 4) is None


def test_resamples_of_one_class_count_whichever_class_and_the_auc_interval_is_over_the_rest():
    # one study bleeds in every slice and two never do: a resample without the first has no positive, one of the
    # first alone no negative; neither has an AUC, and leaving them out is what scoring the replicated rows does
    study_ids = np.repeat(["all", "none1", "none2"], 5)
    y_true = np.zeros((15, len(SUBTYPES)))
    y_true[:5] = 1
    model = np.clip(0.3 * y_true + 0.6 * np.random.default_rng(2).random(y_true.shape), 0.01, 0.99)
    result = study_intervals(y_true, {"model": model}, study_ids, resamples=400, level=0.8, seed=9)
    aucs, no_positive, no_negative = [], 0, 0
    for drawn in study_draws(3, 400, seed=9):
        rows = np.repeat(np.arange(15), drawn[np.unique(study_ids, return_inverse=True)[1]].astype(int))
        no_positive += not y_true[rows, ANY].any()
        no_negative += y_true[rows, ANY].all()
        if y_true[rows, ANY].any() and not y_true[rows, ANY].all():
            aucs.append(roc_auc_score(y_true[rows, ANY], model[rows, ANY]))
    assert no_positive > 0 and no_negative > 0
    assert result["resamples_without_auc"] == no_positive + no_negative
    np.testing.assert_allclose(result["models"]["model"]["slice_auc_any"], np.quantile(aucs, [0.1, 0.9]))
