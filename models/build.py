"""Build the classifier, trainer and decoder of a ``ModelConfig``, sharing one set of weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from capsedge.models.config import INPUT_NORMALIZATIONS, ModelConfig
from capsedge.models.decoder import DECODERS
from capsedge.models.heads import ProbabilityFusion, ncp_head
from capsedge.models.layers import (
    DigitCaps,
    FCCaps,
    Length,
    Mask,
    NormalizeLengths,
    PrimaryCaps,
    PrimaryConvCaps,
    Squash,
)

#: Layer-name prefix of a pretrained trunk inside a capsedge network.
TRUNK_PREFIX = "lite0"
#: Layer-name prefix of the linear read-out beside the capsule head (``readout_weight``).
READOUT_PREFIX = "readout"
#: The dense softmax layer of a linear head (``head="linear"``).
LINEAR_HEAD = "linear_probs"
#: The dense softmax layer of the read-out; a trainer output when the read-out trains.
READOUT_HEAD = f"{READOUT_PREFIX}_probs"
#: The trainer outputs fitted to the one-hot label (each that a network has).
LABEL_OUTPUTS = ("caps_length", "ncp_probs", LINEAR_HEAD, READOUT_HEAD)


@dataclass(frozen=True)
class BuiltModel:
    """The models of one configuration; all share the same layers and weights.

    Attributes:
        config: the configuration built.
        classifier: image ``(batch, H, W, C)`` in [0, 1] -> ``(batch, K)`` class
            probabilities (the fused prediction when ``use_ncp``). No decoder, no loops: the
            model to export.
        trainer: ``[image, y_onehot]`` -> dict with ``"caps_length"`` ``(batch, K)``,
            ``"ncp_probs"`` ``(batch, K)`` when ``use_ncp``, and ``"reconstruction"``
            ``(batch, H, W, C)`` (decoded from the capsule of the true label) when a decoder
            is configured. The trainer adds ``"readout_probs"`` when the read-out trains
            (``capsedge.train.network.with_trained_readout``).
        decoder: ``(batch, K*D)`` masked class capsules -> image, or ``None``.
        encoder: image -> ``(batch, K, D)`` class capsules, for the perturbation view; ``None``
            for a linear head.
    """

    config: ModelConfig
    classifier: keras.Model
    trainer: keras.Model
    decoder: keras.Model | None
    encoder: keras.Model | None


def _stem(x: Any, cfg: ModelConfig) -> Any:
    bn_first = cfg.batch_norm and cfg.norm_order == "bn_relu"
    for i, spec in enumerate(cfg.stem, start=1):
        x = keras.layers.Conv2D(
            spec.filters,
            spec.kernel_size,
            strides=spec.strides,
            padding=spec.padding,
            activation=None if bn_first else "relu",
            kernel_initializer="he_normal",
            name=f"conv{i}",
        )(x)
        if cfg.batch_norm:
            x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        if bn_first:
            x = keras.layers.ReLU(name=f"relu{i}")(x)
    return x


def _features(image: Any, cfg: ModelConfig) -> tuple[Any, Any]:
    """The feature map under the head (the configured stem, or the pretrained trunk), and the
    trunk's stage-7 map under its head convolution (``None`` without ``trunk_head_conv``)."""
    mean, std = INPUT_NORMALIZATIONS[cfg.input_normalization]
    x = image
    if (mean, std) != INPUT_NORMALIZATIONS["unit"]:
        x = keras.layers.Rescaling(255.0 / std, -mean / std, name="input_normalization")(x)
    if cfg.trunk is None:
        return _stem(x, cfg), None
    from capsedge.models.efficientnet_lite import efficientnet_lite0, head_convolution

    x = efficientnet_lite0(x, stages=cfg.trunk_stages, name=TRUNK_PREFIX)
    if not cfg.trunk_head_conv:
        return x, None
    return head_convolution(x, name=TRUNK_PREFIX), x


