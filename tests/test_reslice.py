"""ihd.reslice: interpolation along the normal at the series' real spacing."""
import numpy as np
import pytest

from ihd.reslice import nearest_slice, reslice, reslice_weights, slice_scores


def test_values_linear_in_z_are_reproduced_at_evenly_spaced_positions_despite_a_gap():
    z = np.array([0.0, 5.0, 10.0, 25.0, 30.0])  # a 15 mm gap: resampling by slice number would be wrong
    values = (2.0 * z + 1.0)[:, None] * np.ones((1, 3))
    out = reslice(values, z, frames=7)
    np.testing.assert_allclose(out[:, 0], 2.0 * np.linspace(0, 30, 7) + 1.0, rtol=1e-6)
    assert out.shape == (7, 3) and out.dtype == np.float32


def test_images_are_resliced_whole_and_ends_are_kept():
    z = np.array([10.0, 12.0, 14.0])
    images = np.stack([np.full((4, 4), v) for v in (0.0, 100.0, 300.0)])
    out = reslice(images, z, frames=5)
    assert [float(f[0, 0]) for f in out] == [0.0, 50.0, 100.0, 200.0, 300.0]


def test_unordered_or_repeated_positions_are_refused():
    for z in ([0.0, 5.0, 5.0], [0.0, 10.0, 5.0], [0.0, np.nan]):
        with pytest.raises(ValueError, match="strictly increasing"):
            reslice_weights(np.array(z), 4)
    lower, upper, weight = reslice_weights(np.array([3.0]), 4)
    assert lower.tolist() == upper.tolist() == [0, 0, 0, 0]


def test_frame_scores_go_back_to_their_nearest_slices_and_keep_their_sum():
    z = np.array([0.0, 10.0, 20.0])
    assert nearest_slice(z, 5).tolist() == [0, 0, 1, 1, 2]  # targets 0, 5, 10, 15, 20 (ties go down)
    scores = slice_scores(np.array([0.1, 0.2, 0.3, 0.15, 0.25]), z)
    np.testing.assert_allclose(scores, [0.3, 0.45, 0.25])
