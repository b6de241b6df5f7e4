"""Stratified K-fold cross-validation: each fold a run in ``fold-K``, optionally a ``final`` run on
every image, and a summary (``cv_summary.json``) once every fold is done; the folder is a
:class:`capsedge.workshop.run.CrossValidation`."""

from __future__ import annotations

import sys
from collections.abc import Collection
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from capsedge.errors import UsageError
from capsedge.views import VIEW_AVERAGES
from capsedge.workshop.dataset import Dataset, load_images
from capsedge.workshop.run import CrossValidation, RunDir

from .config import TrainConfig, with_defaults
from .evaluation import save_evaluation_pngs
from .metrics import classification_report, stratified_folds
from .plan import TrainingPlan, plan_training
from .readout import reuse_trained
from .trainer import Part, progress_bar, train


def cross_validate(
    data: str | Path | Dataset,
    run_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    folds: int = 5,
    resume: bool = False,
    progress: bool = True,
    workers: int = 1,
    final: bool = False,
    parts: Collection[int | str] | None = None,
    reuse: str | Path | None = None,
) -> dict[str, Any] | None:
    """Stratified K-fold cross-validation; each fold is a run in ``run_dir/fold-K``.

    With ``resume``, a fold whose run is complete is not trained again, so an
    interrupted cross-validation picks up where it stopped (with the same
    settings: they are checked). Without it, ``run_dir`` must not hold folds. Writes ``cv_summary.json``
    (mean and standard deviation of accuracy and macro-F1, per-fold figures,
    pooled per-class report and confusion matrix) and ``confusion.png``. With ``final``, the
    recipe is then trained on every image into ``run_dir/final`` (the weights to ship, beside
    their figures; frozen-trunk maps are computed once for both).

    ``parts`` (fold numbers and/or ``"final"``) trains only those parts, resuming each, so that
    several processes can share one cross-validation (one part each, e.g. on a GPU machine);
    the summary is written by the call that finds every fold done, else ``None`` is returned.
    With ``init="run:PATH"``, fold K starts from the trunk of ``PATH/fold-K``, which must have
    held out the same images (else the cross-validation would not be honest), and the final run
    from ``PATH/final``. With ``reuse`` (a cross-validation of the same recipe without
    ``stage1_readout``), each part is made from that folder's same part by
    :func:`capsedge.train.readout.reuse_trained` instead of trained.
    """
    dataset, plan = plan_training(data, config or TrainConfig())
    config = plan.config
    cv = CrossValidation(Path(run_dir))
    _check_parts(parts, folds, final)
    settings = {"train": asdict(config), "folds": folds, "images": len(dataset.paths)}
    resume = _open_cross_validation(cv, settings, resume, parts)
    wanted = set(range(folds)) | ({cv.FINAL} if final else set()) if parts is None else set(parts)
    with progress_bar("reading images", progress) as bar:
        images = load_images(dataset, plan.preprocessing, progress=bar)
    maps = _shared_frozen_maps(plan, images, progress)
    targets = dataset.targets

    def make(part: Part, run: RunDir, settings: TrainConfig) -> None:
        """Train ``part`` into ``run`` (resuming its backup), or with ``reuse`` make it from that
        folder's same part."""
        if reuse is not None:
            reuse_trained(dataset, run.path, settings, CrossValidation(Path(reuse)).part(part.name).path,
                          progress=progress, part=part)
        else:
            train(dataset, run.path, settings, resume=resume and run.backup.is_dir(), progress=progress,
                  workers=workers, part=part)

    pooled_true, pooled_pred, per_fold = [], [], []
    for k, (train_idx, val_idx) in enumerate(stratified_folds(targets, folds, config.seed)):
        fold = cv.fold(k)
        if not (resume and fold.is_finished()) and k in wanted:
            if progress:
                print(f"fold {k + 1}/{folds}: {len(train_idx)} training, {len(val_idx)} validation images",
                      file=sys.stderr)
            make(Part(k, (train_idx, val_idx), images, maps), fold, config)
        if not fold.is_finished():
            continue
        pooled_true.append(targets[val_idx])
        pooled_pred.append(fold.read_holdout_probabilities().argmax(1))
        per_fold.append(_fold_row(k, fold.read_metrics()))
    if cv.FINAL in wanted and not (resume and cv.final.is_finished()):
        if progress:
            print(f"final: all {len(targets)} images", file=sys.stderr)
        everything = (np.arange(len(targets)), np.array([], dtype=np.int64))
        make(Part(CrossValidation.FINAL, everything, images, maps), cv.final, replace(config, holdout=0.0))
    if len(per_fold) < folds:
        return None
    pooled = classification_report(np.concatenate(pooled_true), np.concatenate(pooled_pred), dataset.classes)
    summary = _summary(per_fold, pooled, config)
    cv.write_summary(summary)
    indices, probabilities = cv.out_of_fold(len(targets))
    save_evaluation_pngs(probabilities, targets[indices], dataset.classes, cv.path)
    return summary


