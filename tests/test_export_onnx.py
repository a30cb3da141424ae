"""ONNX export: the integer model ONNX Runtime runs follows the simulated one, with int8 kernels."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import hub_dfq
from hub_dfq.backends.onnx import compare_onnx, export_onnx, load_onnx, runtime_ops
from hub_dfq.cli import main
from hub_dfq.errors import CheckpointError, ConfigError
from hub_dfq.hub.checkpoint import save_pretrained
from hub_dfq.quant.calibrate import quant_layers
from hub_dfq.quant.data import images_to_tensor

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(model):
    return images_to_tensor(model, hub_dfq.load_images("default"))


def _quantize(model, weights, activations, images):
    # real images calibrate in a second; what is tested is the export, not the calibration data
    return hub_dfq.quantize(model, weights=weights, activations=activations, calibration=images[:64],
                            algorithm="calibrate")


@pytest.mark.parametrize("weights, activations", [(8, 8), (4, 8), (4, 4)])
def test_onnx_runtime_follows_the_simulated_model(model, images, tmp_path, weights, activations):
    qmodel = _quantize(model, weights, activations, images)
    session = load_onnx(threads=1, path=export_onnx(qmodel, tmp_path / "m.onnx"))
    agreement = compare_onnx(qmodel, session, images)
    # integer kernels round the accumulator once; the simulation sums dequantized floats: rare 1-step
    # differences on a rounding boundary, never a different model
    assert agreement["n"] == 1000 and agreement["top1_agreement"] >= 0.99
    assert agreement["mean_abs_logit_diff"] < 0.05  # logits here are of order 10
    simulated = hub_dfq.evaluate_accuracy(model, "default", forward=qmodel)["top1"]
    assert abs(session.evaluate(qmodel, "default")["top1"] - simulated) <= 0.3


def test_every_conv_and_linear_runs_as_an_integer_kernel(model, images, tmp_path):
    ops = runtime_ops(export_onnx(_quantize(model, 4, 8, images), tmp_path / "m.onnx"))
    assert ops.get("QLinearConv") == 19 and ops.get("QGemm") == 1
    assert not {"Conv", "FusedConv", "Gemm", "MatMul"} & set(ops)


def test_weights_are_the_checkpoint_integers_and_sub8bit_activations_are_clipped_as_integers(model, images, tmp_path):
    qmodel = _quantize(model, 4, 4, images)
    graph = onnx.load(export_onnx(qmodel, tmp_path / "m.onnx")).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for name, layer in quant_layers(qmodel.module):
        stored = initializers[f"{name}.weight_int"]
        assert stored.dtype == np.int8 and np.array_equal(stored, layer.weight_quantizer.weight_int.numpy())
        low, high = layer.weight_quantizer.bounds(layer.weight_quantizer.weight_int)  # the channel's own range
        assert (layer.weight_quantizer.weight_int >= low).all() and (layer.weight_quantizer.weight_int <= high).all()
    constants = {o: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"
                 for o in n.output}
    clips = [n for n in graph.node if n.op_type == "Clip"]
    assert clips  # 4-bit activations: uint8 storage clipped to [0, 15]
    for clip in clips:
        low, high = constants[clip.input[1]], constants[clip.input[2]]
        assert low.dtype == np.uint8 and (int(low), int(high)) == (0, 15)
    assert runtime_ops(tmp_path / "m.onnx").get("QLinearConv", 0) >= 18


def test_saved_checkpoint_holds_the_same_onnx_as_a_reexport_of_its_reload(model, images, tmp_path):
    qmodel = _quantize(model, 4, 8, images)
    folder = save_pretrained(qmodel, tmp_path / "q", backends=["onnx"])
    reloaded = hub_dfq.from_pretrained(folder)
    again = export_onnx(reloaded, tmp_path / "again.onnx")
    assert (folder / "model.onnx").read_bytes() == again.read_bytes()
    assert "model.onnx" in (folder / "README.md").read_text()


def test_transformers_vit_quantizes_with_any_batch_and_exports(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=4)
    ViTForImageClassification(config).eval().save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    vit = hub_dfq.load_model(tmp_path / "vit")
    # the tracer must not bake the example's batch size into the class-token expand
    qmodel = hub_dfq.quantize(vit, weights=8, activations=8, calibration="gaussian", calibration_images=12)
    x = torch.randn(5, 3, 32, 32)
    assert qmodel(x).shape == (5, 4)
    session = load_onnx(threads=1, path=export_onnx(qmodel, tmp_path / "vit.onnx"))
    assert compare_onnx(qmodel, session, x)["max_abs_logit_diff"] < 1e-3
    assert runtime_ops(tmp_path / "vit.onnx").get("MatMulIntegerToFloat", 0) >= 4


def test_reflect_padded_and_depthwise_convs_export(tmp_path):
    from torch import nn

    from hub_dfq.models.preprocess import Preprocess
    from hub_dfq.models.vision_model import ModelSource, VisionModel

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8), nn.ReLU(),
                           nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    model = VisionModel(module, Preprocess(input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3),
                        ["a", "b", "c"], ModelSource(spec="tiny", library="timm", architecture="tiny"))
    qmodel = hub_dfq.quantize(model, weights=4, activations=8, calibration=torch.randn(32, 3, 16, 16),
                              algorithm="calibrate")
    x = torch.randn(16, 3, 16, 16)
    session = load_onnx(export_onnx(qmodel, tmp_path / "t.onnx"), threads=1)
    assert compare_onnx(qmodel, session, x)["max_abs_logit_diff"] < 0.05
    # the depthwise conv feeds a quantized input: integer; so does the 1x1 conv, whose output is quantized
    # before the pooling (an output quantizer); the reflect pad sits between its input's
    # DequantizeLinear and the conv: float
    assert runtime_ops(tmp_path / "t.onnx").get("QLinearConv", 0) == 2


def test_cli_quantize_onnx_and_export(tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", "default", "--weights", "4", "--activations", "8", "--calibration", "gaussian",
            "--calibration-size", "16", "--algorithm", "calibrate", "--eval-limit", "200", "--out", str(out),
            "--backend", "onnx", "--json", str(tmp_path / "q.json")]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "q.json").read_text())
    assert abs(summary["onnx_top1"] - summary["quant_top1"]) <= 1.0  # 200 images: one image is 0.5 points
    assert "ONNX Runtime int8" in capsys.readouterr().out
    assert main(["export", str(out), "--out", str(tmp_path / "e.onnx"), "--dataset", "default", "--limit", "200",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert (tmp_path / "e.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["onnx_top1"] == summary["onnx_top1"] and report["top1_agreement"] >= 0.98


def test_bad_input(model, images, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_onnx(tmp_path / "missing.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a valid ONNX model"):
        load_onnx(tmp_path / "broken.onnx")
    with pytest.raises(ConfigError, match="opset >= 13"):
        export_onnx(_quantize(model, 8, 8, images), tmp_path / "m.onnx", opset=11)
    assert main(["quantize", "default", "--onnx", "--eval", "none"]) == 2
    assert "add --out" in capsys.readouterr().err
    (tmp_path / "taken.onnx").write_bytes(b"keep me")
    assert main(["export", "default", "--out", str(tmp_path / "taken.onnx")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "taken.onnx").read_bytes() == b"keep me"


def _relu6_model():
    from torch import nn

    from hub_dfq.models.preprocess import Preprocess
    from hub_dfq.models.vision_model import ModelSource, VisionModel

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                           nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
                           nn.Conv2d(8, 8, 1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(8, 3)).eval()
    with torch.no_grad():  # outputs well past 6, so that ReLU6 clips and reconstruction pushes the steps up
        for m in module:
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(8.0)
    return VisionModel(module, Preprocess(input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3),
                       ["a", "b", "c"], ModelSource(spec="tiny-relu6", library="timm", architecture="tiny"))


def _bounded_grids(qmodel) -> list[float]:
    from hub_dfq.quant.quantizers import ActQuantizer

    return [float(np.float32(m.scale.detach().abs()) * np.float32(m.qmax))
            for m in qmodel.module.modules() if isinstance(m, ActQuantizer) and m.upper_bound is not None]


def test_learned_steps_stay_inside_relu6_so_every_conv_stays_an_integer_kernel(tmp_path, monkeypatch):
    """Reconstruction learns activation steps; one whose grid passes ReLU6's 6 keeps ONNX Runtime's Clip
    between the conv and its QuantizeLinear, and that conv falls back to float (81% integer MACs on Lite0)."""
    from hub_dfq.quant.quantizers import ActQuantizer

    model = _relu6_model()
    data = torch.randn(32, 3, 16, 16)
    settings = {"reconstruct": {"iters": 30, "batch_size": 8, "lr_act": 0.05, "keep_start": False}}

    def run(name):
        qmodel = hub_dfq.quantize(model, weights=4, activations=8, calibration=data, algorithm="reconstruct",
                                  settings=settings, resume=False)
        return qmodel, runtime_ops(export_onnx(qmodel, tmp_path / name))

    qmodel, ops = run("projected.onnx")
    grids = _bounded_grids(qmodel)
    assert len(grids) == 4 and max(grids) <= 6.0  # float32 arithmetic, as ONNX Runtime checks it
    assert ops.get("QLinearConv") == 3 and "Conv" not in ops and "Clip" not in ops
    with monkeypatch.context() as patch:  # the same run without the projection: the test can fail
        patch.setattr(ActQuantizer, "project_", lambda self: None)
        unprojected, unprojected_ops = run("free.onnx")
    assert max(_bounded_grids(unprojected)) > 6.0 and unprojected_ops.get("QLinearConv", 0) < 3
