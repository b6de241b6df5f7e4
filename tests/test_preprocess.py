"""The shared preprocessing: every kind of image becomes the same kind of tensor."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capsedge.errors import ImageError
from capsedge.preprocess import Preprocessing, load_grey, preprocess

from conftest import implant_data, synthetic_xray

CONFIG = Preprocessing(input_size=32)


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_output_shape_range_and_dtype() -> None:
    tensor = preprocess(synthetic_xray(), CONFIG)
    assert tensor.shape == (32, 32, 1)
    assert tensor.dtype == np.float32
    assert tensor.min() == 0.0
    assert tensor.max() == pytest.approx(1.0)


def test_path_bytes_pil_and_array_agree(tmp_path: Path) -> None:
    pixels = synthetic_xray()
    path = tmp_path / "a.png"
    Image.fromarray(pixels).save(path)
    reference = preprocess(path, CONFIG)
    for source in (path, str(path), path.read_bytes(), Image.fromarray(pixels), pixels):
        np.testing.assert_allclose(preprocess(source, CONFIG), reference, atol=1e-6)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("RGB", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("P", "GIF"),
     ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("L", "BMP"), ("L", "TIFF"), ("I;16", "PNG"), ("I", "TIFF"),
     ("F", "TIFF"), ("1", "PNG"), ("LA", "PNG")],
)
def test_every_common_mode_gives_a_similar_tensor(mode: str, fmt: str) -> None:
    grey = Image.fromarray(synthetic_xray())
    if mode == "I;16":
        image = Image.fromarray(synthetic_xray().astype(np.uint16) * 257)
    elif mode in ("I", "F"):
        image = Image.fromarray(synthetic_xray().astype(np.int32 if mode == "I" else np.float32) * 16)
    else:
        image = grey.convert(mode)
    decoded = Image.open(io.BytesIO(_encode(image, fmt)))
    tensor = preprocess(decoded, CONFIG)
    reference = preprocess(grey, CONFIG)
    assert tensor.shape == (32, 32, 1)
    assert tensor.min() >= 0.0 and tensor.max() <= 1.0
    if mode not in ("1", "CMYK"):  # 1-bit dithers; CMYK->RGB conversion is not exact
        assert np.abs(tensor - reference).mean() < 0.03, mode


def test_sixteen_bit_matches_eight_bit_content() -> None:
    eight = synthetic_xray()
    twelve_bit = (eight.astype(np.uint16) * 16)  # a 12-bit detector in a 16-bit file
    np.testing.assert_allclose(
        preprocess(twelve_bit, CONFIG), preprocess(eight, CONFIG), atol=1e-5
    )


def test_transparent_pixels_become_black() -> None:
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:10, :, 3] = 255  # top half opaque white, bottom half transparent white
    tensor = preprocess(Image.fromarray(rgba, "RGBA"), Preprocessing(input_size=20))[..., 0]
    assert tensor[:10].min() == pytest.approx(1.0)
    assert tensor[11:].max() == pytest.approx(0.0)


def test_exif_orientation_is_applied() -> None:
    wide = np.zeros((20, 60), np.uint8)
    wide[:, :30] = 255  # left half bright
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    data = _encode(Image.fromarray(wide), "JPEG", exif=exif.tobytes(), quality=95)
    upright = np.asarray(load_grey(data))
    assert upright.shape == (60, 20)  # tall after the turn
    assert upright[:25].mean() > 200 and upright[35:].mean() < 50  # left half is now the top


def test_letterbox_keeps_aspect_and_pads_black() -> None:
    elongated = np.tile(np.linspace(0, 255, 1000).astype(np.uint8), (10, 1))
    tensor = preprocess(elongated, CONFIG)[..., 0]
    assert tensor[:10].max() == 0.0 and tensor[-10:].max() == 0.0  # padded rows
    assert tensor[15].max() == pytest.approx(1.0)  # the one-pixel-high strip in the middle


def test_tiny_and_constant_images() -> None:
    for pixels in (np.full((1, 1), 7, np.uint8), np.zeros((5, 9), np.uint8), np.full((4, 4), 255, np.uint8)):
        tensor = preprocess(pixels, CONFIG)
        assert tensor.shape == (32, 32, 1) and np.isfinite(tensor).all()
        assert tensor.max() == 0.0  # no contrast: all black


def test_large_image_is_reduced_consistently() -> None:
    big = np.asarray(Image.fromarray(synthetic_xray()).resize((2000, 1600), Image.Resampling.BILINEAR))
    small = synthetic_xray()
    assert np.abs(preprocess(big, CONFIG) - preprocess(small, CONFIG)).mean() < 0.03


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb's signature)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.png", b"", "empty"),
        ("text.jpg", b"hello, this is not an image\n", "not a readable image"),
        ("page.png", b"<html><body>404</body></html>", "not a readable image"),
        ("random.jpg", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "image"),
        ("bomb.png", _png_claiming(50_000, 50_000), "too large"),
    ],
)
def test_bad_files_raise_image_error(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message):
        preprocess(path, CONFIG)


def test_truncated_files_raise_image_error(tmp_path: Path) -> None:
    for fmt in ("JPEG", "PNG"):
        data = _encode(Image.fromarray(synthetic_xray((300, 300))), fmt)
        path = tmp_path / f"cut.{fmt.lower()}"
        path.write_bytes(data[: len(data) // 3])
        with pytest.raises(ImageError):
            preprocess(path, CONFIG)


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        preprocess(tmp_path / "absent.png", CONFIG)
    with pytest.raises(ImageError, match="directory"):
        preprocess(tmp_path, CONFIG)


def test_preprocessing_round_trips_and_validates() -> None:
    config = Preprocessing(input_size=64)
    assert Preprocessing.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="input_size"):
        Preprocessing(input_size=3)
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        Preprocessing.from_dict({**config.to_dict(), "mean": 0.5})
    # no default size: the model says it (the bundled one takes 512, an old default was 128)
    with pytest.raises(TypeError):
        Preprocessing()  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="must give its input_size"):
        Preprocessing.from_dict({k: v for k, v in config.to_dict().items() if k != "input_size"})


def test_training_pipeline_and_runtime_make_the_tensor_worked_out_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images already ``size`` pixels on their longer side are not resampled, so every value
    of the expected tensor follows from the definition: the grey levels stretched from
    [min, max] to [0, 1], centred on a black square."""
    from capsedge import Classifier
    from capsedge.workshop.dataset import load_images, read_dataset

    classifier = Classifier.load()
    config = classifier.metadata.preprocessing
    size = config.input_size
    half, margin = size // 2, (size - size // 2) // 2
    levels = 40 + 7 * (np.arange(size) % 27)  # 40 to 222
    stretched = (levels - 40) / (222 - 40)
    wide = np.tile(levels, (half, 1))  # half x size: black bands above and below
    tall = np.tile(levels[::-1, np.newaxis], (1, half))  # size x half: black bands left and right
    expected_wide = np.zeros((size, size, 1))
    expected_wide[margin : margin + half, :, 0] = stretched
    expected_tall = np.zeros((size, size, 1))
    expected_tall[:, margin : margin + half, 0] = stretched[::-1, np.newaxis]
    expected = {"Cofield.0.png": expected_wide, "Depuy.1.png": expected_tall}
    Image.fromarray(wide.astype(np.uint8)).save(tmp_path / "Cofield.0.png")
    Image.fromarray(tall.astype(np.uint8)).save(tmp_path / "Depuy.1.png")

    dataset = read_dataset(tmp_path)
    fed: list[np.ndarray] = []
    predict_tensor = classifier.predict_tensor

    def recording(tensor: np.ndarray) -> np.ndarray:
        fed.append(tensor)
        return predict_tensor(tensor)

    monkeypatch.setattr(classifier, "predict_tensor", recording)
    for path, tensor in zip(dataset.paths, load_images(dataset, config), strict=True):
        fed.clear()
        classifier.classify(path)  # its first view is the image as given
        for made in (tensor, fed[0]):  # what training learns from, what the runtime classifies
            np.testing.assert_allclose(made, expected[path.name], atol=1e-6)


