"""Figure text: words stay apart (Pillow's 10 px default drew "lowers thisanswer"), and every
figure draws its text in the one figure font."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from capsedge.explain import occlusion_map, render_overlay
from capsedge.fonts import figure_font

from test_explain import evidence_image, stub_classifier

#: Text the figures draw, where words ran together.
SAMPLES = ("where hiding the image lowers this answer", "rows: dimensions 0-15",
           "rows: true class, columns: predicted", "winning capsule: Depuy (length 0.93)",
           "confidence (x) / accuracy (y)")


def inked_columns(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str, width: int) -> np.ndarray:
    """Which pixel columns ``text`` inks, drawn at x = 4."""
    image = Image.new("L", (width, 48), 0)
    ImageDraw.Draw(image).text((4, 4), text, fill=255, font=font)
    return (np.asarray(image) > 0).any(axis=0)


def word_gaps(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> list[int]:
    """Blank pixel columns between each word's last ink and the next word's first."""
    width = round(font.getlength(text)) + 12
    whole = inked_columns(font, text, width)
    gaps = []
    for i in (i for i, c in enumerate(text) if c == " "):
        right = np.flatnonzero(inked_columns(font, text[:i], width))[-1]
        gaps.append(int(np.flatnonzero(whole[right + 1:])[0]))
    return gaps


@pytest.mark.parametrize("text", SAMPLES)
def test_words_are_drawn_apart(text: str) -> None:
    """At least 3 blank pixel columns between words (Pillow's default 10 px font leaves 1 or 2,
    as between letters: "lowers thisanswer")."""
    font = figure_font()
    assert min(word_gaps(font, text)) >= 3, word_gaps(font, text)
    assert font.getlength("a b") >= font.getlength("ab") + 3


def test_every_figure_draws_its_text_in_the_figure_font(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    from capsedge.train.capsule_view import DELTAS, CapsuleGrid, render_grid
    from capsedge.train.figures import (
        TRAIN_COLOUR,
        save_confusion_png,
        save_learning_curves_png,
        save_per_class_png,
        save_reliability_png,
    )

    fonts: list[object] = []
    real_text = ImageDraw.ImageDraw.text

    def spy(self: ImageDraw.ImageDraw, xy: object, text: str, *args: object, **kwargs: object) -> None:
        fonts.append(kwargs.get("font"))
        real_text(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", spy)
    classes = ("a", "b")
    save_confusion_png(np.array([[3, 1], [0, 4]]), classes, tmp_path / "confusion.png")
    save_learning_curves_png({"loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "accuracy": [0.5, 0.8]},
                             tmp_path / "curves.png")
    bins = [{"count": 3, "confidence": 0.6, "accuracy": 0.5},
            {"count": 5, "confidence": 0.9, "accuracy": 0.8}]
    save_reliability_png([("held-out", bins, TRAIN_COLOUR)], tmp_path / "reliability.png")
    save_per_class_png({"per_class": {c: {"precision": 0.7, "recall": 0.6} for c in classes}},
                       tmp_path / "per_class.png")
    tiles = np.zeros((2, len(DELTAS), 8, 8))
    render_grid(CapsuleGrid("a", 0.9, tiles, tiles[0, 0], tiles[0, 0]))
    classifier, _ = stub_classifier()
    render_overlay(occlusion_map(classifier, evidence_image(), grid=2))
    assert len(fonts) > 20 and all(font is figure_font() for font in fonts)
