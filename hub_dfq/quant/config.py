"""Quantization configuration as data: frozen dataclasses, checked on construction, JSON round-trip.

A :class:`QuantScheme` says how one layer is quantized (bit widths, range finders); a
:class:`QuantConfig` says which scheme every layer gets: a default, the first/last-layer policy and
per-module overrides selected by glob patterns on qualified module names (mixed precision).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ConfigError
from .placement import PlacementRules
from .registry import ACT_OBSERVERS, WEIGHT_GRIDS, WEIGHT_OBSERVERS

__all__ = ["QuantScheme", "QuantConfig", "MIN_BITS", "MAX_BITS", "GRAPH_VERSION"]

MIN_BITS, MAX_BITS = 2, 8
# The rules that build the quantized graph (hub_dfq.quant.prepare). 1: hub-dfq 0.1.0; 2: "same"-padding
# convolutions quantized, zero pads absorbed by the convolution after them, output quantizers where they let
# ONNX Runtime run a convolution as an integer kernel. Checkpoints record it, so a reload rebuilds its own graph.
GRAPH_VERSION = 2


def check_bits(value: Any, what: str) -> int:
    """``value`` as an int bit width in [2, 8], or a :class:`ConfigError` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        raise ConfigError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS} bits, got {value!r}")
    return value


@dataclass(frozen=True)
class QuantScheme:
    """How one layer is quantized.

    Args:
        weights: weight bit width (2-8), one scale per output channel.
        activations: bit width (2-8) of the activations entering the layer, one scale per tensor
            (unsigned after ReLU, asymmetric with a zero point otherwise).
        weight_observer: weight range finder, ``"minmax"`` or ``"mse"`` (or another registered one).
        act_observer: activation range finder, ``"minmax"``, ``"percentile"`` or ``"mse"`` (or another
            registered one).
        percentile: upper percentile kept by the ``"percentile"`` observer (the lower one mirrors it).
        enabled: ``False`` keeps the layer in full precision.
        weight_grid: ``"asymmetric"`` (below 8 bits: integers in ``[low, low + 2^b - 1]`` per output channel, all
            ``2^b`` levels over the channel's own range, zero exact; 8-bit weights stay symmetric) or ``"symmetric"``
            (``[-(2^(b-1)-1), 2^(b-1)-1]``). Configs saved before asymmetric grids existed read as symmetric.
    """

    weights: int = 4
    activations: int = 4
    weight_observer: str = "mse"
    act_observer: str = "mse"
    percentile: float = 99.99
    enabled: bool = True
    weight_grid: str = "asymmetric"

    def __post_init__(self) -> None:
        if self.weight_grid not in WEIGHT_GRIDS:
            raise ConfigError(f"unknown weight grid {self.weight_grid!r}: use one of {', '.join(WEIGHT_GRIDS)}")
        check_bits(self.weights, "weight bits")
        check_bits(self.activations, "activation bits")
        WEIGHT_OBSERVERS.get(self.weight_observer)
        ACT_OBSERVERS.get(self.act_observer)
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile!r}")

    def replace(self, **changes: Any) -> "QuantScheme":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown quantization scheme field(s) {sorted(unknown)}; "
                              f"known: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)


def _freeze_overrides(overrides: Any) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    """Normalise ``{pattern: QuantScheme | {field: value}}`` (or pairs) into a hashable tuple."""
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    frozen = []
    for pattern, change in items:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"override patterns must be non-empty glob strings, got {pattern!r}")
        if isinstance(change, QuantScheme):
            change = dataclasses.asdict(change)
        elif isinstance(change, tuple):
            change = dict(change)
        if not isinstance(change, Mapping):
            raise ConfigError(f"override for {pattern!r} must be a QuantScheme or a dict of its fields, got {change!r}")
        QuantScheme().replace(**change)  # validates field names and values now, not at use
        frozen.append((pattern, tuple(sorted(change.items()))))
    return tuple(frozen)