def _check_parts(parts: Collection[int | str] | None, folds: int, final: bool) -> None:
    """Refuse parts that are neither a fold number nor ``"final"`` (which needs ``final``)."""
    if parts is None:
        return
    unknown = [p for p in parts if p != CrossValidation.FINAL and not (isinstance(p, int) and 0 <= p < folds)]
    if unknown:
        raise UsageError(f"no part {unknown[0]!r} in a {folds}-fold cross-validation "
                         f"(0-{folds - 1} or final)")
    if CrossValidation.FINAL in parts and not final:
        raise UsageError("the final part needs --final")


def _with_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """A cross-validation's ``settings`` as read, its training settings completed by
    :func:`~capsedge.train.config.with_defaults`."""
    return {**settings, "train": with_defaults(settings.get("train", {}))}


def _open_cross_validation(cv: CrossValidation, settings: dict[str, Any], resume: bool,
                           parts: Collection[int | str] | None) -> bool:
    """Create the folder with its settings, checking that a cross-validation resumed (or trained in
    parts) has the same settings, and that a fresh one starts in no other's folder.

    Returns whether finished parts are kept (resumed): with ``resume``, or when training parts.
    """
    if resume or (parts is not None and cv.settings.is_file()):
        if not cv.settings.is_file():
            raise UsageError(f"nothing to resume in {cv.path} (no {CrossValidation.SETTINGS})")
        if _with_defaults(cv.read_settings()) != settings:
            raise UsageError(f"{cv.path} holds a cross-validation with other settings; choose another --out")
    elif parts is None and cv.has_folds():
        raise UsageError(f"{cv.path} already holds a cross-validation: pass --resume or another --out")
    cv.path.mkdir(parents=True, exist_ok=True)
    cv.write_settings(settings)
    return resume or parts is not None


def _shared_frozen_maps(plan: TrainingPlan, images: np.ndarray, progress: bool) -> np.ndarray | None:
    """The frozen trunk's maps of every image and view, computed once when every part has the same
    frozen trunk (ImageNet's); else ``None`` (each part computes its own, or trains end to end)."""
    if not plan.parts_share_frozen_maps:
        return None
    import keras

    from .frozen import frozen_views
    from .network import build_network

    keras.utils.set_random_seed(plan.config.seed)
    network = build_network(plan)
    with progress_bar("frozen trunk maps", progress) as bar:
        return frozen_views(network.frozen, images, progress=bar, views=plan.config.training_views)


def _fold_row(fold: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """A fold's line of the summary: accuracy and macro-F1 in one view and each test-time average."""
    report = metrics["holdout"]
    row = {"fold": fold, "accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}
    for name in VIEW_AVERAGES:
        averaged = metrics.get(f"holdout_{name}", {})
        row |= {f"accuracy_{name}": averaged.get("accuracy"), f"macro_f1_{name}": averaged.get("macro_f1")}
    return row


def _summary(per_fold: list[dict[str, Any]], pooled: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    """``cv_summary.json``: mean and spread over the folds, per fold, pooled, and the settings."""
    folds = len(per_fold)
    summary = {"folds": folds, **_mean_and_spread(per_fold, ""), "per_fold": per_fold, "pooled": pooled,
               "train": asdict(config)}
    for name in VIEW_AVERAGES:
        # What a runtime averaging 4 (flips), 8 (dihedral) or 16 test-time views would score
        # (folds trained before 0.7 saved eight views: no sixteen).
        if all(f[f"accuracy_{name}"] is not None for f in per_fold):
            summary[name] = _mean_and_spread(per_fold, f"_{name}")
    return summary


def _mean_and_spread(per_fold: list[dict[str, Any]], suffix: str) -> dict[str, float]:
    """Mean and standard deviation (0 for one fold) of ``accuracy{suffix}`` and ``macro_f1{suffix}``."""
    out = {}
    for measure in ("accuracy", "macro_f1"):
        values = np.array([f[f"{measure}{suffix}"] for f in per_fold])
        out[f"{measure}_mean"] = float(values.mean())
        out[f"{measure}_std"] = float(values.std(ddof=1)) if len(per_fold) > 1 else 0.0
    return out
