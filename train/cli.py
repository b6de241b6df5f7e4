"""``capsedge train``: a thin command over :func:`capsedge.train.trainer.train`; its recipe options
are generated from :class:`~capsedge.train.config.TrainConfig`'s fields."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from capsedge.boundary import error_boundary, import_tensorflow_quietly, quiet_native_logs
from capsedge.errors import UsageError
from capsedge.outputs import refuse_inside
from capsedge.train.config import TrainConfig, options
from capsedge.workshop.run import CrossValidation


def recipe_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One ``--option`` per :class:`TrainConfig` field (its flag, type, default and help), passed
    to ``command`` under the field's name."""
    for name, option, default in reversed(options()):
        flag = option.flag or f"--{name.replace('_', '-')}"
        command = click.option(flag, name, type=option.type, default=default, show_default=True,
                               help=option.help)(command)
    return command


@click.command(name="train", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Flat folder (Maker.N.jpg), a folder per class, or a CSV of path,label.")
@click.option("--out", "run_dir", required=True, type=click.Path(path_type=Path),
              help="Run folder: config, history, metrics, classifier.keras.")
@recipe_options
@click.option("--folds", type=click.IntRange(2), default=None,
              help="Stratified K-fold cross-validation instead of one hold-out split.")
@click.option("--final", is_flag=True,
              help="With --folds: then train the recipe on every image into OUT/final (the weights to ship).")
@click.option("--fold", "parts", multiple=True, metavar="K|final",
              help="With --folds: train only this part (repeatable), resuming it; processes training "
              "different parts can share OUT, and the one that finds every fold done writes the summary.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Threads that augment batches (results do not depend on it).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--reuse", type=click.Path(path_type=Path), default=None,
              help="With --stage1-readout: a finished run (with --folds, cross-validation) of this recipe "
              "without it, whose trained weights are kept; nothing trains, the read-out is added and the "
              "held-out images are scored again.")
@click.option("--attribution", default=None,
              help="Credit the data set (name, source, licence), recorded in the run and every export; "
              "'uci-517' names the public UCI data set. Default: a capsedge-data.json in --data, else "
              "none.")
@click.option("--verbose", is_flag=True, help="Show TensorFlow's own start-up and log lines.")
def command(data: Path, run_dir: Path, folds: int | None, final: bool, parts: tuple[str, ...], workers: int,
            resume: bool, reuse: Path | None, attribution: str | None, verbose: bool, **recipe: Any) -> None:
    """Train a capsule network on labelled X-rays."""
    from capsedge.train.cross_validation import cross_validate
    from capsedge.train.trainer import train
    from capsedge.workshop.dataset import read_dataset

    with error_boundary(extra="train"), quiet_native_logs(verbose):
        # What can be checked without TensorFlow is checked first.
        dataset = read_dataset(data).with_attribution(attribution)
        config = TrainConfig(**recipe)
        if parts and not folds:
            raise UsageError("--fold needs --folds")
        chosen = [part if part == CrossValidation.FINAL else _fold_number(part) for part in parts] or None
        if reuse is not None and not config.stage1_readout:
            raise UsageError("--reuse adds the stage-1 read-out to a trained run: give --stage1-readout too")
        if reuse is not None and (config.readout_loss or config.distill_readout):
            raise UsageError("--reuse copies the read-out without training: drop --readout-loss and "
                             "--distill-readout")
        refuse_inside(run_dir, [data, reuse], "--out")
        import_tensorflow_quietly(verbose)
        if folds:
            summary = cross_validate(dataset, run_dir, config, folds=folds, resume=resume, workers=workers,
                                     final=final, parts=chosen, reuse=reuse)
            if summary is None:
                click.echo(f"trained {', '.join(parts)} in {run_dir}; the summary is written once every "
                           "fold is done")
                return
            click.echo(
                f"{folds}-fold accuracy {summary['accuracy_mean']:.3f} ± {summary['accuracy_std']:.3f}, "
                f"macro-F1 {summary['macro_f1_mean']:.3f} ± {summary['macro_f1_std']:.3f}"
            )
            click.echo(f"summary written to {CrossValidation(run_dir).summary}")
            if final:
                click.echo(final_run_line(CrossValidation(run_dir)))
            return
        if reuse is not None:
            from capsedge.train.readout import reuse_trained

            result = reuse_trained(dataset, run_dir, config, reuse)
        else:
            result = train(dataset, run_dir, config, resume=resume, workers=workers)
    held = result.metrics.get("holdout")
    if held:
        click.echo(f"held-out accuracy {held['accuracy']:.3f}, macro-F1 {held['macro_f1']:.3f}")
    click.echo(f"run written to {result.run_dir}")


def final_run_line(cv: CrossValidation) -> str:
    """What a ``--final`` cross-validation says of its final run: where it is, or that it is still to
    train (``--fold K`` alone finishes the folds and writes the summary, not the final run)."""
    if cv.final.is_finished():
        return f"final run in {cv.final.path}"
    return f"the final run is not trained yet: --fold final trains it into {cv.final.path}"


def _fold_number(part: str) -> int:
    """A ``--fold`` value that is not ``final``, as a fold number."""
    if not part.isascii() or not part.isdigit() or len(part) > 3:
        raise UsageError(f"--fold takes a fold number or final, got {part!r}")
    return int(part)
