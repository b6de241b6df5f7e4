"""Training above a frozen trunk: the frozen part runs once per image and view, not every step.

With ``--freeze-stages N`` and the ``dihedral`` augmentation (the 8 flips and quarter turns,
nothing else), every view the network can see during training is known in advance, and the
trunk's first N stages are fixed (their batch norm too). So their output for each image and
view is computed once, and training runs the rest of the network on those maps: the same
function and the same gradients as running the whole network every step, for a fraction of
the CPU time. A cross-validation computes the maps once for all its folds (the frozen
weights are the ImageNet ones in every fold).

With ``--int8-trunk``, a run also computes each map with the frozen trunk converted to
full-integer int8, as an int8 export of the whole network will run it, and trains on a mix
of both: what trains then reads the int8 trunk's rounding as well as the float maps.

With ``--training-views 16``, the maps are computed for the sixteen test-time views (the eight
and the same eight of the image turned 45 degrees, :func:`capsedge.views.orientations`), and
training draws among all sixteen: the head then learns the turned views that a runtime
averaging sixteen views shows it, which the two-stage trunk saw at any angle in stage 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from capsedge.views import ALL_VIEWS, DIHEDRAL_VIEWS, orientations, turned

from .augment import DRAWN_VIEWS, orientation
from .batches import average_pool
from .distillation import LABEL_FED_OUTPUTS

#: By default the maps of every image are computed in all eight orientations, numbered as in
#: :mod:`capsedge.views` (``maps[:, v]`` is view ``v``); ``views=16`` adds views 8-15.
VIEWS = DIHEDRAL_VIEWS


def drawn_views(draws: np.ndarray) -> np.ndarray:
    """The view numbers (as in :mod:`capsedge.views`) of random ``draws`` from 0 to 15: draws 0-7
    pick a dihedral view as :data:`~capsedge.train.augment.DRAWN_VIEWS` says (as seeds always
    have), draws 8-15 the same view of the image turned (8 more)."""
    draws = np.asarray(draws)
    return np.asarray(DRAWN_VIEWS)[draws % DIHEDRAL_VIEWS] + DIHEDRAL_VIEWS * (draws // DIHEDRAL_VIEWS)


def view_of(image: np.ndarray, view: int) -> np.ndarray:
    """View ``view`` (0-15, numbered as in :mod:`capsedge.views`) of one ``(H, W, C)`` image: what
    :func:`capsedge.views.orientations` makes of it, one view at a time."""
    return orientation(turned(image) if view >= DIHEDRAL_VIEWS else image, view % DIHEDRAL_VIEWS)


def frozen_split(built: Any, stages: int) -> tuple[keras.Model, keras.Model]:
    """``(frozen, head)``: image -> the map after stage ``stages``, and ``[map, y_onehot]`` -> the
    trainer's outputs, sharing the layers (and weights) of ``built``."""
    from capsedge.models.build import TRUNK_PREFIX
    from capsedge.models.efficientnet_lite import trunk_output_layer

    cut = trunk_output_layer(built.classifier, stages, name=TRUNK_PREFIX).output
    frozen = keras.Model(built.classifier.input, cut, name="frozen_trunk")
    outputs = dict(zip(built.trainer.output_names, built.trainer.outputs, strict=True))
    head = keras.Model([cut, built.trainer.inputs[1]], outputs, name="head_trainer")
    return frozen, head


def frozen_views(frozen: keras.Model, images: np.ndarray, batch_size: int = 32,
                 progress: Callable[[int, int], None] | None = None, views: int = VIEWS) -> np.ndarray:
    """``(N, views, h, w, c)`` float16: the frozen trunk's output for each image and view (the
    first ``views`` of :func:`capsedge.views.orientations`: 8 or 16); float16 halves the memory
    (the maps' relative rounding, 5e-4, is far below what training notices). One batch of views
    is built at a time, not a copy of every image per view: the batches, and so the maps, are
    those of ``frozen.predict`` over each view's whole stack. ``progress(done, total)`` is told
    the batches run."""
    count = len(images)
    starts = range(0, count, batch_size)
    total = views * len(starts)
    out = None
    for k, start in enumerate(starts):
        for view, batch in enumerate(orientations(images[start:start + batch_size], views)):
            maps = np.asarray(frozen.predict_on_batch(batch))
            if out is None:
                out = np.empty((count, views, *maps.shape[1:]), dtype=np.float16)
            out[start:start + len(batch), view] = maps
            if progress is not None:
                progress(k * views + view + 1, total)
    return out


