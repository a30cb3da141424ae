"""Loading models from the (local) Hub through the real huggingface_hub, timm and transformers code."""

from __future__ import annotations

import pytest
import timm
import torch
from hub_server import WRITE_TOKEN
from huggingface_hub import HfApi, constants

from hub_dfq import load_model
from hub_dfq.errors import ModelNotFoundError, ModelSpecError
from hub_dfq.models.loader import default_model_dir


@pytest.fixture
def default_repo(hub) -> tuple[str, str]:
    repo_id = hub.new_repo_id("cifar-r20")
    api = HfApi(token=WRITE_TOKEN)
    api.create_repo(repo_id)
    commit = api.upload_folder(folder_path=default_model_dir(), repo_id=repo_id).oid
    return repo_id, commit


def test_hub_repo_id_loads_timm_model_with_commit(default_repo):
    repo_id, commit = default_repo
    model = load_model(repo_id)
    assert model.source.library == "timm" and model.source.repo_id == repo_id
    assert model.source.commit == commit and model.source.license == "bsd-2-clause"
    assert model.source.url.endswith(f"/{repo_id}/tree/{commit}")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), load_model("default")(x))


def test_revision_suffix_prefix_and_keyword(default_repo, hub):
    repo_id, first = default_repo
    hub.upload_files(repo_id, {"notes.txt": "second commit"})
    assert load_model(f"hf-hub:{repo_id}@{first}").source.commit == first
    assert load_model(repo_id, revision=first).source.commit == first
    assert load_model(repo_id).source.commit != first
    with pytest.raises(ModelSpecError, match="revision given twice"):
        load_model(f"{repo_id}@main", revision=first)
    with pytest.raises(ModelNotFoundError, match="no revision"):
        load_model(f"{repo_id}@does-not-exist")


def test_missing_repo_says_what_to_do(hub):
    with pytest.raises(ModelNotFoundError, match="no model repository"):
        load_model("tester/does-not-exist")


def test_offline_mode_uses_the_cache(default_repo, monkeypatch):
    repo_id, commit = default_repo
    load_model(repo_id)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert load_model(repo_id).source.commit == commit
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        load_model("tester/never-downloaded")


def test_transformers_repo(hub):
    from transformers import (
        ConvNextImageProcessor,
        ResNetConfig,
        ResNetForImageClassification,
    )

    repo_id = hub.new_repo_id("tiny-resnet")
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    original = ResNetForImageClassification(config).eval()
    original.push_to_hub(repo_id, token=WRITE_TOKEN)
    ConvNextImageProcessor(size={"shortest_edge": 40}).push_to_hub(repo_id, token=WRITE_TOKEN)
    model = load_model(repo_id)
    assert model.source.library == "transformers" and model.source.commit == hub.head(repo_id)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(model(x), original(pixel_values=x).logits)


def test_hf_hub_prefix_rejects_transformers_repo(hub):
    from transformers import ResNetConfig, ResNetForImageClassification

    repo_id = hub.new_repo_id("tiny-resnet")
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], num_labels=2)
                                 ).push_to_hub(repo_id, token=WRITE_TOKEN)
    with pytest.raises(ModelSpecError, match="drop the 'hf-hub:' prefix"):
        load_model(f"hf-hub:{repo_id}")


def test_bare_timm_name_downloads_its_hub_weights(hub):
    from timm.models import push_to_hf_hub

    hub.add_user("hf_test_timm_token", "timm-maintainer", orgs=("timm",))
    original = timm.create_model("test_resnet", pretrained=False).eval()
    push_to_hf_hub(original, "timm/test_resnet.r160_in1k", token="hf_test_timm_token", safe_serialization=True)
    model = load_model("test_resnet.r160_in1k")
    assert model.source.repo_id == "timm/test_resnet.r160_in1k" and model.source.library == "timm"
    assert model.num_classes == 1000 and model.labels[0] != "class_0"
    x = torch.randn(1, *model.input_size)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
