import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ihd.intervals import RankedScores, study_intervals, study_weights
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


def test_every_replicate_draws_whole_studies_as_many_as_there_are():
    study_ids = np.array(["a"] * 5 + ["b"] * 1 + ["c"] * 3 + ["d"] * 7)
    sizes = {"a": 5, "b": 1, "c": 3, "d": 7}
    seen = set()
    for weights in study_weights(study_ids, resamples=200, seed=1):
        drawn = {}
        for study in sizes:
            in_study = weights[study_ids == study]
            assert (in_study == in_study[0]).all()  # a study's slices are drawn together
            drawn[study] = in_study[0]
        assert sum(drawn.values()) == len(sizes)
        seen.add(tuple(drawn.values()))
    assert len(seen) > 10
    first = [w.tolist() for w in study_weights(study_ids, 5, seed=1)]
    assert first == [w.tolist() for w in study_weights(study_ids, 5, seed=1)]


def _study_set(rng, studies, slices, offsets):
    """Per-slice labels and `any` scores of ``studies`` studies; each study's scores shifted by its offset."""
    y_true = np.zeros((studies * slices, len(SUBTYPES)))
    y_true[:, ANY] = rng.random(studies * slices) < 0.3
    scores = np.clip(0.2 + 0.3 * y_true[:, ANY] + np.repeat(offsets, slices) + 0.1 * rng.random(len(y_true)), 0, 1)
    y_pred = np.full_like(y_true, 0.1)
    y_pred[:, ANY] = scores
    return y_true, y_pred, np.repeat(np.arange(studies), slices)


def test_studies_that_disagree_widen_the_interval_and_the_difference_is_paired():
    rng = np.random.default_rng(5)
    y_true, y_pred, study_ids = _study_set(rng, 12, 20, np.zeros(12))
    _, shifted, _ = _study_set(np.random.default_rng(5), 12, 20, rng.normal(0, 0.25, 12))
    prior = np.full_like(y_pred, 0.3)
    alike = study_intervals(y_true, {"model": y_pred, "prior": prior}, study_ids)
    unlike = study_intervals(y_true, {"model": shifted, "prior": prior}, study_ids)
    width = {name: np.diff(result["models"]["model"]["slice_auc_any"])[0]
             for name, result in (("alike", alike), ("unlike", unlike))}
    assert width["unlike"] > 2 * width["alike"]
    for result, predictions in ((alike, y_pred), (unlike, shifted)):
        low, high = result["models"]["model"]["weighted_log_loss"]
        assert low < weighted_log_loss(y_true, predictions) < high
        assert result["studies"] == 12 and result["resamples_without_auc"] == 0
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