def int8_frozen_views(frozen: keras.Model, images: np.ndarray, calibration: np.ndarray,
                      progress: Callable[[int, int], None] | None = None, views: int = VIEWS) -> np.ndarray:
    """:func:`frozen_views` computed by ``frozen`` converted to full-integer int8 TFLite (its
    ranges calibrated on ``calibration``, preprocessed images) and run with LiteRT;
    ``progress(done, total)`` is told the images done."""
    import tempfile
    from pathlib import Path

    from capsedge.backends import LiteRTBackend
    from capsedge.export.converter import keras_to_tflite

    flatbuffer = keras_to_tflite(frozen, "int8", lambda: iter(calibration))
    shape = tuple(int(d) for d in frozen.output.shape[1:])
    with tempfile.TemporaryDirectory(prefix="capsedge-int8-trunk-") as folder:
        path = Path(folder) / "trunk.tflite"
        path.write_bytes(flatbuffer)
        backend = LiteRTBackend(path)
        out = np.empty((len(images), views, *shape), dtype=np.float16)
        for i, image in enumerate(images):
            for view, batch in enumerate(orientations(image[np.newaxis].astype(np.float32), views)):
                out[i, view] = backend.run(batch).reshape(shape)
            if progress is not None:
                progress(i + 1, len(images))
    return out


class FrozenViewBatches(keras.utils.PyDataset):
    """Shuffled ``((map, onehot), targets)`` batches: a random view of each image (one of the maps'
    8 or 16 views, drawn as :func:`drawn_views` says), its frozen-trunk map precomputed. The
    order and the views of epoch ``e`` come from ``(seed, e)`` alone, as in
    :class:`capsedge.train.batches.TrainingBatches`.

    Args:
        maps: ``(N, V, h, w, c)`` from :func:`frozen_views` (``V`` 8 or 16 views).
        images: ``(N, H, W, 1)`` the images (for the reconstruction target).
        onehot: ``(N, K)`` labels.
        outputs: the trainer's output names.
        batch_size: images per batch.
        seed: the run's seed.
        reconstruction_size: side of the pooled reconstruction target.
        random_views: a random view per image and epoch; ``False``: always the image as it is
            (for evaluation).
        int8_maps: ``(N, V, h, w, c)`` from :func:`int8_frozen_views`, or ``None``.
        int8_fraction: the chance that an image's map comes from ``int8_maps``, drawn per image
            and epoch from ``(seed, epoch)``.
    """

    def __init__(self, maps: np.ndarray, images: np.ndarray, onehot: np.ndarray, outputs: set[str],
                 batch_size: int, seed: int, reconstruction_size: int | None = None,
                 random_views: bool = True, int8_maps: np.ndarray | None = None,
                 int8_fraction: float = 0.0) -> None:
        super().__init__()
        if maps.shape[1] not in (DIHEDRAL_VIEWS, ALL_VIEWS):
            raise ValueError(f"maps must hold {DIHEDRAL_VIEWS} or {ALL_VIEWS} views per image, "
                             f"got {maps.shape[1]}")
        if int8_fraction and (int8_maps is None or int8_maps.shape != maps.shape):
            raise ValueError("int8_fraction needs int8 maps of the float maps' shape")
        self.int8_maps, self.int8_fraction = int8_maps, int8_fraction
        self.random_views = random_views
        self.maps, self.images, self.onehot = maps, images, onehot
        self.outputs, self.batch_size, self.seed = outputs, batch_size, seed
        self.reconstruction_size = reconstruction_size
        self.epoch = 0

    def __len__(self) -> int:
        return int(np.ceil(len(self.maps) / self.batch_size))

    def __getitem__(self, index: int) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, np.ndarray]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.maps))
        chosen = order[index * self.batch_size:(index + 1) * self.batch_size]
        draws = np.random.default_rng([self.seed, self.epoch, index]).integers(self.maps.shape[1],
                                                                                size=len(chosen))
        views = drawn_views(draws)
        if not self.random_views:
            chosen, views = np.arange(len(self.maps))[index * self.batch_size:][:self.batch_size], views * 0
        maps = self.maps[chosen, views].astype(np.float32)
        if self.int8_fraction:
            from_int8 = np.random.default_rng([self.seed, self.epoch, index, 1]).random(len(chosen))
            from_int8 = from_int8 < self.int8_fraction
            maps[from_int8] = self.int8_maps[chosen[from_int8], views[from_int8]]
        labels = self.onehot[chosen]
        targets = {k: labels for k in LABEL_FED_OUTPUTS if k in self.outputs}
        if "reconstruction" in self.outputs:
            seen = np.stack([view_of(self.images[i], int(v)) for i, v in zip(chosen, views, strict=True)])
            targets["reconstruction"] = average_pool(seen, self.reconstruction_size)
        return (maps, labels), targets
