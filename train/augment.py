"""On-the-fly augmentation of preprocessed X-rays, in numpy and Pillow.

It runs outside the network, so training works the same on every Keras backend
(TensorFlow here, JAX or PyTorch on a GPU machine), and a batch's augmentation
depends only on ``(seed, epoch, batch index)``: a run is repeatable, and a
resumed run sees the same images it would have seen without the interruption.

The eight orientations are those of :mod:`capsedge.views` (the runtime's test-time views),
numbered as there; :data:`DRAWN_VIEWS` says which of them a random draw picks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from capsedge.views import orientations

#: The views a random draw picks, by draw: draw ``4 * mirrored + turns`` is the image mirrored
#: left-right (or not), then turned ``turns`` quarter turns anticlockwise (``np.rot90``), and
#: ``DRAWN_VIEWS[draw]`` is that orientation's number in :mod:`capsedge.views`. Training picked
#: its views in this order before it shared the runtime's numbering (and seeds still draw a
#: number from 0 to 7), so the same seed trains on the same views as runs made before.
DRAWN_VIEWS = (0, 5, 3, 6, 1, 4, 2, 7)


@dataclass(frozen=True)
class Augmentation:
    """What one kind of augmentation does to an image in [0, 1], shape ``(H, W, 1)``.

    Attributes:
        dihedral: a random flip and quarter turn (the 8 orientations X-rays are stored in).
        rotation: largest extra rotation, degrees (180: any angle).
        zoom: largest relative scale change (0.1: 0.9x to 1.1x).
        shift: largest translation, as a fraction of the side.
        contrast: largest gamma exponent change, as a fraction (0.3: gamma in [0.7, 1.3]),
            and the same largest contrast stretch about mid-grey.
        brightness: largest added offset.
    """

    dihedral: bool = True
    rotation: float = 0.0
    zoom: float = 0.0
    shift: float = 0.0
    contrast: float = 0.0
    brightness: float = 0.0


AUGMENTATIONS: dict[str, Augmentation | None] = {
    "none": None,
    # flips, quarter turns, +-15 degrees, +-10 % zoom.
    "d4": Augmentation(rotation=15.0, zoom=0.10),
    # the 8 flips and quarter turns alone: with a frozen trunk, that trunk runs once per view.
    "dihedral": Augmentation(),
    # any angle, +-15 % zoom, +-8 % shift, contrast and brightness.
    "full": Augmentation(rotation=180.0, zoom=0.15, shift=0.08, contrast=0.3, brightness=0.1),
    # d4 plus what a different exposure, framing and magnification do.
    "d4-strong": Augmentation(rotation=20.0, zoom=0.20, shift=0.10, contrast=0.3, brightness=0.08),
}


def augment_image(image: np.ndarray, spec: Augmentation, rng: np.random.Generator) -> np.ndarray:
    """One random view of ``image`` (``(H, W, 1)`` float32 in [0, 1]); a new array."""
    grey = image[..., 0]
    if spec.dihedral:
        mirrored = rng.random() < 0.5
        grey = drawn_view(image, 4 * int(mirrored) + int(rng.integers(4)))[..., 0]
    if spec.rotation or spec.zoom or spec.shift:
        grey = _affine(grey, spec, rng)
    out = np.ascontiguousarray(grey, dtype=np.float32)
    if spec.contrast:
        gamma = 1.0 + rng.uniform(-spec.contrast, spec.contrast)
        stretch = 1.0 + rng.uniform(-spec.contrast, spec.contrast)
        out = np.power(np.clip(out, 0.0, 1.0), gamma)
        out = (out - 0.5) * stretch + 0.5
    if spec.brightness:
        out = out + rng.uniform(-spec.brightness, spec.brightness)
    return np.clip(out, 0.0, 1.0)[..., None].astype(np.float32, copy=False)


def _affine(grey: np.ndarray, spec: Augmentation, rng: np.random.Generator) -> np.ndarray:
    """Rotate, scale and shift about the centre; outside the image is black (as the letterbox)."""
    height, width = grey.shape
    angle = math.radians(rng.uniform(-spec.rotation, spec.rotation))
    scale = 1.0 + rng.uniform(-spec.zoom, spec.zoom)
    dx, dy = rng.uniform(-spec.shift, spec.shift, size=2) * (width, height)
    # Pillow maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f).
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    cx, cy = (width - 1) / 2, (height - 1) / 2
    a, b, d, e = cos, sin, -sin, cos
    c = cx - a * (cx + dx) - b * (cy + dy)
    f = cy - d * (cx + dx) - e * (cy + dy)
    picture = Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32))
    moved = picture.transform((width, height), Image.Transform.AFFINE, (a, b, c, d, e, f),
                              resample=Image.Resampling.BILINEAR, fillcolor=0.0)
    return np.asarray(moved, dtype=np.float32)


def orientation(images: np.ndarray, view: int) -> np.ndarray:
    """View ``view`` (0-7, numbered as in :func:`capsedge.views.orientations`) of an
    ``(..., H, W, C)`` square image or batch; a new array.

    The pixels are gathered where :func:`capsedge.views.orientations` moves them (learnt once
    per image size from that function): one view at the cost of one copy, not eight.
    """
    if type(view) is not int or not 0 <= view < 8:
        raise ValueError(f"view must be in [0, 8), got {view!r}")
    height, width, channels = images.shape[-3:]
    pixels = images.reshape(*images.shape[:-3], height * width, channels)
    return np.take(pixels, _view_pixels(height, width)[view], axis=-2)


@functools.lru_cache(maxsize=4)
def _view_pixels(height: int, width: int) -> np.ndarray:
    """``(8, H, W)``: for each view, which pixel of the ``H x W`` image lands at each place."""
    grid = np.arange(height * width, dtype=np.int32).reshape(height, width, 1)
    return np.stack([view[..., 0] for view in orientations(grid, 8)])


def drawn_view(images: np.ndarray, draw: int) -> np.ndarray:
    """The view a random ``draw`` (0-7) picks: :func:`orientation` ``DRAWN_VIEWS[draw]``."""
    if type(draw) is not int or not 0 <= draw < 8:
        raise ValueError(f"draw must be in [0, 8), got {draw!r}")
    return orientation(images, DRAWN_VIEWS[draw])


def augment_batch(images: np.ndarray, spec: Augmentation | None, rng: np.random.Generator) -> np.ndarray:
    """Augment every image of a ``(B, H, W, 1)`` batch; ``spec=None`` returns a copy."""
    if spec is None:
        return np.array(images, dtype=np.float32)
    return np.stack([augment_image(image, spec, rng) for image in images])


def get_augmentation(name: str) -> Augmentation | None:
    """The augmentation called ``name`` (a key of :data:`AUGMENTATIONS`).

    Raises:
        ValueError: an unknown name; the message lists the valid ones.
    """
    if name not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {name!r}")
    return AUGMENTATIONS[name]
