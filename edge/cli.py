"""The ``capsedge`` command. Thin: it parses options, calls the library, prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import CapsedgeError

EXIT_FAILED = 1


def fail(message: str) -> None:
    """Print a one-line error on stderr."""
    click.echo(f"capsedge: error: {message}", err=True)


def _format_text(path: str, label: str, probabilities: dict[str, float]) -> str:
    scores = "  ".join(f"{name} {100 * p:5.1f} %" for name, p in probabilities.items())
    return f"{path}: {label} ({100 * probabilities[label]:.1f} %)   {scores}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="capsedge")
def main() -> None:
    """Identify a shoulder implant's manufacturer from an X-ray.

    A research tool, not a medical device: confirm every result by other means.
    """


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path),
    default=None,
    help="An exported model (.tflite). Default: the bundled model.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line per image.")
@click.option("--threads", type=click.IntRange(1, 64), default=None, help="CPU threads for inference.")
def classify(images: tuple[str, ...], model_path: Path | None, as_json: bool, threads: int | None) -> None:
    """Classify one or more X-ray images (PNG, JPEG, TIFF, BMP, ...)."""
    from .classifier import Classifier

    try:
        classifier = Classifier.load(model_path, threads=threads)
    except CapsedgeError as exc:
        fail(str(exc))
        sys.exit(EXIT_FAILED)

    failed = 0
    for image in images:
        try:
            prediction = classifier.classify(image)
        except CapsedgeError as exc:
            failed += 1
            fail(f"{image}: {exc}")
            if as_json:
                click.echo(json.dumps({"path": image, "error": str(exc)}))
            continue
        if as_json:
            record = {
                "path": image,
                "label": prediction.label,
                "probabilities": prediction.probabilities,
                "latency_ms": round(prediction.latency_ms, 3),
            }
            click.echo(json.dumps(record))
        else:
            click.echo(_format_text(image, prediction.label, prediction.probabilities))
    if failed:
        if len(images) > 1:
            fail(f"{failed} of {len(images)} images failed")
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
