"""Fake-quant ops, observers and BN folding: integer grid, ranges, rounding, exactness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hub_dfq.quant.fold import fold_bn
from hub_dfq.quant.observers import ActObserver, activation_range, weight_scale
from hub_dfq.quant.quantizers import (
    ActQuantizer,
    WeightQuantizer,
    act_qrange,
    fake_quant,
    weight_qrange,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_quantizer_puts_weights_on_a_symmetric_integer_grid(bits):
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    wq = WeightQuantizer(bits, 6)
    wq.set_scale(weight_scale(w, bits, method="minmax"))
    out = wq(w)
    ints = out / wq.scale.view(-1, 1, 1, 1)
    assert torch.allclose(ints, ints.round(), atol=1e-4)
    qmin, qmax = weight_qrange(bits)
    assert (qmin, qmax) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert ints.round().min() >= qmin and ints.round().max() <= qmax
    # minmax: the largest weight of every channel lands exactly on +-qmax
    assert torch.equal(ints.round().abs().amax(dim=(1, 2, 3)), torch.full((6,), float(qmax)))
    wq.freeze(w)
    assert wq.weight_int.dtype == torch.int8 and torch.equal(wq(w), wq.weight_int.float() * wq.scale.view(-1, 1, 1, 1))


def test_rounding_is_half_to_even_and_clamps():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 7.4, 100.0, -100.0])
    out = fake_quant(x, torch.tensor(1.0), 0, -7, 7, ste=False)
    assert out.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 7.0, 7.0, -7.0]


def test_act_quantizer_unsigned_and_asymmetric_ranges():
    unsigned = ActQuantizer(4, signed=False)
    unsigned.set_range(-3.0, 1.5)  # negative part ignored after a ReLU
    assert int(unsigned.zero_point) == 0 and unsigned.range() == pytest.approx((0.0, 1.5))
    x = torch.linspace(-1, 2, 101)
    q = unsigned(x)
    levels = torch.unique(q / unsigned.scale)
    assert torch.allclose(levels, levels.round(), atol=1e-4) and len(levels) <= 16
    assert q.min() == 0 and q.max() == pytest.approx(1.5)

    signed = ActQuantizer(8, signed=True)
    signed.set_range(-1.0, 3.0)
    low, high = signed.range()
    assert low == pytest.approx(-1.0, abs=signed.scale.item()) and high == pytest.approx(3.0, abs=signed.scale.item())
    assert act_qrange(8) == (0, 255)
    assert signed(torch.zeros(3)).eq(0).all()  # zero is exact (integer zero point)
    q = signed(torch.linspace(-2, 4, 301))
    ints = q / signed.scale + signed.zero_point
    assert torch.allclose(ints, ints.round(), atol=1e-3) and ints.min() >= -1e-3 and ints.max() <= 255 + 1e-3


def test_ste_passes_gradients_and_lsq_scale_gets_one():
    q = ActQuantizer(4, signed=False)
    q.set_range(0, 1)
    q.scale.requires_grad_(True)
    x = torch.linspace(0, 2, 50, requires_grad=True)
    q(x).sum().backward()
    inside = (x.detach() > 0.05) & (x.detach() < 0.9)
    assert x.grad[inside].eq(1).all() and x.grad[x.detach() > 1.1].eq(0).all()
    assert q.scale.grad is not None and q.scale.grad.abs() > 0


def test_adaround_starts_at_nearest_and_hardens_to_floor_or_ceil():
    torch.manual_seed(1)
    w = torch.randn(4, 8)
    wq = WeightQuantizer(4, 4)
    wq.set_scale(weight_scale(w, 4, method="minmax"))
    nearest = wq(w).clone()
    wq.init_adaround(w)
    assert torch.allclose(wq(w), nearest)  # hard rounding of the initial alpha = nearest
    wq.soft = True
    soft_ints = wq.integer_weight(w)
    floor = torch.floor(w / wq.scale[:, None])
    assert ((soft_ints - floor) >= -1e-6).all() and ((soft_ints - floor) <= 1 + 1e-6).all()
    assert wq.rounding_regulariser(2.0) > 0
    # learned rounding survives freezing, also a second freeze (which must not re-round to nearest)
    with torch.no_grad():
        wq.alpha.fill_(10.0)  # every weight rounds up
    wq.soft = False
    wq.freeze(w)
    ceil = torch.clamp(floor + 1, wq.qmin, wq.qmax).to(torch.int8)
    assert torch.equal(wq.weight_int, ceil)
    wq.freeze(w)
    assert torch.equal(wq.weight_int, ceil)


def test_observers_minmax_percentile_mse():
    torch.manual_seed(0)
    obs = ActObserver(seed=0)
    data = torch.randn(64, 16, 8, 8).relu()
    data[0, 0, 0, 0] = 50.0  # one outlier
    obs.update(data)
    lo, hi = activation_range(obs, 4, signed=False, method="minmax")
    assert (lo, hi) == (0.0, 50.0)
    _, hi_p = activation_range(obs, 4, signed=False, method="percentile", percentile=99.9)
    _, hi_m = activation_range(obs, 4, signed=False, method="mse")
    assert 1.0 < hi_p < 10.0 and hi_m < 50.0
    w = torch.randn(8, 32)
    assert torch.all(weight_scale(w, 4, method="mse") <= weight_scale(w, 4, method="minmax") + 1e-7)
    with pytest.raises(ValueError, match="no values"):
        activation_range(ActObserver(), 4, signed=True)


def test_bn_folding_keeps_outputs():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.2, 3.0)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    ref = nn.Sequential(conv, bn).eval()
    x = torch.randn(4, 3, 16, 16)
    expected = ref(x)
    folded = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    folded.load_state_dict(conv.state_dict())
    fold_bn(folded, bn)
    assert (folded(x) - expected).abs().max() <= 1e-4


def test_largest_step_keeps_the_float32_grid_inside_the_bound():
    from hub_dfq.quant.quantizers import largest_step

    for bound, qmax in [(6.0, 255), (6.0, 15), (1.0, 255), (6.0, 127)]:
        step = np.float32(largest_step(bound, qmax))
        assert step * np.float32(qmax) <= np.float32(bound)  # what ONNX Runtime computes
        above = np.nextafter(step, np.float32(np.inf))
        assert above * np.float32(qmax) > np.float32(bound)  # and the largest such step


def test_project_shrinks_only_unsigned_bounded_steps_past_the_bound():
    from hub_dfq.quant.quantizers import ActQuantizer, largest_step

    q = ActQuantizer(8, signed=False)
    q.scale.data.fill_(0.1)
    q.project_()  # no bound known: unchanged
    assert float(q.scale) == pytest.approx(0.1)
    q.upper_bound = 6.0
    q.project_()
    assert float(q.scale) == largest_step(6.0, 255)
    q.scale.data.fill_(0.01)
    q.project_()  # inside the bound: unchanged
    assert float(q.scale) == pytest.approx(0.01)
    signed = ActQuantizer(8, signed=True)
    signed.upper_bound = 6.0
    signed.scale.data.fill_(0.1)
    signed.project_()
    assert float(signed.scale) == pytest.approx(0.1)
