"""The settings of a training run, checked on creation; each field carries its command-line
option (help, type and range: ``capsedge train`` generates its options from them)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import click

from capsedge.errors import UsageError
from capsedge.views import ALL_VIEWS, DIHEDRAL_VIEWS

from .augment import AUGMENTATIONS
from .schedule import SCHEDULES

#: Where a pretrained trunk's weights start (see ``TrainConfig.init``), besides ``run:PATH``.
INITS = ("imagenet", "none")
#: ``init`` of a run that starts from the trunk another run trained (``run:PATH``).
RUN_INIT = "run:"


@dataclass(frozen=True)
class Option:
    """A :class:`TrainConfig` field's command-line option.

    Attributes:
        help: the option's help.
        type: its click type; a range (``click.IntRange``, ``click.FloatRange``) is also what
            :class:`TrainConfig` accepts from Python.
        flag: the flag, when not ``--field-name``.
    """

    help: str
    type: Any = None
    flag: str | None = None


def _setting(default: Any, help: str, type: Any = None, flag: str | None = None) -> Any:
    return field(default=default, metadata={"option": Option(help, type, flag)})


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; model architecture lives in the model registry.

    The defaults are the recipe of the bundled model (see the README, "Accuracy").

    Attributes:
        model: registry name of the model configuration.
        epochs: passes over the training images.
        batch_size: images per step.
        learning_rate: initial Adam learning rate (cosine-decayed to 1 % of it).
        beta: class-balanced loss beta (Cui et al. 2019); 0 disables reweighting.
        reconstruction_weight: weight of the decoder's reconstruction loss.
        ncp_weight: weight of the NCP head's cross-entropy.
        holdout: fraction of each class held out for evaluation (0: train on everything).
        augment: on-the-fly augmentation, a name in
            :data:`capsedge.train.augment.AUGMENTATIONS` (``"dihedral"``, the default: the
            eight flips and quarter turns; ``"d4"``, ``"d4-strong"``, ``"full"``, ``"none"``).
        seed: makes splits, initialisation and augmentation repeatable on one machine.
        mixup: Beta parameter of mixup between training images (0: none; 0.2 is usual).
        ema: momentum of an exponential moving average of the weights that replaces them
            when training ends (Keras' ``use_ema``), e.g. 0.99; 0 keeps the last weights.
        weight_decay: decoupled weight decay (AdamW, Loshchilov & Hutter 2019); 0: Adam.
        warmup: fraction of the steps over which the learning rate rises to ``learning_rate``.
        schedule: ``"cosine"`` (a linear warm-up from 1 %, then cosine decay to 1 %) or
            ``"one-cycle"`` (PyTorch's ``OneCycleLR`` shape, see :mod:`capsedge.train.schedule`).
        label_smoothing: of the cross-entropy heads (NCP, linear).
        init: ``"imagenet"`` starts a pretrained trunk from its ImageNet weights, ``"none"``
            from random ones, ``"run:PATH"`` from the trunk a stage-1 run trained (its
            ``trunk.npz``; with cross-validation, fold K starts from ``PATH/fold-K`` and the
            final run from ``PATH/final``); networks without a trunk ignore it.
        freeze_stages: keep the trunk's stem and first N stages fixed (their batch norm too):
            cheaper steps for CPU training.
        int8_trunk: fraction of the training maps taken from the frozen trunk converted to
            full-integer int8 (calibrated on the run's training images) instead of the float
            one, so that the layers above learn to read int8 maps too (quantization-aware
            training of what trains); needs :attr:`precomputes_frozen_maps`.
        training_views: the views of each image whose frozen-trunk maps training draws from:
            8, the dihedral orientations, or 16, those and the same eight of the image turned
            45 degrees, as a runtime averaging sixteen test-time views shows the network; 16
            needs :attr:`precomputes_frozen_maps` (the other modes augment on the fly).
        int8_aware_trunk: epochs of quantization-aware distillation of the frozen trunk before
            the head trains (:mod:`capsedge.train.quantization_aware`): its weights learn to give,
            rounded as the int8 file rounds them, the maps they gave in float; 0: none. Needs
            :attr:`precomputes_frozen_maps`.
        stage1_readout: the share ``v`` of the stage-1 run's own linear head in the answer,
            ``(1 - v) * capsule + NCP head + v * read-out`` (``ModelConfig.readout_weight``): its
            head convolution, pooling and dense layer are copied from the same part of the
            ``init="run:PATH"`` run (or of ``readout_run``) and train only with ``readout_loss``;
            0: none. Needs ``init="run:PATH"``.
        readout_run: with ``stage1_readout``, the run whose linear head the read-out copies, part
            by part, instead of the ``init`` run: e.g. a linear head refitted on that run's frozen
            trunk (``--model lite0h_linear_512 --freeze-stages 7 --init run:PATH``); its trunk
            must be the ``init`` run's, or with ``--reuse`` the reused run's (e.g. distilled by
            ``--int8-aware-trunk``; see :meth:`capsedge.train.plan.TrainingPlan.readout_trunk`).
        readout_loss: with ``stage1_readout``, the weight of the read-out's own cross-entropy:
            above 0 the read-out trains beside the capsule head, from the stage-1 head it
            copies, on the same maps (the distilled trunk's, int8 ones with ``int8_trunk``);
            0: it keeps the copied weights.
        distill_readout: with ``stage1_readout``, the weight of the NCP head's cross-entropy
            against the read-out's answer, whose gradient stops at the read-out
            (:mod:`capsedge.train.distillation`); 0: none.
    """

    model: str = _setting("effcaps_ncp_lite0_512", "Model configuration name.")
    epochs: int = _setting(30, "Passes over the data.", click.IntRange(1))
    batch_size: int = _setting(32, "Images per step.", click.IntRange(1))
    learning_rate: float = _setting(1e-3, "Peak learning rate (warm-up, then cosine decay to 1 %).",
                                    float, flag="--lr")
    beta: float = _setting(0.999, "Class-balanced loss beta (0: no reweighting).",
                           click.FloatRange(0, 1, max_open=True))
    reconstruction_weight: float = _setting(
        0.5, "Weight of the decoder's reconstruction loss (0: the decoder does not train the net).",
        click.FloatRange(0))
    ncp_weight: float = _setting(1.0, "Weight of the NCP head's cross-entropy, for models with one.",
                                 click.FloatRange(0))
    holdout: float = _setting(0.2, "Fraction of each class held out for evaluation.",
                              click.FloatRange(0, 1, max_open=True))
    augment: str = _setting(
        "dihedral", "d4: flips and quarter turns (+ small rotation, zoom); d4-strong: d4 with more zoom, "
        "shifts, contrast and brightness; full: any rotation, shifts, contrast; none.",
        click.Choice(list(AUGMENTATIONS)))
    seed: int = _setting(0, "Makes a run repeatable.", int)
    mixup: float = _setting(0.0, "Mix training images and their labels, weight ~ Beta(a, a) (e.g. 0.2; "
                            "0: off).", click.FloatRange(0))
    ema: float = _setting(0.0, "Keep a moving average of the weights with this momentum (e.g. 0.99) and end "
                          "on it.", click.FloatRange(0, 1, max_open=True))
    weight_decay: float = _setting(0.05, "Decoupled weight decay (AdamW); 0: Adam.", click.FloatRange(0))
    warmup: float = _setting(0.1, "Fraction of the steps over which the learning rate rises to its peak.",
                             click.FloatRange(0, 1, max_open=True))
    schedule: str = _setting(
        "cosine", "cosine: linear warm-up from 1 %, cosine decay to 1 %; one-cycle: PyTorch's OneCycleLR "
        "(cosine up from 1/25, down to 1/25e4; its default --warmup is 0.3).", click.Choice(list(SCHEDULES)))
    label_smoothing: float = _setting(0.1, "Label smoothing of the cross-entropy heads (NCP, linear).",
                                      click.FloatRange(0, 1, max_open=True))
    init: str = _setting(
        "imagenet", f"Start a pretrained trunk from its ImageNet weights ({INITS[0]}), random ones "
        f"({INITS[1]}), or the trunk a stage-1 run trained (run:PATH; with --folds, fold K starts from "
        "PATH/fold-K).")
    freeze_stages: int = _setting(5, "Keep the trunk's stem and first N stages fixed (faster on a CPU).",
                                  click.IntRange(0, 7))
    int8_trunk: float = _setting(
        0.0, "Fraction of the training maps read from the frozen trunk converted to int8 (the layers above "
        "learn to read int8 maps too; 0: float only).", click.FloatRange(0, 1))
    training_views: int = _setting(
        DIHEDRAL_VIEWS, f"Views of each image a frozen-trunk run trains on: {DIHEDRAL_VIEWS} (the flips and "
        f"quarter turns) or {ALL_VIEWS} (and the same of the image turned 45 degrees, as the sixteen "
        "test-time views).", click.IntRange(DIHEDRAL_VIEWS, ALL_VIEWS))
    int8_aware_trunk: int = _setting(
        0, "Epochs of quantization-aware distillation of the frozen trunk before the head trains: its "
        "weights learn to give, rounded to int8, the maps they gave in float (0: none).", click.IntRange(0))
    stage1_readout: float = _setting(
        0.0, "Share of the --init run:PATH run's own linear head in the answer, beside the capsule head: "
        "copied from the same part of that run, never trained (0: none).",
        click.FloatRange(0, 1, max_open=True))
    readout_run: str = _setting(
        "", "With --stage1-readout: the run whose linear head the read-out copies, part by part, instead "
        "of the --init one (e.g. a linear head refitted on its frozen trunk): on the same trunk, or with "
        "--reuse the reused run's.")
    readout_loss: float = _setting(
        0.0, "With --stage1-readout: weight of the read-out's own cross-entropy; above 0 it trains beside "
        "the capsule head, from the copied head, on the same maps (0: it stays as copied).",
        click.FloatRange(0))
    distill_readout: float = _setting(
        0.0, "With --stage1-readout: weight of the NCP head's cross-entropy against the read-out's answer "
        "on the same maps, the read-out held fixed by it (0: none).",
        click.FloatRange(0))

    @property
    def init_run(self) -> Path | None:
        """The stage-1 run folder of ``init="run:PATH"``, else ``None``."""
        return Path(self.init[len(RUN_INIT):]) if self.init.startswith(RUN_INIT) else None

    @property
    def precomputes_frozen_maps(self) -> bool:
        """Whether the frozen stages of a pretrained trunk can run once per image and view
        instead of every step (see :mod:`capsedge.train.frozen`): some are frozen, and the
        training sees nothing but the eight dihedral views (``augment="dihedral"``, no mixup).
        :class:`capsedge.train.plan.TrainingPlan` decides from it, for a model with a trunk."""
        return self.freeze_stages > 0 and self.augment == "dihedral" and self.mixup == 0

    def __post_init__(self) -> None:
        for setting in fields(self):
            kind = setting.metadata["option"].type
            value = getattr(self, setting.name)
            if isinstance(kind, (click.IntRange, click.FloatRange)):
                _check_range(setting.name, value, kind)
            elif isinstance(kind, click.Choice) and value not in kind.choices:
                raise UsageError(f"{setting.name} must be one of {', '.join(kind.choices)}, got {value!r}")
        if self.init not in INITS and not (self.init.startswith(RUN_INIT) and len(self.init) > len(RUN_INIT)):
            raise UsageError(f"init must be one of {', '.join(INITS)} or run:PATH, got {self.init!r}")
        if self.int8_trunk and not self.precomputes_frozen_maps:
            raise UsageError("int8_trunk needs a frozen trunk (--freeze-stages > 0), the dihedral "
                             "augmentation and no mixup")
        if self.int8_aware_trunk and not self.precomputes_frozen_maps:
            raise UsageError("int8_aware_trunk needs a frozen trunk (--freeze-stages > 0), the dihedral "
                             "augmentation and no mixup")
        if self.stage1_readout and self.init_run is None:
            raise UsageError("stage1_readout needs init run:PATH, the stage-1 run whose linear head it "
                             "copies")
        if self.readout_run and not self.stage1_readout:
            raise UsageError("readout_run names where the stage-1 read-out comes from: give "
                             "stage1_readout too")
        if self.readout_loss and not self.stage1_readout:
            raise UsageError("readout_loss trains the stage-1 read-out: give stage1_readout too")
        if self.distill_readout and not self.stage1_readout:
            raise UsageError("distill_readout fits the NCP head to the stage-1 read-out: give "
                             "stage1_readout too")
        if self.training_views not in (DIHEDRAL_VIEWS, ALL_VIEWS):
            raise UsageError(f"training_views must be {DIHEDRAL_VIEWS} or {ALL_VIEWS}, "
                             f"got {self.training_views!r}")
        if self.training_views != DIHEDRAL_VIEWS and not self.precomputes_frozen_maps:
            raise UsageError(f"training_views {self.training_views} needs a frozen trunk "
                             "(--freeze-stages > 0), the dihedral augmentation and no mixup")


