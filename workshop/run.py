"""The run-folder contract: what ``capsedge train`` writes and export, evaluation and the benches
read, named once.

A run folder (:class:`RunDir`) holds one trained classifier with its recipe, figures and held-out
answers; a cross-validation folder (:class:`CrossValidation`) holds one run per fold (``fold-K``),
optionally a ``final`` run on every image, and the settings and summary of the whole. The file
names are those capsedge has always written, so every existing run stays readable.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from capsedge.errors import CapsedgeError, reason


def read_json(path: Path) -> Any:
    """The JSON document at ``path`` (``OSError``, ``UnicodeDecodeError`` or ``JSONDecodeError``
    when it cannot be read)."""
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` atomically, indented (processes training parts of one
    cross-validation may write the same file at once; a reader never sees half of it)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def average_views(views: np.ndarray, count: int) -> np.ndarray:
    """What a runtime averaging the first ``count`` test-time views answers: the mean of
    ``views[:, :count]`` (``(images, views, classes)`` probabilities)."""
    if views.ndim != 3 or not 1 <= count <= views.shape[1]:
        raise ValueError(f"cannot average {count} views of predictions shaped {views.shape}")
    return views[:, :count].mean(axis=1)


@dataclass(frozen=True)
class RunDir:
    """A run folder written by ``capsedge train``; the paths of its files.

    Attributes:
        path: the folder.
    """

    path: Path

    CLASSIFIER: ClassVar[str] = "classifier.keras"
    CONFIG: ClassVar[str] = "config.json"
    METRICS: ClassVar[str] = "metrics.json"
    HISTORY: ClassVar[str] = "history.csv"
    #: The held-out images' indices into the data set, in the order of the answers below.
    HOLDOUT_INDICES: ClassVar[str] = "holdout_indices.npy"
    #: Their probabilities, one view: ``(images, classes)``.
    HOLDOUT_PROBABILITIES: ClassVar[str] = "holdout_probabilities.npy"
    #: Their probabilities in every test-time view: ``(images, 8, classes)``; a quantized file's
    #: carry its format after the stem (``holdout_probabilities_views_int8.npy``).
    VIEWS: ClassVar[str] = "holdout_probabilities_views.npy"
    #: The EfficientNet-Lite0 trunk's weights (a model with that trunk).
    TRUNK: ClassVar[str] = "trunk.npz"
    #: The reconstruction decoder (a model with one).
    DECODER: ClassVar[str] = "decoder.keras"
    LEARNING_CURVES: ClassVar[str] = "learning_curves.png"
    CONFUSION: ClassVar[str] = "confusion.png"
    PER_CLASS: ClassVar[str] = "per_class.png"
    RELIABILITY: ClassVar[str] = "reliability.png"
    #: What ``--resume`` needs while a run is under way; deleted when it completes.
    BACKUP: ClassVar[str] = "backup"
    #: In the backup: the trunk ``--int8-aware-trunk`` distilled (as :attr:`TRUNK`), and its report.
    INT8_AWARE_TRUNK: ClassVar[str] = "int8_aware_trunk.npz"
    INT8_AWARE_REPORT: ClassVar[str] = "int8_aware_trunk.json"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of(cls, path: str | Path) -> RunDir:
        """The run of a run folder or of its ``classifier.keras`` (any file in it)."""
        path = Path(path)
        try:
            return cls(path if path.is_dir() else path.parent)
        except OSError:
            return cls(path.parent)

    @property
    def classifier(self) -> Path:
        return self.path / self.CLASSIFIER

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def history(self) -> Path:
        return self.path / self.HISTORY

    @property
    def holdout_indices(self) -> Path:
        return self.path / self.HOLDOUT_INDICES

    @property
    def holdout_probabilities(self) -> Path:
        return self.path / self.HOLDOUT_PROBABILITIES

    def views_file(self, fmt: str | None = None) -> Path:
        """The held-out probabilities per view: the float model's, or those of the run's
        classifier exported as ``fmt`` (``int8``)."""
        return self.path / views_name(fmt)

    @property
    def trunk(self) -> Path:
        return self.path / self.TRUNK

    @property
    def int8_aware_trunk(self) -> Path:
        return self.backup / self.INT8_AWARE_TRUNK

    @property
    def int8_aware_report(self) -> Path:
        return self.backup / self.INT8_AWARE_REPORT

    @property
    def decoder(self) -> Path:
        return self.path / self.DECODER

    @property
    def learning_curves(self) -> Path:
        return self.path / self.LEARNING_CURVES

    @property
    def confusion(self) -> Path:
        return self.path / self.CONFUSION

    @property
    def per_class(self) -> Path:
        return self.path / self.PER_CLASS

    @property
    def reliability(self) -> Path:
        return self.path / self.RELIABILITY

    @property
    def backup(self) -> Path:
        return self.path / self.BACKUP

    def missing(self, *names: str) -> list[str]:
        """Which of the files ``names`` (default: classifier and config) the folder lacks."""
        return [name for name in names or (self.CLASSIFIER, self.CONFIG) if not (self.path / name).is_file()]

    def is_finished(self) -> bool:
        """Whether the run completed: its metrics written and no backup left."""
        return self.metrics.is_file() and not self.backup.is_dir()

    def read_config(self) -> dict[str, Any]:
        """``config.json``: the recipe (``train``), ``model``, ``preprocessing``, ``classes``, ``data``."""
        return read_json(self.config)

    def write_config(self, config: dict[str, Any]) -> None:
        write_json(self.config, config)

    def read_metrics(self) -> dict[str, Any]:
        """``metrics.json``; empty when the run has none (yet)."""
        return read_json(self.metrics) if self.metrics.is_file() else {}

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json(self.metrics, metrics)

    def save_holdout(self, indices: np.ndarray, probabilities: np.ndarray,
                     views: np.ndarray | None = None) -> None:
        """The held-out images' indices, their probabilities and (optionally) those per view."""
        np.save(self.holdout_probabilities, probabilities)
        if views is not None:
            np.save(self.views_file(), views)
        np.save(self.holdout_indices, np.asarray(indices))

    def read_holdout_indices(self) -> np.ndarray:
        return np.load(self.holdout_indices)

    def read_holdout_probabilities(self) -> np.ndarray:
        return np.load(self.holdout_probabilities)

    def read_views(self, fmt: str | None = None) -> np.ndarray:
        """The held-out probabilities per view (see :meth:`views_file`)."""
        return np.load(self.views_file(fmt))

    def save_views(self, views: np.ndarray, fmt: str | None = None) -> Path:
        """Write the held-out probabilities per view (see :meth:`views_file`); returns the file."""
        path = self.views_file(fmt)
        np.save(path, views)
        return path


