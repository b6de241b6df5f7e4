"""Online distillation from the read-out (``capsedge train --distill-readout W``).

Above a frozen stage-1 trunk the linear read-out trained beside the capsule head
(``--readout-loss``) is the stronger head of the two (docs/accuracy.md). With ``W`` above 0 the
trainer also fits the NCP head, the part of the capsule head that decides most of its answers
(:class:`capsedge.models.heads.ProbabilityFusion`), to the read-out's answer on the same maps:
``W`` times the cross-entropy of the NCP's probabilities against the read-out's, the read-out's
side held fixed (its gradient stopped), as in one direction of deep mutual learning (Zhang et al.
2018). The NCP head reads the primary capsules, so the term reaches them too. It is a trainer
output only: the classifier, and so every export, is the same network.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from capsedge.errors import UsageError
from capsedge.models.build import LABEL_OUTPUTS

#: The trainer output that carries the distillation term: each image's cross-entropy of the NCP
#: head against the read-out; fed the label as its target, which its loss ignores.
DISTILLATION_OUTPUT = "readout_teacher"

#: Every trainer output the batches feed the one-hot label as its target.
LABEL_FED_OUTPUTS = (*LABEL_OUTPUTS, DISTILLATION_OUTPUT)

#: Probabilities are clipped to this before their logarithm.
EPSILON = 1e-7


class ReadoutTeacher(keras.layers.Layer):
    """``[student, teacher]`` probabilities -> each row's cross-entropy ``-sum(t * log s)``, the
    teacher held fixed (no gradient reaches it)."""

    def call(self, inputs: list) -> Any:
        student, teacher = inputs
        teacher = ops.stop_gradient(ops.cast(teacher, student.dtype))
        return -ops.sum(teacher * ops.log(ops.clip(student, EPSILON, 1.0)), axis=-1)

    def compute_output_shape(self, input_shape: list) -> tuple:
        return tuple(input_shape[0][:-1])


def distillation_loss(_: Any, cross_entropy: Any) -> Any:
    """The loss of :data:`DISTILLATION_OUTPUT`: its cross-entropies' mean (the label is not used)."""
    return ops.mean(cross_entropy)


def with_readout_teacher(built: Any) -> Any:
    """``built`` whose trainer has :data:`DISTILLATION_OUTPUT` as an output too: the NCP head's
    cross-entropy against the read-out of its classifier.

    Raises:
        UsageError: the network has no NCP head or no read-out.
    """
    import dataclasses

    from capsedge.models.build import READOUT_HEAD

    trainer = built.trainer
    outputs = dict(zip(trainer.output_names, trainer.outputs, strict=True))
    names = {layer.name for layer in built.classifier.layers}
    if "ncp_probs" not in outputs or READOUT_HEAD not in names:
        raise UsageError(f"--distill-readout fits the NCP head to the read-out: {built.config.name} has "
                         "no NCP head or no read-out")
    teacher = built.classifier.get_layer(READOUT_HEAD).output
    outputs[DISTILLATION_OUTPUT] = ReadoutTeacher(name=DISTILLATION_OUTPUT)([outputs["ncp_probs"], teacher])
    return dataclasses.replace(built, trainer=keras.Model(trainer.inputs, outputs, name=trainer.name))
