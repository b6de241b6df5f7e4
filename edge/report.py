"""How a prediction is shown: one line of text per image, one CSV row per image."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from .boundary import printable

if TYPE_CHECKING:
    from .classifier import Prediction


#: What text output and the page lead with for an out-of-distribution image, instead of a maker.
NOT_AN_XRAY = "not a shoulder-implant X-ray"


def confidence_note(prediction: Prediction) -> str:
    """The answer's confidence with its flag: ``"90.0 %, uncertain"``, ``"25.4 %, uncalibrated"``."""
    flags = {None: ", uncalibrated", True: ", uncertain", False: ""}
    flag = flags[prediction.uncertain]
    return f"{100 * prediction.confidence:.1f} %{flag}"


def format_text(path: str, prediction: Prediction) -> str:
    """One line per image: the answer with its confidence and flags, then every class's probability;
    an out-of-distribution image leads with :data:`NOT_AN_XRAY` and names no maker."""
    if prediction.out_of_distribution:
        return f"{printable(path)}: {NOT_AN_XRAY}, no answer: {prediction.ood_reason}"
    scores = "  ".join(f"{name} {100 * p:5.1f} %" for name, p in prediction.probabilities.items())
    return f"{printable(path)}: {prediction.label} ({confidence_note(prediction)})   {scores}"


def write_csv(path: Path, rows: list[dict[str, object]], labels: tuple[str, ...]) -> None:
    """One row per image: path, label, answer (empty out of distribution), one probability column
    per class, latency, model version, the flags with their threshold and reason, error."""
    # surrogateescape: file names that are not valid UTF-8 are written back byte for byte.
    with path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "answer", *(f"p_{label}" for label in labels), "latency_ms",
                         "model_version", "uncertain", "threshold", "out_of_distribution", "ood_reason",
                         "error"])
        for row in rows:
            probabilities = row.get("probabilities") or {}
            threshold = row.get("threshold")
            writer.writerow([
                _cell(row["path"]),
                _cell(row.get("label", "")),
                _cell(row.get("answer") or ""),
                *(f"{probabilities[label]:.6f}" if probabilities else "" for label in labels),
                row.get("latency_ms", ""),
                _cell(row.get("model_version", "")),
                _csv_flag(row.get("uncertain")),
                "" if threshold is None else threshold,
                _csv_flag(row.get("out_of_distribution")),
                _cell(row.get("ood_reason") or ""),
                _cell(row.get("error", "")),
            ])


def _csv_flag(value: object) -> str:
    return "" if value is None else str(bool(value)).lower()


#: A cell starting with one of these is a formula to a spreadsheet (CSV injection).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> object:
    """A text cell a spreadsheet shows as text: a leading ``'`` before a formula character."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value
