"""Architectures in the quantized graph: "same" padding, zero pads, output quantizers, SE, concatenation,
ViTs, EfficientNet-Lite0 end to end, and checkpoints written by the first graph rules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same
from torch import nn

import hub_dfq
from hub_dfq.backends.onnx import compare_onnx, export_onnx, load_onnx
from hub_dfq.backends.onnx_kernels import integer_macs
from hub_dfq.models.preprocess import Preprocess
from hub_dfq.models.vision_model import ModelSource, VisionModel
from hub_dfq.quant.calibrate import (
    calibrate_activations,
    calibrate_weights,
    freeze_weights,
    quant_mode,
)
from hub_dfq.quant.config import QuantConfig, QuantScheme
from hub_dfq.quant.model import QuantizedModel
from hub_dfq.quant.modules import QuantConv2d, QuantLinear
from hub_dfq.quant.padding import same_pads
from hub_dfq.quant.prepare import prepare

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).parent / "fixtures"
W8A8 = QuantConfig(default=QuantScheme(weights=8, activations=8))


def _settle_bn(module: nn.Module, size: tuple[int, ...]) -> nn.Module:
    """BN scale 1, shift 0 and running statistics of random images (a random network that is not degenerate)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_parameters()
            m.momentum = None
    module.train()
    with torch.no_grad():
        module(torch.randn(16, *size, generator=torch.Generator().manual_seed(0)))
    return module.eval()


def _vision_model(module: nn.Module, size: int, architecture: str) -> VisionModel:
    preprocess = Preprocess(input_size=(3, size, size), mean=(0.5,) * 3, std=(0.25,) * 3)
    return VisionModel(_settle_bn(module, (3, size, size)), preprocess, [f"c{i}" for i in range(10)],
                       ModelSource(spec=architecture, library="timm", architecture=architecture))


