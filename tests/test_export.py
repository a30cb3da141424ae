"""The published checkpoint format: packing, bit-exact reloads, sizes, cards, the transformers plugin, faults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

import hub_dfq
from hub_dfq.errors import CheckpointError, OutputExistsError
from hub_dfq.hub.checkpoint import from_pretrained, save_pretrained
from hub_dfq.models.loader import default_model_dir
from hub_dfq.quant.api import quantize
from hub_dfq.quant.packing import pack, unpack


@pytest.mark.parametrize("bits", range(2, 9), ids=lambda b: f"{b}bit")
def test_packing_round_trip(bits):
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    values = torch.randint(low, high + 1, (7, 3, 3, 3), dtype=torch.int8)
    packed = pack(values, bits)
    assert torch.equal(unpack(packed, bits, values.shape), values)
    assert packed.numel() == {2: 48, 3: 95, 4: 95}.get(bits, values.numel())


@pytest.fixture(scope="module")
def default_model():
    return hub_dfq.load_model("default")


@pytest.fixture(scope="module")
def calibration():
    return hub_dfq.load_images("default", limit=32)


def quantized(model, w: int, a: int, calibration, **kwargs):
    kwargs.setdefault("algorithm", "calibrate")  # what is exported matters here, not how it was fitted
    return quantize(model, weights=w, activations=a, calibration=calibration, calibration_images=32, **kwargs)


@pytest.mark.parametrize("w,a", [(8, 8), (4, 4), (3, 3), (2, 8)], ids=["W8A8", "W4A4", "W3A3", "W2A8"])
def test_reload_is_bit_identical(tmp_path, default_model, calibration, w, a):
    qmodel = quantized(default_model, w, a, calibration)
    save_pretrained(qmodel, tmp_path / "q")
    reloaded = from_pretrained(tmp_path / "q")
    x = torch.randn(16, 3, 32, 32)
    assert torch.equal(qmodel(x), reloaded(x))
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = config["quantization_config"]
    assert config["architecture"] == "resnet20_cifar"
    assert (qc["quant_method"], qc["weights"], qc["activations"], qc["first_last_bits"]) == ("hub_dfq", w, a, 8)
    assert qc["layers"]["conv1"]["weights"] == 8 and qc["layers"]["layer2.0.conv1"]["weights"] == w
    assert qc["calibration_source"].startswith("real: default")
    assert reloaded.labels == default_model.labels and reloaded.preprocess == default_model.preprocess


@pytest.mark.parametrize("name", ["cifar10-resnet20", "cifar10-resnet44"])
def test_checkpoint_size_against_fp32(tmp_path, shared_dir, calibration, name):
    model = hub_dfq.load_model(shared_dir / "models" / name)
    fp32 = (shared_dir / "models" / name / "model.safetensors").stat().st_size
    for bits, limit in ((4, 0.16), (8, 0.30)):
        folder = save_pretrained(quantized(model, bits, 8, calibration), tmp_path / f"w{bits}")
        assert (folder / "model.safetensors").stat().st_size <= limit * fp32


def test_card_metadata_round_trips(tmp_path, default_model, calibration):
    qmodel = quantized(default_model, 4, 8, calibration)
    evaluation = {"dataset": "default", "split": "test", "n": 1000, "fp_top1": 87.8, "fp_top5": 99.6,
                  "quant_top1": 87.1, "quant_top5": 99.5}
    save_pretrained(qmodel, tmp_path / "q", repo_id="tester/r20-w4a8", evaluation=evaluation)
    card = ModelCard.load(tmp_path / "q" / "README.md")
    assert {"hub-dfq", "quantized", "w4a8", "timm"} <= set(card.data.tags)
    assert card.data.license == "bsd-2-clause" and card.data.library_name == "timm"
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values == {"top-1 accuracy (W4A8)": 87.1, "top-1 accuracy (full-precision base model)": 87.8}
    text = card.text
    assert "hub-dfq quantize default --weights 4 --activations 8" in text
    assert "87.10%" in text and "real images" in text


def test_output_folder_is_not_overwritten(tmp_path, default_model, calibration):
    qmodel = quantized(default_model, 8, 8, calibration)
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # a folder hub-dfq did not write is never written into or replaced
        with pytest.raises(OutputExistsError, match="did not write"):
            save_pretrained(qmodel, tmp_path / "q", overwrite=overwrite)
    assert [p.name for p in (tmp_path / "q").iterdir()] == ["keep.txt"]
    save_pretrained(qmodel, tmp_path / "ours")
    with pytest.raises(OutputExistsError, match="`overwrite=True`"):
        save_pretrained(qmodel, tmp_path / "ours")
    (tmp_path / "ours" / "keep.txt").write_text("mine too")
    save_pretrained(qmodel, tmp_path / "ours", overwrite=True)  # replaces what it wrote, keeps the rest
    assert (tmp_path / "ours" / "keep.txt").read_text() == "mine too"
    assert (tmp_path / "ours" / "model.safetensors").is_file()


@pytest.fixture
def saved(tmp_path, default_model, calibration) -> Path:
    return save_pretrained(quantized(default_model, 4, 4, calibration), tmp_path / "q")


def test_newer_format_asks_to_upgrade(saved):
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="upgrade"):
        from_pretrained(saved)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_damaged_weights_give_a_clear_error(saved, damage):
    weights = saved / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    else:
        weights.unlink()
    with pytest.raises(CheckpointError, match="corrupted or truncated|missing"):
        from_pretrained(saved)


def test_load_model_reads_a_quantized_checkpoint_and_from_pretrained_refuses_a_float_model(saved):
    loaded = hub_dfq.load_model(saved)  # hub-dfq eval and audits take quantized checkpoints too
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(loaded.module(x), from_pretrained(saved)(x))
    assert loaded.quantization_config["quant_method"] == "hub_dfq" and loaded.info()["quantized"].startswith("W4A4")
    with pytest.raises(CheckpointError, match="load_model"):
        from_pretrained(Path(default_model_dir()))


def test_the_models_layer_alone_reads_a_quantized_checkpoint(saved):
    """The hub layer registers its adapter at `import hub_dfq`, so importing only the loader is enough."""
    code = ("import sys\nfrom hub_dfq.models.loader import load_model\n"
            "assert 'hub_dfq.hub.checkpoint' not in sys.modules\n"
            f"model = load_model({str(saved)!r})\n"
            "print(model.quantization_config['quant_method'], model.info()['quantized'][:4])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split() == ["hub_dfq", "W4A4"]


@pytest.fixture(scope="module")
def hf_resnet(tmp_path_factory):
    from transformers import (
        ConvNextImageProcessor,
        ResNetConfig,
        ResNetForImageClassification,
    )

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf-fp")
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3,
                          id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    ResNetForImageClassification(config).eval().save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(folder)
    return hub_dfq.load_model(folder)


def test_transformers_plugin_loads_bit_identical(tmp_path, hf_resnet):
    from transformers import AutoModelForImageClassification

    qmodel = quantize(hf_resnet, weights=4, activations=8, calibration="gaussian", calibration_images=16,
                      algorithm="calibrate")
    assert "model.resnet.embedder.embedder.convolution" in qmodel.report.quantized
    folder = save_pretrained(qmodel, tmp_path / "q")
    assert (folder / "preprocessor_config.json").is_file()
    x = torch.randn(4, 3, 32, 32)
    model = AutoModelForImageClassification.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, qmodel(x))
    assert model.config.quantization_config.quant_method == "hub_dfq"
    assert torch.equal(from_pretrained(folder)(x), qmodel(x))


def test_checkpoints_are_byte_identical_across_processes(tmp_path):
    """Same inputs, same bytes: also the safetensors header, whose metadata order the writer does not fix."""
    import hashlib
    import os
    import subprocess
    import sys

    code = ("import sys, torch, hub_dfq\n"
            "torch.manual_seed(0)\n"
            "q = hub_dfq.quantize('default', weights=4, activations=8, calibration=torch.randn(8, 3, 32, 32),\n"
            "                     algorithm='calibrate')\n"
            "hub_dfq.save_pretrained(q, sys.argv[1])\n")
    digests = []
    for i, seed in enumerate(("1", "2")):
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"q{i}")], check=True, env=env, timeout=300)
        digests.append({f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in (tmp_path / f"q{i}").iterdir()})
    assert digests[0] == digests[1]
