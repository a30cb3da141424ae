"""The divergences an audit can rank by: one descriptor each, read by the API checks, the CLI and the report.

A divergence compares, per channel, the Gaussian the BN layer remembers (running mean and variance)
with the Gaussian of the candidate's BN inputs; the report averages it over channels, then takes the geometric
mean over layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..registry import Registry, resolve

__all__ = ["Divergence", "DIVERGENCES", "register_divergence", "divergence_fn"]


@dataclass(frozen=True)
class Divergence:
    """One per-channel divergence between ``p = N(running)`` and ``q = N(data)``.

    Args:
        name: what users type (``metric=NAME``).
        formula: the formula, as the report prints it.
        fn: ``(mu_p, var_p, mu_q, var_q) -> per-channel tensor`` (broadcasting), or its path.
    """

    name: str
    formula: str
    fn: Callable[..., Any] | str


DIVERGENCES: Registry[Divergence] = Registry("divergence", "metric")


def register_divergence(divergence: Divergence, *, overwrite: bool = False) -> Divergence:
    """Add a divergence (see :class:`Divergence`)."""
    return DIVERGENCES.register(divergence, overwrite=overwrite)


def divergence_fn(name: str) -> Callable[..., Any]:
    """The function of the divergence ``name``."""
    return resolve(DIVERGENCES.get(name).fn)


register_divergence(Divergence("kl", "KL(N(running_mean, running_var) || N(mean, var))", "hub_dfq.bnstats:gaussian_kl"))
register_divergence(Divergence("symmetric_kl", "(KL(p||q) + KL(q||p)) / 2 with p = N(running), q = N(data)",
                               "hub_dfq.bnstats:symmetric_kl"))
register_divergence(Divergence("reverse_kl", "KL(N(mean, var) || N(running_mean, running_var))",
                               "hub_dfq.bnstats:reverse_kl"))
register_divergence(Divergence("w2", "(mu_p - mu_q)^2 + (sigma_p - sigma_q)^2 (squared 2-Wasserstein)",
                               "hub_dfq.bnstats:wasserstein2"))
