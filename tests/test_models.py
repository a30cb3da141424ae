"""Model adapters: CIFAR ResNets, the embedded default, timm and transformers folders, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from hub_dfq import load_images, load_model
from hub_dfq.errors import (
    ModelNotFoundError,
    ModelSpecError,
    UnsafeCheckpointError,
    UnsupportedModelError,
)
from hub_dfq.evaluation import evaluate_accuracy
from hub_dfq.models.vision_model import BN_TYPES


def card_accuracy(folder: Path) -> float:
    match = re.search(r"\*\*([\d.]+)%\*\*", (folder / "README.md").read_text())
    assert match, f"no accuracy in {folder}/README.md"
    return float(match.group(1))


@pytest.mark.parametrize("depth,blocks", [(20, 3), (32, 5), (44, 7), (56, 9)], ids=lambda v: str(v))
def test_cifar_resnets_are_registered_in_timm(depth, blocks):
    model = timm.create_model(f"resnet{depth}_cifar")
    keys = model.state_dict().keys()
    assert f"layer3.{blocks - 1}.bn2.running_var" in keys and f"layer3.{blocks}.conv1.weight" not in keys
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["cifar10-resnet20", "cifar10-resnet44"])
def test_cifar_state_dict_keys_match_shared_checkpoints(shared_dir, name):
    weights = load_file(shared_dir / "models" / name / "model.safetensors")
    arch = json.loads((shared_dir / "models" / name / "config.json").read_text())["architecture"]
    model_keys = {k for k in timm.create_model(arch).state_dict() if not k.endswith("num_batches_tracked")}
    assert model_keys == set(weights)


@pytest.mark.parametrize("name", ["resnet20", "resnet44"])
def test_full_test_split_accuracy_matches_model_card(name, resnet20_dir, resnet44_dir, cifar_test_parquet):
    folder = {"resnet20": resnet20_dir, "resnet44": resnet44_dir}[name]
    result = evaluate_accuracy(load_model(f"local-dir:{folder}"), load_images(cifar_test_parquet), batch_size=500,
                               progress=False)
    assert result["n"] == 10_000
    assert abs(result["top1"] - card_accuracy(folder)) <= 0.1


def test_default_model_is_the_shared_resnet20(resnet20_dir, cifar_test_parquet):
    """The embedded default holds the card's ResNet-20 bit for bit, so its full-split accuracy is the one above."""
    default, shared = load_model("default"), load_model(f"local-dir:{resnet20_dir}")
    mine, theirs = default.module.state_dict(), shared.module.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert default.preprocess == shared.preprocess
    images = load_images(cifar_test_parquet, limit=500)
    assert evaluate_accuracy(default, images, progress=False) == evaluate_accuracy(shared, images, progress=False)


def test_default_model_provenance_and_inventory():
    model = load_model("default")
    assert model.source.library == "timm" and model.source.architecture == "resnet20_cifar"
    assert model.source.license == "bsd-2-clause"
    assert model.labels[:3] == ["airplane", "automobile", "bird"]
    assert model.input_size == (3, 32, 32)
    assert len(model.bn_layers) == 19 and len(model.weight_layers()) == 20
    assert not model.module.training


def test_bn_inventory_is_in_forward_order_with_module_names():
    model = load_model("default")
    called: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda m, i, o: called.append(m))
               for m in model.module.modules() if isinstance(m, BN_TYPES)]
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    for h in handles:
        h.remove()
    assert [m for _, m in model.bn_layers] == called
    named = dict(model.module.named_modules())
    assert all(named[name] is module for name, module in model.bn_layers)


def test_timm_hub_style_folder_gives_identical_logits(tmp_path):
    from timm.models import save_for_hf

    original = timm.create_model("test_resnet", num_classes=7, pretrained=False).eval()
    save_for_hf(original, tmp_path, safe_serialization=True)
    model = load_model(f"local-dir:{tmp_path}")
    assert model.source.library == "timm" and model.num_classes == 7
    x = torch.randn(2, *model.input_size)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
    assert load_model(str(tmp_path)).source.path == str(tmp_path.resolve())


@pytest.fixture(scope="module")
def tiny_transformers_resnet(tmp_path_factory):
    from transformers import (
        ConvNextImageProcessor,
        ResNetConfig,
        ResNetForImageClassification,
    )

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3,
                          id2label={0: "cat", 1: "dog", 2: "fish"}, label2id={"cat": 0, "dog": 1, "fish": 2})
    model = ResNetForImageClassification(config).eval()
    folder = tmp_path_factory.mktemp("hf-resnet")
    model.save_pretrained(folder)
    processor = ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875)
    processor.save_pretrained(folder)
    return folder, model, processor


def test_transformers_folder_gives_identical_logits(tiny_transformers_resnet):
    folder, original, processor = tiny_transformers_resnet
    model = load_model(folder)
    assert model.source.library == "transformers" and model.source.architecture == "resnet"
    assert model.labels == ["cat", "dog", "fish"]
    assert model.input_size == (3, 64, 64)
    assert len(model.bn_layers) == sum(isinstance(m, BN_TYPES) for m in original.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), original(pixel_values=x).logits)


def test_transformers_preprocessing_matches_image_processor(tiny_transformers_resnet):
    from PIL import Image

    folder, _, processor = tiny_transformers_resnet
    model = load_model(f"local-dir:{folder}")
    image = Image.fromarray(torch.randint(0, 256, (90, 120, 3), dtype=torch.uint8).numpy())
    expected = processor(image, return_tensors="pt")["pixel_values"][0]
    ours = model.preprocess(image)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().mean() < 0.02


def test_vit_without_batchnorm_loads(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=4)
    ViTForImageClassification(config).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.bn_layers == [] and model.input_size == (3, 32, 32)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


# ---- bad input ------------------------------------------------------------------------------------

def test_unknown_spec_names_the_spellings():
    with pytest.raises(ModelSpecError, match="local-dir:PATH"):
        load_model("not a model")


def test_missing_folder():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model("local-dir:/nonexistent/model")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model("./no/such/folder")


def test_config_without_weights(tmp_path, resnet20_dir):
    (tmp_path / "config.json").write_text((resnet20_dir / "config.json").read_text())
    with pytest.raises(ModelNotFoundError, match="no weights"):
        load_model(tmp_path)


class Payload:  # stands for arbitrary pickled code
    pass


def test_pickle_only_checkpoint_is_refused(tmp_path, resnet20_dir):
    (tmp_path / "config.json").write_text((resnet20_dir / "config.json").read_text())
    torch.save({"model": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="safetensors"):
        load_model(tmp_path)


def test_weights_only_pickle_checkpoint_loads(tmp_path, resnet20_dir):
    (tmp_path / "config.json").write_text((resnet20_dir / "config.json").read_text())
    torch.save(load_file(resnet20_dir / "model.safetensors"), tmp_path / "pytorch_model.bin")
    assert len(load_model(tmp_path).bn_layers) == 19


def test_not_an_image_classifier(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="not an image classifier"):
        load_model(tmp_path)


def test_timm_model_without_head(tmp_path):
    from timm.models import save_for_hf

    save_for_hf(timm.create_model("test_resnet", num_classes=0), tmp_path, safe_serialization=True)
    with pytest.raises(UnsupportedModelError, match="classifier"):
        load_model(tmp_path)


def test_timm_name_without_weights_needs_random_init():
    with pytest.raises(ModelNotFoundError, match="pretrained=False"):
        load_model("resnet44_cifar")
    assert load_model("resnet44_cifar", pretrained=False).num_classes == 10
