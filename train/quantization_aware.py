"""Quantization-aware distillation of a frozen trunk (``--int8-aware-trunk EPOCHS``).

Stage 2 reads the maps of a frozen trunk, and the shipped file computes them in int8. Rounding
the trunk's weights and activations to int8 moves those maps (a relative error of about 0.6 for
a trunk fine-tuned at 512 px, against 0.05 for the layers above it), and the head reads what the
trunk gives. Here the trunk is fine-tuned for a few epochs so that its computation *rounded as
the int8 file rounds it* gives the maps its float computation gave: the float copy is the
teacher, the loss the maps' mean squared difference over their variance (distillation onto its
own maps, not onto the labels, so the trunk keeps what stage 1 taught it).

The rounding is simulated as TensorFlow Lite's converter does it for an EfficientNet-Lite trunk
(Jacob et al., "Quantization and training of neural networks for efficient
integer-arithmetic-only inference", CVPR 2018): each batch norm folded into its convolution with
its moving statistics, the folded kernel rounded per output channel (symmetric, 127 levels), and
every tensor the int8 file keeps (the normalised input, each ReLU6, each projection, each
residual sum) rounded to 256 levels over a range calibrated like the converter's (minimum and
maximum over the calibration images), then followed by a moving minimum and maximum. Gradients
pass the rounding straight through. Written with ``keras.ops``, so it runs on any backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from capsedge.views import DIHEDRAL_VIEWS

from .frozen import view_of

#: Symmetric int8 weights: TFLite's converter rounds convolution kernels per output channel to
#: -127..127 steps of max|w| / 127.
WEIGHT_LEVELS = 127
#: The layers of an EfficientNet-Lite trunk (``capsedge.models.efficientnet_lite``) whose outputs the
#: int8 file keeps as int8 tensors: each convolution's ReLU6, each linear projection, each residual
#: sum, and the input's normalisation (``capsedge.models.build``).
ROUNDED_SUFFIXES = ("_relu6", "_project_bn", "_add")
INPUT_NORMALIZATION = "input_normalization"
#: Momentum of the moving minimum and maximum of each rounded tensor while the trunk trains.
RANGE_MOMENTUM = 0.9


def fake_quant(x: Any, low: Any, high: Any) -> Any:
    """``x`` rounded to 256 levels over ``[low, high]``, the range moved so that zero is a level
    (TensorFlow's ``fake_quant_with_min_max_vars``); the gradient passes straight through inside
    the range and is zero outside it."""
    ops = keras.ops
    step = ops.maximum((high - low) / 255.0, 1e-8)
    zero_point = ops.clip(ops.round(-low / step), 0.0, 255.0)
    nudged_low, nudged_high = -zero_point * step, (255.0 - zero_point) * step
    clipped = ops.clip(x, nudged_low, nudged_high)
    rounded = ops.round((clipped - nudged_low) / step) * step + nudged_low
    return clipped + ops.stop_gradient(rounded - clipped)


class RoundedActivation(keras.layers.Layer):
    """A tensor rounded as the int8 file rounds it: over its calibrated range, which then follows
    a moving minimum and maximum while training (always including zero)."""

    def __init__(self, low: float, high: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.low = self.add_weight(shape=(), initializer=keras.initializers.Constant(min(low, 0.0)),
                                   trainable=False, name="low")
        self.high = self.add_weight(shape=(), initializer=keras.initializers.Constant(max(high, 0.0)),
                                    trainable=False, name="high")

    def call(self, x: Any, training: bool | None = None) -> Any:
        ops = keras.ops
        if training:
            m = RANGE_MOMENTUM
            self.low.assign(ops.minimum(m * self.low + (1 - m) * ops.min(x), 0.0))
            self.high.assign(ops.maximum(m * self.high + (1 - m) * ops.max(x), 0.0))
        return fake_quant(x, self.low, self.high)


class FoldedRoundedConv(keras.layers.Layer):
    """A convolution (or depthwise convolution) and the batch norm after it, as one convolution
    whose folded kernel is rounded to int8 per output channel: the layer TFLite makes of them.
    It shares the two layers' variables, so training it trains them; the batch norm's moving
    statistics stay fixed."""

    def __init__(self, conv: keras.layers.Layer, norm: keras.layers.Layer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conv, self.norm = conv, norm
        self.depthwise = isinstance(conv, keras.layers.DepthwiseConv2D)

    def call(self, x: Any) -> Any:
        ops, norm = keras.ops, self.norm
        scale = norm.gamma / ops.sqrt(norm.moving_variance + norm.epsilon)
        if self.depthwise:  # kernel (kh, kw, channels, 1)
            kernel, axes = self.conv.kernel * ops.reshape(scale, (1, 1, -1, 1)), (0, 1, 3)
        else:  # kernel (kh, kw, in, out)
            kernel, axes = self.conv.kernel * scale, (0, 1, 2)
        largest = ops.max(ops.abs(kernel), axis=axes, keepdims=True)
        step = ops.stop_gradient(ops.maximum(largest / WEIGHT_LEVELS, 1e-12))
        levels = ops.clip(ops.round(kernel / step), -WEIGHT_LEVELS, WEIGHT_LEVELS)
        rounded = kernel + ops.stop_gradient(levels * step - kernel)
        if self.depthwise:
            y = ops.depthwise_conv(x, rounded, strides=self.conv.strides, padding="same")
        else:
            y = ops.conv(x, rounded, strides=self.conv.strides, padding="same")
        return y + (norm.beta - norm.moving_mean * scale)


def rounded_trunk(frozen: keras.Model, calibration: np.ndarray) -> keras.Model:
    """``frozen`` (image -> map) as the int8 file computes it, sharing ``frozen``'s layers: its
    convolutions folded with their batch norms and rounded, its int8 tensors rounded over the
    ranges they take on ``calibration`` (preprocessed images)."""
    layers = {layer.name: layer for layer in frozen.layers}
    norms = {name: layers[name.removesuffix("_conv") + "_bn"] for name in layers
             if name.endswith("_conv") and name.removesuffix("_conv") + "_bn" in layers}
    folded = {norm.name for norm in norms.values()}
    points = [name for name in layers if name.endswith(ROUNDED_SUFFIXES) or name == INPUT_NORMALIZATION]
    probe = keras.Model(frozen.input, [layers[name].output for name in points])
    low, high = dict.fromkeys(points, np.inf), dict.fromkeys(points, -np.inf)
    for image in calibration:
        for name, value in zip(points, probe.predict_on_batch(image[np.newaxis]), strict=True):
            low[name] = min(low[name], float(np.min(value)))
            high[name] = max(high[name], float(np.max(value)))
    rounding = {name: RoundedActivation(low[name], high[name], name=f"{name}_rounded") for name in points}

    def call(layer: keras.layers.Layer, *args: Any, **kwargs: Any) -> Any:
        if layer.name in norms:
            result = FoldedRoundedConv(layer, norms[layer.name], name=f"{layer.name}_folded")(args[0])
        elif layer.name in folded or isinstance(layer, keras.layers.Dropout):
            result = args[0]  # in its convolution already; or drop-connect, which the file lacks
        else:
            result = layer(*args, **kwargs)
        return rounding[layer.name](result) if layer.name in rounding else result

    return keras.models.clone_model(frozen, clone_function=lambda layer: layer, call_function=call)


class _DistillationBatches(keras.utils.PyDataset):
    """Shuffled batches of training images, each in a random view, with the float trunk's maps
    of them as targets; epoch ``e`` is drawn from ``(seed, e)``."""

    def __init__(self, images: np.ndarray, teacher: keras.Model, batch_size: int, seed: int,
                 views: int) -> None:
        super().__init__()
        self.images, self.teacher, self.batch_size = images, teacher, batch_size
        self.seed, self.views, self.epoch = seed, views, 0

    def __len__(self) -> int:
        return int(np.ceil(len(self.images) / self.batch_size))

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng((self.seed, self.epoch))
        order, views = rng.permutation(len(self.images)), rng.integers(self.views, size=len(self.images))
        chosen = order[index * self.batch_size:(index + 1) * self.batch_size]
        x = np.stack([view_of(self.images[i], int(views[i])) for i in chosen]).astype(np.float32)
        return x, np.asarray(self.teacher.predict_on_batch(x))

    def on_epoch_end(self) -> None:
        self.epoch += 1


class _Progress(keras.callbacks.Callback):
    def __init__(self, report: Callable[[int, int], None], total: int) -> None:
        super().__init__()
        self.report, self.total, self.done = report, total, 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.done += 1
        self.report(self.done, self.total)


def map_error(trunk: keras.Model, reference: np.ndarray, images: np.ndarray) -> float:
    """Root-mean-square difference between ``trunk``'s maps of ``images`` and ``reference`` (the
    maps another trunk gave), over the spread of ``reference``."""
    out = np.asarray(trunk.predict(images, batch_size=4, verbose=0), dtype=np.float64)
    return float(np.sqrt(np.mean((out - reference) ** 2)) / reference.std())


def distil_for_int8(frozen: keras.Model, images: np.ndarray, calibration: np.ndarray, epochs: int, *,
                    learning_rate: float = 1e-4, batch_size: int = 16, seed: int = 0,
                    views: int = DIHEDRAL_VIEWS,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Fine-tune ``frozen``'s weights in place (its layers are the classifier's) for ``epochs``
    passes over ``images`` (preprocessed training images, each pass in random views out of
    ``views``) so that its int8-rounded computation gives the maps its float computation gave
    before; ``calibration`` sets the rounding's ranges. AdamW without weight decay, cosine decay
    from ``learning_rate`` to 1 % of it. ``progress(done, total)`` is told the steps done.

    Returns what was done, for ``metrics.json``: the settings and the simulated int8 error of the
    maps (RMS over the maps' spread, on the calibration images) before and after.
    """
    teacher = keras.models.clone_model(frozen)
    teacher.set_weights(frozen.get_weights())
    teacher.trainable = False
    rounded = rounded_trunk(frozen, calibration)
    check = calibration[:8].astype(np.float32)
    reference = np.asarray(teacher.predict(check, batch_size=4, verbose=0), dtype=np.float64)
    before = map_error(rounded, reference, check)

    batches = _DistillationBatches(images, teacher, batch_size, seed, views)
    spread = float(reference.std())
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, epochs * len(batches), alpha=0.01)
    trainable = {layer.name: layer.trainable for layer in frozen.layers}
    try:
        for layer in frozen.layers:
            layer.trainable = True
        rounded.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.0),
                        loss=lambda target, maps: keras.ops.mean(keras.ops.square(maps - target)) / spread**2)
        callbacks = [_Progress(progress, epochs * len(batches))] if progress is not None else []
        history = rounded.fit(batches, epochs=epochs, verbose=0, callbacks=callbacks)
    finally:
        for layer in frozen.layers:
            layer.trainable = trainable[layer.name]
    after = map_error(rounded, reference, check)
    return {"epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size,
            "loss": [round(float(v), 5) for v in history.history["loss"]],
            "simulated_int8_map_error": {"before": round(before, 4), "after": round(after, 4)}}
