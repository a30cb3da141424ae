"""QuantScheme / QuantConfig: validation, resolution order, JSON round trip."""

from __future__ import annotations

import pytest

from hub_dfq.errors import ConfigError
from hub_dfq.quant.config import QuantConfig, QuantScheme


@pytest.mark.parametrize("bits", [1, 9, 0, 16, 4.0, "4", True], ids=repr)
def test_bits_outside_2_8_are_rejected(bits):
    with pytest.raises(ConfigError, match="2 to 8"):
        QuantScheme(weights=bits)
    with pytest.raises(ConfigError, match="2 to 8"):
        QuantScheme(activations=bits)


def test_unknown_observer_and_override_field_are_rejected():
    with pytest.raises(ConfigError, match="weight_observer"):
        QuantScheme(weight_observer="percentile")
    with pytest.raises(ConfigError, match="act_observer"):
        QuantScheme(act_observer="kl")
    with pytest.raises(ConfigError, match="unknown quantization scheme field"):
        QuantConfig(overrides={"layer1.*": {"wieghts": 8}})
    with pytest.raises(ConfigError, match="2 to 8"):
        QuantConfig(overrides={"layer1.*": {"weights": 12}})
    with pytest.raises(ConfigError, match="first/last"):
        QuantConfig(first_last_bits=1)


def test_resolution_order_default_first_last_then_overrides():
    cfg = QuantConfig(default=QuantScheme(weights=4, activations=4), first_last_bits=8,
                      overrides={"layer3.*": {"weights": 2}, "linear": {"activations": 6}})
    assert (cfg.scheme_for("layer1.0.conv1").weights, cfg.scheme_for("layer1.0.conv1").activations) == (4, 4)
    assert cfg.scheme_for("conv1", first=True).weights == 8
    assert cfg.scheme_for("layer3.2.conv2").weights == 2
    last = cfg.scheme_for("linear", last=True)
    assert (last.weights, last.activations) == (8, 6)  # the override wins over the first/last policy
    assert QuantConfig(first_last_bits=None).scheme_for("conv1", first=True).weights == 4


def test_residual_bits_and_globs():
    cfg = QuantConfig(default=QuantScheme(weights=4, activations=4), residual_bits=8, exclude=("layer1.*",))
    assert cfg.residual_scheme("layer2.0.add").activations == 8
    assert QuantConfig(residual_bits=None).residual_scheme("layer2.0.add").activations == 4
    assert not cfg.selected("layer1.0.conv1") and cfg.selected("layer2.0.conv1")


def test_json_round_trip_and_hashable():
    cfg = QuantConfig(default=QuantScheme(weights=3, activations=5, act_observer="percentile"),
                      overrides={"layer3.*": QuantScheme(weights=8, activations=8)}, exclude=["linear"])
    again = QuantConfig.from_json(cfg.to_json())
    assert again == cfg and hash(again) == hash(cfg)
    with pytest.raises(ConfigError, match="unknown quantization config key"):
        QuantConfig.from_dict({"defaults": {}})
    with pytest.raises(ConfigError, match="not valid JSON"):
        QuantConfig.from_json("{")
