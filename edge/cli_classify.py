"""``capsedge classify`` and ``capsedge explain``: images (or folders of them) in, answers out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .boundary import EXIT_FAILED, error_boundary, fail, fail_and_exit, printable
from .cli_options import backend_option, model_option, threads_option
from .errors import CapsedgeError, ImageError, reason
from .limits import DEFAULT_GRID, MAX_GRID, MIN_GRID
from .outputs import refuse_overwrite
from .report import NOT_AN_XRAY, confidence_note, format_text, write_csv


def expand_inputs(paths: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """Files as given; a directory becomes its images (recursively, sorted).

    Inside a directory, files with an image suffix and files with no suffix
    (DICOM exports often have none) are taken; hidden files are skipped. Each
    entry is ``(path, None)``, or ``(path, reason)`` for a folder or entry that
    could not be read (it fails alone; the walk goes on).
    """
    from .folders import walk_images

    entries: list[tuple[str, str | None]] = []
    for given in paths:
        folder = Path(given)
        try:
            is_folder = bool(given) and folder.is_dir()
        except (OSError, ValueError):  # a name too long, a folder we may not search: classify reports it
            is_folder = False
        if not is_folder:
            entries.append((given, None))
            continue
        found, problems = walk_images(folder, allow_no_suffix=True)
        walked = [(str(path), None) for path in found] + [(str(path), why) for path, why in problems]
        entries.extend(sorted(walked, key=lambda entry: entry[0]))
    return entries


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=str, readable=False))
@model_option()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line per image.")
@backend_option()
@click.option("--csv", "csv_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write one row per image to this CSV file.")
@threads_option()
def classify(images: tuple[str, ...], model_path: Path | None, as_json: bool, backend: str,
             csv_path: Path | None, threads: int | None) -> None:
    """Classify X-ray images (PNG, JPEG, TIFF, BMP, DICOM, ...) or folders of them."""
    from .classifier import Classifier

    with error_boundary():
        classifier = Classifier.load(model_path, backend=backend, threads=threads)

    files = expand_inputs(images)
    if not files:
        fail_and_exit("no images found in " + ", ".join(images))
    if csv_path is not None:
        with error_boundary():
            refuse_overwrite(csv_path, [path for path, _ in files] + [classifier.model_path], "--csv")
    rows: list[dict[str, object]] = []
    failed = 0
    for image, problem in files:
        try:
            if problem is not None:
                raise ImageError(problem)
            prediction = classifier.classify(image)
        except CapsedgeError as exc:
            failed += 1
            fail(f"{image}: {exc}")
            rows.append({"path": image, "error": str(exc)})
            if as_json:
                click.echo(json.dumps({"path": image, "error": str(exc)}, allow_nan=False))
            continue
        record = {"path": image, **prediction.to_dict()}
        rows.append(record)
        if as_json:
            click.echo(json.dumps(record, allow_nan=False))  # strict JSON: NaN is refused upstream
        else:
            click.echo(format_text(image, prediction))
    if csv_path is not None:
        try:
            write_csv(csv_path, rows, classifier.labels)
        except OSError as exc:
            fail_and_exit(f"cannot write {csv_path} ({reason(exc)})")
    if failed:
        if len(files) > 1:
            fail(f"{failed} of {len(files)} images failed")
        sys.exit(EXIT_FAILED)


@click.command()
@click.argument("image", type=click.Path(path_type=str, readable=False))
@click.option("--out", "out_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Overlay PNG to write. Default: <image name>.explain.png in this folder.")
@model_option()
@backend_option()
@click.option("--grid", type=click.IntRange(MIN_GRID, MAX_GRID), default=DEFAULT_GRID, show_default=True,
              help="Squares per side hidden in turn (one inference each, after the answer's).")
@threads_option()
@click.option("--json", "as_json", is_flag=True, help="Print the heat grid and figures as JSON.")
def explain(image: str, out_path: Path | None, model_path: Path | None, backend: str, grid: int,
            threads: int | None, as_json: bool) -> None:
    """Show where the model looked: an occlusion heat map over the X-ray, as a PNG."""
    from .classifier import Classifier
    from .explain import occlusion_map, render_overlay
    from .progress import Progress

    out = out_path if out_path is not None else Path(Path(image).name + ".explain.png")
    with error_boundary():
        classifier = Classifier.load(model_path, backend=backend, threads=threads)
        refuse_overwrite(out, [image, classifier.model_path], "--out")
    bar = Progress("explain")
    try:
        explanation = occlusion_map(classifier, image, grid, progress=bar.update)
    except CapsedgeError as exc:
        bar.close()
        fail_and_exit(f"{printable(image)}: {exc}")
    bar.close()
    try:
        render_overlay(explanation).save(out, format="PNG")
    except OSError as exc:
        fail_and_exit(f"cannot write {out} ({reason(exc)})")
    if as_json:
        click.echo(json.dumps({"path": image, "overlay": str(out), **explanation.to_dict()}))
    else:
        p = explanation.prediction
        answer = (f"{NOT_AN_XRAY}, no answer: {p.ood_reason}" if p.out_of_distribution
                  else f"{p.label} ({confidence_note(p)})")
        click.echo(f"{printable(image)}: {answer}; overlay {printable(str(out))} "
                   f"({explanation.inferences} inferences, {explanation.seconds:.1f} s)")