class SameStem(nn.Module):
    """TF "same" padding on a stride-2 stem and a depthwise conv (asymmetric pads), SiLU, SE, a pooled head."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn1 = Conv2dSame(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn2 = Conv2dSame(8, 8, 5, stride=2, groups=8, bias=False), nn.BatchNorm2d(8)
        self.se_reduce, self.se_expand = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.pw = nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.silu(self.bn1(self.stem(x)))
        x = F.silu(self.bn2(self.dw(x)))
        x = x * torch.sigmoid(self.se_expand(F.relu(self.se_reduce(x.mean((2, 3), keepdim=True)))))
        x = F.relu(self.pw(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("size, kernel, stride, dilation", [(224, 3, 2, 1), (112, 5, 2, 1), (7, 3, 1, 1),
                                                            (15, 5, 2, 1), (16, 3, 1, 2), (9, 4, 3, 1)])
def test_same_pads_are_timms(size, kernel, stride, dilation):
    x = torch.zeros(1, 1, size, size + 1)
    padded = pad_same(x, (kernel, kernel), (stride, stride), (dilation, dilation))
    ours = F.pad(x, same_pads((size, size + 1), (kernel, kernel), (stride, stride), (dilation, dilation)))
    assert ours.shape == padded.shape


def test_conv2d_same_is_quantized_with_its_static_asymmetric_pads():
    model = _settle_bn(SameStem(), (3, 32, 32))
    x = torch.randn(16, 3, 32, 32)
    prepared = prepare(model, W8A8, example_input=x[:1])
    gm, report = prepared.module, prepared.report
    assert report.same_padding == ["stem", "dw"] and sorted(report.folded_bn) == ["bn1", "bn2"]
    assert report.absorbed_pads == {"stem": [0, 1, 0, 1], "dw": [1, 2, 1, 2]}
    assert not report.unsupported and not report.float_by_design and isinstance(gm.get_submodule("dw"), QuantConv2d)
    with quant_mode(gm, enabled=False):
        assert (gm(x) - model(x)).abs().max() <= 1e-5  # the rewrite computes what Conv2dSame computes
    # outputs read by a SiLU or the SE gate are quantized (integer kernels in ONNX Runtime); the pw conv's
    # ReLU output is pooled before the head reads it: quantized after the ReLU
    outputs = {p.name for p in report.act_points if p.kind == "output"}
    assert outputs == {"stem_out", "dw_out", "se_expand_out", "pw_out"}  # se_reduce: ReLU, then se_expand's input
    assert [p.signed for p in report.act_points if p.name == "pw_out"] == [False]


def test_same_pads_follow_a_non_square_input():
    model = _settle_bn(SameStem(), (3, 30, 47))
    x = torch.randn(4, 3, 30, 47)
    prepared = prepare(model, W8A8, example_input=x[:1])
    # stem: 30 -> pad 1 (0 + 1), 47 -> pad 2 (1 + 1); dw (5x5, stride 2) on 15 x 24: 4 (2 + 2) and 3 (1 + 2)
    assert prepared.report.absorbed_pads == {"stem": [1, 1, 0, 1], "dw": [1, 2, 2, 2]}
    with quant_mode(prepared.module, enabled=False):
        assert (prepared.module(x) - model(x)).abs().max() <= 1e-5


def test_padded_conv_simulation_equals_integer_arithmetic():
    """The padded conv pads its integer input with the zero point: exactly the simulated output."""
    model = _settle_bn(SameStem(), (3, 32, 32))
    x = torch.randn(16, 3, 32, 32)
    gm = prepare(model, QuantConfig(default=QuantScheme(weights=4, activations=4)), example_input=x[:1]).module
    calibrate_weights(gm)
    calibrate_activations(gm, x)
    freeze_weights(gm)
    conv = gm.get_submodule("dw")
    captured = {}
    handle = conv.register_forward_hook(lambda m, a, o: captured.update(inp=a[0], out=o))
    gm(x)
    handle.remove()
    aq = conv.input_quantizer
    zero = int(aq.zero_point)
    x_int = torch.round(captured["inp"].double() / aq.scale.double()) + zero
    padded = F.pad(x_int, conv.pre_pad, value=zero)  # what QLinearConv pads with
    acc = F.conv2d(padded - zero, conv.weight_quantizer.weight_int.double(), stride=2, groups=8)
    scale = (aq.scale.double() * conv.weight_quantizer.scale.double()).view(1, -1, 1, 1)
    expected = (acc + conv.bias_int().double().view(1, -1, 1, 1)) * scale
    assert torch.allclose(captured["out"].double(), expected, atol=1e-5, rtol=1e-5)


def test_graph_version_1_keeps_the_first_rules():
    model = _settle_bn(SameStem(), (3, 32, 32))
    report = prepare(model, QuantConfig(default=QuantScheme(8, 8), graph_version=1),
                     example_input=torch.zeros(1, 3, 32, 32)).report
    assert {"stem", "dw"} <= {u.split(" ")[0] for u in report.unsupported}
    assert not report.same_padding and not any(p.kind == "output" for p in report.act_points)
    assert QuantConfig.from_dict({"default": {"weights": 8, "activations": 8}}).graph_version == 1  # saved before v2
    assert QuantConfig.from_dict(W8A8.to_dict()) == W8A8


def test_zero_pad_modules_join_the_convolution():
    module = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 8, 3, stride=2, padding="valid"), nn.ReLU(),
                           nn.Conv2d(8, 8, 3, padding="same"), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    model = _settle_bn(module, (3, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    prepared = prepare(model, W8A8, example_input=x[:1])
    assert prepared.report.absorbed_pads == {"1": [0, 1, 0, 1]}
    assert not any(n.target is F.pad or isinstance(getattr(n, "target", None), nn.ZeroPad2d)
                   for n in prepared.module.graph.nodes)
    with quant_mode(prepared.module, enabled=False):
        assert (prepared.module(x) - model(x)).abs().max() <= 1e-5


def test_timm_linear_is_quantized():
    """timm's Linear redefines forward only for TorchScript: it is an nn.Linear, not a float leftover."""
    module = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), timm.layers.Linear(8 * 6 * 6, 10)).eval()
    report = prepare(module, W8A8, example_input=torch.zeros(1, 3, 8, 8)).report
    assert "3" in report.quantized and not report.unsupported
    legacy = prepare(module, QuantConfig(default=QuantScheme(8, 8), graph_version=1),
                     example_input=torch.zeros(1, 3, 8, 8)).report
    assert "3" not in legacy.quantized  # graph version 1 traced through it, silently


def _integer_run(model: VisionModel, tmp_path, calibration: torch.Tensor, inputs: torch.Tensor):
    qmodel = hub_dfq.quantize(model, quant_config=W8A8, calibration=calibration)
    path = export_onnx(qmodel, tmp_path / "m.onnx")
    return qmodel, compare_onnx(qmodel, load_onnx(path, threads=1), inputs), integer_macs(path)