def options() -> list[tuple[str, Option, Any]]:
    """``(field name, option, default)`` of every :class:`TrainConfig` setting, in field order."""
    return [(f.name, f.metadata["option"], f.default) for f in fields(TrainConfig)]


def with_defaults(recorded: dict[str, Any]) -> dict[str, Any]:
    """The training settings a run recorded, each one it lacks (a setting added after the run was
    written) at its default, which is what that run trained with."""
    return {**{name: default for name, _, default in options()}, **recorded}


def _check_range(name: str, value: Any, kind: click.IntRange | click.FloatRange) -> None:
    """Refuse ``value`` of setting ``name`` outside ``kind``'s range, or not an integer for an
    integer range."""
    low = kind.min is None or (value > kind.min if kind.min_open else value >= kind.min)
    high = kind.max is None or (value < kind.max if kind.max_open else value <= kind.max)
    integer = isinstance(kind, click.IntRange)
    if (integer and not isinstance(value, int)) or not (low and high):
        raise UsageError(f"{name} must be {_range_text(kind)}, got {value!r}")


def _range_text(kind: click.IntRange | click.FloatRange) -> str:
    """``"in [0, 1)"``, ``">= 0"``, ``"a positive integer"``, ``"an integer in [0, 7]"``."""
    if kind.max is None:
        if isinstance(kind, click.IntRange):
            return "a positive integer" if kind.min == 1 else f"an integer >= {kind.min}"
        return f"{'>' if kind.min_open else '>='} {kind.min:g}"
    interval = f"{'(' if kind.min_open else '['}{kind.min:g}, {kind.max:g}{')' if kind.max_open else ']'}"
    return f"an integer in {interval}" if isinstance(kind, click.IntRange) else f"in {interval}"
