"""Tracing, BN folding, module swaps, quantizer placement, unsupported-layer reports, integer exactness."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hub_dfq.errors import UnsupportedModelError
from hub_dfq.quant.calibrate import (
    calibrate_activations,
    calibrate_weights,
    freeze_weights,
    quant_mode,
)
from hub_dfq.quant.config import QuantConfig, QuantScheme
from hub_dfq.quant.modules import (
    QuantConv2d,
    QuantLinear,
    qmodule_for,
    register_qmodule,
)
from hub_dfq.quant.prepare import prepare


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class Tiny(nn.Module):
    def __init__(self, norm: nn.Module | None = None):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.layers = nn.Sequential(Block(8), Block(8))
        self.norm = norm or nn.Identity()
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.norm(self.layers(x))
        return self.head(x.mean(dim=(2, 3)))


def _randomize_bn(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return model.eval()


def test_prepare_folds_bn_swaps_layers_and_keeps_float_outputs():
    model = _randomize_bn(Tiny())
    x = torch.randn(4, 3, 16, 16)
    prepared = prepare(model, QuantConfig(), example_input=x[:1])
    gm, report = prepared.module, prepared.report
    assert sorted(report.folded_bn) == ["bn", "layers.0.bn1", "layers.0.bn2", "layers.1.bn1", "layers.1.bn2"]
    assert isinstance(gm.get_submodule("stem"), QuantConv2d) and isinstance(gm.get_submodule("head"), QuantLinear)
    assert report.quantized["stem"]["first"] and report.quantized["head"]["last"]
    assert report.quantized["stem"]["weights"] == 8 and report.quantized["layers.0.conv1"]["weights"] == 4
    assert report.residual_adds == ["layers.0.add", "layers.1.add_1"] and not report.unsupported
    with quant_mode(gm, enabled=False):
        assert (gm(x) - model(x)).abs().max() <= 1e-4  # folding keeps the outputs
    kinds = {(p.kind, p.signed) for p in report.act_points}
    assert ("input", True) in kinds and ("input", False) in kinds and ("residual", True) in kinds
    assert isinstance(model.bn, nn.BatchNorm2d)  # the caller's model is untouched


class FunctionalHead(nn.Module):
    """A classifier that multiplies by its own parameter: no layer module to swap."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(10, 8))

    def forward(self, x):
        return F.linear(x, self.weight)


def test_what_stays_float_is_named_with_its_reason():
    model = _randomize_bn(Tiny(norm=nn.GroupNorm(2, 8)))
    model.head = FunctionalHead()
    prepared = prepare(model, QuantConfig(exclude=("layers.1.*",)), example_input=torch.zeros(1, 3, 8, 8))
    report = prepared.report
    assert report.float_by_design == ["norm (GroupNorm: normalisation over the tensor's own statistics)"]
    assert report.unsupported == ["head (FunctionalHead: weights of a functional matrix product, no layer to quantize)"]
    assert "layers.1.conv1" in report.excluded
    assert not isinstance(prepared.module.get_submodule("layers.1.conv1"), QuantConv2d)


def test_model_without_conv_or_linear_is_rejected():
    class NoWeights(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10]

    with pytest.raises(UnsupportedModelError, match="no convolution or linear"):
        prepare(NoWeights(), QuantConfig(), example_input=torch.zeros(1, 3, 8, 8))


def test_registry_resolves_subclasses_but_not_changed_forwards():
    class MyConv(nn.Conv2d):
        pass

    class SameConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(F.pad(x, (1, 1, 1, 1)))

    assert qmodule_for(MyConv(3, 3, 1)) is QuantConv2d
    assert qmodule_for(SameConv(3, 3, 1)) is None
    register_qmodule(SameConv)(QuantConv2d)  # explicit registration is the way to opt in
    try:
        assert qmodule_for(SameConv(3, 3, 1)) is QuantConv2d
    finally:
        from hub_dfq.quant import modules

        modules._REGISTRY.pop(SameConv)


def test_mixed_precision_overrides():
    model = _randomize_bn(Tiny())
    cfg = QuantConfig(default=QuantScheme(weights=4, activations=4), overrides={"layers.1.*": {"weights": 2}})
    report = prepare(model, cfg, example_input=torch.zeros(1, 3, 8, 8)).report
    assert report.quantized["layers.1.conv2"]["weights"] == 2 and report.quantized["layers.0.conv2"]["weights"] == 4


def test_simulation_equals_integer_arithmetic():
    """A quantized conv's output is exactly acc * s_in * s_w + bias, acc an integer convolution."""
    model = _randomize_bn(Tiny())
    x = torch.randn(16, 3, 16, 16)
    prepared = prepare(model, QuantConfig(default=QuantScheme(weights=4, activations=4)), example_input=x[:1])
    gm = prepared.module
    calibrate_weights(gm)
    calibrate_activations(gm, x)
    freeze_weights(gm)
    conv = gm.get_submodule("layers.0.conv2")
    captured = {}
    handle = conv.register_forward_hook(lambda m, a, o: captured.update(inp=a[0], out=o))
    gm(x)
    handle.remove()
    aq = conv.input_quantizer
    x_int = torch.round(captured["inp"].double() / aq.scale.double()) + int(aq.zero_point)
    assert torch.allclose(x_int, x_int.round()) and x_int.min() >= 0 and x_int.max() <= 15
    acc = F.conv2d(x_int - int(aq.zero_point), conv.weight_quantizer.weight_int.double(), padding=1)
    assert torch.equal(acc, acc.round())  # integer accumulator
    scale = (aq.scale.double() * conv.weight_quantizer.scale.double()).view(1, -1, 1, 1)
    expected = (acc + conv.bias_int().double().view(1, -1, 1, 1)) * scale
    assert torch.allclose(captured["out"].double(), expected, atol=1e-5, rtol=1e-5)


class Bounded(nn.Module):
    """ReLU6 as a module, F.relu6, F.hardtanh and a plain ReLU, each read by a conv (through a pool for one)."""

    def __init__(self):
        super().__init__()
        self.stem, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6()
        self.c1, self.c2, self.c3, self.c4 = (nn.Conv2d(8, 8, 1) for _ in range(4))

    def forward(self, x):
        x = self.act(self.stem(x))
        x = F.relu6(self.c1(F.max_pool2d(x, 2)))
        x = F.hardtanh(self.c2(x), 0.0, 2.5)
        return self.c4(F.relu(self.c3(x)))


def test_quantizers_know_the_bound_of_a_relu6_or_hardtanh_they_read():
    prepared = prepare(Bounded().eval(), QuantConfig(), example_input=torch.randn(1, 3, 8, 8))
    modules = dict(prepared.module.named_modules())
    bounds = {p.consumers[0]: modules[f"act_quantizers.{p.name}"].upper_bound for p in prepared.report.act_points}
    # the stem reads the image (no bound); c1 reads ReLU6 through a max pool and the quantizer before it
    # (on the stem's output); c4 reads a plain ReLU; c2's output quantizer (read by hardtanh) has no bound
    assert bounds == {"stem": None, "max_pool2d": 6.0, "c1": 6.0, "c2": 6.0, "hardtanh": None, "c3": 2.5,
                      "c4": None}
