import numpy as np
import pytest

from ihd.cnn import build_cnn
from ihd.gradcam import (best_slices, draw_montage, draw_overlay, gradcam_heatmap, gradcam_heatmaps,
                         last_feature_map_layer)
from ihd.labels import SUBTYPES

SIZE = 48


@pytest.fixture(scope="module")
def model():
    # positive head weights make every feature raise every logit: the heatmap cannot be empty
    cnn = build_cnn("tiny", SIZE, weights=None)
    kernel, bias = cnn.get_layer("pred").get_weights()
    cnn.get_layer("pred").set_weights([np.abs(kernel) + 0.1, bias])
    return cnn


def _bleed_stack():
    hu = np.full((SIZE, SIZE, 3), 30.0, np.float32)
    hu[10:20, 25:35] = 70.0
    return hu


def test_last_feature_map_is_the_backbone_output(model):
    assert last_feature_map_layer(model) == "tiny_relu3"


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_heatmap_is_non_empty_in_unit_range_and_leaves_the_model_alone(model, method):
    stack = _bleed_stack()
    before = model.predict_on_batch(stack[None])
    heatmap = gradcam_heatmap(model, stack, method=method)
    assert heatmap.shape == (SIZE, SIZE) and heatmap.dtype == np.float32
    assert heatmap.min() >= 0.0 and heatmap.max() == pytest.approx(1.0, abs=1e-3)
    assert (heatmap > 0.05).mean() > 0.01
    np.testing.assert_allclose(model.predict_on_batch(stack[None]), before, rtol=1e-6)
    assert np.all((before > 0) & (before < 1))


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_heatmaps_of_a_batch_are_those_of_each_input_alone(model, method):
    moved = np.roll(_bleed_stack(), 12, axis=1)
    faint = np.full((SIZE, SIZE, 3), 30.0, np.float32)
    faint[30:34, 5:9] = 34.0
    stacks = np.stack([_bleed_stack(), moved, faint])
    together = gradcam_heatmaps(model, stacks, method=method)
    alone = np.stack([gradcam_heatmap(model, stack, method=method) for stack in stacks])
    assert together.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert not np.allclose(together[0], together[1], atol=0.1), "different inputs, different maps"
    assert gradcam_heatmaps(model, stacks[:0]).shape == (0, SIZE, SIZE)


def test_unknown_method_is_refused(model):
    with pytest.raises(ValueError, match="scorecam"):
        gradcam_heatmap(model, _bleed_stack(), method="scorecam")


def test_best_slices_orders_by_any():
    probabilities = np.zeros((5, len(SUBTYPES)))
    probabilities[:, -1] = [0.1, 0.9, 0.3, 0.95, 0.2]
    probabilities[0, 0] = 1.0
    assert best_slices(probabilities, 2).tolist() == [3, 1]
    assert best_slices(probabilities, 10).tolist() == [3, 1, 2, 4, 0]


def test_overlay_and_montage_are_written(model, tmp_path):
    stack = _bleed_stack()
    heatmap = gradcam_heatmap(model, stack)
    overlay = draw_overlay(stack[..., 0] * 8, heatmap, np.linspace(0, 1, 6), tmp_path / "ID_1.png", "ID_1")
    montage = draw_montage([stack[..., 0]] * 3, np.full((3, 6), 0.7), tmp_path / "study.png", {1: heatmap}, "study")
    for path in (overlay, montage):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ID_1.png", "study.png"]


def _bright_region_detector():
    """The tiny CNN with weights set by hand so that its `any` logit is the mean, over the last feature
    map, of how far the brain-window channel exceeds its middle (40 HU): a detector of the bright bleed."""
    cnn = build_cnn("tiny", SIZE, recipe="windows", weights=None)
    for block in range(4):
        conv = cnn.get_layer(f"tiny_conv{block}")
        kernel = np.zeros(conv.kernel.shape, np.float32)
        kernel[1, 1, 0, 0] = 1.0  # channel 0 passes through unchanged
        conv.set_weights([kernel])
        bn = cnn.get_layer(f"tiny_bn{block}")
        channels = kernel.shape[-1]
        gamma = np.zeros(channels, np.float32)
        gamma[0] = 1.0
        mean = np.zeros(channels, np.float32)
        mean[0] = 0.5 if block == 0 else 0.0  # the first block keeps only what lies above the window's middle
        bn.set_weights([gamma, np.zeros(channels, np.float32), mean, np.ones(channels, np.float32)])
    kernel, bias = cnn.get_layer("pred").get_weights()
    kernel[:] = 0.0
    kernel[0, SUBTYPES.index("any")] = 1.0
    cnn.get_layer("pred").set_weights([kernel, np.zeros_like(bias)])
    return cnn


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_the_heatmap_peaks_on_the_bleed(method):
    stack = _bleed_stack()
    bleed = np.zeros((SIZE, SIZE), bool)
    bleed[10:20, 25:35] = True
    heatmap = gradcam_heatmap(_bright_region_detector(), stack, method=method)
    row, column = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    assert 10 <= row < 20 and 25 <= column < 35, f"peak at ({row}, {column}), off the bleed"
    assert heatmap[bleed].mean() > 3 * heatmap[~bleed].mean()
