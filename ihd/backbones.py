"""The backbones a slice CNN can be built on, each built on the windowed input tensor.

Three kinds, all giving the last feature map of a flat functional graph (Grad-CAM reaches its layers):

- any `keras.applications` model, with its ImageNet weights (``weights="imagenet"``, downloaded at
  first use), none, or a local weights file; its input scaling is read off its own `preprocess_input`;
- ``ResNeXt101_32x8d_WSL``: the paper's backbone, ResNeXt-101 32x8d (Xie et al. 2017) with the
  weakly supervised Instagram weights of Mahajan et al. 2018, fine-tuned on ImageNet. keras.applications
  has no ResNeXt; the architecture comes from the `zeromodels` package (plain Keras layers, so a saved
  model loads without it) and ``weights="wsl"`` downloads its Keras conversion of those weights from
  the Hugging Face hub (licence CC BY-NC 4.0, non-commercial use). It expects ImageNet's mean and
  standard deviation on [0, 1] inputs, as torchvision's models do;
- ``tiny``: four conv blocks, about 60k weights, for tests and quick CPU runs.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import keras
import numpy as np

TINY = "tiny"
RESNEXT_WSL = "ResNeXt101_32x8d_WSL"
RESNEXT_WSL_HUB = "zeromodels/resnext101_32x8d_fb_wsl_ig1b_ft_in1k"  # the WSL weights, converted to Keras
HUB_HOST = "huggingface.co"
HUB_ROUTES = ("HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")  # the hub not reached directly
WSL = "wsl"
# torchvision's input normalisation of [0, 1] RGB images, which the WSL weights were trained with
TORCHVISION_MEAN = np.array([0.485, 0.456, 0.406])
TORCHVISION_STD = np.array([0.229, 0.224, 0.225])


def backbone_names() -> list[str]:
    """Every backbone `ihd.cnn.build_cnn` accepts: `tiny`, the paper's ResNeXt and the `keras.applications` models."""
    return [TINY, RESNEXT_WSL] + sorted(n for n in dir(keras.applications) if n[:1].isupper())


def keras_application(name: str):
    """The `keras.applications` constructor called ``name``, and its module's `preprocess_input`."""
    constructor = getattr(keras.applications, name, None) if name[:1].isupper() else None
    if constructor is None:
        examples = ", ".join([TINY, RESNEXT_WSL, "MobileNetV2", "EfficientNetB0", "ResNet50", "ConvNeXtTiny"])
        raise ValueError(
            f"unknown backbone {name!r}: use 'tiny', the paper's {RESNEXT_WSL} or a keras.applications model name "
            f"such as {examples} ({len(backbone_names())} in all)"
        )
    module = importlib.import_module(constructor.__module__)
    return constructor, module.preprocess_input


def input_affine(preprocess_input) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, offset) mapping [0, 1] to what ``preprocess_input`` makes of 0..255 pixels.

    Read off the function itself on constant 0 and 255 images, so every backbone family (scaling to
    [-1, 1], ImageNet mean/std, caffe means, or none because the model rescales inside) is covered
    without a table. A caffe-style RGB->BGR swap only reorders the per-channel means here: our
    channels are windows, not colours.
    """
    black = np.asarray(preprocess_input(np.zeros((1, 1, 1, 3), np.float32)), dtype=np.float64).reshape(3)
    white = np.asarray(preprocess_input(np.full((1, 1, 1, 3), 255.0, np.float32)), dtype=np.float64).reshape(3)
    return white - black, black


def backbone_input_affine(backbone: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, offset) that maps a window in [0, 1] to the input range ``backbone`` was trained on."""
    if backbone == TINY:
        return np.ones(3), np.zeros(3)
    if backbone == RESNEXT_WSL:
        return 1.0 / TORCHVISION_STD, -TORCHVISION_MEAN / TORCHVISION_STD
    return input_affine(keras_application(backbone)[1])


def resolve_weights(backbone: str, weights) -> str | None:
    """``"imagenet"`` (``"wsl"`` for the paper's ResNeXt), None (for None or "none"), or an existing weights file."""
    if weights is None or str(weights).lower() == "none":
        return None
    if backbone == TINY:
        raise ValueError("the tiny backbone has no pretrained weights: use --weights none")
    pretrained = WSL if backbone == RESNEXT_WSL else "imagenet"
    if weights in (WSL, "imagenet"):
        if weights != pretrained:
            raise ValueError(f"{backbone}'s pretrained weights are --weights {pretrained}, not {weights}")
        return weights
    if not Path(weights).is_file():
        raise FileNotFoundError(f"weights file {weights} does not exist (use {pretrained}, none or a file path)")
    return str(weights)


def backbone_features(backbone: str, windowed, weights: str | None):
    """The backbone's last feature map, built on ``windowed`` so that the graph stays flat."""
    if backbone == TINY:
        return _tiny_features(windowed)
    if backbone == RESNEXT_WSL:
        return resnext_wsl_on(windowed, weights)
    return application_on(backbone, windowed, weights).output