def _readout(stage_map: Any, cfg: ModelConfig) -> Any:
    """The linear read-out beside the capsule head (``readout_weight``): a stage-1 run's linear
    head on the same trunk, with its own head convolution (stage 2 trains the trunk's for the
    capsules), pooling and dense softmax; layers ``readout_*``."""
    from capsedge.models.efficientnet_lite import head_convolution

    x = head_convolution(stage_map, name=READOUT_PREFIX)
    x = keras.layers.GlobalAveragePooling2D(name=f"{READOUT_PREFIX}_pool")(x)
    return keras.layers.Dense(cfg.num_classes, activation="softmax", name=READOUT_HEAD)(x)


def _trunk_primary(x: Any, cfg: ModelConfig) -> Any:
    """Primary capsules from a trunk's feature map (see ``ModelConfig.primary_source``)."""
    channels = cfg.primary_caps * cfg.primary_dim
    if cfg.primary_source == "pooled":
        x = keras.layers.GlobalAveragePooling2D(name="primary_pool")(x)
        x = keras.layers.Dense(channels, name="primary_dense")(x)
        x = keras.layers.Reshape((cfg.primary_caps, cfg.primary_dim), name="primary_reshape")(x)
        return Squash(cfg.squash, name="primary_caps")(x)
    x = keras.layers.Conv2D(channels, 1, use_bias=False, name="primary_reduce")(x)
    x = keras.layers.BatchNormalization(name="primary_reduce_bn")(x)
    x = keras.layers.ReLU(6.0, name="primary_reduce_relu")(x)
    caps = PrimaryCaps(cfg.primary_caps, cfg.primary_dim, cfg.primary_kernel, cfg.squash, name="primary_caps")
    return caps(x)


def _capsules(x: Any, cfg: ModelConfig) -> tuple[Any, Any]:
    """Primary and class capsules of the configured routing."""
    if cfg.trunk is not None:
        primary = _trunk_primary(x, cfg)
        caps = FCCaps(cfg.num_classes, cfg.class_dim, cfg.attention_scale, cfg.squash, name="class_caps")(
            primary
        )
        return primary, caps
    if cfg.routing == "self_attention":
        primary = PrimaryCaps(
            cfg.primary_caps, cfg.primary_dim, cfg.primary_kernel, cfg.squash, name="primary_caps"
        )(x)
        caps = FCCaps(cfg.num_classes, cfg.class_dim, cfg.attention_scale, cfg.squash, name="class_caps")(
            primary
        )
    else:
        primary = PrimaryConvCaps(
            cfg.primary_caps,
            cfg.primary_dim,
            cfg.primary_kernel,
            cfg.primary_strides,
            cfg.squash,
            name="primary_caps",
        )(x)
        caps = DigitCaps(
            cfg.num_classes, cfg.class_dim, cfg.routing_iterations, cfg.squash, name="class_caps"
        )(primary)
    return primary, caps


