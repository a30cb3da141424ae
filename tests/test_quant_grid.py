"""Asymmetric weight grids: each output channel's integers span ``[low, low + 2^b - 1]`` over its own range, zero
exact, stored packed with ``low`` and read back bit-exactly; symmetric configs read as they always did."""

from __future__ import annotations

import json

import pytest
import torch

import hub_dfq
from hub_dfq.errors import CheckpointError, ConfigError
from hub_dfq.quant.config import QuantConfig, QuantScheme
from hub_dfq.quant.gptq import clamp_rows, gptq_rounding, search_scales
from hub_dfq.quant.modules import quant_layers
from hub_dfq.quant.observers import asymmetric_grid, weight_grid
from hub_dfq.quant.packing import pack, unpack
from hub_dfq.quant.quantizers import WeightQuantizer, weight_qrange

pytestmark = pytest.mark.usefixtures("one_thread")


def _skewed(rows: int = 64, k: int = 9, seed: int = 0) -> torch.Tensor:
    """Kernels like depthwise ones after BN folding: a large centre tap of either sign, small off-centre taps."""
    g = torch.Generator().manual_seed(seed)
    w = 0.1 * torch.randn(rows, k, generator=g)
    w[:, k // 2] += torch.where(torch.rand(rows, generator=g) < 0.5, 1.0, -1.0) * (1 + torch.rand(rows, generator=g))
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_asymmetric_grid_keeps_zero_and_fits_int8(bits):
    w = _skewed()
    scale, low = asymmetric_grid(w, bits)
    span = 2**bits - 1
    assert (scale > 0).all() and (low <= 0).all() and (low + span >= 0).all()
    q = torch.clamp(torch.round(w / scale[:, None]), low[:, None], (low + span)[:, None])
    assert q.abs().max() <= 127 and torch.equal(q[w == 0], torch.zeros_like(q[w == 0]))


def test_asymmetric_grid_rounds_skewed_kernels_with_less_error():
    w = _skewed()
    qmin, qmax = weight_qrange(4)
    sym = search_scales(w[None], torch.ones(1, w.shape[1]), w.abs().amax(1)[None] / qmax, qmin, qmax)[0]
    sym_err = (torch.clamp(torch.round(w / sym[:, None]), qmin, qmax) * sym[:, None] - w).square().sum()
    scale, low = asymmetric_grid(w, 4)
    asym_err = (torch.clamp(torch.round(w / scale[:, None]), low[:, None], (low + 15)[:, None]) * scale[:, None]
                - w).square().sum()
    assert asym_err < 0.6 * sym_err  # one-signed centre taps waste half a symmetric grid


def test_gptq_on_asymmetric_ranges_beats_nearest_rounding():
    w = _skewed(rows=16)[None]
    x = torch.randn(9, 400, generator=torch.Generator().manual_seed(1))
    x[1:] += 0.8 * x[:1]  # correlated inputs: what GPTQ's compensation exploits
    h = (x @ x.T)[None]
    scale, low = asymmetric_grid(w, 4, importance=torch.diagonal(h, dim1=1, dim2=2))
    high = low + 15
    start = gptq_rounding(w, h, scale, low, high, damp=0.01)
    chosen = clamp_rows(torch.round(start), low, high)
    nearest = clamp_rows(torch.round(w / scale[..., None]), low, high)

    def error(q):
        delta = (w - q * scale[..., None]).double()
        return float(torch.einsum("grk,gkl,grl->", delta, h.double(), delta))

    assert error(chosen) < 0.8 * error(nearest)


def test_weight_quantizer_grids():
    w = _skewed(rows=8)[:, :, None, None]
    wq = WeightQuantizer(4, 8, grid="asymmetric")
    wq.set_grid(*weight_grid(w, 4, symmetric=False))
    out = wq(w)
    integers = torch.round(out / wq.scale[:, None, None, None]).flatten(1)
    low = wq.low.float()[:, None]
    assert (integers >= low).all() and (integers <= low + 15).all()
    assert "asymmetric" in repr(wq)
    assert WeightQuantizer(8, 8, grid="asymmetric").symmetric  # int8 cannot hold an asymmetric 8-bit range
    with pytest.raises(ValueError, match="needs each channel's lowest integer"):
        wq.set_grid(torch.ones(8))
    with pytest.raises(ConfigError, match="unknown weight grid 'skew'.*asymmetric, symmetric"):
        QuantScheme(weight_grid="skew")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_with_low_round_trips(bits):
    g = torch.Generator().manual_seed(bits)
    span = 2**bits - 1
    low = -torch.randint(0, span + 1, (5,), generator=g)
    values = (low[:, None] + torch.randint(0, span + 1, (5, 7), generator=g)).to(torch.int8)
    packed = pack(values, bits, low=low)
    assert packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits, values.shape, low=low), values)


def test_symmetric_configs_keep_their_bytes_and_asymmetric_ones_say_so():
    sym = QuantConfig(default=QuantScheme(weights=4, activations=8, weight_grid="symmetric"))
    assert "weight_grid" not in sym.to_dict()["default"]  # checkpoints from before asymmetric grids keep their bytes
    asym = QuantConfig(default=QuantScheme(weights=4, activations=8))
    assert asym.default.weight_grid == "asymmetric" and asym.to_dict()["default"]["weight_grid"] == "asymmetric"
    assert QuantConfig.from_json(asym.to_json()) == asym and QuantConfig.from_json(sym.to_json()) == sym
    old = {"default": {"weights": 4, "activations": 8, "weight_observer": "mse", "act_observer": "mse"}}
    assert QuantConfig.from_dict(old).default.weight_grid == "symmetric"  # saved before the field existed


