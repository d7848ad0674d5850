"""ihd.normalization: each window's mean and standard deviation over a sample of training slices."""
import numpy as np
import pandas as pd
import pytest

from ihd.normalization import normalising_affine, window_moments
from ihd.slices import SliceStore, to_model_hu
from ihd.windows import parse_recipe, window


def test_window_moments_are_those_of_the_sampled_slices(prepared_synthetic):
    index = pd.read_parquet(prepared_synthetic / "index.parquet")
    store = SliceStore(prepared_synthetic / "slices")
    recipe = parse_recipe("windows")
    rows = np.arange(0, len(index), 3)
    mean, std = window_moments(index, store, recipe, rows, 32, sample_rows=40, seed=5)
    sample = np.sort(np.random.default_rng(5).choice(rows, size=40, replace=False))
    hu = np.stack([to_model_hu(store.read_hu(image), 32) for image in index["image_id"].iloc[sample]])
    expected = [window(hu, w.center_hu, w.width_hu).astype(np.float64) for w in recipe.windows]
    np.testing.assert_allclose(mean, [e.mean() for e in expected], rtol=1e-5)
    np.testing.assert_allclose(std, [e.std() for e in expected], rtol=1e-5)
    assert not np.allclose(mean, window_moments(index, store, recipe, rows, 32, sample_rows=40, seed=6)[0]), (
        "another seed samples other slices")


def test_the_affine_maps_the_mean_to_zero_and_one_std_to_one():
    scale, offset = normalising_affine(np.array([0.2, 0.4, 0.5]), np.array([0.1, 0.2, 0.25]))
    np.testing.assert_allclose(np.array([0.2, 0.4, 0.5]) * scale + offset, 0, atol=1e-12)
    np.testing.assert_allclose(np.array([0.3, 0.6, 0.75]) * scale + offset, 1)
    with pytest.raises(ValueError, match="no training rows"):
        window_moments(pd.DataFrame(), None, parse_recipe("windows"), np.array([], int), 32)
