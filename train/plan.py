"""How a run trains, decided once from the settings and the model configuration.

Two modes:

- ``"frozen-trunk"``: the model has a pretrained trunk whose first stages are frozen, and the
  training sees nothing but the eight dihedral views (:attr:`TrainConfig.precomputes_frozen_maps`).
  The frozen part then runs once per image and view (:mod:`capsedge.train.frozen`) and the rest
  of the network trains above those maps, optionally read in part from an int8 trunk, optionally
  of the image turned 45 degrees too (``training_views=16``).
- ``"end-to-end"``: every step runs the whole network on augmented images.

Where a pretrained trunk starts is a property of the plan too: ImageNet's weights, random ones, or
the trunk a stage-1 run trained (``init="run:PATH"``, the two-stage recipe).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from capsedge.errors import UsageError
from capsedge.preprocess import Preprocessing
from capsedge.views import DIHEDRAL_VIEWS
from capsedge.workshop.dataset import Dataset, read_dataset
from capsedge.workshop.run import CrossValidation, RunDir

from .config import TrainConfig

if TYPE_CHECKING:
    from capsedge.models import ModelConfig

Mode = Literal["frozen-trunk", "end-to-end"]
FROZEN_TRUNK: Mode = "frozen-trunk"
END_TO_END: Mode = "end-to-end"


@dataclass(frozen=True)
class TrainingPlan:
    """A run's settings, its model (fitted to the data's classes), its preprocessing and its mode.

    Build one with :meth:`build` (or :func:`plan_training`), which decides the mode.
    """

    config: TrainConfig
    model: ModelConfig
    preprocessing: Preprocessing
    mode: Mode

    @classmethod
    def build(cls, config: TrainConfig, model: ModelConfig, classes: tuple[str, ...]) -> TrainingPlan:
        """The plan of ``config`` for ``model`` trained on ``classes``.

        Raises:
            UsageError: an int8 trunk, an int8-aware trunk or sixteen training views are asked of
                a model without a pretrained trunk, or a stage-1 read-out of one without a
                capsule head on a trunk with its head convolution.
        """
        if tuple(model.class_names) != tuple(classes):
            model = replace(model, class_names=tuple(classes), num_classes=len(classes))
        if config.stage1_readout:
            if model.head != "capsules" or not model.trunk_head_conv:
                raise UsageError("--stage1-readout needs a capsule head on a trunk with its head "
                                 f"convolution; {config.model} has none")
            model = replace(model, readout_weight=config.stage1_readout)
        if model.trunk is not None and config.precomputes_frozen_maps:
            mode = FROZEN_TRUNK
        elif config.int8_trunk:
            raise UsageError(f"--int8-trunk needs a model with a pretrained trunk; {config.model} has none")
        elif config.int8_aware_trunk:
            raise UsageError(f"--int8-aware-trunk needs a model with a pretrained trunk; {config.model} "
                             "has none")
        elif config.training_views != DIHEDRAL_VIEWS:
            raise UsageError(f"--training-views {config.training_views} needs a model with a pretrained "
                             f"trunk; {config.model} has none")
        else:
            mode = END_TO_END
        return cls(config, model, model.preprocessing, mode)

    @property
    def frozen_trunk(self) -> bool:
        """Whether the run trains above precomputed frozen-trunk maps."""
        return self.mode == FROZEN_TRUNK

    @property
    def stage1_run(self) -> Path | None:
        """The stage-1 run whose trunk this run starts from (``init="run:PATH"``), else ``None``."""
        return self.config.init_run

    @property
    def parts_share_frozen_maps(self) -> bool:
        """Whether every part of a cross-validation has the same frozen trunk (ImageNet's, not
        distilled on the part's images), so its maps are computed once for all of them."""
        return self.frozen_trunk and self.config.init == "imagenet" and not self.config.int8_aware_trunk

    def stage1_trunk(self, part: int | str | None = None, held_out: np.ndarray | None = None) -> Path | None:
        """The trunk weights this run starts from under ``init="run:PATH"`` (else ``None``): for a
        single run (``part`` ``None``), that run's (see :func:`stage1_trunk_file`); for fold ``part``
        (a number) or the ``"final"`` run of a cross-validation, the same part of the stage-1 run,
        whose fold must have held out the same images (``held_out``), else the cross-validation
        would not be honest.

        Raises:
            UsageError: no such trunk, or its fold held out other images.
        """
        if self.stage1_run is None:
            return None
        return _same_part_trunk(self.stage1_run, part, held_out)

    def readout_trunk(self, part: int | str | None = None, held_out: np.ndarray | None = None,
                      trunk: Path | None = None) -> Path | None:
        """The ``trunk.npz`` whose run's linear head the stage-1 read-out copies (else ``None``):
        that of :meth:`stage1_trunk`, or under ``readout_run`` the same part of that run, which
        must have held out the same images and kept the trunk the network reads (every weight but
        the head's): ``trunk``, by default stage 1's (``--reuse``: the reused run's, which
        ``--int8-aware-trunk`` distilled).

        Raises:
            UsageError: as :meth:`stage1_trunk`, or the ``readout_run`` part has another trunk.
        """
        if not self.config.stage1_readout:
            return None
        stage1 = self.stage1_trunk(part, held_out)
        if not self.config.readout_run:
            return stage1
        from .network import READOUT_LAYERS  # the head's layers: the rest is the trunk

        read = trunk or stage1
        if not read.is_file():
            raise UsageError(f"{read} does not exist: the read-out's trunk cannot be compared with it")
        readout = _same_part_trunk(Path(self.config.readout_run), part, held_out)
        with np.load(read) as ours, np.load(readout) as theirs:
            kept = [key for key in ours.files if key.rsplit("/", 1)[0] not in READOUT_LAYERS.values()]
            if any(key not in theirs.files or not np.array_equal(ours[key], theirs[key]) for key in kept):
                raise UsageError(f"{readout} holds another trunk than {read}: its linear head was not "
                                 "trained on the trunk the read-out reads")
        return readout


def _same_part_trunk(run: Path, part: int | str | None, held_out: np.ndarray | None) -> Path:
    """``run``'s trunk of ``part`` (see :func:`stage1_trunk_file`); a fold's must have held out
    ``held_out``."""
    trunk_file = stage1_trunk_file(run, part)
    if isinstance(part, int) and held_out is not None:
        fold = RunDir(trunk_file.parent)
        if not fold.holdout_indices.is_file() or not np.array_equal(np.sort(fold.read_holdout_indices()),
                                                                      np.sort(held_out)):
            raise UsageError(f"{trunk_file.parent} did not hold out fold {part}'s images: the stage-1 "
                             "run must be a cross-validation of the same data, folds and seed")
    return trunk_file


def plan_training(data: str | Path | Dataset, config: TrainConfig) -> tuple[Dataset, TrainingPlan]:
    """The data set of ``data`` (read unless it is one) and the plan of ``config`` for it.

    Raises:
        ModelConfigError: no model of that name (before any data is read).
        DatasetError: the data cannot be used.
        UsageError: see :meth:`TrainingPlan.build`.
    """
    from capsedge.models import get_model_config

    model = get_model_config(config.model)  # a wrong name fails before any data is read
    dataset = data if isinstance(data, Dataset) else read_dataset(data)
    return dataset, TrainingPlan.build(config, model, dataset.classes)


def stage1_trunk_file(run: Path, part: int | str | None = None) -> Path:
    """The trunk weights a stage-1 ``run`` hands on: ``run/trunk.npz`` for a single run;
    for a cross-validation, that of fold ``part`` (a number) or of the ``"final"`` run (by
    default).

    Raises:
        UsageError: no such file.
    """
    stages = CrossValidation(run)
    candidates = [stages.part(part).trunk] if part is not None else [RunDir(run).trunk, stages.final.trunk]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UsageError(f"no stage-1 trunk in {run} (looked for {', '.join(str(c) for c in candidates)})")
