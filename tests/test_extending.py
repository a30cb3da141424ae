"""One toy of each kind of extension, registered from outside the package and run end to end.

docs/extending.md says each kind is one file plus one registration: a synthesis method, a quantization
algorithm, an activation observer that owns its collection (a histogram), a model family (its adapter and
its tracing quirks), a quantized layer type and an inference backend. Each toy here is that file, written
in the test, on the embedded ResNet-20; every registration is undone afterwards.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hub_dfq
from hub_dfq.backends.compare import EngineClassifier, compare_logits
from hub_dfq.backends.registry import BACKENDS, Backend, register_backend
from hub_dfq.models.adapters import ADAPTERS, ModelAdapter, TracingHints, register_adapter
from hub_dfq.models.preprocess import Preprocess
from hub_dfq.models.vision_model import ModelSource, VisionModel
from hub_dfq.quant.calibrate import calibrate_activations, calibrate_weights, quant_mode
from hub_dfq.quant.config import QuantConfig, QuantScheme
from hub_dfq.quant.modules import QuantLinear, act_quantizers, register_qmodule, unregister_qmodule
from hub_dfq.quant.observers import ActObserver, new_collector
from hub_dfq.quant.prepare import prepare
from hub_dfq.quant.registry import (
    ACT_OBSERVERS,
    QUANT_ALGORITHMS,
    Observer,
    QuantAlgorithm,
    register_algorithm,
    register_observer,
)
from hub_dfq.registry import resolve
from hub_dfq.synth.registry import SYNTH_METHODS, SynthMethod, register_synth_method

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HUB_DFQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _data(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---- a synthesis method: a loss over a Step ---------------------------------------------------------------
def smooth_loss(step):
    """Confident predictions from smooth images: entropy of the logits plus total variation."""
    entropy = -(step.logits.softmax(-1) * step.logits.log_softmax(-1)).sum(-1).mean()
    tv = (step.x[..., 1:, :] - step.x[..., :-1, :]).abs().mean() + (step.x[..., 1:] - step.x[..., :-1]).abs().mean()
    return entropy + tv


def test_a_synthesis_method_calibrates_a_quantized_model(model, cache):
    register_synth_method(SynthMethod("toy-smooth", summary="smooth, confident images (a test's toy)",
                                      description="a toy method registered by tests/test_extending.py",
                                      loss=smooth_loss, uses_logits=True, iters=2, lr=0.1))
    try:
        qmodel = hub_dfq.quantize(model, weights=8, activations=8, calibration="toy-smooth", calibration_images=8,
                                  synth_options={"iters": 2}, algorithm="calibrate", progress=False)
    finally:
        SYNTH_METHODS.unregister("toy-smooth")
    assert qmodel.calibration["method"] == "toy-smooth" and qmodel.calibration["iters"] == 2
    assert torch.isfinite(qmodel(_data(2))).all()


# ---- an algorithm: run(context) -> history, after calibration --------------------------------------------
def round_up_biases(context):
    """A toy: nothing learned, the history says which layers it saw."""
    layers = [name for name, m in context.module.named_modules() if hasattr(m, "weight_quantizer")]
    return {"layers_seen": len(layers)}


def test_an_algorithm_runs_after_calibration(model, cache):
    register_algorithm(QuantAlgorithm("toy-count", summary="counts the quantized layers (a test's toy)",
                                      description="a toy algorithm registered by tests/test_extending.py",
                                      run=round_up_biases))
    try:
        qmodel = hub_dfq.quantize(model, weights=8, activations=8, calibration=_data(), algorithm="toy-count")
    finally:
        QUANT_ALGORITHMS.unregister("toy-count")
    assert qmodel.algorithm == "toy-count"
    assert qmodel.history["layers_seen"] == len(qmodel.integer_layers()) == 20


# ---- an observer that owns its collection: a streaming histogram -----------------------------------------
class HistogramCollector:
    """A symmetric histogram of every observed value: fixed bin count, the range doubling (adjacent bins
    merged) whenever a value falls outside it. Memory is constant, whatever the number of images."""

    bins = 2048
    made: list["HistogramCollector"] = []

    def __init__(self, *, seed: int = 0):
        self.counts = torch.zeros(self.bins, dtype=torch.float64)
        self.bound = 0.0
        HistogramCollector.made.append(self)

    @property
    def empty(self) -> bool:
        return not self.counts.sum()

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten().cpu()
        peak = float(x.abs().max())
        if not self.bound:
            self.bound = 2.0 ** math.ceil(math.log2(max(peak, 1e-6)))
        while peak > self.bound:  # [-B, B] becomes the middle half of [-2B, 2B]
            merged = self.counts.view(-1, 2).sum(1)
            self.counts = torch.zeros(self.bins, dtype=torch.float64)
            self.counts[self.bins // 4: 3 * self.bins // 4] = merged
            self.bound *= 2
        self.counts += torch.histc(x, self.bins, -self.bound, self.bound)


def histogram_percentile_range(collected: HistogramCollector, bits: int, *, signed: bool,
                               percentile: float = 99.99) -> tuple[float, float]:
    cdf = collected.counts.cumsum(0) / collected.counts.sum()
    edges = torch.linspace(-collected.bound, collected.bound, collected.bins + 1, dtype=torch.float64)
    high = float(edges[1:][int(torch.searchsorted(cdf, percentile / 100.0))])
    low = float(edges[:-1][int(torch.searchsorted(cdf, 1.0 - percentile / 100.0))])
    return (min(low, 0.0) if signed else 0.0), max(high, 0.0)


def test_an_observer_with_its_own_collection(model):
    register_observer(Observer("toy-histogram", "activation", "the percentile of a streaming histogram (a toy)",
                               fn=histogram_percentile_range, collector=HistogramCollector))
    HistogramCollector.made.clear()
    try:
        config = QuantConfig(default=QuantScheme(weights=8, activations=8, act_observer="toy-histogram",
                                                 percentile=99.0))
        prepared = hub_dfq.prepare(model, config)
        quantizers = act_quantizers(prepared.module)
        data = _data(16)
        calibrate_weights(prepared.module)
        calibrate_activations(prepared.module, data, batch_size=4)  # four batches: the range may grow
        assert len(HistogramCollector.made) == len(quantizers)  # one collection per quantizer
        # the range each quantizer got is its histogram's 99th percentile: well inside the observed maximum
        stem = next(q for name, q in quantizers if name.endswith(".conv1_in"))
        observed = ActObserver()
        observed.update(data)  # conv1's input is the image itself
        low, high = stem.range()
        assert 0 < high < observed.high and observed.low < low < 0
        assert not any(c.empty for c in HistogramCollector.made)
        assert isinstance(new_collector("mse"), ActObserver)  # the built-ins keep the sampled collection
    finally:
        ACT_OBSERVERS.unregister("toy-histogram")


# ---- a model family: an adapter, and what torch.fx must keep whole ---------------------------------------
class SignGate(nn.Module):
    """Data-dependent control flow (as in many research models): fx cannot trace through it."""

    def forward(self, x):
        return x if float(x.mean()) > 0 else -x


class ToyFamilyNet(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.gate, self.conv, self.bn = SignGate(), nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(self.gate(x)))).mean((2, 3)))


def load_toy_folder(folder: Path, source: ModelSource, *, trust_remote_code: bool = False,
                    pretrained: bool = True) -> VisionModel:
    config = json.loads((folder / "config.json").read_text())
    module = ToyFamilyNet(config["classes"])
    if pretrained:
        module.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
    return VisionModel(module, Preprocess(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3),
                       [f"class_{i}" for i in range(config["classes"])], source, config=config)


def test_a_model_family_loads_and_quantizes_with_its_tracing_hints(tmp_path):
    register_adapter(ModelAdapter("toyfam", "a toy family's folder (config.json with 'toy_family')",
                                  detect=lambda config: "toy_family" in config, load=load_toy_folder,
                                  tracing=lambda: TracingHints(leaf_modules=(SignGate,))))
    try:
        torch.manual_seed(0)
        folder = tmp_path / "fp"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"toy_family": 1, "classes": 4}))
        torch.save(ToyFamilyNet(4).state_dict(), folder / "weights.pt")
        model = hub_dfq.load_model(folder)
        assert model.source.library == "toyfam" and model.tracing_hints.leaf_modules == (SignGate,)
        qmodel = hub_dfq.quantize(model, weights=8, activations=8, calibration=_data(), algorithm="calibrate")
        gates = [n for n in qmodel.module.graph.nodes if n.op == "call_module" and n.target == "gate"]
        assert len(gates) == 1  # kept whole: the branch is still taken per input
        bright = _data(1).abs() + 0.1
        assert torch.equal(qmodel(bright), qmodel(-bright))  # the gate flips the dark image back
        # a checkpoint of the family rebuilds its graph with the same hints (the adapter builds the architecture)
        reloaded = hub_dfq.from_pretrained(hub_dfq.save_pretrained(qmodel, tmp_path / "q"))
        assert torch.equal(reloaded(-bright), qmodel(-bright))
        assert [n.target for n in reloaded.module.graph.nodes if n.op == "call_module" and n.target == "gate"]
        # without the family's hints fx specialises the branch to the example input (zeros: "negate")
        traced = prepare(model.module, QuantConfig(), example_input=model.example_input(1), hints=TracingHints())
        assert not any(n.op == "call_module" and n.target == "gate" for n in traced.module.graph.nodes)
        with torch.no_grad(), quant_mode(traced.module, enabled=False):
            assert torch.allclose(traced.module(-bright), model.module(bright), atol=1e-5)  # BN folded: rounding
            assert not torch.allclose(traced.module(bright), model.module(bright), atol=1e-2)  # negated regardless
    finally:
        ADAPTERS.unregister("toyfam")


# ---- a quantized layer type: float class -> quantized class, one registration -----------------------------
class Affine(nn.Module):
    """A linear layer from some other library (not an nn.Linear subclass)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class QuantAffine(QuantLinear):
    """It computes what a linear layer does, so QuantLinear's integer form (kind "linear") is its own."""