@pytest.fixture(scope="module")
def asym_qmodel(model):
    data = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return hub_dfq.quantize(model, weights=4, activations=8, calibration=data, algorithm="gptq", progress=False,
                            resume=False)


def test_quantize_defaults_to_asymmetric_and_reloads_bit_exactly(asym_qmodel, tmp_path):
    layer = asym_qmodel.module.get_submodule("layer2.0.conv1")
    assert not layer.weight_quantizer.symmetric and (layer.weight_quantizer.low < 0).any()
    assert asym_qmodel.module.get_submodule("conv1").weight_quantizer.symmetric  # first layer: 8 bits
    out = hub_dfq.save_pretrained(asym_qmodel, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["weight_grid"] == "asymmetric"
    assert "per output channel, asymmetric below 8 bits" in (out / "README.md").read_text()
    again = hub_dfq.from_pretrained(str(out))
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(asym_qmodel(x), again(x))
    first, second = asym_qmodel.integer_state(), again.integer_state()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_damaged_low_is_refused(asym_qmodel, tmp_path):
    from safetensors.torch import load_file, save_file

    out = hub_dfq.save_pretrained(asym_qmodel, tmp_path / "q")
    tensors = load_file(out / "model.safetensors")
    key = "layer2.0.conv1.weight_quantizer.low"
    tensors[key] = torch.full_like(tensors[key], -100)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layer2.0.conv1 holds integer weights .* of each channel"):
        hub_dfq.from_pretrained(str(out))
    del tensors[key]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="layer2.0.conv1 does not store the lowest integer of each channel"):
        hub_dfq.from_pretrained(str(out))


def test_symmetric_grid_on_request(model):
    data = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    qmodel = hub_dfq.quantize(model, weights=4, activations=8, calibration=data, algorithm="gptq", progress=False,
                              resume=False, weight_grid="symmetric")
    state = qmodel.integer_state()
    assert state["layer2.0.conv1.weight_int"].abs().max() <= 7
    assert qmodel.module.get_submodule("layer2.0.conv1").weight_quantizer.low is None


def test_an_8bit_model_is_symmetric_and_its_card_says_so(model, tmp_path):
    data = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    qmodel = hub_dfq.quantize(model, weights=8, activations=8, calibration=data, algorithm="calibrate", progress=False,
                              resume=False)
    assert all(layer.weight_quantizer.symmetric for _, layer in quant_layers(qmodel.module))
    card = (hub_dfq.save_pretrained(qmodel, tmp_path / "q") / "README.md").read_text()
    assert "per output channel, symmetric" in card and "asymmetric below" not in card


def _coarse_grid(w: torch.Tensor, bits: int):
    """A plugin's asymmetric grid: each row's [min, max] unclipped, then one step coarser than it needs."""
    scale, low = asymmetric_grid(w, bits, search=False)
    return scale * 1.5, torch.ceil(low / 1.5)


@pytest.fixture
def coarse_observer():
    from hub_dfq.quant.registry import WEIGHT_OBSERVERS, Observer, register_observer

    register_observer(Observer("coarse", "weight", "a plugin (tests)", fn="hub_dfq.quant.observers:minmax_weight_scale",
                               grid_fn=_coarse_grid))
    register_observer(Observer("no-grid", "weight", "a plugin without grid_fn (tests)",
                               fn="hub_dfq.quant.observers:minmax_weight_scale"))
    yield
    WEIGHT_OBSERVERS.unregister("coarse")
    WEIGHT_OBSERVERS.unregister("no-grid")


def test_a_registered_weight_observer_sets_the_asymmetric_grid(model, coarse_observer):
    data = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grids = {}
    for name in ("coarse", "no-grid", "mse"):
        q = hub_dfq.quantize(model, weights=4, activations=8, calibration=data, algorithm="calibrate",
                             weight_observer=name, progress=False)
        layer = q.module.get_submodule("layer2.0.conv1")
        wq = layer.weight_quantizer
        grids[name] = (wq.scale.flatten().clone(), wq.low.flatten().float().clone())
        if name == "coarse":
            scale, low = _coarse_grid(layer.weight.detach().reshape(len(wq.scale.flatten()), -1), 4)
            assert torch.allclose(grids[name][0], scale) and torch.equal(grids[name][1], low)
    assert all(torch.equal(a, b) for a, b in zip(grids["no-grid"], grids["mse"]))  # without grid_fn: the mse grid
    assert not torch.allclose(grids["coarse"][0], grids["mse"][0])


def test_an_invalid_grid_from_an_observer_is_one_error(coarse_observer):
    from hub_dfq.quant.registry import WEIGHT_OBSERVERS, Observer, register_observer

    w = _skewed()
    bad = {"positive low": lambda w, bits: (torch.ones(len(w)), torch.ones(len(w))),
           "one grid for all rows": lambda w, bits: (torch.ones(1), torch.zeros(1)),
           "zero step": lambda w, bits: (torch.zeros(len(w)), -torch.ones(len(w)))}
    for fn in bad.values():
        register_observer(Observer("coarse", "weight", "broken", fn="hub_dfq.quant.observers:minmax_weight_scale",
                                   grid_fn=fn), overwrite=True)
        with pytest.raises(ConfigError, match=r"weight observer 'coarse' returned an invalid asymmetric 4-bit grid: "
                                              r"give one positive finite scale and one integer low in \[-15, 0\] per "
                                              r"output channel \(64 channels\)"):
            weight_grid(w, 4, method="coarse", symmetric=False)
    assert "coarse" in WEIGHT_OBSERVERS
