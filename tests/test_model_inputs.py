"""Models people bring that are not 3 x 224 x 224 RGB, and devices a machine does not have (issue #13, bad input)."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import hub_dfq
from hub_dfq.cli import main
from hub_dfq.errors import ConfigError
from hub_dfq.quant.data import images_to_tensor


@pytest.fixture(scope="module")
def grayscale_model_dir(tmp_path_factory):
    """A timm folder whose model takes one channel at 48 x 40 pixels (height x width)."""
    from timm.models import save_for_hf

    torch.manual_seed(0)
    module = timm.create_model("test_resnet", num_classes=5, in_chans=1, pretrained=False).eval()
    module.pretrained_cfg = {**module.pretrained_cfg, "input_size": (1, 48, 40), "mean": (0.5,), "std": (0.25,)}
    folder = tmp_path_factory.mktemp("gray-48x40")
    save_for_hf(module, folder, safe_serialization=True)
    return folder


def test_a_grayscale_non_square_model_synthesises_quantizes_and_exports(grayscale_model_dir, tmp_path):
    model = hub_dfq.load_model(f"local-dir:{grayscale_model_dir}")
    assert model.input_size == (1, 48, 40)
    hub_dfq.synthesize(model, "bns", 4, iters=3, batch_size=4, out_dir=tmp_path / "synth", progress=False)
    manifest = json.loads((tmp_path / "synth" / "generation.json").read_text())
    assert manifest["input_size"] == [1, 48, 40] and manifest["complete"]
    data = hub_dfq.load_images(str(tmp_path / "synth"))
    pixels = images_to_tensor(model, data)
    assert pixels.shape == (4, 1, 48, 40)  # stored images come back at the model's own size and channels

    qmodel = hub_dfq.quantize(model, weights=8, activations=8, calibration=str(tmp_path / "synth"), progress=False)
    x = torch.randn(3, 1, 48, 40)
    with torch.no_grad():
        assert qmodel(x).shape == (3, 5)
    path = hub_dfq.export_onnx(qmodel, tmp_path / "model.onnx")
    session = hub_dfq.load_onnx(path)
    assert session(x).shape == (3, 5)


@pytest.mark.parametrize("device,message", [
    ("cuda", "no usable CUDA GPU"),
    ("cuda:3", "no usable CUDA GPU"),
    ("tpu", "unknown device 'tpu': use auto, cpu, cuda or cuda:N"),
])
def test_a_device_the_machine_lacks_is_one_clear_error(device, message):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=message):
        hub_dfq.load_model("default", device=device)


def test_cli_device_error_exits_2_and_writes_nothing(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    assert main(["synth", "default", "--method", "gaussian", "--num-images", "4", "--device", "cuda",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no usable CUDA GPU" in err and "--device cpu" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_device_cpu_gives_the_same_bytes_as_the_default(tmp_path):
    a = hub_dfq.synthesize("default", "bns", 4, iters=2, batch_size=4, out_dir=tmp_path / "a", progress=False)
    b = hub_dfq.synthesize("default", "bns", 4, iters=2, batch_size=4, out_dir=tmp_path / "b", progress=False,
                           device="cpu")
    assert a["image"] == b["image"]


def test_a_gpu_out_of_memory_is_one_error_line_with_what_to_do(monkeypatch, tmp_path, capsys):
    class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError, as raised on a GPU
        pass

    def out_of_memory(*args, **kwargs):
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("hub_dfq.synth.api.synthesize_folder", out_of_memory)
    out = tmp_path / "out"
    assert main(["synth", "default", "--num-images", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the GPU ran out of memory" in err and "lower --batch-size, or pass --device cpu" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the lock
