"""The OpenVINO backend: its int8 model follows the simulated one, checkpoints and the CLI carry it."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("openvino", reason="the OpenVINO backend needs openvino: pip install 'hub-dfq[openvino]'")

import hub_dfq  # noqa: E402
from hub_dfq.backends.compare import compare_logits  # noqa: E402
from hub_dfq.backends.openvino import export_openvino, load_openvino, runtime_precisions  # noqa: E402
from hub_dfq.cli import main  # noqa: E402
from hub_dfq.quant.data import images_to_tensor  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(model):
    return images_to_tensor(model, hub_dfq.load_images("default"))


@pytest.fixture(scope="module")
def qmodel(model, images):
    # quantized by OpenVINO's placement rules; real images calibrate in a second
    return hub_dfq.quantize(model, weights=4, activations=8, calibration=images[:64], algorithm="calibrate",
                            placement=hub_dfq.BACKENDS.get("openvino").placement)


def test_openvino_runs_every_layer_int8_and_follows_the_simulated_model(qmodel, images, tmp_path):
    engine = load_openvino(export_openvino(qmodel, tmp_path / "m.xml"), threads=1)
    precisions = runtime_precisions(engine)
    assert precisions.get("Convolution:u8") == 19 and precisions.get("FullyConnected:u8") == 1
    assert not {k for k in precisions if k.split(":")[0] in ("Convolution", "FullyConnected") and k.endswith("f32")}
    agreement = compare_logits(qmodel, engine, images)  # the embedded 1,000 CIFAR-10 test images
    # one-step rounding differences where a value sits on a boundary, as in ONNX Runtime
    assert agreement["n"] == 1000 and agreement["top1_agreement"] >= 0.99


def test_checkpoint_with_both_backends_reexports_the_same_bytes(qmodel, tmp_path):
    folder = qmodel.save_pretrained(tmp_path / "q", backends=["onnx", "openvino"])
    assert {"model.onnx", "openvino_model.xml", "openvino_model.bin"} <= {p.name for p in folder.iterdir()}
    card = (folder / "README.md").read_text()
    assert "openvino_model.xml" in card and "model.onnx" in card and "- openvino" in card
    config = json.loads((folder / "config.json").read_text())["quantization_config"]["config"]
    assert config["placement"]["name"] == "openvino" and not config["placement"]["output_quantizers"]
    reloaded = hub_dfq.from_pretrained(folder)
    assert reloaded.config.placement == qmodel.config.placement
    again = export_openvino(reloaded, tmp_path / "again.xml")
    assert again.read_bytes() == (folder / "openvino_model.xml").read_bytes()
    assert again.with_suffix(".bin").read_bytes() == (folder / "openvino_model.bin").read_bytes()


def test_cli_quantize_for_openvino_and_export(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "default", "--weights", "8", "--activations", "8", "--calibration", "gaussian",
                 "--calibration-size", "16", "--algorithm", "calibrate", "--eval-limit", "100", "--out", str(out),
                 "--backend", "openvino", "--json", str(tmp_path / "q.json")]) == 0
    summary = json.loads((tmp_path / "q.json").read_text())
    assert abs(summary["openvino_top1"] - summary["quant_top1"]) <= 2.0  # 100 images: one image is 1 point
    assert "OpenVINO int8" in capsys.readouterr().out
    assert main(["export", str(out), "--backend", "openvino", "--out", str(tmp_path / "e.xml"), "--dataset",
                 "default", "--limit", "100", "--json", str(tmp_path / "e.json")]) == 0
    assert (tmp_path / "e.xml").read_bytes() == (out / "openvino_model.xml").read_bytes()
    assert (tmp_path / "e.bin").read_bytes() == (out / "openvino_model.bin").read_bytes()
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["openvino_top1"] == summary["openvino_top1"] and report["top1_agreement"] >= 0.98
