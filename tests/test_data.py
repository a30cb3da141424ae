"""The dataset loader: every spelling, column detection, streaming, odd and broken images."""

from __future__ import annotations

import io

import datasets
import numpy as np
import pytest
from PIL import Image

from hub_dfq import iter_batches, load_images
from hub_dfq.data import decode_image, embedded_sample_path
from hub_dfq.errors import DatasetError, ImageDecodeError


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_embedded_sample_is_labelled_cifar(model):
    data = load_images("default")
    assert len(data) == 1000 and data.split == "test"
    assert (data.image_column, data.label_column) == ("img", "label")
    assert data.label_names == model.labels
    assert embedded_sample_path().stat().st_size < 1_000_000


@pytest.mark.parametrize("form", ["parquet-prefix", "parquet-suffix", "dataset-object", "datasetdict"])
def test_spellings_of_the_same_parquet(form, cifar_test_parquet, model):
    spec = {
        "parquet-prefix": f"parquet:{cifar_test_parquet}",
        "parquet-suffix": str(cifar_test_parquet),
        "dataset-object": datasets.load_dataset("parquet", data_files=str(cifar_test_parquet), split="train"),
        "datasetdict": datasets.load_dataset("parquet", data_files={"test": str(cifar_test_parquet)}),
    }[form]
    data = load_images(spec, limit=10)
    assert len(data) == 10 and data.label_column == "label"
    batches = list(iter_batches(data, model.preprocess, batch_size=4))
    assert [len(b.indices) for b in batches] == [4, 4, 2]
    assert batches[0].pixel_values.shape == (4, 3, 32, 32)


def test_streaming_equals_map_style(cifar_test_parquet, model):
    eager = load_images(cifar_test_parquet, limit=12)
    streamed = load_images(cifar_test_parquet, limit=12, streaming=True)
    assert streamed.streaming and streamed.num_rows is None
    a = [b.pixel_values for b in iter_batches(eager, model.preprocess, batch_size=5)]
    b = [b.pixel_values for b in iter_batches(streamed, model.preprocess, batch_size=5)]
    assert all(x.equal(y) for x, y in zip(a, b)) and len(a) == len(b) == 3


def test_image_folder_with_odd_images(tmp_path, model):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "cat" / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(tmp_path / "cat" / "gray.png")
    Image.fromarray(rng.integers(0, 256, (20, 33, 4), dtype=np.uint8), mode="RGBA").save(tmp_path / "dog" / "rgba.png")
    data = load_images(tmp_path)
    assert data.label_names == ["cat", "dog"]
    (batch,) = iter_batches(data, model.preprocess, batch_size=8)
    assert batch.pixel_values.shape == (3, 3, 32, 32) and not batch.skipped


def test_truncated_images_are_skipped_and_counted(model):
    good = png_bytes(Image.new("RGB", (32, 32), "red"))
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": good, "path": None}, {"bytes": good[: len(good) // 2], "path": None},
                   {"bytes": b"not an image", "path": None}, {"bytes": good, "path": None}]},
        features=datasets.Features({"image": datasets.Image()}),
    )
    data = load_images(ds)
    assert data.label_column is None
    (batch,) = iter_batches(data, model.preprocess, batch_size=8)
    assert batch.indices == [0, 3] and [i for i, _ in batch.skipped] == [1, 2]
    assert batch.labels is None
    with pytest.raises(ImageDecodeError, match="row 1"):
        list(iter_batches(data, model.preprocess, batch_size=8, skip_errors=False))


def test_explicit_columns_and_missing_image_column():
    ds = datasets.Dataset.from_dict({"pic": [png_bytes(Image.new("L", (8, 8)))], "y": [1], "text": ["x"]})
    with pytest.raises(DatasetError, match="`image_column`"):
        load_images(ds)
    data = load_images(ds, image_column="pic", label_column="y")
    assert (data.image_column, data.label_column) == ("pic", "y")
    with pytest.raises(DatasetError, match="no column 'nope'"):
        load_images(ds, image_column="nope")


def test_bad_specs(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_images("parquet:/no/such.parquet")
    with pytest.raises(DatasetError, match="no split 'dev'"):
        load_images("default", split="dev")
    with pytest.raises(DatasetError, match="positive"):
        load_images("default", limit=0)
    empty = datasets.Dataset.from_dict({"image": []}, features=datasets.Features({"image": datasets.Image()}))
    with pytest.raises(DatasetError, match="empty"):
        load_images(empty)


def test_decode_image_cells():
    image = Image.new("RGB", (4, 4), "blue")
    assert decode_image({"bytes": png_bytes(image), "path": None}).size == (4, 4)
    assert decode_image(np.zeros((4, 4, 3), dtype=np.uint8)).size == (4, 4)
    with pytest.raises(ImageDecodeError):
        decode_image(None)


@pytest.mark.parametrize("streaming", [False, True], ids=["download", "streaming"])
def test_hub_dataset_with_config_and_split(hub, cifar_test_parquet, model, streaming):
    from hub_server import WRITE_TOKEN

    repo_id = hub.new_repo_id("cifar-mini")
    source = datasets.load_dataset("parquet", data_files=str(cifar_test_parquet), split="train[:20]")
    source.push_to_hub(repo_id, config_name="mini", split="validation", token=WRITE_TOKEN)
    data = load_images(repo_id, dataset_config="mini", split="validation", limit=8, streaming=streaming)
    assert data.streaming is streaming and data.split == "validation"
    assert (data.image_column, data.label_column) == ("img", "label") and data.label_names == model.labels
    batches = list(iter_batches(data, model.preprocess, batch_size=8))
    assert sum(len(b.indices) for b in batches) == 8
    with pytest.raises(DatasetError, match="no dataset"):
        load_images("tester/no-such-dataset")
