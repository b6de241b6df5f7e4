"""Where the model looked: occlusion sensitivity through the exported model, as a PNG overlay.

Each square of a ``grid`` x ``grid`` tiling of the image is blacked out in turn (black is
what an X-ray shows where there is nothing) and the model run again; the square's heat is
how much the calibrated probability of the predicted label falls. Works on every backend
(it only runs the model), without TensorFlow. The label and its confidence are the ones
``classify`` gives (averaged over the model's test-time views); the occlusions are run on
the image as given, one view each: ``grid**2 + 1`` inferences for a one-view model,
``grid**2 + views + 1`` otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .classifier import Classifier, Prediction
from .errors import UsageError
from .fonts import figure_font
from .limits import DEFAULT_GRID, MAX_GRID, MIN_GRID
from .preprocess import ImageSource, content_box, load_grey, not_a_radiograph, to_model_input

#: The overlay's longer image side, in pixels.
OVERLAY_SIDE = 512
#: Colour map anchors (dark blue -> purple -> orange -> yellow), for heat 0 .. 1.
_ANCHORS = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]],
                    dtype=np.float32)


@dataclass(frozen=True)
class Explanation:
    """An occlusion map.

    Attributes:
        label: the predicted label.
        confidence: its calibrated probability on the whole image.
        heat: ``(grid, grid)`` fall of that label's probability (one view) when each square is
            hidden (negative: hiding it raised the probability), rows top to bottom over the
            image itself.
        grey: the image as read (greyscale), for drawing.
        seconds: time taken.
        inferences: model runs made.
        prediction: the whole answer, with the flags ``classify`` gives (uncertain,
            out of distribution).
    """

    label: str
    confidence: float
    heat: np.ndarray
    grey: Image.Image
    seconds: float
    inferences: int
    prediction: Prediction

    def to_dict(self) -> dict[str, object]:
        """JSON-ready figures (the grid rounded to 4 decimals), with the flags of ``classify --json``."""
        p = self.prediction
        return {
            "answer": p.answer,
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "model_version": p.model_version,
            "uncertain": p.uncertain,
            "calibrated": p.calibrated,
            "threshold": p.threshold,
            "out_of_distribution": p.out_of_distribution,
            "ood_reason": p.ood_reason,
            "grid": int(self.heat.shape[0]),
            "heat": np.round(self.heat.astype(np.float64), 4).tolist(),
            "seconds": round(self.seconds, 3),
            "inferences": self.inferences,
        }


def occlusion_map(classifier: Classifier, image: ImageSource, grid: int = DEFAULT_GRID,
                  progress: Callable[[int, int], None] | None = None) -> Explanation:
    """Occlusion sensitivity of ``classifier``'s answer on ``image``.

    Args:
        grid: squares per side, :data:`~capsedge.limits.MIN_GRID` to :data:`~capsedge.limits.MAX_GRID`.
        progress: called as ``progress(done, total)`` after each inference.

    Raises:
        UsageError: ``grid`` out of range.
        ImageError: the image cannot be read.
    """
    if isinstance(grid, bool) or not isinstance(grid, int) or not MIN_GRID <= grid <= MAX_GRID:
        raise UsageError(f"grid must be an integer from {MIN_GRID} to {MAX_GRID}, got {grid!r}")
    start = time.perf_counter()
    config = classifier.metadata.preprocessing
    grey = load_grey(image, config.input_size)
    tensor = to_model_input(grey, config)
    top, left, height, width = content_box(grey.size, config.input_size)
    views = classifier.test_time_views
    prediction = classifier.classify_tensor(tensor, start, not_a_radiograph(grey))
    answer = np.array(list(prediction.probabilities.values()), np.float32)
    target = classifier.labels.index(prediction.label)
    base = answer if views == 1 else classifier.probabilities(tensor, views=1)
    first = views + (views > 1)  # inferences before the occlusions
    rows = np.linspace(top, top + height, grid + 1).round().astype(int)
    cols = np.linspace(left, left + width, grid + 1).round().astype(int)
    heat = np.zeros((grid, grid), np.float32)
    total = first + grid * grid
    if progress is not None:
        progress(first, total)
    for i in range(grid):
        for j in range(grid):
            hidden = tensor.copy()
            hidden[rows[i]:rows[i + 1], cols[j]:cols[j + 1]] = 0.0
            heat[i, j] = base[target] - classifier.probabilities(hidden, views=1)[target]
            if progress is not None:
                progress(first + 1 + i * grid + j, total)
    return Explanation(prediction.label, prediction.confidence, heat, grey, time.perf_counter() - start,
                       total, prediction)


def title(explanation: Explanation) -> str:
    """The overlay's title: the answer with its flag, or "Not a shoulder-implant X-ray" (no maker)."""
    p = explanation.prediction
    if p.out_of_distribution:
        return "Not a shoulder-implant X-ray: no answer (map of what moved the top class)"
    flag = {None: ", uncalibrated", True: ", UNCERTAIN", False: ""}[p.uncertain]
    return f"{p.label} ({100 * p.confidence:.1f} %{flag}): where hiding the image lowers this answer"


