"""``capsedge export`` (also ``python export/quantize.py``): options in, files and a report out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from capsedge.boundary import error_boundary, import_tensorflow_quietly, quiet_native_logs
from capsedge.export.calibration import CALIBRATION_IMAGES
from capsedge.export.formats import FORMATS
from capsedge.export.run import trust_sources
from capsedge.export.writer import ExportOptions, check_arguments, export, steps
from capsedge.outputs import refuse_overwrite
from capsedge.progress import Progress
from capsedge.views import RECIPE_VIEWS, VIEW_COUNTS
from capsedge.workshop.run import CrossValidation


class StepCounter:
    """An export's ``progress`` callback: each call is the next step, shown on ``bar``."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.count = 0

    def __call__(self, note: str) -> None:
        self.bar.update(self.count, note=note)
        self.count += 1


def _cli() -> Any:
    import click

    @click.command(name="export", context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--model", "model", required=True, type=click.Path(path_type=Path),
                  help="A run folder from 'capsedge train', or its classifier.keras.")
    @click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
                  help="Folder for the exported files and report.json / report.md.")
    @click.option("--formats", default="tflite-f32", show_default=True,
                  help=f"Comma-separated: {', '.join(FORMATS)}.")
    @click.option("--calib", type=click.Path(path_type=Path), default=None,
                  help="Folder of images for int8 calibration (any layout).")
    @click.option("--calib-limit", type=click.IntRange(1), default=CALIBRATION_IMAGES, show_default=True,
                  help="Calibration images used at most.")
    @click.option("--eval", "eval_dir", type=click.Path(path_type=Path), default=None,
                  help="Folder of images to verify on (Maker.N.jpg or Maker/...). Default: --calib.")
    @click.option("--eval-limit", type=click.IntRange(1), default=None,
                  help="Verify on the first N evaluation images only.")
    @click.option("--version", "version", default=None, help="Model version to record.")
    @click.option("--cross-validation", "cv_dir", type=click.Path(path_type=Path), default=None,
                  help="A 'capsedge train --folds K' folder of the same recipe: its figures go "
                       "into the model's provenance. Default: the folder above a 'final' run.")
    @click.option("--train-data", "train_data", type=click.Path(path_type=Path), default=None,
                  help="The images the run was trained on: with --cross-validation, the files get "
                       "calibrated confidence, an 'uncertain' threshold and outlier statistics. "
                       "Default: the data folder the run recorded.")
    @click.option("--test-time-views", "test_time_views", type=click.Choice([str(n) for n in VIEW_COUNTS]),
                  default=str(RECIPE_VIEWS), show_default=True,
                  help="Views of each image the runtime averages (16: the flips and quarter turns of "
                       "the image and of the image turned 45 degrees, as in the recipe and the bundled "
                       "model; 8: the first eight; 4: the flips); with --train-data the calibration is "
                       "fitted for that average.")
    @click.option("--score-folds", is_flag=True,
                  help="First score each fold of the cross-validation as an int8 file on its held-out "
                       "images (saved in the fold folders), so that the int8 files are calibrated on "
                       "int8 answers. A release step; needs the trust section's sources.")
    @click.option("--no-verify", is_flag=True, help="Write the files only; no report.")
    @click.option("--verbose", is_flag=True, help="Show TensorFlow's own start-up and log lines.")
    @click.option("--allow-fail", is_flag=True,
                  help="Exit 0 even when a verification check fails (the report still says which).")
    def command(model: Path, out_dir: Path, formats: str, calib: Path | None, calib_limit: int,
                eval_dir: Path | None, eval_limit: int | None, version: str | None, cv_dir: Path | None,
                train_data: Path | None, test_time_views: str, score_folds: bool, no_verify: bool,
                allow_fail: bool, verbose: bool) -> None:
        """Export a trained model to TFLite / ONNX / Edge TPU files and verify them."""
        names = [f.strip() for f in formats.split(",") if f.strip()]
        with error_boundary(extra="export"), quiet_native_logs(verbose):
            # Not an input itself; inside one is fine (the files written are no images and
            # have names of their own, so nothing is overwritten or read back as data).
            refuse_overwrite(out_dir, [p for p in (model, calib, eval_dir, train_data, cv_dir) if p],
                             "--out")
            from capsedge.export.verify import check_evaluation, verify_export

            check_arguments(names, calib, model)
            if not no_verify:
                check_evaluation(eval_dir if eval_dir is not None else calib)
            cv_dir, train_data, note = trust_sources(model, cv_dir, train_data)
            options = ExportOptions(formats=tuple(names), calibration=calib, calibration_limit=calib_limit,
                                    version=version, cross_validation=cv_dir, train_data=train_data,
                                    test_time_views=int(test_time_views), score_folds=score_folds)
            folds = len(CrossValidation(cv_dir).folds()) if score_folds and cv_dir is not None else 0
            import_tensorflow_quietly(verbose)
            with Progress("export", steps(names, train_data is not None, not no_verify, folds)) as bar:
                step = StepCounter(bar)
                result = export(model, out_dir, options, progress=step)
                report = None if no_verify else verify_export(result, eval_dir, eval_limit, progress=step)
                bar.update(bar.total, note="done")
        from capsedge.export.edgetpu_format import describe

        for name, path in result.files.items():
            what = f"; {describe(path)}" if name == "edgetpu" else ""
            click.echo(f"{name}: {path} ({path.stat().st_size / 1024:.1f} KiB{what})")
        if note is not None:  # after the files, so that an error stays the only line
            click.echo(f"capsedge: note: {note}", err=True)
        if report is None:
            return
        click.echo(f"report: {Path(out_dir) / 'report.md'}")
        if report.passed:
            click.echo(f"verification: all {len(report.checks)} checks passed")
            return
        failures = "; ".join(f"{c.artifact} {c.name} = {c.value} (goal {c.goal})" for c in report.failed)
        click.echo(f"capsedge: {'warning' if allow_fail else 'error'}: verification failed: {failures}",
                   err=True)
        if not allow_fail:
            raise SystemExit(1)

    return command


command = _cli()
