"""Placement rules: where an integer backend needs quantizers, as data the quantized graph is built from.

An integer inference engine decides which layers it runs as integer kernels from where the graph quantizes
tensors. :func:`~hub_dfq.quant.prepare.prepare` places quantizers by the rules it is given; each backend
(:mod:`hub_dfq.backends.registry`) states its own, and :func:`strictest` combines several so that one
checkpoint runs integer on all of them. Names only, no torch: reading a registry stays cheap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

from ..errors import ConfigError

__all__ = ["FUSABLE_ACTIVATIONS", "PlacementRules", "strictest"]

# The activations prepare knows how to see through (module, function and method spellings of each).
FUSABLE_ACTIVATIONS = ("relu", "relu6", "hardtanh", "silu", "hardswish", "sigmoid", "gelu")


@dataclass(frozen=True)
class PlacementRules:
    """What a backend's integer kernels absorb, and so where the quantized graph puts quantizers.

    The defaults are the rules of an engine that fuses ``DequantizeLinear -> layer -> QuantizeLinear``
    into one kernel writing integers (ONNX Runtime): such a kernel applies a ReLU/ReLU6 on its way to
    the output quantizer, and runs a layer in float when a float op reads its output first.

    Args:
        name: whose rules these are (a backend's name), for messages.
        fused_activations: activations (names from :data:`FUSABLE_ACTIVATIONS`) an integer kernel applies
            before its output quantizer, so an output quantizer goes after them. No-ops always pass.
        output_quantizers: a convolution (or a linear read by a quantizer and a float op) needs a quantizer
            on its output to run as an integer kernel. ``False`` for an engine whose kernels dequantize
            their own output (OpenVINO): the quantizer would only add rounding error.

    Raises:
        ConfigError: an activation name prepare does not know.
    """

    name: str = "onnxruntime"
    fused_activations: tuple[str, ...] = ("relu", "relu6")
    output_quantizers: bool = True

    def __post_init__(self) -> None:
        fused = (self.fused_activations,) if isinstance(self.fused_activations, str) else self.fused_activations
        object.__setattr__(self, "fused_activations", tuple(fused))
        unknown = sorted(set(self.fused_activations) - set(FUSABLE_ACTIVATIONS))
        if unknown:
            raise ConfigError(f"placement rules {self.name!r}: unknown fused activation(s) {unknown}; known: "
                              f"{list(FUSABLE_ACTIVATIONS)}")
        if not isinstance(self.output_quantizers, bool):
            raise ConfigError(f"placement rules {self.name!r}: `output_quantizers` must be True or False, got "
                              f"{self.output_quantizers!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fused_activations": list(self.fused_activations)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PlacementRules":
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError(f"unreadable placement rules {dict(data)!r} ({err})") from err


def strictest(rules: Iterable[PlacementRules]) -> PlacementRules:
    """One set of rules under which every engine of ``rules`` runs the layers integer.

    An output quantizer is placed where any of them needs one, after the activations all of them fuse;
    one set of rules is returned unchanged (its name kept).
    """
    rules = list(dict.fromkeys(rules))
    if not rules:
        return PlacementRules()
    if len(rules) == 1:
        return rules[0]
    fused = [a for a in rules[0].fused_activations if all(a in r.fused_activations for r in rules[1:])]
    needs = any(r.output_quantizers for r in rules)
    for r in rules:  # rules equal to one of the inputs keep its name (the default's, for ONNX Runtime's)
        if set(r.fused_activations) == set(fused) and r.output_quantizers == needs:
            return r
    return PlacementRules(name="+".join(r.name for r in rules), fused_activations=tuple(fused), output_quantizers=needs)
