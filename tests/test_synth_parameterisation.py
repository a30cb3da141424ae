"""The decorrelated parameterisation (bns+d): exact round trips, photograph-like steps, clamping, reruns."""

from __future__ import annotations

import json

import pytest
import torch

from hub_dfq.synth.api import synthesize
from hub_dfq.synth.parameterisation import DecorrelatedParameterisation, parameterisation_for
from hub_dfq.synth.registry import SynthMethod

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]


def _band_power(images: torch.Tensor, low: float, high: float) -> float:
    grey = images.mean(1)
    power = torch.fft.fft2(grey - grey.mean((1, 2), keepdim=True)).abs().square().mean(0)
    h, w = power.shape
    radius = (torch.fft.fftfreq(h)[:, None].square() + torch.fft.fftfreq(w)[None, :].square()).sqrt()
    return float(power[(radius >= low) & (radius < high)].mean())


@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 24, 31), (1, 28, 28)])
def test_images_round_trip_through_the_parameters(shape):
    space = parameterisation_for("decorrelated", shape)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(space.to_images(space.to_params(x)), x, atol=1e-5, rtol=0)


def test_a_step_in_the_parameters_is_a_photograph_like_change_of_the_image():
    """Adam moves every coordinate about equally: over pixels that is white noise; here it has most of its energy
    at low frequencies and colour channels that correlate as in photographs."""
    space = DecorrelatedParameterisation((3, 64, 64))
    step = torch.randn(64, 3, 64, 33, 2, generator=torch.Generator().manual_seed(0))
    change = space.to_images(step)
    channels = change.permute(1, 0, 2, 3).reshape(3, -1)
    correlation = torch.corrcoef(channels)
    assert correlation[0, 1] == pytest.approx(0.8, abs=0.05) and correlation[1, 2] == pytest.approx(0.8, abs=0.05)
    assert _band_power(change, 0.02, 0.04) > 50 * _band_power(change, 0.32, 0.5)
    white = torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert _band_power(white, 0.02, 0.04) < 2 * _band_power(white, 0.32, 0.5)
    # a step changes the image about as much as a step over pixels (a complex coefficient is two coordinates)
    assert 1.0 < float(change.square().mean()) < 2.0


def test_projection_keeps_the_images_in_the_valid_box():
    space = DecorrelatedParameterisation((3, 16, 16))
    params = space.to_params(3 * torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    low, high = torch.tensor([-2.0, -1.9, -1.8]).view(3, 1, 1), torch.tensor([2.2, 2.3, 2.6]).view(3, 1, 1)
    space.project(params, low, high)
    images = space.to_images(params)
    assert (images >= low - 1e-4).all() and (images <= high + 1e-4).all()


def test_unknown_parameterisation_is_named_when_a_method_registers_it():
    with pytest.raises(ValueError, match="unknown parameterisation 'fourier'; known: pixels, decorrelated"):
        parameterisation_for("fourier", (3, 8, 8))
    with pytest.raises(ValueError, match="method 'mine': unknown parameterisation 'fourier'"):
        SynthMethod("mine", summary="", description="", parameterisation="fourier")


def test_bns_d_matches_the_statistics_sooner_and_reruns_byte_identical(model, tmp_path):
    """At the same small budget the decorrelated images reach a lower BN divergence than bns+p from the same start
    (the steps that matter most, large-scale structure, are the ones it takes first)."""
    ends = {}
    for method in ("bns+p", "bns+d"):
        synthesize(model, method, 16, iters=30, batch_size=16, out_dir=tmp_path / method, progress=False)
        info = json.loads((tmp_path / method / "generation.json").read_text())
        ends[method] = info["bn_divergence"]["end"]["total"]
        assert info["bn_divergence"]["start"]["total"] > 5 * ends[method]
    assert info["arguments"]["method"] == "bns+d"
    assert ends["bns+d"] < ends["bns+p"], ends
    synthesize(model, "bns+d", 16, iters=30, batch_size=16, out_dir=tmp_path / "again", progress=False)
    for shard in (tmp_path / "bns+d" / "data").glob("*.parquet"):
        assert (tmp_path / "again" / "data" / shard.name).read_bytes() == shard.read_bytes()