def build_model(cfg: ModelConfig) -> BuiltModel:
    """Build the models of ``cfg`` (see ``BuiltModel``); weights are freshly initialised.

    The classifier's output is the capsule lengths normalised to sum to 1, or, with
    ``use_ncp``, ``w * that + (1 - w) * ncp_probs`` with ``w = cfg.fusion_weight``; with
    ``readout_weight`` ``v``, ``(1 - v) * that + v * readout_probs``. The read-out is no output
    of the trainer (its weights come from a stage-1 run; ``capsedge train --readout-loss`` makes
    it one), and its layers are built last, so the others start as they would without it.
    """
    image = keras.Input(cfg.input_shape, name="image")
    if cfg.head == "linear":
        return _build_linear(image, cfg)
    features, stage_map = _features(image, cfg)
    primary, caps = _capsules(features, cfg)
    lengths = Length(name="caps_length")(caps)
    probs = NormalizeLengths(name="caps_probs")(lengths)
    outputs: dict[str, Any] = {"caps_length": lengths}
    if cfg.use_ncp:
        outputs["ncp_probs"] = ncp_head(primary, cfg.num_classes, cfg.ncp_units)
        probs = ProbabilityFusion(cfg.fusion_weight, name="fused_probs")([probs, outputs["ncp_probs"]])

    y_true = keras.Input((cfg.num_classes,), name="y_onehot")
    decoder = None
    if cfg.decoder is not None:
        size = cfg.reconstruction_size or cfg.input_shape[0]
        target = (size, size * cfg.input_shape[1] // cfg.input_shape[0], cfg.input_shape[2])
        decoder = DECODERS[cfg.decoder](cfg.num_classes, cfg.class_dim, target)
        masked = Mask(name="mask_by_label")([caps, y_true])
        outputs["reconstruction"] = keras.layers.Identity(name="reconstruction")(decoder(masked))
    if cfg.readout_weight:
        probs = ProbabilityFusion(1.0 - cfg.readout_weight, name=f"{READOUT_PREFIX}_fusion")(
            [probs, _readout(stage_map, cfg)])
    classifier = keras.Model(image, probs, name=f"{cfg.name}_classifier")
    trainer = keras.Model([image, y_true], outputs, name=f"{cfg.name}_trainer")
    encoder = keras.Model(image, caps, name=f"{cfg.name}_encoder")
    return BuiltModel(cfg, classifier, trainer, decoder, encoder)


def _build_linear(image: Any, cfg: ModelConfig) -> BuiltModel:
    """The transfer-learning baseline: trunk, global average pooling, dropout, dense softmax."""
    x = keras.layers.GlobalAveragePooling2D(name="pool")(_features(image, cfg)[0])
    if cfg.dropout:
        x = keras.layers.Dropout(cfg.dropout, name="dropout")(x)
    probs = keras.layers.Dense(cfg.num_classes, activation="softmax", name=LINEAR_HEAD)(x)
    classifier = keras.Model(image, probs, name=f"{cfg.name}_classifier")
    y_true = keras.Input((cfg.num_classes,), name="y_onehot")
    trainer = keras.Model([image, y_true], {LINEAR_HEAD: probs}, name=f"{cfg.name}_trainer")
    return BuiltModel(cfg, classifier, trainer, None, None)


def rebuild_classifier(classifier: keras.Model, cfg: ModelConfig, tolerance: float = 1e-4) -> keras.Model:
    """``cfg``'s classifier as the current code builds it, with the weights of ``classifier``.

    A model saved by an earlier version keeps the graph it was saved with (for
    instance the ``ncps`` ``CfC`` layer, whose unrolled graph holds an UNPACK);
    the rebuilt one computes the same function with the current, Edge TPU-friendly
    operations. Weights are copied layer by layer, by name.

    Raises:
        ValueError: a layer is missing or its weights do not fit, or the two models'
            outputs differ by more than ``tolerance`` on random images.
    """
    rebuilt = build_model(cfg).classifier
    copy_weights(classifier, rebuilt)
    images = np.random.default_rng(0).random((4, *cfg.input_shape), dtype=np.float32)
    difference = float(np.max(np.abs(np.asarray(classifier(images)) - np.asarray(rebuilt(images)))))
    if difference > tolerance:
        raise ValueError(f"the rebuilt model's outputs differ from the saved model's by {difference:.3g}")
    return rebuilt


def copy_weights(source: keras.Model, target: keras.Model, skip_prefix: str | None = None) -> int:
    """Set every layer of ``target`` that has weights, but those whose name starts with
    ``skip_prefix``, from ``source``'s layer of the same name; returns how many.

    Raises:
        ValueError: ``source`` lacks such a layer, or its weights do not fit.
    """
    copied = 0
    for layer in target.layers:
        if not layer.weights or (skip_prefix is not None and layer.name.startswith(skip_prefix)):
            continue
        try:
            origin = source.get_layer(layer.name)
        except ValueError:
            raise ValueError(f"the saved model has no layer {layer.name!r}") from None
        layer.set_weights(origin.get_weights())
        copied += 1
    return copied
