"""ihd.backbones: the paper's ResNeXt-101 32x8d, weights copied between builds, clear errors offline."""
import keras
import numpy as np
import pytest

from ihd.backbones import (RESNEXT_WSL, backbone_input_affine, backbone_names, copy_weights, resnext_wsl_architecture,
                           resolve_weights)
from ihd.cnn import build_cnn


def test_the_papers_resnext_builds_flat_with_its_2048_wide_embedding():
    model = build_cnn(RESNEXT_WSL, image_size=64, recipe="windows", weights=None)
    assert model.get_layer("embedding").output.shape[-1] == 2048
    assert 86e6 < model.count_params() < 88e6, "ResNeXt-101 32x8d has about 87 million weights"
    assert RESNEXT_WSL in backbone_names()
    grouped = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D) and layer.groups == 32]
    assert len(grouped) == 33, "one grouped 3x3 convolution in each of the 3 + 4 + 23 + 3 blocks"


def test_the_wsl_weights_are_copied_into_the_flat_model(monkeypatch):
    from zeromodels.models.resnext import ResNeXtModel

    hub_input = keras.Input((32, 32, 3))
    hub = keras.Model(hub_input, resnext_wsl_architecture(hub_input))  # stands for the download: other random weights
    monkeypatch.setattr(ResNeXtModel, "from_weights", lambda *args, **kwargs: hub)
    model = build_cnn(RESNEXT_WSL, image_size=64, recipe="windows", weights="wsl")
    assert len(model.weights) == len(hub.weights) + 2, "the backbone's weights, then the head's kernel and bias"
    for source, copied in zip(hub.weights, model.weights):
        np.testing.assert_array_equal(np.asarray(source), np.asarray(copied))
    with pytest.raises(ValueError, match="cannot copy"):
        copy_weights(hub, keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(32, 32, 3)))


def test_wsl_download_failure_tells_what_to_do_and_whether_the_hub_was_reached(monkeypatch):
    import ihd.backbones as backbones
    from zeromodels.models.resnext import ResNeXtModel

    def failed(*args, **kwargs):
        raise ValueError("the repo has no zm_config.json")  # what the library says when its fetch failed

    monkeypatch.setattr(ResNeXtModel, "from_weights", failed)
    for name in ("HF_HUB_OFFLINE", *backbones.HUB_ROUTES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(backbones, "_unreachable", lambda host: "gaierror: Name or service not known")
    offline = "WSL weights.*huggingface.co cannot be reached: gaierror.*--weights none"
    with pytest.raises(RuntimeError, match=offline) as error:
        build_cnn(RESNEXT_WSL, image_size=32, weights="wsl")
    assert "zm_config" not in str(error.value)
    monkeypatch.setattr(backbones, "_unreachable", lambda host: None)  # online: the library's own error is the cause
    with pytest.raises(RuntimeError, match="WSL weights.*ValueError: the repo has no zm_config.json.*--weights none"):
        backbones._download_resnext_wsl()
    monkeypatch.setattr(backbones, "_unreachable", lambda host: pytest.fail("a proxy's user is not probed directly"))
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    with pytest.raises(RuntimeError, match="WSL weights.*ValueError: the repo has no zm_config.json"):
        backbones._download_resnext_wsl()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="WSL weights.*HF_HUB_OFFLINE is set.*--weights none"):
        backbones._download_resnext_wsl()


def test_each_backbone_names_its_own_pretrained_weights():
    assert resolve_weights(RESNEXT_WSL, "wsl") == "wsl"
    with pytest.raises(ValueError, match="--weights wsl, not imagenet"):
        resolve_weights(RESNEXT_WSL, "imagenet")
    with pytest.raises(ValueError, match="--weights imagenet, not wsl"):
        resolve_weights("MobileNetV2", "wsl")


def test_the_resnext_reads_windows_normalised_as_torchvision_does():
    scale, offset = backbone_input_affine(RESNEXT_WSL)
    unit = np.array([0.485, 0.456, 0.406])  # torchvision's means map to 0
    np.testing.assert_allclose(unit * scale + offset, 0, atol=1e-12)
    np.testing.assert_allclose((unit + [0.229, 0.224, 0.225]) * scale + offset, 1, atol=1e-12)
