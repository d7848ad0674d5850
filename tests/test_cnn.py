import keras
import numpy as np
import pytest
from keras.src.utils import file_utils

from ihd.cnn import backbone_names, build_cnn, input_affine
from ihd.windows import RECIPES, window


def _hu_batch(n=2, size=32, seed=0):
    return np.random.default_rng(seed).uniform(-1100, 1500, (n, size, size, 3)).astype(np.float32)


def test_tiny_model_is_flat_with_the_named_layers():
    model = build_cnn("tiny", image_size=32, recipe="windows")
    names = [layer.name for layer in model.layers]
    assert names[1] == "windowing" and names[-3:] == ["embedding", "dropout", "pred"]
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    assert model.output.shape[-1] == 6 and model.get_layer("embedding").output.shape[-1] == 64


def test_windowing_applies_the_recipe_windows_then_the_backbone_scaling():
    hu = _hu_batch()
    for backbone, scale, offset in (("tiny", 1.0, 0.0), ("MobileNetV2", 2.0, -1.0)):
        model = build_cnn(backbone, image_size=32, recipe="windows")
        windowing = keras.Model(model.input, model.get_layer("windowing").output)
        got = windowing.predict(hu, verbose=0)
        for channel, w in enumerate(RECIPES["windows"].windows):
            expected = window(hu[..., channel], w.center_hu, w.width_hu) * scale + offset
            np.testing.assert_allclose(got[..., channel], expected, atol=1e-5)


def test_backbone_is_built_flat_on_the_windowing_output():
    model = build_cnn("MobileNetV2", image_size=32, recipe="adjacent")
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    assert len(model.layers) > 100
    assert model.get_layer("embedding").output.shape[-1] == 1280


def test_input_affine_reads_each_family_off_preprocess_input():
    scale, offset = input_affine(keras.applications.resnet50.preprocess_input)
    np.testing.assert_allclose(scale, [255, 255, 255])
    np.testing.assert_allclose(sorted(offset), sorted([-103.939, -116.779, -123.68]), atol=1e-3)
    scale, offset = input_affine(keras.applications.efficientnet.preprocess_input)
    np.testing.assert_allclose([scale, offset], [[255] * 3, [0] * 3])


def test_model_saves_and_loads_with_the_custom_layer(tmp_path):
    model = build_cnn("tiny", image_size=32, recipe="0:40/80,0:80/200,0:600/2800")
    hu = _hu_batch()
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_allclose(loaded.predict(hu, verbose=0), model.predict(hu, verbose=0), atol=1e-6)
    assert loaded.get_layer("windowing").widths_hu == [80.0, 200.0, 2800.0]


def test_bad_backbones_and_weights_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone 'ResNet5'.*MobileNetV2"):
        build_cnn("ResNet5")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_cnn("preprocess_input")
    with pytest.raises(ValueError, match="--weights none"):
        build_cnn("tiny", weights="imagenet")
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        build_cnn("MobileNetV2", image_size=32, weights=str(tmp_path / "missing.h5"))
    assert {"tiny", "MobileNetV2", "EfficientNetB0", "ConvNeXtTiny"} <= set(backbone_names())


def test_imagenet_download_failure_tells_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/x.h5: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(RuntimeError, match="--weights none.*--weights PATH"):
        build_cnn("MobileNetV2", image_size=96, weights="imagenet")


