"""Test-time views: the orientations of an image whose answers a model averages.

numpy only. The networks train on the eight orientations an X-ray may be stored in (the
four flips and their transposes); averaging a model's probabilities over several of
them at inference is steadier than one view (figures in ``docs/accuracy.md``). The order
is fixed, so that 4 views are the four flips and 8 all dihedral orientations:

0. the image; 1. flipped left-right; 2. flipped top-bottom; 3. both (turned 180 degrees);
4.-7. the same four, transposed.
"""

from __future__ import annotations

import numpy as np

#: How many views a model may average: one, the four flips, all eight orientations.
VIEW_COUNTS = (1, 4, 8)

#: The views the training recipe's models average (the bundled model's four flips); what
#: ``capsedge export`` records unless told otherwise.
RECIPE_VIEWS = 4


def orientations(images: np.ndarray, count: int) -> list[np.ndarray]:
    """The first ``count`` views of an ``(..., H, W, C)`` array (one image or a batch).

    Raises:
        ValueError: ``count`` is not one of :data:`VIEW_COUNTS`, or a transposed view of a
            non-square image is asked for.
    """
    if type(count) is not int or count not in VIEW_COUNTS:
        raise ValueError(f"test-time views must be one of {VIEW_COUNTS}, got {count!r}")
    images = np.asarray(images)
    if images.ndim < 3:
        raise ValueError(f"expected (..., H, W, C) images, got shape {images.shape}")
    height, width = images.shape[-3:-1]
    flips = [images, images[..., :, ::-1, :], images[..., ::-1, :, :], images[..., ::-1, ::-1, :]]
    if count == 8 and height != width:
        raise ValueError(f"transposed views need square images, got {height}x{width}")
    views = flips if count < 8 else flips + [np.swapaxes(view, -3, -2) for view in flips]
    return [np.ascontiguousarray(view) for view in views[:count]]
