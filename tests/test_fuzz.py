"""Fuzzing the image decoding and preprocessing: a tensor or an ImageError, nothing else."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from capsedge.errors import ImageError
from capsedge.preprocess import Preprocessing, preprocess

from conftest import synthetic_xray

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CONFIG = Preprocessing(input_size=16)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(synthetic_xray((40, 30))).save(buffer, format=fmt)
    return buffer.getvalue()


SEEDS = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF")}


def _check(data: bytes) -> None:
    try:
        tensor = preprocess(data, CONFIG)
    except ImageError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert tensor.shape == (16, 16, 1) and tensor.dtype == np.float32
    assert np.isfinite(tensor).all() and tensor.min() >= 0.0 and tensor.max() <= 1.0


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    _check(data)


@FUZZ
@given(
    st.sampled_from(sorted(SEEDS)),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=12),
    st.integers(0, 10_000),
)
def test_mutated_images(fmt: str, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(SEEDS[fmt])
    for position, value in edits:
        data[position % len(data)] = value
    _check(bytes(data[: max(1, len(data) - cut % len(data))]))


@FUZZ
@given(
    st.integers(1, 300), st.integers(1, 300),
    st.sampled_from(["uint8", "uint16", "int32", "float32", "float64"]),
    st.sampled_from([0, 1, 3, 4]),
)
def test_arrays_of_any_shape_and_type(height: int, width: int, dtype: str, channels: int) -> None:
    rng = np.random.default_rng(height * 1000 + width)
    shape = (height, width) if channels == 0 else (height, width, channels)
    array = (rng.random(shape) * 1000).astype(dtype)
    tensor = preprocess(array, CONFIG)
    assert tensor.shape == (16, 16, 1) and np.isfinite(tensor).all()
