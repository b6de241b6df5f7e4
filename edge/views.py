"""Test-time views: the orientations of an image whose answers a model averages.

numpy and Pillow only. The networks train on the eight orientations an X-ray may be stored in
(the four flips and their transposes); averaging a model's probabilities over several of them at
inference is steadier than one view (figures in ``docs/accuracy.md``). Sixteen views add the
same eight of the image turned 45 degrees, which helps the two-stage models, whose trunk was
trained on images turned by any angle. The order is fixed, so that 4 views are the four flips, 8 all
dihedral orientations and 16 those and the turned ones:

0. the image; 1. flipped left-right; 2. flipped top-bottom; 3. both (turned 180 degrees);
4.-7. the same four, transposed; 8.-15. views 0-7 of the image turned 45 degrees anticlockwise
(:func:`turned`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: How many views a model may average: one, the four flips, all eight orientations, and those
#: eight with the same eight of the image turned :data:`TURN_DEGREES`.
VIEW_COUNTS = (1, 4, 8, 16)

#: Every test-time view: what the trainer and ``capsedge export --score-folds`` save per image.
ALL_VIEWS = max(VIEW_COUNTS)

#: The angle of views 8-15, anticlockwise.
TURN_DEGREES = 45.0

#: The views the training recipe's models average (the bundled model's sixteen since 0.7; four
#: flips in 0.4-0.6); what ``capsedge export`` records unless told otherwise.
RECIPE_VIEWS = ALL_VIEWS

#: All dihedral orientations: the views training augments over and :func:`view` numbers.
DIHEDRAL_VIEWS = 8

#: The averages a cross-validation reports beside one view: name -> views.
VIEW_AVERAGES = {"flips": 4, "dihedral": DIHEDRAL_VIEWS, "sixteen": ALL_VIEWS}


def view(images: np.ndarray, index: int) -> np.ndarray:
    """View ``index`` (0-7, numbered as above) of an ``(..., H, W, C)`` array, as a new
    contiguous array: the one definition of the eight orientations.

    Raises:
        ValueError: ``index`` is not 0-7, or a transposed view of a non-square image is asked for.
    """
    if type(index) is not int or not 0 <= index < DIHEDRAL_VIEWS:
        raise ValueError(f"view must be an integer from 0 to {DIHEDRAL_VIEWS - 1}, got {index!r}")
    images = np.asarray(images)
    if images.ndim < 3:
        raise ValueError(f"expected (..., H, W, C) images, got shape {images.shape}")
    flipped = images[..., :: -1 if index & 2 else 1, :: -1 if index & 1 else 1, :]
    if index >= 4:
        height, width = images.shape[-3:-1]
        if height != width:
            raise ValueError(f"transposed views need square images, got {height}x{width}")
        flipped = np.swapaxes(flipped, -3, -2)
    return np.ascontiguousarray(flipped)


def turned(images: np.ndarray, degrees: float = TURN_DEGREES) -> np.ndarray:
    """An ``(..., H, W, C)`` float32 array with each image turned ``degrees`` anticlockwise about
    its centre: bilinear, the same size, black (0) where no pixel of the image lands, as
    the training's rotations fill (Pillow's rotation, which training uses too).

    Raises:
        ValueError: fewer than three dimensions.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim < 3:
        raise ValueError(f"expected (..., H, W, C) images, got shape {images.shape}")
    height, width, channels = images.shape[-3:]
    if images.size == 0:
        return images.copy()
    planes = np.moveaxis(images.reshape(-1, height, width, channels), -1, 1).reshape(-1, height, width)
    moved = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(plane)).rotate(
        degrees, resample=Image.Resampling.BILINEAR, fillcolor=0.0), dtype=np.float32) for plane in planes])
    moved = np.moveaxis(moved.reshape(-1, channels, height, width), 1, -1)
    return np.ascontiguousarray(moved.reshape(images.shape))


def orientations(images: np.ndarray, count: int) -> list[np.ndarray]:
    """The first ``count`` views of an ``(..., H, W, C)`` array (one image or a batch).

    Raises:
        ValueError: ``count`` is not one of :data:`VIEW_COUNTS`, or a transposed view of a
            non-square image is asked for.
    """
    if type(count) is not int or count not in VIEW_COUNTS:
        raise ValueError(f"test-time views must be one of {VIEW_COUNTS}, got {count!r}")
    images = np.asarray(images)
    if count >= DIHEDRAL_VIEWS and images.ndim >= 3 and images.shape[-3] != images.shape[-2]:
        height, width = images.shape[-3:-1]
        raise ValueError(f"transposed views need square images, got {height}x{width}")
    upright = [view(images, index) for index in range(min(count, DIHEDRAL_VIEWS))]
    if count <= DIHEDRAL_VIEWS:
        return upright
    tilted = turned(images)
    return upright + [view(tilted, index) for index in range(DIHEDRAL_VIEWS)]