def _tiny_features(x):
    """A small CNN (four conv blocks, about 60k weights) for tests and quick CPU runs."""
    for block, filters in enumerate((16, 32, 64, 64)):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"tiny_conv{block}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"tiny_bn{block}")(x)
        x = keras.layers.ReLU(name=f"tiny_relu{block}")(x)
        if block < 3:
            x = keras.layers.MaxPooling2D(2, name=f"tiny_pool{block}")(x)
    return x


class WeightsUnavailable(RuntimeError):
    """Pretrained weights that could not be downloaded; the message says what to pass instead."""


def application_on(backbone: str, windowed, weights: str | None) -> keras.Model:
    """The `keras.applications` model ``backbone`` without its top, built on the tensor ``windowed``."""
    constructor, _ = keras_application(backbone)
    try:
        model = constructor(
            include_top=False, weights=weights, input_tensor=windowed, input_shape=tuple(windowed.shape[1:])
        )
    except Exception as error:
        if weights == "imagenet" and "fetch failure" in str(error):
            raise WeightsUnavailable(
                f"could not download the ImageNet weights of {backbone} ({error}). Offline, pass "
                "--weights none to train from scratch, or --weights PATH with a local weights file "
                "(the no-top .h5 file keras.applications would download)."
            ) from None  # the message holds the download's error; its long traceback would bury it
        raise
    return model


def resnext_wsl_architecture(windowed):
    """ResNeXt-101 32x8d (stages of 3, 4, 23 and 3 blocks, 32 groups of width 8) built on the tensor
    ``windowed``, untrained; returns its last feature map (2,048 channels)."""
    from zeromodels.models.resnet.resnet_model import resnet_backbone_feature
    from zeromodels.models.resnext import resnext_block

    return resnet_backbone_feature(windowed, block_fn=resnext_block, depths=(3, 4, 23, 3), filters=(64, 128, 256, 512),
                                   channels_axis=-1, data_format="channels_last", groups=32, senet=False, width_factor=4)


def resnext_wsl_on(windowed, weights: str | None):
    """The paper's ResNeXt-101 32x8d on ``windowed`` (untrained, with the WSL weights, or from a weights
    file written by ``save_weights`` of the same architecture); returns its last feature map."""
    features = resnext_wsl_architecture(windowed)
    if weights is not None:
        backbone = keras.Model(windowed, features)  # shares the layers just built, so loading reaches them
        if weights == WSL:
            copy_weights(_download_resnext_wsl(), backbone)
        else:
            backbone.load_weights(weights)
    return features


def _download_resnext_wsl() -> keras.Model:
    """The hub's Keras ResNeXt-101 32x8d with the WSL weights; a clear error offline."""
    from zeromodels.models.resnext import ResNeXtModel

    try:
        return ResNeXtModel.from_weights(RESNEXT_WSL_HUB)
    except Exception as error:
        raise WeightsUnavailable(
            f"could not download the WSL weights of {RESNEXT_WSL} from the Hugging Face hub ({RESNEXT_WSL_HUB}; "
            f"{_download_failure(error)}). Offline, pass --weights none to train from scratch, or --weights PATH "
            "with a weights file of this architecture saved by model.save_weights."
        ) from None


def _download_failure(error: Exception) -> str:
    """Why the hub download failed, in words: offline, the hub library reports a file missing from the
    repository, not the network, so where it would connect directly the hub's host is tried first."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    direct = not any(os.environ.get(name) for name in HUB_ROUTES)
    unreachable = _unreachable(HUB_HOST) if direct else None
    return f"{HUB_HOST} cannot be reached: {unreachable}" if unreachable else f"{type(error).__name__}: {error}"


def _unreachable(host: str, port: int = 443, timeout_s: float = 5.0) -> str | None:
    """Why a TCP connection to ``host`` fails (its name not resolved, refused, timed out), or None when it opens."""
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as error:
        return f"{type(error).__name__}: {error}"
    return None


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Copy every weight of ``source`` into ``target``, two builds of one architecture (any input size).

    Refuses, naming the first difference, models whose weights differ in number or shape.
    """
    source_weights, target_weights = source.weights, target.weights
    if len(source_weights) != len(target_weights):
        raise ValueError(f"cannot copy {source.name} into {target.name}: {len(source_weights)} weights "
                         f"against {len(target_weights)}")
    for source_weight, target_weight in zip(source_weights, target_weights):
        if tuple(source_weight.shape) != tuple(target_weight.shape):
            raise ValueError(f"cannot copy {source.name} into {target.name}: {source_weight.path} is "
                             f"{tuple(source_weight.shape)}, {target_weight.path} {tuple(target_weight.shape)}")
        target_weight.assign(source_weight)
