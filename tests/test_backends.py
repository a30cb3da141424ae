"""Backends as descriptors: their placement rules build the graph, checkpoints and the CLI loop over them."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hub_dfq
from hub_dfq.backends.registry import BACKENDS, Backend
from hub_dfq.cli import main
from hub_dfq.errors import ConfigError, DependencyError
from hub_dfq.quant.config import QuantConfig, QuantScheme
from hub_dfq.quant.placement import PlacementRules, strictest
from hub_dfq.quant.prepare import prepare

pytestmark = pytest.mark.usefixtures("one_thread")


class _ConvSiLU(nn.Module):
    """conv -> SiLU -> conv -> ReLU -> pool -> linear: ONNX Runtime needs an output quantizer after both convs."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.act, self.relu, self.fc = nn.SiLU(), nn.ReLU(), nn.Linear(8, 4)

    def forward(self, x):
        x = self.relu(self.conv2(self.act(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _outputs(rules: PlacementRules) -> list[tuple[str, str]]:
    config = QuantConfig(default=QuantScheme(weights=8, activations=8), placement=rules)
    report = prepare(_ConvSiLU(), config, example_input=torch.randn(2, 3, 8, 8)).report
    return [(p.name, p.source) for p in report.act_points if p.kind == "output"]


def test_the_backends_placement_rules_decide_where_output_quantizers_go():
    onnx, openvino = BACKENDS.get("onnx").placement, BACKENDS.get("openvino").placement
    # ONNX Runtime: after conv1 (a SiLU reads it) and after conv2's fused ReLU (a pooling reads it)
    assert _outputs(onnx) == [("conv1_out", "conv1"), ("conv2_out", "relu")]
    assert _outputs(openvino) == []  # OpenVINO's kernels dequantize their own output
    assert _outputs(PlacementRules(fused_activations=())) == [("conv1_out", "conv1"), ("conv2_out", "conv2")]


def test_default_rules_are_onnx_runtimes_and_are_not_written_into_the_config():
    assert BACKENDS.get("onnx").placement == PlacementRules() == QuantConfig().placement
    assert "placement" not in QuantConfig().to_dict()  # checkpoints made for ONNX Runtime keep their bytes
    config = QuantConfig(placement=BACKENDS.get("openvino").placement)
    assert QuantConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="unknown fused activation"):
        PlacementRules(fused_activations=("tanh",))


def test_strictest_rules_run_every_backend_integer():
    onnx, openvino = BACKENDS.get("onnx").placement, BACKENDS.get("openvino").placement
    assert strictest([openvino, onnx]) is onnx and strictest([onnx, openvino]) is onnx
    assert strictest([openvino]) is openvino
    mixed = strictest([openvino, PlacementRules(name="x", fused_activations=("relu", "silu"))])
    assert mixed.output_quantizers and mixed.fused_activations == ("relu", "silu")


def test_a_missing_engine_fails_with_one_line_naming_the_pip_command(monkeypatch, tmp_path, capsys):
    missing = Backend("nowhere", summary="test", runtime="Nowhere", file_name="m.bin", export="x:y", load="x:y",
                      requires="nowhere", modules=("hub_dfq_no_such_module",))
    with pytest.raises(DependencyError, match=r"pip install 'hub-dfq\[nowhere\]'"):
        missing.require()
    monkeypatch.setattr(Backend, "available", lambda self: False)
    assert main(["quantize", "default", "--backend", "openvino", "--out", str(tmp_path / "q"), "--eval", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'hub-dfq[openvino]'" in err[0]
    assert not (tmp_path / "q").exists()


def test_onnx_true_and_cli_onnx_are_deprecated_spellings(model, tmp_path):
    qmodel = hub_dfq.quantize(model, weights=8, activations=8, calibration="gaussian", calibration_images=8,
                              algorithm="calibrate")
    with pytest.warns(FutureWarning, match=r'use `backends=\["onnx"\]`'):
        folder = hub_dfq.save_pretrained(qmodel, tmp_path / "a", onnx=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        again = qmodel.save_pretrained(tmp_path / "b", backends=["onnx"])
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in again.iterdir())
    assert (folder / "model.onnx").read_bytes() == (again / "model.onnx").read_bytes()
    assert (folder / "README.md").read_text() == (again / "README.md").read_text()
    with pytest.warns(FutureWarning, match="use `--backend onnx`"):
        assert main(["quantize", "default", "--onnx", "--eval", "none"]) == 2  # still needs --out
    with pytest.raises(ConfigError, match="unknown backend"):
        hub_dfq.save_pretrained(qmodel, tmp_path / "c", backends=["tensorrt"])


def test_export_refuses_options_the_backend_does_not_take(tmp_path, capsys):
    BACKENDS.register(Backend("plain", summary="test", runtime="Plain", file_name="m.bin", export="x:y", load="x:y",
                              export_options=()))
    try:
        assert main(["export", str(tmp_path), "--backend", "plain", "--opset", "17"]) == 2
    finally:
        BACKENDS.unregister("plain")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--opset do not apply to the plain backend" in err[0]