@dataclass(frozen=True)
class QuantConfig:
    """Which scheme each layer of a model gets.

    Resolution order for a module ``name``: ``default``; then ``first_last_bits`` for the first
    weight layer (the one reading the image) and the last one (the classifier); then every
    override whose glob pattern matches ``name``, in order (later ones win).

    Args:
        default: scheme of every quantized layer.
        first_last_bits: weight and input-activation bits of the first and last weight layers;
            ``None`` treats them like the others.
        residual_bits: bits of the operands of residual additions. Integer inference engines keep
            the residual stream in int8 even when convolutions read 4-bit inputs; ``None`` uses the
            activation bits of the default scheme.
        overrides: ``{glob pattern: QuantScheme or {field: value}}``, e.g.
            ``{"layer3.*": {"weights": 8}}`` (globs, not regular expressions).
        include: globs of module names to quantize (default all).
        exclude: globs of module names to keep in full precision.
        output_quantizers: quantize a convolution's output (at ``residual_bits``) where a float op reads it
            before any quantizer does (a SiLU, a normalisation, a pooling), so that ONNX Runtime can run the
            convolution as an integer kernel; graph version 2 and later.
        graph_version: version of the rules that build the quantized graph (``GRAPH_VERSION``, the
            newest, by default); a checkpoint records it so that a reload builds the graph it was saved from.
        placement: the inference backend's :class:`~hub_dfq.quant.placement.PlacementRules` (what its integer
            kernels fuse, where they need output quantizers); the default is ONNX Runtime's. Pass a backend's
            with ``hub_dfq.BACKENDS.get(name).placement``.

    Raises:
        ConfigError: a bit width outside 2-8, an unknown observer or override field.

    Example:
        >>> cfg = QuantConfig(default=QuantScheme(weights=4, activations=4), overrides={"layer1.*": {"weights": 8}})
        >>> cfg.scheme_for("layer1.0.conv1").weights
        8
    """

    default: QuantScheme = field(default_factory=QuantScheme)
    first_last_bits: int | None = 8
    residual_bits: int | None = 8
    overrides: Any = ()
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    output_quantizers: bool = True
    graph_version: int = GRAPH_VERSION
    placement: PlacementRules = field(default_factory=PlacementRules)

    def __post_init__(self) -> None:
        if isinstance(self.default, Mapping):
            object.__setattr__(self, "default", QuantScheme(**self.default))
        if not isinstance(self.default, QuantScheme):
            raise ConfigError(f"default must be a QuantScheme, got {type(self.default).__name__}")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first/last layer bits")
        if self.residual_bits is not None:
            check_bits(self.residual_bits, "residual bits")
        object.__setattr__(self, "overrides", _freeze_overrides(self.overrides))
        for attr in ("include", "exclude"):
            value = getattr(self, attr)
            value = (value,) if isinstance(value, str) else tuple(value)
            if not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"{attr} must be glob strings, got {value!r}")
            object.__setattr__(self, attr, value)
        if not isinstance(self.output_quantizers, bool):
            raise ConfigError(f"`output_quantizers` must be True or False, got {self.output_quantizers!r}")
        if isinstance(self.placement, Mapping):
            object.__setattr__(self, "placement", PlacementRules.from_dict(self.placement))
        if not isinstance(self.placement, PlacementRules):
            raise ConfigError(f"placement must be PlacementRules, got {type(self.placement).__name__}")
        if isinstance(self.graph_version, bool) or self.graph_version not in range(1, GRAPH_VERSION + 1):
            newer = isinstance(self.graph_version, int) and self.graph_version > GRAPH_VERSION
            hint = " (written by a newer hub-dfq: upgrade with `pip install -U hub-dfq`)" if newer else ""
            raise ConfigError(f"`graph_version` must be an integer from 1 to {GRAPH_VERSION}, "
                              f"got {self.graph_version!r}{hint}")

    # ---- resolution --------------------------------------------------------------------------
    def selected(self, name: str) -> bool:
        """Whether ``name`` passes the include/exclude globs."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def scheme_for(self, name: str, *, first: bool = False, last: bool = False) -> QuantScheme:
        """The scheme of module ``name`` (see the class docstring for the order)."""
        scheme = self.default
        if (first or last) and self.first_last_bits is not None:
            scheme = scheme.replace(weights=self.first_last_bits, activations=self.first_last_bits)
        for pattern, change in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                scheme = scheme.replace(**dict(change))
        return scheme

    def residual_scheme(self, name: str) -> QuantScheme:
        """Scheme of the operands of the residual addition ``name`` (overrides apply too)."""
        scheme = self.default
        if self.residual_bits is not None:
            scheme = scheme.replace(activations=self.residual_bits)
        for pattern, change in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                scheme = scheme.replace(**dict(change))
        return scheme

    # ---- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        # why: the default (ONNX Runtime's) rules are left out, so checkpoints made for it keep their bytes and
        # fingerprints, and ones written before backends had rules read back the same
        default = dataclasses.replace(self.placement, name=PlacementRules().name) == PlacementRules()
        placement = {} if default else {"placement": self.placement.to_dict()}
        scheme = dataclasses.asdict(self.default)
        if scheme["weight_grid"] == "symmetric":  # why: checkpoints from before asymmetric grids keep their bytes
            del scheme["weight_grid"]
        return {
            "default": scheme,
            "first_last_bits": self.first_last_bits,
            "residual_bits": self.residual_bits,
            "overrides": {pattern: dict(change) for pattern, change in self.overrides},
            "include": list(self.include),
            "exclude": list(self.exclude),
            "output_quantizers": self.output_quantizers,
            "graph_version": self.graph_version,
            **placement,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantConfig":
        """Read :meth:`to_dict`'s output; one without ``graph_version`` predates it and gets graph version 1."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown quantization config key(s) {sorted(unknown)}; known: {sorted(known)}")
        data = dict(data)
        data.setdefault("graph_version", 1)
        if "default" in data:  # saved without a grid: from before asymmetric grids, or symmetric (to_dict)
            data["default"] = QuantScheme(**{"weight_grid": "symmetric", **data["default"]})
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"quantization config is not valid JSON: {err}") from err
        return cls.from_dict(data)
