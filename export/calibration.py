"""Which images calibrate a full-integer (int8) conversion: how many, and how they are drawn."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from capsedge.errors import CapsedgeError
from capsedge.folders import image_files
from capsedge.workshop.dataset import ImageCache

#: How many images calibrate the ranges of a full-integer conversion: the export's default
#: (``--calib-limit``), and what ``--int8-trunk`` and the folds' int8 files calibrate on.
CALIBRATION_IMAGES = 200


def calibration_indices(train_idx: np.ndarray, limit: int = CALIBRATION_IMAGES) -> np.ndarray:
    """The training images (indices into the data set) that calibrate a model trained on
    ``train_idx``: up to ``limit`` of them, drawn with seed 0 as :func:`calibration_images`
    draws from a folder (``--int8-trunk``; the folds' int8 files)."""
    return np.sort(np.random.default_rng(0).permutation(train_idx)[:limit])


def calibration_files(source: str | Path) -> list[Path]:
    """The images of a calibration folder (any layout, any depth), sorted.

    Raises:
        CapsedgeError: the folder is missing or has no images.
    """
    folder = Path(source)
    if not folder.is_dir():
        raise CapsedgeError(f"calibration folder not found: {folder}")
    files = image_files(folder)
    if not files:
        raise CapsedgeError(f"no calibration images found in {folder}")
    return files


def calibration_images(source: str | Path, cache: ImageCache, limit: int = CALIBRATION_IMAGES,
                       seed: int = 0) -> Callable[[], Iterable[np.ndarray]]:
    """Up to ``limit`` images of a folder (any layout), preprocessed by ``cache``, for int8
    calibration (:meth:`capsedge.export.quantization.Quantization.for_int8` takes the result).

    Raises:
        CapsedgeError: the folder is missing, has no images, or an image cannot be decoded.
    """
    files = calibration_files(source)
    chosen = sorted(np.random.default_rng(seed).permutation(len(files))[:limit])
    images = [cache.image(files[i], "calibration image") for i in chosen]
    return lambda: iter(images)
