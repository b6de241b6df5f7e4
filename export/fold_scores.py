"""The held-out answers of each fold's classifier as a device file: converted as the export
converts (int8 calibrated on the fold's own training images), run with LiteRT on the fold's
held-out images in every test-time view (all sixteen), and saved beside the float model's
(:meth:`capsedge.workshop.run.RunDir.views_file`). An int8 export's trust section is calibrated on
those answers (:func:`capsedge.export.trust_fit.fit_file_trust`)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from capsedge.export.calibration import calibration_indices
from capsedge.export.quantization import Quantization
from capsedge.preprocess import Preprocessing
from capsedge.views import ALL_VIEWS, orientations
from capsedge.workshop.dataset import Dataset, ImageCache
from capsedge.workshop.run import CrossValidation, RunDir

#: The formats a fold can be scored as: the quantizations of a ``.tflite`` file.
FOLD_FORMATS = ("int8", "dynamic", "float16")


def fold_views(fold: RunDir, dataset: Dataset, formats: Sequence[str] = ("int8",),
               images: ImageCache | None = None,
               transform: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """``(held-out images, 16, classes)`` float32 probabilities of the fold's classifier converted
    to each of ``formats``, in every test-time view (:func:`capsedge.views.orientations`); int8 is
    calibrated on up to 200 of the fold's training images, drawn as
    :func:`~capsedge.export.calibration.calibration_indices` draws them, never held-out ones.
    ``transform``, if given, changes each preprocessed held-out image before its views (a bench
    turns them); calibration images are never transformed.

    Raises:
        CapsedgeError: the fold cannot be loaded or an image cannot be decoded.
        ValueError: a format not in :data:`FOLD_FORMATS`.
    """
    from capsedge.backends import LiteRTBackend
    from capsedge.export.run import load_run
    from capsedge.export.tflite_format import convert_to_tflite

    unknown = [fmt for fmt in formats if fmt not in FOLD_FORMATS]
    if unknown:
        raise ValueError(f"cannot score folds as {unknown[0]!r}; one of {FOLD_FORMATS}")
    trained = load_run(fold.path)
    cache = images if images is not None else ImageCache(trained.preprocessing)
    calibration, held_images = fold_images(fold, dataset, cache)
    if transform is not None:
        held_images = [transform(image) for image in held_images]
    classes = len(trained.labels)
    answers = {}
    with tempfile.TemporaryDirectory(prefix="capsedge-fold-scores-") as folder:
        for fmt in formats:
            quantization = (Quantization.for_int8(lambda: iter(calibration)) if fmt == "int8"
                            else Quantization(fmt))
            path = Path(folder) / f"{fmt}.tflite"
            path.write_bytes(convert_to_tflite(trained.classifier, quantization))
            backend = LiteRTBackend(path)
            views = np.array([[backend.run(view[np.newaxis])[:classes]
                               for view in orientations(image, ALL_VIEWS)] for image in held_images])
            answers[fmt] = views.astype(np.float32)
    return answers


def fold_images(fold: RunDir, dataset: Dataset,
                cache: ImageCache) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(calibration, held_out)`` preprocessed images of a fold: up to 200 of its training images,
    drawn as :func:`~capsedge.export.calibration.calibration_indices` draws them, and its held-out
    images in their saved order.

    Raises:
        CapsedgeError: an image cannot be decoded.
    """
    held = fold.read_holdout_indices()
    training = np.setdiff1d(np.arange(len(dataset.paths)), held)
    calibration = [cache.image(dataset.paths[i]) for i in calibration_indices(training)]
    return calibration, [cache.image(dataset.paths[i]) for i in held]


def score_folds(cross_validation: str | Path, dataset: Dataset, formats: Sequence[str] = ("int8",),
                folds: Sequence[int] | None = None,
                progress: Callable[[str], None] | None = None) -> dict[str, dict[str, Path]]:
    """Score every fold (or those numbered ``folds``) of ``cross_validation`` as each of
    ``formats`` (:func:`fold_views`) and save the answers in the fold folders
    (``holdout_probabilities_views_<format>.npy``); ``dataset``: the images the folds were
    trained on. ``progress(step)`` is told each fold as it starts.

    Returns:
        Fold name to format name to the file written.
    """
    cv = CrossValidation(Path(cross_validation))
    chosen = cv.folds() if folds is None else [cv.fold(k) for k in folds]
    caches: dict[Preprocessing, ImageCache] = {}
    written: dict[str, dict[str, Path]] = {}
    for fold in chosen:
        if progress is not None:
            progress(f"scoring {fold.path.name}")
        preprocessing = Preprocessing.from_dict(fold.read_config()["preprocessing"])
        cache = caches.setdefault(preprocessing, ImageCache(preprocessing))
        answers = fold_views(fold, dataset, formats, cache)
        written[fold.path.name] = {fmt: fold.save_views(views, fmt) for fmt, views in answers.items()}
    return written
