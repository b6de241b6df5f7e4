"""``capsedge train``: a thin command over :func:`capsedge.train.trainer.train`."""

from __future__ import annotations

from pathlib import Path

import click

from capsedge.boundary import error_boundary, import_tensorflow_quietly, quiet_native_logs
from capsedge.errors import UsageError
from capsedge.outputs import refuse_inside
from capsedge.train.augment import AUGMENTATIONS
from capsedge.train.config import INITS, TrainConfig

DEFAULT = TrainConfig()  # the bundled model's recipe: one source for the options' defaults


@click.command(name="train", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Flat folder (Maker.N.jpg), a folder per class, or a CSV of path,label.")
@click.option("--out", "run_dir", required=True, type=click.Path(path_type=Path),
              help="Run folder: config, history, metrics, classifier.keras.")
@click.option("--model", default=DEFAULT.model, show_default=True,
              help="Model configuration name.")
@click.option("--epochs", type=click.IntRange(1), default=DEFAULT.epochs, show_default=True,
              help="Passes over the data.")
@click.option("--batch-size", type=click.IntRange(1), default=DEFAULT.batch_size,
              show_default=True, help="Images per step.")
@click.option("--lr", "learning_rate", type=float, default=DEFAULT.learning_rate, show_default=True,
              help="Peak learning rate (warm-up, then cosine decay to 1 %).")
@click.option("--beta", type=click.FloatRange(0, 1, max_open=True), default=DEFAULT.beta,
              show_default=True, help="Class-balanced loss beta (0: no reweighting).")
@click.option("--reconstruction-weight", type=click.FloatRange(0), default=DEFAULT.reconstruction_weight,
              show_default=True,
              help="Weight of the decoder's reconstruction loss (0: the decoder does not train the net).")
@click.option("--ncp-weight", type=click.FloatRange(0), default=DEFAULT.ncp_weight, show_default=True,
              help="Weight of the NCP head's cross-entropy, for models with one.")
@click.option("--holdout", type=click.FloatRange(0, 1, max_open=True), default=DEFAULT.holdout,
              show_default=True, help="Fraction of each class held out for evaluation.")
@click.option("--folds", type=click.IntRange(2), default=None,
              help="Stratified K-fold cross-validation instead of one hold-out split.")
@click.option("--final", is_flag=True,
              help="With --folds: then train the recipe on every image into OUT/final (the weights to ship).")
@click.option("--fold", "parts", multiple=True, metavar="K|final",
              help="With --folds: train only this part (repeatable), resuming it; processes training "
              "different parts can share OUT, and the one that finds every fold done writes the summary.")
@click.option("--augment", type=click.Choice(list(AUGMENTATIONS)), default=DEFAULT.augment, show_default=True,
              help="d4: flips and quarter turns (+ small rotation, zoom); d4-strong: d4 with more zoom, "
              "shifts, contrast and brightness; full: any rotation, shifts, contrast; none.")
@click.option("--mixup", type=click.FloatRange(0), default=DEFAULT.mixup, show_default=True,
              help="Mix training images and their labels, weight ~ Beta(a, a) (e.g. 0.2; 0: off).")
@click.option("--ema", type=click.FloatRange(0, 1, max_open=True), default=DEFAULT.ema, show_default=True,
              help="Keep a moving average of the weights with this momentum (e.g. 0.99) and end on it.")
@click.option("--weight-decay", type=click.FloatRange(0), default=DEFAULT.weight_decay, show_default=True,
              help="Decoupled weight decay (AdamW); 0: Adam.")
@click.option("--warmup", type=click.FloatRange(0, 1, max_open=True), default=DEFAULT.warmup,
              show_default=True,
              help="Fraction of the steps with a linear learning-rate warm-up.")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True),
              default=DEFAULT.label_smoothing, show_default=True,
              help="Label smoothing of the cross-entropy heads (NCP, linear).")
