"""The settings of a training run (what ``capsedge train``'s options set), checked on creation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from capsedge.errors import UsageError

from .augment import get_augmentation

#: Where a pretrained trunk's weights start (see ``TrainConfig.init``), besides ``run:PATH``.
INITS = ("imagenet", "none")
#: ``init`` of a run that starts from the trunk another run trained (``run:PATH``).
RUN_INIT = "run:"


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
        warmup: fraction of the steps over which the learning rate rises linearly from 1 %
            to ``learning_rate`` before the cosine decay.
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
            training of what trains); needs a frozen trunk under the dihedral augmentation.
    """

    model: str = "effcaps_ncp_lite0_512"
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-3
    beta: float = 0.999
    reconstruction_weight: float = 0.5
    ncp_weight: float = 1.0
    holdout: float = 0.2
    augment: str = "dihedral"
    seed: int = 0
    mixup: float = 0.0
    ema: float = 0.0
    weight_decay: float = 0.05
    warmup: float = 0.1
    label_smoothing: float = 0.1
    init: str = "imagenet"
    freeze_stages: int = 5
    int8_trunk: float = 0.0

    @property
    def init_run(self) -> Path | None:
        """The stage-1 run folder of ``init="run:PATH"``, else ``None``."""
        return Path(self.init[len(RUN_INIT):]) if self.init.startswith(RUN_INIT) else None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise UsageError(f"holdout must be in [0, 1), got {self.holdout!r}")
        get_augmentation(self.augment)  # raises for an unknown name
        if self.mixup < 0:
            raise UsageError(f"mixup must be >= 0, got {self.mixup!r}")
        if not 0.0 <= self.ema < 1.0:
            raise UsageError(f"ema must be in [0, 1), got {self.ema!r}")
        if not 0.0 <= self.beta < 1.0:
            raise UsageError(f"beta must be in [0, 1), got {self.beta!r}")
        if self.weight_decay < 0:
            raise UsageError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise UsageError(f"warmup must be in [0, 1), got {self.warmup!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UsageError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.init not in INITS and not (self.init.startswith(RUN_INIT) and len(self.init) > len(RUN_INIT)):
            raise UsageError(f"init must be one of {', '.join(INITS)} or run:PATH, got {self.init!r}")
        if not isinstance(self.freeze_stages, int) or not 0 <= self.freeze_stages <= 7:
            raise UsageError(f"freeze_stages must be an integer in [0, 7], got {self.freeze_stages!r}")
        if not 0.0 <= self.int8_trunk <= 1.0:
            raise UsageError(f"int8_trunk must be in [0, 1], got {self.int8_trunk!r}")
        if self.int8_trunk and not (self.freeze_stages and self.augment == "dihedral" and self.mixup == 0):
            raise UsageError("int8_trunk needs a frozen trunk (--freeze-stages > 0), the dihedral "
                             "augmentation and no mixup")