def test_a_quantized_layer_type_is_one_registration(model):
    module = copy.deepcopy(model.module)
    head = module.linear
    module.linear = Affine(head.in_features, head.out_features)
    module.linear.load_state_dict(head.state_dict())
    affine = VisionModel(module, model.preprocess, model.labels, model.source)
    before = hub_dfq.prepare(affine, QuantConfig()).report
    assert "linear" not in before.quantized and any(u.startswith("linear") for u in before.unsupported)
    register_qmodule(Affine)(QuantAffine)
    try:
        qmodel = hub_dfq.quantize(affine, weights=8, activations=8, calibration=_data(), algorithm="calibrate")
    finally:
        unregister_qmodule(Affine)
    assert isinstance(qmodel.module.get_submodule("linear"), QuantAffine) and not qmodel.left_in_float
    assert qmodel.integer_layers()[-1].name == "linear" and qmodel.integer_layers()[-1].kind == "linear"


# ---- a backend: export + load over the public integer-state API ------------------------------------------
class _Layer(nn.Module):
    """A layer computing in float from its integer description (what an integer kernel reproduces)."""

    def __init__(self, layer):
        super().__init__()
        self.weight = nn.Parameter(layer.dequantized_weight(), requires_grad=False)
        bias = layer.bias_int.float() * layer.bias_scale if layer.bias_int is not None else layer.bias
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.conv = layer.is_conv
        self.geometry = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                             groups=layer.groups) if layer.is_conv else {}
        self.pre_pad = layer.pre_pad

    def forward(self, x):
        if not self.conv:
            return F.linear(x, self.weight, self.bias)
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad)
        return F.conv2d(x, self.weight, self.bias, **self.geometry)