def test_real_xrays_preprocess_identically_in_training_and_runtime() -> None:
    from capsedge import Classifier
    from capsedge.workshop.dataset import load_images, read_dataset

    dataset = read_dataset(implant_data())
    subset = dataset.subset(np.arange(0, len(dataset.paths), 25))
    config = Classifier.load().metadata.preprocessing
    batch = load_images(subset, config)
    for path, tensor in zip(subset.paths, batch, strict=True):
        np.testing.assert_array_equal(tensor, preprocess(path, config))
        assert tensor.max() == pytest.approx(1.0)


def test_animated_gif_uses_the_first_frame() -> None:
    first = Image.fromarray(synthetic_xray(seed=1)).convert("P")
    second = Image.fromarray(255 - synthetic_xray(seed=2)).convert("P")
    buffer = io.BytesIO()
    first.save(buffer, format="GIF", save_all=True, append_images=[second], duration=100, loop=0)
    animated = preprocess(buffer.getvalue(), CONFIG)
    assert np.abs(animated - preprocess(first, CONFIG)).mean() < 0.01
    assert np.abs(animated - preprocess(second, CONFIG)).mean() > 0.1


@pytest.mark.parametrize("array", [np.zeros((4, 4, 2)), np.array([["a", "b"]]), np.zeros((2, 2), complex),
                                   np.zeros((2, 2, 2, 2))])
def test_unusable_arrays_are_image_errors(array: np.ndarray) -> None:
    with pytest.raises(ImageError, match="image array"):
        preprocess(array, CONFIG)
