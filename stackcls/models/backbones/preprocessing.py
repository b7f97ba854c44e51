"""Keras `imagenet_utils.preprocess_input` in jnp, for RGB images in 0..255 (NHWC).

caffe: RGB -> BGR, subtract the ImageNet BGR means (VGG16).
tf:    scale to [-1, 1] (MobileNets, Inception*, Xception, ResNet50V2, NASNet).
torch: scale to [0, 1], subtract mean and divide by std per RGB channel (DenseNet).
"""

from __future__ import annotations

import jax.numpy as jnp

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


def preprocess_input(x, mode: str):
    x = jnp.asarray(x, jnp.float32)
    if mode == "caffe":
        return x[..., ::-1] - jnp.asarray(_CAFFE_MEAN_BGR, jnp.float32)
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "torch":
        return (x / 255.0 - jnp.asarray(_TORCH_MEAN, jnp.float32)) / jnp.asarray(_TORCH_STD, jnp.float32)
    raise ValueError(f"unknown preprocess mode {mode!r} (caffe, tf or torch)")