class _Grid(nn.Module):
    def __init__(self, grid):
        super().__init__()
        self.scale, self.zero_point, self.qmin, self.qmax = grid.scale, grid.zero_point, grid.qmin, grid.qmax

    def forward(self, x):
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale


def export_torchscript(qmodel, path, *, overwrite: bool = False, batch_size: int = 1) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(path)
    graph = qmodel.lower(layer=_Layer, activation=_Grid)
    torch.jit.save(torch.jit.trace(graph, qmodel.model.example_input(batch_size)), str(path))
    return path


class TorchScriptClassifier(EngineClassifier):
    def __init__(self, path):
        self.module = torch.jit.load(str(path))

    @torch.no_grad()
    def __call__(self, pixel_values):
        return self.module(pixel_values)


def load_torchscript(path, *, threads: int | None = None) -> TorchScriptClassifier:
    return TorchScriptClassifier(path)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # the toy engine is TorchScript
def test_a_backend_exports_into_checkpoints_and_follows_the_model(model, tmp_path):
    register_backend(Backend("toy-jit", summary="TorchScript of the lowered integer model (a test's toy)",
                             runtime="TorchScript", file_name="model.pt", export=export_torchscript,
                             load=load_torchscript, usage="`model.pt`: `torch.jit.load` it."))
    try:
        qmodel = hub_dfq.quantize(model, weights=8, activations=8, calibration=_data(),
                                  placement=BACKENDS.get("toy-jit").placement, algorithm="calibrate")
        folder = hub_dfq.save_pretrained(qmodel, tmp_path / "q", backends=["toy-jit"])
        assert (folder / "model.pt").is_file() and "torch.jit.load" in (folder / "README.md").read_text()
        backend = BACKENDS.get("toy-jit")
        agreement = resolve(backend.check)(qmodel, resolve(backend.load)(folder / "model.pt", threads=1), _data(16, 1))
    finally:
        BACKENDS.unregister("toy-jit")
    assert agreement["top1_agreement"] == 1.0 and agreement["max_abs_logit_diff"] < 1e-3
    assert compare_logits is resolve(backend.check)
