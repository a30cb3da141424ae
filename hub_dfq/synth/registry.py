"""The synthesis methods: one descriptor each, and the registry every listing reads.

A method is what an optimisation step minimises (its ``loss`` over a :class:`~hub_dfq.synth.objectives.Step`)
plus flags that say what the loop must provide: BatchNorm statistics, logits, class targets. The loop
(``generator``), the config checks, the dataset card, the cache keys, the CLI's ``--method`` choices
and the docs table all read these descriptors. A new method is one function (a loss) and one
:func:`register_synth_method` call; it works from outside the package too::

    from hub_dfq.synth.registry import SynthMethod, register_synth_method
    register_synth_method(SynthMethod("bns-mean", summary="match BN means only", description="...",
                                      loss=my_loss, needs_bn=True))
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

from ..registry import Registry

__all__ = ["SynthMethod", "SYNTH_METHODS", "register_synth_method", "methods_for", "BNLoss", "BN_LOSSES",
           "register_bn_loss", "PRECISIONS", "BNLossSpec"]

PRECISIONS = ("auto", "fp32", "bf16")  # of the optimisation loop; "auto": bf16 where it is natively fast
# what a method's optimiser moves (hub_dfq.synth.parameterisation; named here so that the CLI needs no torch)
PARAMETERISATIONS = ("pixels", "decorrelated")


@dataclass(frozen=True)
class SynthMethod:
    """One way of generating calibration images.

    Args:
        name: what users type (``--method NAME``).
        summary: one line for the CLI help and the docs table.
        description: a paragraph for the dataset card: what the images are and what the labels mean.
        loss: ``Step -> 0-d tensor`` minimised at every step (or its ``"module:attribute"`` path);
            ``None``: nothing is optimised, the images are the initial Gaussian noise.
        augment: ``(x, jitter, flip, generator) -> inputs`` applied before each forward pass (random
            translations and flips), or ``None``.
        needs_bn: the loss reads the BatchNorm statistics; models without BN are refused.
        uses_logits: the loss reads the logits, so the forward pass runs past the last BN layer.
        class_targets: images are optimised towards class-balanced targets, which become their labels;
            otherwise the label is the model's prediction on the stored image.
        iters: default optimisation steps per batch.
        lr: default peak Adam learning rate (normalised input space).
        tv_weight: default weight of the image's total variation, for methods whose loss reads it (bns+p scales
            it by the image side over 224).
        noise: default noise the images start from (``white`` or ``pink``; :class:`~hub_dfq.synth.config.Regularizers`).
        parameterisation: what the optimiser moves: ``pixels``, or ``decorrelated`` (Fourier coefficients scaled by
            ``1 / f`` and correlated colour channels, :mod:`hub_dfq.synth.parameterisation`).
        hyperparameters: :class:`~hub_dfq.synth.config.Regularizers` fields the method reads (shown on the card).
        version: bump whenever the method's output bytes change; part of every cache key.
    """

    name: str
    summary: str
    description: str
    loss: Callable[..., Any] | str | None = None
    augment: Callable[..., Any] | str | None = None
    needs_bn: bool = False
    uses_logits: bool = False
    class_targets: bool = False
    iters: int = 200
    lr: float = 1.0
    tv_weight: float = 0.05
    noise: str = "white"
    parameterisation: str = "pixels"
    hyperparameters: tuple[str, ...] = ()
    version: int = 1

    def __post_init__(self) -> None:
        if self.parameterisation not in PARAMETERISATIONS:  # a plugin's typo fails at registration, not mid-run
            raise ValueError(f"synthesis method {self.name!r}: unknown parameterisation {self.parameterisation!r}; "
                             f"known: {', '.join(PARAMETERISATIONS)}")

    @property
    def optimised(self) -> bool:
        return self.loss is not None


SYNTH_METHODS: Registry[SynthMethod] = Registry("synthesis method", "method")


def register_synth_method(method: SynthMethod, *, overwrite: bool = False) -> SynthMethod:
    """Add a synthesis method (see :class:`SynthMethod`)."""
    return SYNTH_METHODS.register(method, overwrite=overwrite)


def methods_for(has_bn: bool) -> list[str]:
    """Names of the methods that work for a model with (or without) BatchNorm layers."""
    return SYNTH_METHODS.names(lambda m: has_bn or not m.needs_bn)


register_synth_method(SynthMethod(
    "gaussian",
    summary="Gaussian noise in the normalised input space (the paper's baseline)",
    description="Random inputs drawn from N(0, 1) in the model's normalised input space and clipped to the valid "
                "pixel range: the paper's baseline. Labels are the model's predictions.",
    iters=0, lr=0.0))
register_synth_method(SynthMethod(
    "inception",
    summary="maximise a target class logit under image priors (TV, L2, jitter, flips)",
    description="Inputs optimised (Adam) to maximise a target class logit under image priors: total variation, an "
                "L2 penalty, random jitter and horizontal flips. Targets are spread evenly over the classes.",
    loss="hub_dfq.synth.objectives:inception_loss", augment="hub_dfq.synth.priors:jitter_flip",
    uses_logits=True, class_targets=True, lr=0.1, hyperparameters=("tv_weight", "l2_weight", "jitter", "flip")))
register_synth_method(SynthMethod(
    "bns",
    summary="match every BN layer's running mean and variance (BN-Statistics)",
    description="Inputs optimised (Adam) so that, at the input of every BatchNorm layer, the batch's per-channel mean "
                "and standard deviation match the layer's running statistics (BN-Statistics). Labels are the model's "
                "predictions.",
    loss="hub_dfq.synth.objectives:bns_loss", needs_bn=True))
register_synth_method(SynthMethod(
    "bns+p",
    summary="BN-Statistics plus image priors: a pink-noise start, total variation, random jitter and flips",
    description="Inputs optimised (Adam) to match every BatchNorm layer's running mean and standard deviation (as "
                "bns), starting from pink noise (a photograph's 1/f spectrum and correlated colour channels, no "
                "content) instead of white, while a total-variation penalty keeps neighbouring pixels close and each "
                "step sees the batch randomly shifted and flipped (as DeepInversion), so the images are smooth like "
                "photographs rather than noise-like. Labels are the model's predictions.",
    loss="hub_dfq.synth.objectives:bns_prior_loss", augment="hub_dfq.synth.priors:jitter_flip", needs_bn=True,
    tv_weight=8.0, noise="pink", hyperparameters=("tv_weight", "jitter", "flip"), version=3))
register_synth_method(replace(  # bns+p's loss, priors and defaults; only what the optimiser moves differs
    SYNTH_METHODS.get("bns+p"), name="bns+d",
    summary="bns+p optimised in a decorrelated space: 1/f-scaled Fourier coefficients, correlated colour channels",
    description="Inputs optimised (Adam) to match every BatchNorm layer's running mean and standard deviation under "
                "the image priors of bns+p (a pink-noise start, total variation, random jitter and flips), with the "
                "optimiser moving the image's Fourier coefficients scaled by 1/f and colour channels mixed to "
                "correlate as in photographs (the decorrelated parameterisation of feature visualisation, Olah et al. "
                "2017) instead of its pixels: every step's change has a photograph's spectrum, and the images keep "
                "a photograph's large-scale structure and colour correlation. Labels are the model's predictions.",
    parameterisation="decorrelated", version=1))
register_synth_method(SynthMethod(
    "bns+i",
    summary="BN-Statistics plus cross-entropy towards class-balanced targets (BNS+I)",
    description="BN-Statistics plus a cross-entropy term towards class-balanced target labels (BNS+I).",
    loss="hub_dfq.synth.objectives:bns_inception_loss", needs_bn=True, uses_logits=True, class_targets=True,
    hyperparameters=("ce_weight",)))


@dataclass(frozen=True)
class BNLoss:
    """A distance between a layer's running statistics and a batch's moments (the BNS loss).

    Args:
        name: what users type (``--loss NAME``).
        summary: one line for the CLI help, the card and the docs.
        layer_term: ``(running_mean, running_var, mean, var) -> 0-d tensor``, one layer's loss (per-channel
            float tensors), or its ``"module:attribute"`` path. The loss of a batch is the sum over layers.
        layer_eps: the term also takes ``eps=``, the layer's own BN epsilon.
        reported_as: the registered loss whose value datasets report as their BN divergence (``None``: this
            one); losses of one family report on one scale, so runs optimised either way compare.
        version: bump whenever the term's values change; part of every cache key.
    """

    name: str
    summary: str
    layer_term: Callable[..., Any] | str
    layer_eps: bool = False
    reported_as: str | None = None
    version: int = 1

    @property
    def reported(self) -> str:
        """The name of the divergence a run with this loss reports."""
        return self.reported_as or self.name


BN_LOSSES: Registry[BNLoss] = Registry("BN loss", "loss")


def register_bn_loss(loss: BNLoss, *, overwrite: bool = False) -> BNLoss:
    """Add a BN-statistics loss (see :class:`BNLoss`)."""
    return BN_LOSSES.register(loss, overwrite=overwrite)


register_bn_loss(BNLoss(
    "kl", "KL divergence between N(running mean, running var) and N(batch mean, batch var), averaged over channels "
          "and summed over layers (the paper's)",
    layer_term="hub_dfq.synth.bns:kl_term"))
register_bn_loss(BNLoss(
    "rkl", "reverse KL divergence KL(N(batch) || N(running)) with the layer's own BN eps on both variances, averaged "
           "over channels and summed over layers: well-conditioned where a batch leaves a channel nearly dead "
           "(reported divergence: the paper's KL)",
    layer_term="hub_dfq.synth.bns:reverse_kl_term", layer_eps=True, reported_as="kl"))
register_bn_loss(BNLoss(
    "l2", "ZeroQ's ||mu - mu_batch||_2 + ||sigma - sigma_batch||_2 per layer, summed over layers",
    layer_term="hub_dfq.bnstats:zeroq_l2"))

# why: the descriptor's name before issue 20 (every other registry names its descriptor by the thing, not "Spec");
# kept so that plugins written against it still register
BNLossSpec = BNLoss
