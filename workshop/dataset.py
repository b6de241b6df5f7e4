"""The one reader of labelled images: a collection in the public flat layout, a folder per class,
or a CSV (:func:`read_dataset`); the label of any one file (:func:`label_of`); and images
preprocessed once however many steps need them (:class:`ImageCache`).

numpy and the shared preprocessing only; TensorFlow is not needed to read data.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from capsedge.errors import CapsedgeError, ImageError, reason
from capsedge.folders import IMAGE_SUFFIXES, is_image_file, label_from_name
from capsedge.preprocess import Preprocessing, preprocess

UCI_SHOULDER_IMPLANTS = (
    "Shoulder Implant X-Ray Manufacturer Classification, UCI Machine Learning Repository, "
    "id 517, doi:10.24432/C5F893 (Urban, Porhemmat, Stark, Feeley, Okada, Baldi, "
    "Computational and Structural Biotechnology Journal 18 (2020) 967-972); licence CC BY 4.0"
)
#: Short names ``--attribution`` accepts for data sets whose credit capsedge knows.
KNOWN_SOURCES = {"uci-517": UCI_SHOULDER_IMPLANTS}
#: A data folder's (or a CSV's folder's) manifest: ``{"attribution": "..."}``.
MANIFEST = "capsedge-data.json"

class DatasetError(CapsedgeError):
    """A data set is missing, empty, unreadable or has fewer than two classes."""


@dataclass(frozen=True)
class Dataset:
    """Image paths with their labels.

    Attributes:
        paths: one path per image.
        labels: the class name of each image.
        classes: the sorted class names; a label's index is its class id.
        layout: ``"flat"``, ``"folders"`` or ``"csv"``.
        source: where the data was read from (the folder or CSV), if known.
        credit: the data set's provenance (name, licence), only when a flag or a manifest
            gave it; never guessed from the labels.
    """

    paths: tuple[Path, ...]
    labels: tuple[str, ...]
    classes: tuple[str, ...]
    layout: str
    source: Path | None = None
    credit: str | None = None

    @property
    def targets(self) -> np.ndarray:
        """Class ids, int64, one per image."""
        index = {name: i for i, name in enumerate(self.classes)}
        return np.array([index[label] for label in self.labels], dtype=np.int64)

    def counts(self) -> dict[str, int]:
        """Images per class, in class order."""
        counter = Counter(self.labels)
        return {name: counter[name] for name in self.classes}

    def attribution(self) -> str:
        """Credit for the data, as given by ``--attribution`` or the folder's manifest; without
        either, only that the images were the user's (the labels prove nothing about the source)."""
        if self.credit:
            return f"trained on images from the {self.credit}"
        return "trained on user-supplied images (provenance not given)"

    def with_attribution(self, attribution: str | None) -> Dataset:
        """The same images credited to ``attribution`` (a name of :data:`KNOWN_SOURCES` or free
        text); ``None`` keeps the manifest's credit."""
        if attribution is None or not attribution.strip():
            return self
        return replace(self, credit=KNOWN_SOURCES.get(attribution.strip(), attribution.strip()))

    def subset(self, indices: np.ndarray) -> Dataset:
        """The images at ``indices``, same classes."""
        return Dataset(
            paths=tuple(self.paths[i] for i in indices),
            labels=tuple(self.labels[i] for i in indices),
            classes=self.classes,
            layout=self.layout,
            source=self.source,
            credit=self.credit,
        )