def heat_colours(values: np.ndarray) -> np.ndarray:
    """``uint8`` RGB colours for values in [0, 1] (dark blue through orange to yellow)."""
    position = np.clip(np.asarray(values, np.float32), 0.0, 1.0) * (len(_ANCHORS) - 1)
    low = np.minimum(position.astype(int), len(_ANCHORS) - 2)
    fraction = (position - low)[..., np.newaxis]
    return np.round(_ANCHORS[low] * (1 - fraction) + _ANCHORS[low + 1] * fraction).astype(np.uint8)


def render_overlay(explanation: Explanation, side: int = OVERLAY_SIDE) -> Image.Image:
    """The X-ray at its aspect ratio with the heat blended over it, a title line with the label
    and confidence, and a colour bar (0 to the largest fall) on the right."""
    grey = explanation.grey
    scale = side / max(grey.size)
    size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
    picture = np.asarray(grey.convert("L").resize(size, Image.Resampling.BILINEAR), np.float32)
    peak = float(max(explanation.heat.max(), 1e-6))
    heat = Image.fromarray(np.clip(explanation.heat / peak, 0, 1).astype(np.float32), mode="F")
    heat = np.asarray(heat.resize(size, Image.Resampling.BILINEAR), np.float32)
    colours = heat_colours(heat).astype(np.float32)
    alpha = (0.65 * heat)[..., np.newaxis]
    blended = picture[..., np.newaxis] * (1 - alpha) + colours * alpha
    font = figure_font()
    heading = title(explanation)
    top_label = f"-{100 * peak:.0f} pts"
    title_h, bar_w, margin = 34, 18, 8
    bar_x = size[0] + 2 * margin
    width = max(bar_x + bar_w + 4 * margin, bar_x + round(font.getlength(top_label)) + margin,
                round(font.getlength(heading)) + 2 * margin)  # nothing drawn past the edge
    canvas = Image.new("RGB", (width, size[1] + title_h + margin), "white")
    canvas.paste(Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8)), (margin, title_h))
    draw = ImageDraw.Draw(canvas)
    warn = explanation.prediction.out_of_distribution or explanation.prediction.uncertain is not False
    draw.text((margin, 8), heading, fill="#a11d1d" if warn else "black", font=font)
    ramp = heat_colours(np.linspace(1, 0, size[1]))[:, np.newaxis, :].repeat(bar_w, axis=1)
    canvas.paste(Image.fromarray(ramp), (bar_x, title_h))
    draw.rectangle((bar_x, title_h, bar_x + bar_w - 1, title_h + size[1] - 1), outline="black")
    draw.text((bar_x, title_h - 17), top_label, fill="black", font=font)
    draw.text((bar_x + 3, title_h + size[1] - 18), "0", fill="white", font=font)
    return canvas
