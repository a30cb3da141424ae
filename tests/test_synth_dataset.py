"""What synthesize returns: a datasets.Dataset whose save_pretrained / push_to_hub publish the folder it wrote."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

import hub_dfq
from hub_dfq.errors import ConfigError, DatasetError, OutputExistsError
from hub_dfq.synth.api import synthesize
from hub_dfq.synth.card import render_card
from hub_dfq.synth.dataset import SyntheticDataset

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]

FAST = {"iters": 3, "batch_size": 4, "shard_size": 4, "progress": False}


def files(folder: Path) -> dict[str, bytes]:
    """Every file of a dataset folder but hub-dfq's marker (never pushed) and the Hub's .gitattributes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (".hub-dfq.json", ".gitattributes")}


@pytest.fixture(scope="module")
def synthetic(model, tmp_path_factory) -> SyntheticDataset:
    return synthesize(model, "bns", 8, out_dir=tmp_path_factory.mktemp("synth") / "bns", **FAST)


def test_the_result_is_a_dataset_that_knows_its_folder(synthetic, model):
    assert isinstance(synthetic, datasets.Dataset) and isinstance(synthetic, hub_dfq.SyntheticDataset)
    assert synthetic.num_rows == 8 and synthetic.features["label"].names == model.labels
    assert synthetic.manifest["num_rows"] == 8 and (synthetic.folder / "README.md").is_file()
    assert type(synthetic.select([0, 1])) is datasets.Dataset  # other rows: a plain dataset, without the verbs
    assert hub_dfq.load_images(synthetic).num_rows == 8


def test_save_pretrained_copies_the_folder_byte_for_byte(synthetic, tmp_path):
    out = synthetic.save_pretrained(tmp_path / "copy")
    assert files(out) == files(synthetic.folder)
    assert set(files(out)) == {"README.md", "preview.png", "generation.json", "data/train-00000-of-00002.parquet",
                               "data/train-00001-of-00002.parquet"}
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        synthetic.save_pretrained(out)
    (out / "notes.txt").write_text("mine")
    synthetic.save_pretrained(out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and files(out)["README.md"] == files(synthetic.folder)["README.md"]
    assert SyntheticDataset.from_pretrained(out)["label"] == synthetic["label"]


def test_save_pretrained_refuses_what_is_not_that_folder(synthetic, tmp_path):
    with pytest.raises(ConfigError, match="no longer the one"):
        synthetic.remove_columns("label").save_pretrained(tmp_path / "a")
    with pytest.raises(DatasetError, match="no readable generation.json"):
        SyntheticDataset.from_pretrained(tmp_path)
    assert not (tmp_path / "a").exists()


def test_push_to_hub_uploads_the_folder_synthesize_would_push(synthetic, model, tmp_path, hub):
    from hub_server import WRITE_TOKEN

    repo_id = hub.new_repo_id("synth")
    before = files(synthetic.folder)
    # datasets.Dataset.push_to_hub's keywords that describe this folder are accepted
    assert synthetic.push_to_hub(repo_id, token=WRITE_TOKEN, split="train").endswith(repo_id)
    assert files(synthetic.folder) == before  # the local folder is left alone
    remote = {k: v for k, v in hub.list_files(repo_id, "dataset").items() if k != ".gitattributes"}
    assert len(hub.commits(repo_id, "dataset")) == 2  # the Hub's initial commit + one
    assert remote == {**before, "README.md": str(render_card(synthetic.manifest, repo_id=repo_id)).encode()}
    # the same files as synthesize(push_to_hub=) uploads (it reuses the finished folder, then pushes it)
    synthesize(model, "bns", 8, out_dir=synthetic.folder, resume=True, push_to_hub=repo_id, token=WRITE_TOKEN, **FAST)
    assert files(synthetic.folder) == remote
    loaded = datasets.load_dataset(repo_id, split="train", cache_dir=str(tmp_path / "cache"))
    assert loaded.num_rows == 8 and loaded["label"] == synthetic["label"]
    again = SyntheticDataset.from_pretrained(repo_id, token=WRITE_TOKEN)
    assert files(again.folder) == remote and again["label"] == synthetic["label"]
    with pytest.raises(ConfigError, match="datasets.Dataset.push_to_hub"):
        synthetic.push_to_hub(repo_id, token=WRITE_TOKEN, num_shards=3)