def read_dataset(source: str | Path) -> Dataset:
    """Find the images and labels under ``source``.

    Three layouts are read:

    - flat, as in the public UCI archive: ``DIR/Maker.N.jpg``, the label being
      the file name's first dot-separated token;
    - a folder per class: ``DIR/Maker/any-name.png``;
    - a CSV file with ``path,label`` rows (a header row is optional; relative
      paths are taken from the CSV's folder).

    A manifest ``capsedge-data.json`` in the folder (or beside the CSV) may credit the data:
    ``{"attribution": "<name, source, licence>"}``.

    Raises:
        DatasetError: nothing usable was found, fewer than two classes, or an unreadable manifest.
    """
    root = Path(source)
    if not root.exists():
        raise DatasetError(f"data not found: {root}")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DatasetError(f"expected a folder or a .csv file, got {root}")
        pairs, layout = _read_csv(root), "csv"
    else:
        subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        foldered = [
            (f, folder.name) for folder in subfolders for f in sorted(folder.iterdir()) if is_image_file(f)
        ]
        if foldered:
            pairs, layout = foldered, "folders"
        else:
            pairs = [(f, label_from_name(f)) for f in sorted(root.iterdir()) if is_image_file(f)]
            layout = "flat"
    if not pairs:
        raise DatasetError(f"no images found in {root} ({', '.join(sorted(IMAGE_SUFFIXES))})")
    classes = tuple(sorted({label for _, label in pairs}))
    if len(classes) < 2:
        raise DatasetError(f"need at least two classes, found only {classes[0]!r} in {root}")
    return Dataset(
        paths=tuple(p for p, _ in pairs),
        labels=tuple(label for _, label in pairs),
        classes=classes,
        layout=layout,
        source=root.resolve(),
        credit=_manifest_credit(root.parent if root.is_file() else root),
    )


def _manifest_credit(folder: Path) -> str | None:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        credit = json.loads(manifest.read_text(encoding="utf-8"))["attribution"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DatasetError(f"cannot read {manifest} ({reason(exc)})") from None
    if not isinstance(credit, str) or not credit.strip():
        raise DatasetError(f"{manifest}: 'attribution' must be a non-empty string")
    return credit.strip()


def _read_csv(path: Path) -> list[tuple[Path, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read {path} ({exc})") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    pairs = []
    for line, row in enumerate(rows, start=1):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DatasetError(f"{path.name} row {line}: expected 'path,label', got {row!r}")
        image = Path(row[0].strip())
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise DatasetError(f"{path.name} row {line}: image not found: {image}")
        pairs.append((image, row[1].strip()))
    return pairs


def load_images(dataset: Dataset, config: Preprocessing,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Preprocess every image of ``dataset`` into one ``(N, H, W, C)`` float32 array;
    ``progress(done, total)`` is told each image read.

    Raises:
        DatasetError: an image cannot be decoded (its path is named).
    """
    images = np.empty((len(dataset.paths), *config.input_shape), dtype=np.float32)
    for i, path in enumerate(dataset.paths):
        try:
            images[i] = preprocess(path, config)
        except CapsedgeError as exc:
            raise DatasetError(f"{path}: {exc}") from None
        if progress is not None:
            progress(i + 1, len(dataset.paths))
    return images


def label_of(path: Path, labels: tuple[str, ...]) -> int:
    """Class id of one image among ``labels``, by the rules :func:`read_dataset` reads: its
    folder's name (a folder per class), else its name's first token (``Label.N.jpg``); -1 when
    neither is a label."""
    for candidate in (path.parent.name, label_from_name(path)):
        if candidate in labels:
            return labels.index(candidate)
    return -1


class ImageCache:
    """Images preprocessed one way, each decoded once however many steps ask for it (an export
    calibrates, fits its trust section and verifies, often on the same folder)."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.preprocessing = preprocessing
        self._images: dict[Path, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._images)

    def image(self, path: Path, what: str = "image") -> np.ndarray:
        """The preprocessed ``(H, W, C)`` float32 image at ``path``.

        Raises:
            DatasetError: it cannot be decoded (``what`` and its path are named).
        """
        key = Path(path).resolve()
        if key not in self._images:
            try:
                self._images[key] = preprocess(path, self.preprocessing)
            except ImageError as exc:
                raise DatasetError(f"{what} {path}: {exc}") from None
        return self._images[key]

    def images(self, paths: Sequence[Path], what: str = "image") -> np.ndarray:
        """The images at ``paths`` as one ``(N, H, W, C)`` float32 array (see :meth:`image`)."""
        out = np.empty((len(paths), *self.preprocessing.input_shape), dtype=np.float32)
        for i, path in enumerate(paths):
            out[i] = self.image(path, what)
        return out
