"""Running a registered quantization algorithm: its settings and the context it works in.

Settings of an algorithm come from three places, later ones winning: the dataclass defaults, the
preset (``Preset.algorithms[name]``) and the caller (``settings={name: dataclass or dict}``); a
``seed`` field always takes the run's seed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import fx

from ..errors import ConfigError
from ..registry import resolve
from ..runner import Runner
from .registry import QUANT_ALGORITHMS, Preset, QuantAlgorithm
from .resume import RunState

__all__ = ["AlgorithmContext", "algorithm_settings", "settings_resolver", "settings_dict", "recorded_settings",
           "run_algorithm"]


def algorithm_settings(algorithm: QuantAlgorithm, preset: Preset, override: Any = None, *, seed: int) -> Any:
    """The settings object ``algorithm`` runs with (``None`` if it takes none).

    Raises:
        ConfigError: an override of the wrong type or with unknown fields.
    """
    if algorithm.settings is None:
        if override:
            raise ConfigError(f"algorithm {algorithm.name!r} takes no settings, got {override!r}")
        return None
    cls = resolve(algorithm.settings)
    if isinstance(override, cls):
        settings = override
    else:
        values = {**dict(preset.algorithms.get(algorithm.name, {})), **dict(override or {})}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown} of algorithm {algorithm.name!r}; known: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        for key, value in dict(override or {}).items():
            if not _fits(value, hints.get(key, Any)):
                raise ConfigError(f"setting {key!r} of algorithm {algorithm.name!r} must be {_type_name(hints[key])}, "
                                  f"got {value!r}")
        settings = cls(**values)
    if any(f.name == "seed" for f in dataclasses.fields(cls)):
        settings = dataclasses.replace(settings, seed=seed)
    return settings


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type (ints pass as floats, lists as tuples): the settings classes only
    use scalars, optionals and fixed-length tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is tuple:
        return (isinstance(value, (tuple, list)) and len(value) == len(args)
                and all(_fits(v, a) for v, a in zip(value, args)))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (bool, str, type(None)):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if typing.get_origin(hint) else getattr(hint, "__name__", str(hint))


def settings_resolver(preset: Preset, settings: Mapping[str, Any] | None, *, seed: int) -> Callable[[str], Any]:
    """``name -> settings object`` of every algorithm in one run (memoised: each is built and checked once).

    Args:
        preset: the (possibly time-scaled) preset whose values come before the caller's.
        settings: ``{algorithm name: settings dataclass or {field: value}}`` from the caller.
        seed: the run's seed.

    Raises:
        ConfigError: a settings key that names no registered algorithm.
    """
    settings = dict(settings or {})
    for name in settings:
        QUANT_ALGORITHMS.get(name)
    built: dict[str, Any] = {}

    def settings_of(name: str) -> Any:
        if name not in built:
            built[name] = algorithm_settings(QUANT_ALGORITHMS.get(name), preset, settings.get(name), seed=seed)
        return built[name]

    return settings_of


def settings_dict(settings: Any) -> dict[str, Any]:
    """A settings object as JSON-able data (for cards, configs and cache keys)."""
    if settings is None:
        return {}
    if hasattr(settings, "to_dict"):
        return settings.to_dict()
    return dataclasses.asdict(settings)


def recorded_settings(name: str, settings_of: Callable[[str], Any]) -> dict[str, Any]:
    """The settings ``name`` runs with, as data, with those of the algorithms it starts from (distill <- reconstruct
    <- gptq): what a card records and a fingerprint keys on."""
    recorded = settings_dict(settings_of(name))
    init = getattr(settings_of(name), "init", None)
    while init in QUANT_ALGORITHMS and init not in recorded and init != "calibrate":
        recorded[init] = settings_dict(settings_of(init))
        init = getattr(settings_of(init), "init", None)
    return recorded


@dataclass
class AlgorithmContext:
    """What an algorithm's ``run`` function gets.

    Attributes:
        module: the prepared, calibrated model (changed in place).
        node_blocks: the block each graph node belongs to (for block-wise algorithms).
        data: normalised calibration inputs ``(N, C, H, W)``.
        settings: the algorithm's settings object (``None`` if it takes none).
        seed: the run's seed.
        progress: show progress bars (``None``: on a terminal).
        state: where to save progress and resume from (``None``: no resuming).
        settings_of: the settings another algorithm gets in this run (e.g. distillation that starts
            from a reconstructed model).
        runner: the processes that share the run (``None``: :class:`~hub_dfq.runner.Runner` over the process
            group of the environment).
    """

    module: fx.GraphModule
    node_blocks: dict[str, str]
    data: torch.Tensor
    settings: Any
    seed: int
    progress: bool | None
    state: RunState | None
    settings_of: Callable[[str], Any]
    runner: Runner | None = None

    def run(self, name: str) -> dict[str, Any]:
        """Run another registered algorithm on this context's model and data (with its settings in this run)."""
        algorithm = QUANT_ALGORITHMS.get(name)
        return resolve(algorithm.run)(dataclasses.replace(self, settings=self.settings_of(name)))


def run_algorithm(name: str, context: AlgorithmContext) -> dict[str, Any]:
    """Run the registered algorithm ``name``; returns its history."""
    history = resolve(QUANT_ALGORITHMS.get(name).run)(context)
    if not isinstance(history, Mapping):
        raise TypeError(f"algorithm {name!r} must return a dict (its history), got {type(history).__name__}")
    return dict(history)