def views_name(fmt: str | None = None) -> str:
    """The name of a run's held-out probabilities per view: the float model's, or those of its
    classifier exported as ``fmt``."""
    return RunDir.VIEWS if fmt is None else RunDir.VIEWS.replace(".npy", f"_{fmt}.npy")


@dataclass(frozen=True)
class CrossValidation:
    """A ``capsedge train --folds K`` folder: one run per fold, optionally a ``final`` run.

    Attributes:
        path: the folder.
    """

    path: Path

    SETTINGS: ClassVar[str] = "cv_settings.json"
    SUMMARY: ClassVar[str] = "cv_summary.json"
    FOLD: ClassVar[str] = "fold-{}"
    FINAL: ClassVar[str] = "final"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def above(cls, run: RunDir) -> CrossValidation | None:
        """The cross-validation whose part ``run`` is (its folder holds a summary), if any."""
        parent = cls(run.path.parent)
        return parent if parent.summary.is_file() else None

    @property
    def settings(self) -> Path:
        return self.path / self.SETTINGS

    @property
    def summary(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def final(self) -> RunDir:
        return RunDir(self.path / self.FINAL)

    def fold(self, k: int) -> RunDir:
        return RunDir(self.path / self.FOLD.format(k))

    def part(self, name: int | str) -> RunDir:
        """Fold ``name`` (a number) or the ``final`` run."""
        return self.final if name == self.FINAL else self.fold(int(name))

    def folds(self) -> list[RunDir]:
        """The fold runs present, in the order of their names."""
        return [RunDir(p) for p in sorted(self.path.glob(self.FOLD.format("*")))]

    def has_folds(self) -> bool:
        return self.path.is_dir() and any(self.path.glob(self.FOLD.format("*")))

    def read_settings(self) -> dict[str, Any]:
        return read_json(self.settings)

    def write_settings(self, settings: dict[str, Any]) -> None:
        write_json(self.settings, settings)

    def read_summary(self) -> dict[str, Any]:
        return read_json(self.summary)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary, summary)

    def has_views(self, fmt: str | None = None) -> bool:
        """Whether every fold has its held-out probabilities per view (of ``fmt``'s files)."""
        folds = self.folds()
        return bool(folds) and all(fold.views_file(fmt).is_file() for fold in folds)

    def out_of_fold(self, images: int, views: int = 1,
                    fmt: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, probabilities)`` of every image from the held-out folds, averaged over
        ``views`` test-time views (the folds' views files) when more than one; with ``fmt``,
        those of the folds' classifiers exported as ``fmt`` (``int8``).

        Raises:
            CapsedgeError: a fold is missing its held-out predictions (or those views), or they
                do not cover ``images`` images exactly once.
        """
        folds = self.folds()
        if not folds:
            raise CapsedgeError(f"no fold-* folders in {self.path}")
        per_view = views > 1 or fmt is not None
        missing = [f.path.name for f in folds if per_view and not f.views_file(fmt).is_file()]
        if missing and fmt is not None:
            raise CapsedgeError(f"{self.path}/{missing[0]} has no {views_name(fmt)} (an export of "
                                f"{self.path}/final with --score-folds writes it)")
        if missing:
            raise CapsedgeError(f"{self.path}/{missing[0]} has no {views_name()} for {views} test-time "
                                "views (runs of capsedge before 0.4 did not write it: python "
                                "bench/test_time_views.py --cv DIR --out DIR adds it)")
        try:
            indices = np.concatenate([f.read_holdout_indices() for f in folds])
            per_fold = [f.read_views(fmt) if per_view else f.read_holdout_probabilities() for f in folds]
            short = [(f, p.shape[1]) for f, p in zip(folds, per_fold, strict=True)
                     if per_view and p.ndim == 3 and p.shape[1] < views]
            if short:
                raise CapsedgeError(f"{short[0][0].path} holds {short[0][1]} test-time views per image, "
                                    f"not {views} (the trainer saves the eight dihedral views; "
                                    "capsedge export --score-folds scores the int8 files in all sixteen)")
            probabilities = np.concatenate([average_views(p, views) if per_view else p for p in per_fold])
        except (OSError, ValueError) as exc:
            raise CapsedgeError(f"cannot read the held-out predictions in {self.path} "
                                f"({reason(exc)})") from None
        if sorted(indices.tolist()) != list(range(images)):
            raise CapsedgeError(f"the folds of {self.path} do not cover the {images} training images "
                                "exactly once: was it trained on other data?")
        return indices, probabilities