@click.option("--init", default=DEFAULT.init, show_default=True,
              help=f"Start a pretrained trunk from its ImageNet weights ({INITS[0]}), random ones "
              f"({INITS[1]}), or the trunk a stage-1 run trained (run:PATH; with --folds, fold K starts "
              "from PATH/fold-K).")
@click.option("--freeze-stages", type=click.IntRange(0, 7), default=DEFAULT.freeze_stages, show_default=True,
              help="Keep the trunk's stem and first N stages fixed (faster on a CPU).")
@click.option("--int8-trunk", type=click.FloatRange(0, 1), default=DEFAULT.int8_trunk, show_default=True,
              help="Fraction of the training maps read from the frozen trunk converted to int8 (the "
              "layers above learn to read int8 maps too; 0: float only).")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Threads that augment batches (results do not depend on it).")
@click.option("--seed", type=int, default=DEFAULT.seed, show_default=True, help="Makes a run repeatable.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--attribution", default=None,
              help="Credit the data set (name, source, licence), recorded in the run and every export; "
              "'uci-517' names the public UCI data set. Default: a capsedge-data.json in --data, else "
              "none.")
@click.option("--verbose", is_flag=True, help="Show TensorFlow's own start-up and log lines.")
def command(data: Path, run_dir: Path, model: str, epochs: int, batch_size: int, learning_rate: float,
            beta: float, reconstruction_weight: float, ncp_weight: float, holdout: float, folds: int | None,
            final: bool, parts: tuple[str, ...], augment: str, mixup: float, ema: float, weight_decay: float,
            warmup: float,
            label_smoothing: float, init: str, freeze_stages: int, int8_trunk: float, workers: int, seed: int,
            resume: bool, attribution: str | None, verbose: bool) -> None:
    """Train a capsule network on labelled X-rays."""
    from capsedge.train.data import read_dataset
    from capsedge.train.trainer import cross_validate, train

    with error_boundary(extra="train"), quiet_native_logs(verbose):
        # What can be checked without TensorFlow is checked first.
        dataset = read_dataset(data).with_attribution(attribution)
        config = TrainConfig(model=model, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                             beta=beta, reconstruction_weight=reconstruction_weight,
                             ncp_weight=ncp_weight, holdout=holdout, augment=augment, seed=seed,
                             mixup=mixup, ema=ema, weight_decay=weight_decay, warmup=warmup,
                             label_smoothing=label_smoothing, init=init, freeze_stages=freeze_stages,
                             int8_trunk=int8_trunk)
        if parts and not folds:
            raise UsageError("--fold needs --folds")
        chosen = [part if part == "final" else _fold_number(part) for part in parts] or None
        refuse_inside(run_dir, [data], "--out")
        import_tensorflow_quietly(verbose)
        if folds:
            summary = cross_validate(dataset, run_dir, config, folds=folds, resume=resume, workers=workers,
                                     final=final, parts=chosen)
            if summary is None:
                click.echo(f"trained {', '.join(parts)} in {run_dir}; the summary is written once every "
                           "fold is done")
                return
            click.echo(
                f"{folds}-fold accuracy {summary['accuracy_mean']:.3f} ± {summary['accuracy_std']:.3f}, "
                f"macro-F1 {summary['macro_f1_mean']:.3f} ± {summary['macro_f1_std']:.3f}"
            )
            click.echo(f"summary written to {Path(run_dir) / 'cv_summary.json'}")
            if final:
                click.echo(f"final run written to {Path(run_dir) / 'final'}")
            return
        result = train(dataset, run_dir, config, resume=resume, workers=workers)
    held = result.metrics.get("holdout")
    if held:
        click.echo(f"held-out accuracy {held['accuracy']:.3f}, macro-F1 {held['macro_f1']:.3f}")
    click.echo(f"run written to {result.run_dir}")


def _fold_number(part: str) -> int:
    """A ``--fold`` value that is not ``final``, as a fold number."""
    if not part.isascii() or not part.isdigit() or len(part) > 3:
        raise UsageError(f"--fold takes a fold number or final, got {part!r}")
    return int(part)
