"""Preprocess reproduces what timm and transformers do at evaluation time."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from hub_dfq.models.preprocess import Preprocess


@pytest.fixture
def photo() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8))


@pytest.mark.parametrize("crop_pct", [0.875, 0.95, 1.0])
def test_matches_timm_eval_transform(photo, crop_pct):
    model = timm.create_model("test_resnet", pretrained=False)
    cfg = resolve_data_config(model=model)
    cfg["crop_pct"] = crop_pct
    expected = create_transform(**cfg)(photo)
    ours = Preprocess.from_timm_config(cfg)(photo)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["vit", "mobilenet_v2"])
def test_matches_transformers_processors(photo, kind):
    from transformers import MobileNetV2ImageProcessor, ViTImageProcessor

    processor = {
        "vit": ViTImageProcessor(size={"height": 48, "width": 48}),
        "mobilenet_v2": MobileNetV2ImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 48, "width": 48}),
    }[kind]
    expected = processor(photo, return_tensors="pt")["pixel_values"][0]
    ours = Preprocess.from_image_processor(processor)(photo)
    assert ours.shape == expected.shape == (3, 48, 48)
    assert (ours - expected).abs().mean() < 0.02


def test_normalise_round_trip_and_valid_range():
    pre = Preprocess(input_size=(3, 8, 8), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    pixels = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(pre.denormalize(pre.normalize(pixels)), pixels)
    low, high = pre.valid_range()
    torch.testing.assert_close(low.flatten(), torch.tensor([-2.5, -1.6, -1.0]))
    torch.testing.assert_close(high.flatten(), torch.tensor([2.5, 2.4, 7 / 3]))


def test_grayscale_and_rgba_become_rgb():
    pre = Preprocess(input_size=(3, 16, 16), mean=(0.0,) * 3, std=(1.0,) * 3, resize=16, crop=(16, 16))
    assert pre(Image.new("L", (20, 30), 128)).shape == (3, 16, 16)
    assert pre(Image.new("RGBA", (16, 16), (255, 0, 0, 0)))[0].mean() == 1.0


def test_rejects_mismatched_stats():
    with pytest.raises(ValueError, match="mean/std"):
        Preprocess(input_size=(3, 8, 8), mean=(0.5,), std=(0.5,))


def test_lite0_folder_matches_timm_eval_transform_on_real_imagenet_images(shared_dir):
    """The shared EfficientNet-Lite0 (bicubic, crop 0.875, mean/std 0.5) on the shared ImageNet JPEGs."""
    import hub_dfq

    folder = shared_dir / "models" / "imagenet-efficientnet-lite0"
    model = hub_dfq.load_model(folder)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False,
                                  pretrained_cfg_overlay=model.config.get("pretrained_cfg", {}))
    transform = create_transform(**resolve_data_config(model=reference))
    import io

    import pyarrow.parquet as pq

    table = pq.read_table(shared_dir / "data" / "imagenet-sample" / "even-classes.parquet", columns=["image"])
    worst = 0.0
    for cell in table.column("image").to_pylist()[::20]:  # 25 of the 500 JPEGs
        image = Image.open(io.BytesIO(cell["bytes"])).convert("RGB")
        expected, ours = transform(image), model.preprocess(image)
        assert ours.shape == expected.shape == (3, 224, 224)
        worst = max(worst, float((ours - expected).abs().max()))
    assert worst < 1e-5  # same resize, crop and normalisation, to float rounding
