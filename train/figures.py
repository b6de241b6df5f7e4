"""The pictures a training run writes, drawn with Pillow (no plotting library); text in
:func:`capsedge.fonts.figure_font`.

confusion matrix, learning curves (loss and accuracy per epoch, train vs validation),
reliability diagram (accuracy against confidence per bin), per-class precision/recall bars.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from capsedge.fonts import figure_font

TRAIN_COLOUR = (31, 119, 180)
VALIDATION_COLOUR = (214, 39, 40)
SECOND_COLOUR = (255, 127, 14)


class Axes:
    """A plot area mapping data coordinates to pixels, with a frame, ticks and a title."""

    def __init__(self, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int],
                 x_range: tuple[float, float], y_range: tuple[float, float], title: str,
                 x_ticks: bool = True) -> None:
        self.draw, self.box = draw, box
        self.x_range, self.y_range = x_range, y_range
        left, top, right, bottom = box
        draw.rectangle(box, outline="black")
        draw.text((left, top - 19), title, fill="black", font=figure_font())
        for fraction in (0.0, 0.5, 1.0):
            y = y_range[0] + fraction * (y_range[1] - y_range[0])
            py = self.y(y)
            draw.line((left - 4, py, left, py), fill="black")
            draw.text((left - 36, py - 8), f"{y:.2g}", fill="black", font=figure_font())
            if x_ticks:
                x = x_range[0] + fraction * (x_range[1] - x_range[0])
                px = self.x(x)
                draw.line((px, bottom, px, bottom + 4), fill="black")
                draw.text((px - 8, bottom + 6), f"{x:.3g}", fill="black", font=figure_font())

    def x(self, value: float) -> float:
        """Pixel column of ``value``."""
        low, high = self.x_range
        return self.box[0] + (value - low) / ((high - low) or 1) * (self.box[2] - self.box[0])

    def y(self, value: float) -> float:
        """Pixel row of ``value``."""
        low, high = self.y_range
        return self.box[3] - (value - low) / ((high - low) or 1) * (self.box[3] - self.box[1])

    def line(self, xs: Sequence[float], ys: Sequence[float], colour: tuple[int, int, int], width: int = 2
             ) -> None:
        """A polyline through the finite points."""
        points = [(self.x(a), self.y(b)) for a, b in zip(xs, ys, strict=True) if np.isfinite(b)]
        if len(points) > 1:
            self.draw.line(points, fill=colour, width=width)
        elif points:
            x, y = points[0]
            self.draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)

    def legend(self, entries: Sequence[tuple[str, tuple[int, int, int]]]) -> None:
        """Coloured labels in the top-left corner."""
        for i, (text, colour) in enumerate(entries):
            x, y = self.box[0] + 8, self.box[1] + 6 + 19 * i
            self.draw.rectangle((x, y + 5, x + 10, y + 13), fill=colour)
            self.draw.text((x + 14, y), text, fill="black", font=figure_font())


def save_confusion_png(matrix: np.ndarray, classes: tuple[str, ...], path: Path) -> None:
    """A confusion matrix as a small PNG: rows true class, columns predicted, counts in cells."""
    cell, margin = 64, 90
    size = margin + cell * len(classes)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    peak = max(1, int(matrix.max()))
    for i, row in enumerate(matrix):
        draw.text((4, margin + i * cell + cell // 2 - 8), classes[i], fill="black", font=figure_font())
        draw.text((margin + i * cell + 4, margin - 22), classes[i], fill="black", font=figure_font())
        for j, count in enumerate(row):
            shade = 255 - int(200 * count / peak)
            left, top = margin + j * cell, margin + i * cell
            box = (left, top, left + cell - 1, top + cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255), outline="grey")
            draw.text((box[0] + cell // 2 - 8, box[1] + cell // 2 - 8), str(int(count)),
                      fill="black" if shade > 120 else "white", font=figure_font())
    draw.text((4, 4), "rows: true class, columns: predicted", fill="black", font=figure_font())
    image.save(path)


def save_learning_curves_png(history: dict[str, Sequence[float]], path: Path) -> None:
    """Loss and accuracy per epoch, train vs validation (``val_*`` keys), side by side.

    Accuracy is the first ``*accuracy`` key (the capsule head's, when there are several).
    """
    image = Image.new("RGB", (760, 300), "white")
    draw = ImageDraw.Draw(image)
    accuracy_keys = sorted(k for k in history if k.endswith("accuracy") and not k.startswith("val_"))
    panels = [("loss", "loss")] + ([(accuracy_keys[0], "accuracy")] if accuracy_keys else [])
    for i, (key, title) in enumerate(panels):
        train = np.asarray(history.get(key, []), np.float64)
        validation = np.asarray(history.get(f"val_{key}", []), np.float64)
        values = np.concatenate([train, validation])
        values = values[np.isfinite(values)]
        epochs = max(len(train), len(validation), 1)
        low, high = (0.0, 1.0) if title == "accuracy" else (0.0, float(values.max()) if values.size else 1.0)
        axes = Axes(draw, (60 + 370 * i, 30, 340 + 370 * i, 260), (1, max(epochs, 2)), (low, high or 1.0),
                    f"{title} per epoch")
        axes.line(range(1, len(train) + 1), train, TRAIN_COLOUR)
        axes.line(range(1, len(validation) + 1), validation, VALIDATION_COLOUR)
        entries = [("train", TRAIN_COLOUR)] + ([("validation", VALIDATION_COLOUR)] if len(validation) else [])
        axes.legend(entries)
    image.save(path)


def save_reliability_png(curves: Sequence[tuple[str, Sequence[dict], tuple[int, int, int]]], path: Path,
                         title: str = "reliability: accuracy against confidence") -> None:
    """One or more reliability curves (from :func:`capsedge.trust.reliability_bins`) against the
    diagonal of perfect calibration; each point is a confidence bin's mean confidence and accuracy,
    its dot's area the bin's share of the answers."""
    image = Image.new("RGB", (420, 400), "white")
    draw = ImageDraw.Draw(image)
    axes = Axes(draw, (60, 40, 390, 360), (0.0, 1.0), (0.0, 1.0), title)
    axes.line([0.0, 1.0], [0.0, 1.0], (160, 160, 160), width=1)
    for _, bins, colour in curves:
        kept = [b for b in bins if b["count"]]
        total = sum(b["count"] for b in kept) or 1
        axes.line([b["confidence"] for b in kept], [b["accuracy"] for b in kept], colour)
        for b in kept:
            radius = 2 + 10 * np.sqrt(b["count"] / total)
            x, y = axes.x(b["confidence"]), axes.y(b["accuracy"])
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=colour, width=2)
    axes.legend([(name, colour) for name, _, colour in curves])
    draw.text((130, 378), "confidence (x) / accuracy (y)", fill="black", font=figure_font())
    image.save(path)


def save_per_class_png(report: dict, path: Path) -> None:
    """Precision and recall bars per class (from ``classification_report``)."""
    classes = list(report["per_class"])
    image = Image.new("RGB", (100 + 110 * len(classes), 300), "white")
    draw = ImageDraw.Draw(image)
    axes = Axes(draw, (60, 30, 60 + 110 * len(classes), 250), (0, len(classes)), (0.0, 1.0),
                "precision and recall per class", x_ticks=False)
    for i, name in enumerate(classes):
        figures = report["per_class"][name]
        for j, (key, colour) in enumerate((("precision", TRAIN_COLOUR), ("recall", SECOND_COLOUR))):
            left = axes.x(i + 0.15 + 0.35 * j)
            draw.rectangle((left, axes.y(figures[key]), left + 0.33 * 110, axes.y(0.0)), fill=colour)
        draw.text((axes.x(i + 0.2), 268), name, fill="black", font=figure_font())
    axes.legend([("precision", TRAIN_COLOUR), ("recall", SECOND_COLOUR)])
    image.save(path)
