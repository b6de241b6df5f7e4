"""The one font every figure is drawn with: explain's overlay, the training figures, the
capsule grid."""

from __future__ import annotations

import functools

from PIL import ImageFont

#: Pixel size of figure text. At Pillow's default of 10 px, hinting draws the words of its
#: FreeType font all but together ("lowers thisanswer", "rows:dimensions0-15"): the blank
#: between two words is 1 to 2 pixel columns, as between letters. At 15 px it is at least 3
#: in every figure's text (Pillow 13, tests/test_fonts.py).
TEXT_SIZE = 15


@functools.lru_cache(maxsize=8)
def figure_font(size: int = TEXT_SIZE) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's scalable default font at ``size`` pixels (Pillow >= 10.1 with FreeType); where
    Pillow has no FreeType, its bitmap font, whose spaces are wide at its one size."""
    return ImageFont.load_default(size=size)