@pytest.mark.parametrize("name", ["tf_efficientnet", "densenet"])
def test_conv_families_run_every_mac_in_integer_kernels(name, tmp_path):
    torch.manual_seed(0)
    if name == "tf_efficientnet":  # Conv2dSame stem and stride-2 depthwise convs, SE, SiLU, drop-path
        module = timm.create_model("test_efficientnet", pad_type="same", num_classes=10, drop_path_rate=0.1)
    else:  # concatenation, BN before ReLU before conv (no conv to fold into)
        from timm.models.densenet import DenseNet

        module = DenseNet(growth_rate=8, block_config=(2, 2), num_classes=10)
    model = _vision_model(module, 64, name)
    generator = torch.Generator().manual_seed(1)
    qmodel, agreement, macs = _integer_run(model, tmp_path, torch.randn(8, 3, 64, 64, generator=generator),
                                           torch.randn(32, 3, 64, 64, generator=generator))
    assert not qmodel.report.unsupported
    if name == "tf_efficientnet":
        assert len(qmodel.report.same_padding) == 5 and not qmodel.report.float_by_design
    else:
        assert qmodel.report.float_by_design and all("BatchNorm" in e for e in qmodel.report.float_by_design)
    assert macs["share"] == 1.0, macs["float_layers"]
    # random weights: nearly tied logits, so the logit difference is the measure, not the top-1
    with torch.no_grad():
        logits = qmodel(torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    spread = float((logits.max(-1).values - logits.min(-1).values).mean())
    assert agreement["max_abs_logit_diff"] < 0.1 * spread


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", "catavgmax"])
def test_pooling_heads(pool, tmp_path):
    model = _vision_model(timm.create_model("test_resnet", global_pool=pool, num_classes=10), 32, "test_resnet")
    generator = torch.Generator().manual_seed(1)
    qmodel, agreement, macs = _integer_run(model, tmp_path, torch.randn(8, 3, 32, 32, generator=generator),
                                           torch.randn(8, 3, 32, 32, generator=generator))
    assert not qmodel.left_in_float and macs["share"] == 1.0
    assert agreement["top1_agreement"] >= 0.75


def test_vit_runs_its_linear_layers_in_integer_kernels(tmp_path):
    model = _vision_model(timm.create_model("test_vit", img_size=32, num_classes=10), 32, "test_vit")
    generator = torch.Generator().manual_seed(1)
    qmodel, agreement, macs = _integer_run(model, tmp_path, torch.randn(8, 3, 32, 32, generator=generator),
                                           torch.randn(16, 3, 32, 32, generator=generator))
    assert not qmodel.report.unsupported
    assert {e.split(" ")[1] for e in qmodel.report.float_by_design} == {"(LayerNorm:", "(a"}
    assert agreement["top1_agreement"] >= 0.9
    # only the attention products (query x key, weights x value) stay float
    assert macs["float_layers"] and all(op == "MatMul" for _, op, _ in macs["float_layers"])
    assert macs["share"] > 0.8


def test_checkpoint_of_the_first_graph_rules_reloads_bit_exact():
    """A checkpoint written before graph version 2 (hub-dfq 0.1.0: a transformers EfficientNet whose zero
    pads and SiLU-read convs the new rules would treat differently) rebuilds its own graph."""
    qmodel = hub_dfq.from_pretrained(FIXTURES / "v1-efficientnet-w8a8")
    expected = load_file(FIXTURES / "v1-efficientnet-w8a8-expected.safetensors")
    assert qmodel.config.graph_version == 1
    # Same graph, same integers: equal up to float summation order, which differs between torch builds
    # and CPUs (the fixture was written elsewhere); a different graph moves logits by far more than this.
    torch.testing.assert_close(qmodel(expected["inputs"]), expected["logits"], rtol=0, atol=1e-5)
    v2 = prepare(qmodel.model.module, QuantConfig(default=QuantScheme(8, 8)), example_input=expected["inputs"][:1])
    assert len(v2.report.act_points) != len(qmodel.report.act_points) and v2.report.absorbed_pads


def test_efficientnet_lite0_is_an_integer_model_end_to_end(shared_dir, tmp_path):
    """The real Lite0: its Conv2dSame stem and stride-2 depthwise convs quantize, ONNX Runtime runs every
    MAC in integer kernels and follows the simulated model on real ImageNet images, and a reload is exact."""
    from hub_dfq.quant.data import images_to_tensor

    model = hub_dfq.load_model(shared_dir / "models" / "imagenet-efficientnet-lite0")
    images = images_to_tensor(model, hub_dfq.load_images(shared_dir / "data" / "imagenet-sample" /
                                                         "even-classes.parquet", limit=40))
    qmodel = hub_dfq.quantize(model, quant_config=W8A8, calibration=images[:8])
    assert qmodel.left_in_float == []
    assert qmodel.report.same_padding == ["conv_stem", "blocks.1.0.conv_dw", "blocks.2.0.conv_dw",
                                          "blocks.3.0.conv_dw", "blocks.5.0.conv_dw"]
    assert all(isinstance(m, (QuantConv2d, QuantLinear)) for m in qmodel.module.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)))
    path = export_onnx(qmodel, tmp_path / "lite0.onnx")
    agreement = compare_onnx(qmodel, load_onnx(path, threads=1), images[8:])
    # 32 of 32 here (99.2% of the 500 images in docs/coverage.md): allow one rounding-boundary image
    assert agreement["top1_agreement"] >= 31 / 32 and agreement["max_abs_logit_diff"] < 0.5
    macs = integer_macs(path)
    assert macs["share"] == 1.0 and math.isclose(macs["total"], 385_187_552, rel_tol=1e-6)
    reloaded = QuantizedModel.from_checkpoint(model, qmodel.config, qmodel.checkpoint_tensors())
    assert torch.equal(reloaded(images[8:12]), qmodel(images[8:12]))
