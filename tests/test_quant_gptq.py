"""Second-order rounding (GPTQ): the columns it sees, the rounding it chooses, and what it does to a model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hub_dfq
from hub_dfq.quant.config import QuantScheme
from hub_dfq.quant.gptq import (
    GPTQConfig,
    HessianStats,
    damped,
    float_target,
    gptq_rounding,
    layer_columns,
    refine_rounding,
    search_scales,
)
from hub_dfq.quant.modules import QuantConv1d, QuantConv2d, QuantLinear
from hub_dfq.quant.quantizers import weight_qrange

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEME = QuantScheme(weights=4, activations=8)


def _output_via_columns(layer, x):
    cols = layer_columns(layer, x)  # (groups, K, M)
    groups = cols.shape[0]
    w = layer.weight.detach().reshape(groups, layer.weight.shape[0] // groups, -1)
    return torch.bmm(w, cols)  # (groups, R, M)


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(6, 8, 3, padding=1),
    lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, dilation=1),
    lambda: nn.Conv2d(6, 8, (3, 5), stride=(1, 2), padding=(2, 1), dilation=2),
    lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6),  # depthwise
    lambda: nn.Conv2d(6, 4, 1, groups=2),
    lambda: nn.Conv2d(6, 8, 1, stride=2),
    lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"),
], ids=["3x3", "stride2", "rect-dilated", "depthwise", "grouped-1x1", "1x1-stride2", "reflect"])
def test_columns_reproduce_the_convolution(make):
    torch.manual_seed(0)
    conv = make()
    layer = QuantConv2d.from_float(conv, SCHEME)
    x = torch.randn(2, 6, 9, 11)
    reflect = conv.padding_mode != "zeros"
    padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode) if reflect else x
    expected = F.conv2d(padded, conv.weight, None, conv.stride, 0 if reflect else conv.padding, conv.dilation,
                        conv.groups)
    got = _output_via_columns(layer, x)  # (groups, R, N * L)
    n, c, h, w = expected.shape
    groups = got.shape[0]
    expected = expected.reshape(n, groups, c // groups, h * w).permute(1, 2, 0, 3).reshape(groups, c // groups, -1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_columns_of_asymmetric_pads_linear_and_conv1d():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, stride=2, groups=4)
    layer = QuantConv2d.from_float(conv, SCHEME, pre_pad=(0, 1, 0, 1))  # TF "same" at stride 2
    x = torch.randn(2, 4, 8, 8)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, None, 2, 0, 1, 4)
    got = _output_via_columns(layer, x)
    assert got.numel() == expected.numel()
    torch.testing.assert_close(got.reshape(4, 2, 16).permute(1, 0, 2), expected.reshape(2, 4, 16))

    linear = QuantLinear.from_float(nn.Linear(5, 3), SCHEME)
    x = torch.randn(4, 7, 5)
    torch.testing.assert_close(_output_via_columns(linear, x)[0].t(), x.reshape(-1, 5) @ linear.weight.detach().t())

    conv1d = QuantConv1d.from_float(nn.Conv1d(3, 4, 3, padding=1), SCHEME)
    x = torch.randn(2, 3, 10)
    expected = F.conv1d(x, conv1d.weight.detach(), None, 1, 1)
    got = _output_via_columns(conv1d, x)[0]
    torch.testing.assert_close(got, expected.permute(1, 0, 2).reshape(4, -1), atol=1e-5, rtol=1e-5)


def _reference_gptq(w, h, scale, qmin, qmax, damp):
    """GPTQ for one group written plainly (no batching, natural column order)."""
    w = w.double().clone()
    h = h.double().clone()
    h += torch.eye(len(h), dtype=h.dtype) * damp * torch.diagonal(h).mean()
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    start = torch.zeros_like(w)
    for i in range(w.shape[1]):
        start[:, i] = w[:, i] / scale
        q = torch.clamp(torch.round(start[:, i]), qmin, qmax) * scale
        err = (w[:, i] - q) / u[i, i]
        w[:, i + 1:] -= err[:, None] * u[i, i + 1:][None, :]
    return start


def _correlated_problem(groups=3, rows=5, k=9, m=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(groups, k, k, generator=g)
    x = torch.bmm(mix, torch.randn(groups, k, m, generator=g))  # strongly correlated inputs
    w = torch.randn(groups, rows, k, generator=g)
    stats = HessianStats()
    for chunk in x.split(100, dim=2):
        stats.update(chunk)
    return w, x, stats.hessian


def test_gptq_matches_a_plain_implementation_per_group():
    w, _, h = _correlated_problem()
    qmin, qmax = weight_qrange(4)
    scale = (w.abs().amax(-1) / qmax).double()
    start = gptq_rounding(w, h, scale, qmin, qmax, damp=0.01, act_order=False)
    for g in range(w.shape[0]):
        ref = _reference_gptq(w[g], h[g], scale[g], qmin, qmax, 0.01)
        torch.testing.assert_close(start[g].double(), ref, atol=1e-4, rtol=1e-4)


def test_float_target_maps_quantized_inputs_to_the_float_output_and_survives_dead_inputs():
    w, x, _ = _correlated_problem(groups=3, rows=8, k=9)
    x = x.double()
    x[1] = 0.0  # a depthwise channel whose quantized input is always zero (a whole dead group)
    x[2, 4] = 0.0  # one dead column
    # inputs off by a linear map of themselves: some weights reach the float output exactly
    x_float = x + 0.1 * torch.bmm(torch.randn(3, 9, 9, dtype=x.dtype, generator=torch.Generator().manual_seed(1)), x)
    n = x.shape[2]
    h = torch.bmm(x, x.transpose(1, 2)) / n
    drift = torch.bmm(x_float - x, x.transpose(1, 2)) / n
    target = float_target(w.double(), h, drift, damp=1e-6)
    assert torch.isfinite(target).all()
    torch.testing.assert_close(target[1], w[1].double())  # nothing to fit: the weights stay
    # a live group: the least-squares weights reach the float output from the quantized inputs
    reached = torch.bmm(target[:1], x[:1]).sub(torch.bmm(w[:1].double(), x_float[:1])).square().sum()
    plain = torch.bmm(w[:1].double(), x[:1]).sub(torch.bmm(w[:1].double(), x_float[:1])).square().sum()
    assert reached < 1e-6 * plain


def test_hessian_is_the_running_mean_of_column_products():
    _, x, h = _correlated_problem()
    torch.testing.assert_close(h, torch.bmm(x.double(), x.double().transpose(1, 2)) / x.shape[2])


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_below_nearest_rounding(act_order):
    w, x, h = _correlated_problem(groups=4, rows=16, k=27)
    qmin, qmax = weight_qrange(4)
    scale = w.abs().amax(-1) / qmax
    start = gptq_rounding(w, h, scale, qmin, qmax, act_order=act_order)
    ints = torch.clamp(torch.round(start), qmin, qmax)
    assert ints.min() >= qmin and ints.max() <= qmax and torch.equal(ints, ints.round())

    def error(q):
        return float(torch.bmm((w - q * scale[..., None]), x).square().sum())

    nearest = torch.clamp(torch.round(w / scale[..., None]), qmin, qmax)
    assert error(ints) < 0.6 * error(nearest)


def test_refined_rounding_lowers_gptqs_error_and_stays_on_the_grid():
    """Coordinate descent after GPTQ: every move lowers the damped output error, so it ends at or below GPTQ's,
    and on correlated inputs strictly below; the integers stay in range."""
    w, x, h = _correlated_problem(groups=4, rows=16, k=27)
    qmin, qmax = weight_qrange(4)
    scale = w.abs().amax(-1) / qmax
    hd = damped(h, 0.01)
    gptq = torch.clamp(torch.round(gptq_rounding(w, h, scale, qmin, qmax)), qmin, qmax).double()
    refined = refine_rounding(w, hd, scale, gptq, qmin, qmax, sweeps=4)
    assert torch.equal(refined, refined.round()) and refined.min() >= qmin and refined.max() <= qmax

    def error(q):
        delta = w.double() - q * scale.double()[..., None]
        return torch.einsum("grk,gkl,grl->gr", delta, hd, delta)

    assert (error(refined) <= error(gptq) + 1e-12).all()
    assert error(refined).sum() < 0.99 * error(gptq).sum()
    assert torch.equal(refine_rounding(w, hd, scale, gptq, qmin, qmax, sweeps=0), gptq)


def test_scale_search_never_does_worse_than_the_observer_step():
    w, _, h = _correlated_problem(groups=2, rows=8, k=9)
    qmin, qmax = weight_qrange(3)
    observer = w.abs().amax(-1) / qmax
    diag = torch.diagonal(h, dim1=1, dim2=2).float()
    best = search_scales(w, diag, observer, qmin, qmax)

    def error(s):
        q = torch.clamp(torch.round(w / s[..., None]), qmin, qmax) * s[..., None]
        return ((w - q).square() * diag[:, None]).sum(-1)

    assert (best <= observer + 1e-7).all() and (error(best) <= error(observer) + 1e-6).all()


def test_bad_settings():
    from hub_dfq.errors import ConfigError

    with pytest.raises(ConfigError, match="damp"):
        GPTQConfig(damp=0)
    with pytest.raises(ConfigError, match="scale_search"):
        GPTQConfig(scale_search="mse")
    with pytest.raises(ConfigError, match="refine"):
        GPTQConfig(refine=-1)


@pytest.fixture(scope="module")
def real_64(model, cifar_train_parquet):
    from hub_dfq.quant.data import calibration_tensor

    return calibration_tensor(model, str(cifar_train_parquet), size=64)[0]


@pytest.fixture(scope="module")
def test_1000(cifar_test_parquet):
    return hub_dfq.load_images(str(cifar_test_parquet), limit=1000)


def test_gptq_algorithm_beats_nearest_rounding_at_3_bits(model, real_64, test_1000):
    common = dict(weights=3, activations=8, calibration=real_64, progress=False)
    nearest = hub_dfq.quantize(model, algorithm="calibrate", **common)
    gptq = hub_dfq.quantize(model, algorithm="gptq", **common)
    a = nearest.evaluate(test_1000, progress=False)["top1"]
    b = gptq.evaluate(test_1000, progress=False)["top1"]
    assert b > a + 5.0, (a, b)
    layers = gptq.history["layers"]
    assert len(layers) == len(gptq.integer_layers()) and all(v["gptq"] <= v["nearest"] for v in layers.values())
    assert gptq.method == "gptq" and "damp" in gptq.method_config
    # what the checkpoint holds is what was evaluated: integers frozen, no rounding start point left behind
    assert all(layer.weight_quantizer.frozen and layer.weight_quantizer.start is None
               for _, layer in hub_dfq.quant.modules.quant_layers(gptq.module))
