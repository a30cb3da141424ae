"""What the built-in synthesis methods minimise at each optimisation step.

A loss takes a :class:`Step` (everything the loop computed for the current inputs) and returns a 0-d
tensor; the loop differentiates it with respect to the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import Regularizers
from .priors import l2_prior, total_variation

__all__ = ["Step", "inception_loss", "bns_loss", "bns_prior_loss", "bns_inception_loss"]


@dataclass
class Step:
    """One optimisation step, as a method's loss sees it.

    Attributes:
        x: the inputs being optimised (normalised space, ``requires_grad``).
        inputs: what the model saw this step (``x`` after the method's augmentation).
        logits: the model's logits on ``inputs`` (``None`` unless the method uses them).
        bn_loss: the BN-statistics divergence of ``inputs`` summed over layers (``None`` unless the
            method needs BatchNorm statistics).
        targets: the class each image is optimised towards.
        regularizers: image priors, augmentations and auxiliary loss weights (:attr:`priors`: its old name).
        index: the step number, from 0.
        total: the number of steps.
    """

    x: torch.Tensor
    inputs: torch.Tensor
    logits: torch.Tensor | None
    bn_loss: torch.Tensor | None
    targets: torch.Tensor
    regularizers: Regularizers
    index: int
    total: int

    @property
    def priors(self) -> Regularizers:
        """``regularizers`` under its name before issue 20, for losses written against it."""
        return self.regularizers


def inception_loss(step: Step) -> torch.Tensor:
    """Minus the target logit, plus total-variation and L2 image priors."""
    chosen = step.logits.float().gather(1, step.targets[:, None]).mean()
    zero = step.x.new_zeros(())  # kept from the first implementation: the same float sums, the same bytes
    return (zero - chosen + step.regularizers.tv_weight * total_variation(step.x)
            + step.regularizers.l2_weight * l2_prior(step.x))


def bns_loss(step: Step) -> torch.Tensor:
    """The BN-statistics divergence alone."""
    return step.bn_loss


# the image side at which bns+p's tv_weight applies as given
TV_REFERENCE_SIDE = 224


def bns_prior_loss(step: Step) -> torch.Tensor:
    """The BN-statistics divergence plus the images' total variation: BNS images are otherwise rough (their mean
    squared neighbour difference is ~13x that of photographs on EfficientNet-Lite0), and the input Hessians that
    GPTQ rounds with then misjudge the spatial correlations depthwise convolutions see.

    The weight is the one at 224 px, scaled by ``side / 224``: photographs' squared neighbour difference grows about
    as ``1 / side`` (0.042 for the shared ImageNet images at 224 px, 0.34 for CIFAR-10 at 32 px, normalised), so a
    fixed weight would smooth small images far below their natural roughness (0.11 at 32 px)."""
    weight = step.regularizers.tv_weight * step.x.shape[-1] / TV_REFERENCE_SIDE
    return step.bn_loss + weight * total_variation(step.x)


def bns_inception_loss(step: Step) -> torch.Tensor:
    """The BN-statistics divergence plus cross-entropy towards the targets."""
    return step.bn_loss + step.regularizers.ce_weight * F.cross_entropy(step.logits.float(), step.targets)
