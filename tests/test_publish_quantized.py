"""Quantize -> push model and calibration set -> download -> reload, against the local Hub server."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from hub_server import COMMIT_PATH, WRITE_TOKEN
from huggingface_hub import (
    DatasetCard,
    HfApi,
    ModelCard,
    hf_hub_download,
    snapshot_download,
)

import hub_dfq
from hub_dfq.cli import main
from hub_dfq.errors import OutputExistsError, PublishError
from hub_dfq.models.loader import default_model_dir
from hub_dfq.outputs import MARKER

FAST = {"weights": 4, "activations": 8, "calibration": "gaussian", "calibration_images": 16, "algorithm": "calibrate"}


@pytest.fixture
def base_repo(hub) -> str:
    repo_id = hub.new_repo_id("cifar-r20")
    api = HfApi(token=WRITE_TOKEN)
    api.create_repo(repo_id)
    api.upload_folder(folder_path=default_model_dir(), repo_id=repo_id)
    return repo_id


def test_push_model_and_dataset_then_reload(hub, base_repo, tmp_path):
    model = hub_dfq.load_model(base_repo)
    qmodel = hub_dfq.quantize(model, **FAST)
    model_repo, data_repo = hub.new_repo_id("r20-w4a8"), hub.new_repo_id("r20-calibration")
    result = hub_dfq.push_to_hub(qmodel, model_repo, token=WRITE_TOKEN, dataset_repo=data_repo,
                                 calibration_folder=qmodel.calibration["folder"])
    assert result.commit == hub.head(model_repo)
    assert len(hub.commits(model_repo)) == 2  # the Hub's initial commit + one upload

    folder = snapshot_download(model_repo, cache_dir=tmp_path / "cache")
    names = {p.name for p in __import__("pathlib").Path(folder).iterdir()}
    assert {"model.safetensors", "config.json", "README.md"} <= names
    config = json.loads(open(hf_hub_download(model_repo, "config.json", cache_dir=tmp_path / "c2")).read())
    assert config["quantization_config"]["calibration"]["repo_id"] == data_repo
    assert "folder" not in config["quantization_config"]["calibration"]  # no local paths published

    x = torch.randn(8, 3, 32, 32)
    assert torch.equal(hub_dfq.from_pretrained(model_repo)(x), qmodel(x))
    assert torch.equal(hub_dfq.from_pretrained(folder)(x), qmodel(x))

    card = ModelCard.load(model_repo)
    assert card.data.base_model == base_repo and card.data.base_model_relation == "quantized"
    assert card.data.datasets == [data_repo] and "data-free" in card.data.tags
    assert "without any training data" in card.text

    calibration = datasets.load_dataset(data_repo, split="train")
    assert len(calibration) == 16 and calibration.features["label"].names == model.labels
    assert model_repo in DatasetCard.load(data_repo, repo_type="dataset").text


def test_cli_out_push_and_push_dataset(hub, base_repo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    model_repo, data_repo = hub.new_repo_id("cli-q"), hub.new_repo_id("cli-cal")
    out = tmp_path / "q"
    argv = ["quantize", base_repo, "--weights", "4", "--activations", "4", "--calibration", "gaussian",
            "--calibration-size", "16", "--algorithm", "calibrate", "--eval-limit", "64", "--out", str(out),
            "--push-to-hub", model_repo,
            "--push-dataset", data_repo, "--backend", "onnx", "--json", str(tmp_path / "q.json")]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "q.json").read_text())
    assert summary["pushed"].endswith(model_repo) and summary["quant_top1"] > 50
    files = {k: v for k, v in hub.list_files(model_repo).items() if k != ".gitattributes"}
    saved = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".hub-dfq.json"}  # the marker stays local
    assert files == saved  # what was saved is what was pushed, byte for byte
    assert "model.onnx" in files
    card = ModelCard.load(model_repo)
    assert "hub-dfq quantize " + base_repo in card.text and "--push-dataset" in card.text
    assert {r.metric_name for r in card.data.eval_results} == {
        "top-1 accuracy (W4A4)", "top-1 accuracy (full-precision base model)"}
    assert hub.repo_exists(data_repo, "dataset")


def test_push_without_token_keeps_the_folder(hub, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", "default", "--calibration", "gaussian", "--calibration-size", "16", "--eval", "none",
            "--algorithm", "calibrate", "--out", str(out), "--push-to-hub", "tester/no-token"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "token" in err and str(out) in err
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert not hub.repo_exists("tester/no-token")


def test_server_error_during_push_commits_nothing(hub, tmp_path):
    qmodel = hub_dfq.quantize("default", **FAST)
    repo_id = hub.new_repo_id()
    hub.create_repo(repo_id)
    head = hub.head(repo_id)
    hub.fail_next(COMMIT_PATH, status=500)
    with pytest.raises(PublishError, match="nothing was committed"):
        hub_dfq.push_to_hub(qmodel, repo_id, token=WRITE_TOKEN)
    assert hub.head(repo_id) == head
    hub_dfq.push_to_hub(qmodel, repo_id, token=WRITE_TOKEN)  # retry
    assert "model.safetensors" in hub.list_files(repo_id)


def test_push_uploads_the_model_it_is_given_not_a_folder_lying_around(hub, tmp_path):
    first = hub_dfq.quantize("default", **FAST)
    second = hub_dfq.quantize("default", **{**FAST, "weights": 8})
    hub_dfq.save_pretrained(first, tmp_path / "q")
    repo_id = hub.new_repo_id()
    hub_dfq.push_to_hub(second, repo_id, token=WRITE_TOKEN)
    pushed = json.loads(hub.list_files(repo_id)["config.json"])
    assert pushed["quantization_config"]["weights"] == 8
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(hub_dfq.from_pretrained(repo_id)(x), second(x))
    # one commit holds the weights and the card: a pushed repo is never seen without it
    assert {"README.md", "model.safetensors", "config.json"} <= set(hub.commits(repo_id)[0]["files"])


def test_push_dataset_needs_synthetic_calibration(capsys):
    argv = ["quantize", "default", "--calibration", "default", "--push-to-hub", "tester/x", "--push-dataset",
            "tester/y"]
    assert main(argv) == 2
    assert "synthetic" in capsys.readouterr().err


def test_transformers_checkpoint_from_the_hub(hub, tmp_path):
    from transformers import (
        AutoModelForImageClassification,
        ConvNextImageProcessor,
        ResNetConfig,
        ResNetForImageClassification,
    )

    folder = tmp_path / "fp"
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    ResNetForImageClassification(config).eval().save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(folder)
    qmodel = hub_dfq.quantize(hub_dfq.load_model(folder), **FAST)
    repo_id = hub.new_repo_id("hf-q")
    hub_dfq.push_to_hub(qmodel, repo_id, token=WRITE_TOKEN)
    x = torch.randn(2, 3, 32, 32)
    model = AutoModelForImageClassification.from_pretrained(repo_id)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, qmodel(x))


# ---- the verbs as methods of QuantizedModel (issue 20) ---------------------------------------------

@pytest.fixture(scope="module")
def fast_qmodel():
    return hub_dfq.quantize("default", **FAST)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_methods_take_the_arguments_of_the_functions():
    from hub_dfq.hub import checkpoint

    for verb in ("save_pretrained", "push_to_hub", "from_pretrained"):
        function = inspect.signature(getattr(checkpoint, verb)).parameters
        method = inspect.signature(getattr(hub_dfq.QuantizedModel, verb)).parameters
        assert {k: (v.kind, v.default) for k, v in function.items() if k != "qmodel"} == \
            {k: (v.kind, v.default) for k, v in method.items() if k != "self"}, verb


def test_save_pretrained_method_writes_the_bytes_the_function_writes(fast_qmodel, tmp_path):
    card = {"repo_id": "me/r20-w4a8", "command": "hub-dfq quantize default", "calibration_repo": "me/r20-cal"}
    by_function = hub_dfq.save_pretrained(fast_qmodel, tmp_path / "function", **card)
    by_method = fast_qmodel.save_pretrained(tmp_path / "method", **card)
    assert by_method == tmp_path / "method"
    assert _files(by_method) == _files(by_function)
    assert {"model.safetensors", "config.json", "README.md", MARKER} <= set(_files(by_method))


def test_save_pretrained_method_never_overwrites_without_being_asked(fast_qmodel, tmp_path):
    out = fast_qmodel.save_pretrained(tmp_path / "q")
    before = _files(out)
    with pytest.raises(OutputExistsError, match="overwrite"):
        fast_qmodel.save_pretrained(out)
    assert _files(out) == before
    (out / "notes.txt").write_text("mine")
    fast_qmodel.save_pretrained(out, overwrite=True, repo_id="me/other")
    assert (out / "notes.txt").read_text() == "mine"  # files hub-dfq did not write are kept
    assert "me/other" in (out / "README.md").read_text()


def test_push_to_hub_method_then_reload_bit_exactly(fast_qmodel, hub, tmp_path):
    repo_id = hub.new_repo_id("r20-method")
    result = fast_qmodel.push_to_hub(repo_id, token=WRITE_TOKEN)
    assert result.repo_id == repo_id and result.commit == hub.head(repo_id)
    pushed = {k: v for k, v in hub.list_files(repo_id).items() if k != ".gitattributes"}
    saved = hub_dfq.save_pretrained(fast_qmodel, tmp_path / "q", repo_id=repo_id)
    assert pushed == {k: v for k, v in _files(saved).items() if k != MARKER}  # the function's bytes, uploaded

    x = torch.randn(4, 3, 32, 32)
    reloaded = hub_dfq.QuantizedModel.from_pretrained(repo_id)
    assert isinstance(reloaded, hub_dfq.QuantizedModel)
    assert torch.equal(reloaded(x), fast_qmodel(x))
    with torch.no_grad():
        assert torch.equal(hub_dfq.load_model(repo_id)(x), fast_qmodel(x))


def test_the_methods_work_without_importing_the_hub_layer(tmp_path):
    """The Hub format is registered by `import hub_dfq` itself; the Hub layer's modules load on the first save."""
    code = ("import sys, torch\n"
            "from hub_dfq.quant.api import quantize\n"
            "from hub_dfq.quant.model import QuantizedModel\n"
            f"q = quantize('default', **{FAST!r})\n"
            "assert 'hub_dfq.hub.checkpoint' not in sys.modules\n"
            f"q.save_pretrained({str(tmp_path / 'q')!r})\n"
            "x = torch.randn(2, 3, 32, 32)\n"
            f"print(torch.equal(QuantizedModel.from_pretrained({str(tmp_path / 'q')!r})(x), q(x)))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"
