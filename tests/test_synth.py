"""Synthetic data: every method, divergence, targets, byte-identical reruns, resume, refusals, card, CLI, push."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import datasets
import pytest
import torch
from torch import nn

import hub_dfq
from hub_dfq.errors import (
    CheckpointError,
    ConfigError,
    DivergedError,
    OutputExistsError,
    UnsupportedModelError,
)
from hub_dfq.models.preprocess import Preprocess
from hub_dfq.models.vision_model import ModelSource, VisionModel
from hub_dfq.synth.api import generate_folder, shard_seed, synthesize
from hub_dfq.synth.config import SynthConfig

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]

FAST = {"iters": 10, "batch_size": 8, "shard_size": 8, "progress": False}


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "data").glob("*.parquet"))}


def manifest(folder: Path) -> dict:
    return json.loads((folder / "generation.json").read_text())


@pytest.mark.parametrize("method", ["gaussian", "inception", "bns", "bns+p", "bns+d", "bns+i"])
def test_each_method_gives_valid_images_and_labels(model, tmp_path, method):
    out = tmp_path / "out"
    ds = synthesize(model, method, 20, out_dir=out, **FAST)
    assert ds.num_rows == 20
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["label"].names == model.labels
    for row in ds:
        assert row["image"].mode == "RGB" and row["image"].size == (32, 32)
        assert 0 <= row["label"] < 10
    if method in ("inception", "bns+i"):  # targets spread evenly over the classes
        assert ds["label"] == [r % 10 for r in range(20)]
    # the layout of a Hub dataset repo: 3 shards of 8, 8, 4 rows
    assert sorted(p.name for p in (out / "data").iterdir()) == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert (out / "README.md").is_file() and (out / "preview.png").is_file()
    info = manifest(out)
    assert info["complete"] and info["num_rows"] == 20 and info["arguments"]["method"] == method
    assert set(info["bn_divergence"]["end"]["layers"]) == {name for name, _ in model.bn_layers}
    # usable as calibration data through the normal loader and preprocessing
    data = hub_dfq.load_images(out)
    batch = next(hub_dfq.iter_batches(data, model.preprocess, batch_size=20))
    assert batch.pixel_values.shape == (20, 3, 32, 32) and not batch.skipped
    low, high = model.preprocess.valid_range()
    assert (batch.pixel_values >= low - 1e-5).all() and (batch.pixel_values <= high + 1e-5).all()


def test_labels_of_untargeted_methods_are_the_model_predictions(model, tmp_path):
    ds = synthesize(model, "bns", 8, out_dir=tmp_path / "o", **FAST)
    pixels = torch.stack([model.preprocess(image) for image in ds["image"]])
    with torch.no_grad():
        assert model(pixels).argmax(-1).tolist() == ds["label"]


def test_repeated_class_names_get_their_index(model, tmp_path):
    # ImageNet names two classes "crane"; a ClassLabel needs unique names
    twin = copy.copy(model)
    twin.labels = ["crane"] + model.labels[1:-1] + ["crane"]
    ds = synthesize(twin, "gaussian", num_images=4, out_dir=tmp_path / "g", **FAST)
    names = ds.features["label"].names
    assert names[0] == "crane (0)" and names[-1] == "crane (9)" and names[1:-1] == model.labels[1:-1]


def test_bns_final_divergence_is_a_tenth_of_the_gaussian_start(model, tmp_path):
    synthesize(model, "bns", 16, iters=60, batch_size=16, out_dir=tmp_path / "o", progress=False)
    div = manifest(tmp_path / "o")["bn_divergence"]
    assert div["metric"] == "kl"
    assert div["end"]["total"] <= div["start"]["total"] / 10, div
    # the start is the Gaussian baseline's own divergence (same seed, same initial batch)
    synthesize(model, "gaussian", 16, batch_size=16, out_dir=tmp_path / "g", progress=False)
    gauss = manifest(tmp_path / "g")["bn_divergence"]
    assert gauss["end"]["total"] == pytest.approx(div["start"]["total"], rel=0.05)


def test_l2_loss_lowers_the_zeroq_distance(model, tmp_path):
    synthesize(model, "bns", 16, loss="l2", iters=40, batch_size=16, out_dir=tmp_path / "o", progress=False)
    div = manifest(tmp_path / "o")["bn_divergence"]
    assert div["metric"] == "l2" and div["end"]["total"] < div["start"]["total"] / 3


def test_bns_plus_priors_images_are_smooth_and_still_match_the_statistics(model, tmp_path):
    """bns+p trades a little of the BN match for photograph-like smoothness: far lower total variation than bns
    from the same start, and still a fraction of the Gaussian start's divergence."""
    from hub_dfq.synth.priors import total_variation

    runs = {}
    for method in ("bns", "bns+p"):
        ds = synthesize(model, method, 16, iters=60, batch_size=16, out_dir=tmp_path / method,
                        progress=False)
        pixels = torch.stack([model.preprocess(image) for image in ds["image"]])
        runs[method] = (float(total_variation(pixels)), manifest(tmp_path / method))
    assert runs["bns+p"][0] < 0.5 * runs["bns"][0], runs
    stored = runs["bns+p"][1]
    assert stored["arguments"]["priors"]["tv_weight"] == 8.0  # the method's default, recorded
    assert stored["bn_divergence"]["end"]["total"] < stored["bn_divergence"]["start"]["total"] / 5


def test_bns_plus_i_images_are_classified_as_their_target(model, tmp_path):
    synthesize(model, "bns+i", 20, iters=100, batch_size=20, out_dir=tmp_path / "o", progress=False)
    # through the published files and the model's normal preprocessing: what is published is what is used
    result = hub_dfq.evaluate_accuracy(model, hub_dfq.load_images(tmp_path / "o"))
    assert result["n"] == 20 and result["top1"] >= 90.0


def test_reruns_are_byte_identical(model, tmp_path):
    synthesize(model, "bns", 16, out_dir=tmp_path / "a", **FAST)
    synthesize(model, "bns", 16, out_dir=tmp_path / "b", **FAST)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    synthesize(model, "bns", 16, out_dir=tmp_path / "c", **{**FAST, "seed": 1})
    assert shard_bytes(tmp_path / "c") != shard_bytes(tmp_path / "a")


def test_shards_depend_only_on_seed_and_index(model, tmp_path):
    """Shard 1 of an 3-shard run equals shard 1 of a 2-shard run: any process can make any shard."""
    synthesize(model, "bns", 24, out_dir=tmp_path / "a", **FAST)
    synthesize(model, "bns", 16, out_dir=tmp_path / "b", **FAST)
    a = pq_images(tmp_path / "a" / "data" / "train-00001-of-00003.parquet")
    b = pq_images(tmp_path / "b" / "data" / "train-00001-of-00002.parquet")
    assert a == b
    assert shard_seed(0, 1) != shard_seed(0, 2) and shard_seed(0, 1) != shard_seed(1, 1)


def pq_images(path: Path) -> list[bytes]:
    import pyarrow.parquet as pq

    return [cell["bytes"] for cell in pq.read_table(path).column("image").to_pylist()]


class Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted_run(model, tmp_path):
    config = SynthConfig(method="bns", num_images=24, iters=10, batch_size=8, shard_size=8)
    generate_folder(model, config, tmp_path / "full", progress=False)

    def kill_after_first(index: int) -> None:
        raise Interrupt  # as if the process died right after shard 0 was written

    with pytest.raises(Interrupt):
        generate_folder(model, config, tmp_path / "run", progress=False, on_shard=kill_after_first)
    partial = manifest(tmp_path / "run")
    assert not partial["complete"] and [s["index"] for s in partial["shards"]] == [0]
    assert not (tmp_path / "run" / "README.md").exists()
    first = (tmp_path / "run" / "data" / "train-00000-of-00003.parquet").stat().st_mtime_ns
    with pytest.raises(OutputExistsError, match="`resume=True`"):
        generate_folder(model, config, tmp_path / "run", progress=False)
    made = []
    generate_folder(model, config, tmp_path / "run", resume=True, progress=False, on_shard=made.append)
    assert made == [1, 2]  # nothing finished is recomputed
    assert (tmp_path / "run" / "data" / "train-00000-of-00003.parquet").stat().st_mtime_ns == first
    assert shard_bytes(tmp_path / "run") == shard_bytes(tmp_path / "full")
    assert manifest(tmp_path / "run")["complete"]


def test_resume_after_killing_the_process_between_shards(model, tmp_path):
    """SIGKILL a real `hub-dfq synth` once its first shard exists; --resume finishes it byte-identically."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "hub_dfq", "synth", "default", "--method", "bns", "--num-images", "40", "--iters", "40",
            "--batch-size", "8", "--shard-size", "8", "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300

        def recorded() -> bool:  # a shard is finished once the manifest records it
            try:
                return bool(manifest(out)["shards"])
            except (FileNotFoundError, ValueError, KeyError):
                return False

        while not recorded() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "README.md").exists()
    done = [s["index"] for s in manifest(out)["shards"]]
    assert 1 <= len(done) < 5
    assert subprocess.run(args + ["--resume"], env=env, capture_output=True).returncode == 0
    config = SynthConfig(method="bns", num_images=40, iters=40, batch_size=8, shard_size=8)
    generate_folder(model, config, tmp_path / "full", progress=False)
    assert shard_bytes(out) == shard_bytes(tmp_path / "full")


def test_half_written_shard_is_never_seen(model, tmp_path):
    config = SynthConfig(method="gaussian", num_images=16, batch_size=8, shard_size=8)
    generate_folder(model, config, tmp_path / "o", progress=False, stop_after_shards=1)
    # what a killed run leaves (temporaries are named per process), and a file of the user's that looks alike
    (tmp_path / "o" / "data" / ".train-00001-of-00002.parquet.4194304.hub-dfq.tmp").write_bytes(b"half a shard")
    (tmp_path / "o" / "data" / ".notes.tmp").write_bytes(b"not ours")
    generate_folder(model, config, tmp_path / "o", resume=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "o" / "data").iterdir()) == [
        ".notes.tmp", "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]


def test_output_folder_of_another_run_is_refused(model, tmp_path):
    out = tmp_path / "o"
    synthesize(model, "gaussian", 8, out_dir=out, progress=False)
    with pytest.raises(OutputExistsError, match="`overwrite=True`"):
        synthesize(model, "gaussian", 8, out_dir=out, progress=False)
    with pytest.raises(OutputExistsError, match="seed: stored 0, now 3"):
        synthesize(model, "gaussian", 8, seed=3, out_dir=out, resume=True, progress=False)
    before = shard_bytes(out)
    assert synthesize(model, "gaussian", 8, out_dir=out, resume=True, progress=False).num_rows == 8  # finished: reused
    assert shard_bytes(out) == before
    ds = synthesize(model, "gaussian", 12, seed=3, out_dir=out, overwrite=True, progress=False)
    assert ds.num_rows == 12 and manifest(out)["arguments"]["seed"] == 3


def test_bad_arguments(model, tmp_path):
    with pytest.raises(ConfigError, match="positive"):
        synthesize(model, "bns", 0, out_dir=tmp_path / "a")
    methods = "gaussian, inception, bns, bns\\+p, bns\\+d, bns\\+i"
    with pytest.raises(ConfigError, match=f"unknown method 'deepdream'.*{methods}"):
        synthesize(model, "deepdream", 4, out_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match="unknown loss 'l1'"):
        synthesize(model, "bns", 4, loss="l1", out_dir=tmp_path / "a")
    config = SynthConfig(method="bns", num_images=5, batch_size=64)
    assert config.batch_size == 5 and config.num_shards == 1  # clamped, not refused
    assert not (tmp_path / "a").exists()


def no_bn_model() -> VisionModel:
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(4, 3))
    torch.manual_seed(0)
    preprocess = Preprocess(input_size=(3, 8, 8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    source = ModelSource(spec="tiny-no-bn", library="timm", architecture="tiny")
    return VisionModel(module, preprocess, ["a", "b", "c"], source)


def test_model_without_batchnorm(tmp_path):
    model = no_bn_model()
    for method in ("bns", "bns+i"):
        with pytest.raises(UnsupportedModelError, match="no BatchNorm layers.*gaussian, inception"):
            synthesize(model, method, 4, out_dir=tmp_path / "x")
    ds = synthesize(model, "inception", 6, iters=5, batch_size=3, out_dir=tmp_path / "i", progress=False)
    assert ds.num_rows == 6 and ds[0]["image"].size == (8, 8)
    assert manifest(tmp_path / "i")["bn_divergence"]["end"] is None


def test_nan_loss_is_reported_with_its_step_and_nothing_is_saved(model, tmp_path):
    broken = copy.deepcopy(model)
    broken.module = copy.deepcopy(model.module)
    names = dict(broken.module.named_modules())
    broken.bn_layers = [(name, names[name]) for name, _ in model.bn_layers]
    names["layer2.0.bn1"].running_mean.fill_(3e38)  # finite, but its square overflows: NaN at the first step
    with pytest.raises(DivergedError, match="step 1 of 10.*rows 0-7, shard 0.*learning rate"):
        synthesize(broken, "bns", 16, out_dir=tmp_path / "o", **FAST)
    assert not list((tmp_path / "o").glob("data/*"))
    assert not (tmp_path / "o" / "README.md").exists()


def test_negative_variance_is_refused_before_any_step(model, tmp_path):
    broken = copy.deepcopy(model)
    broken.module = copy.deepcopy(model.module)
    names = dict(broken.module.named_modules())
    broken.bn_layers = [(name, names[name]) for name, _ in model.bn_layers]
    names["layer2.0.bn1"].running_var[3] = -1.0  # NaN at the first step, blamed on the learning rate before #19
    with pytest.raises(CheckpointError, match=r"layer2.0.bn1.running_var\[3\] is -1.0, a negative variance"):
        synthesize(broken, "bns", 16, out_dir=tmp_path / "o", **FAST)
    assert not (tmp_path / "o").exists()


def test_card_renders_and_round_trips(model, tmp_path):
    from huggingface_hub import DatasetCard

    out = tmp_path / "o"
    synthesize(model, "bns", 8, out_dir=out, **FAST)
    card = DatasetCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "bsd-2-clause"  # inherited from the model
    assert data["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    names = data["dataset_info"]["features"][1]["class_label"]["names"]
    assert [names[str(i)] for i in range(10)] == model.labels
    assert data["dataset_info"]["splits"][0]["num_examples"] == 8
    text = card.text
    info = manifest(out)
    for fact in ("`bns`", "| seed | `0` |", "| iterations per batch | `10` |", "preview.png", "load_dataset(",
                 info["model"]["weights_sha256"], f"{info['bn_divergence']['end']['total']:.4g}", "hub-dfq version"):
        assert fact in text, fact
    assert str(DatasetCard(str(card))) == str(card)  # round trip is stable
    assert DatasetCard.load(out / "README.md").data.to_dict() == data


def test_load_dataset_reads_the_folder(model, tmp_path):
    out = tmp_path / "o"
    synthesize(model, "gaussian", 10, batch_size=4, shard_size=4, out_dir=out, progress=False)
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 10 and ds.features["label"].names == model.labels


def test_cache_without_out_dir_does_not_regenerate(model, monkeypatch):
    first = synthesize(model, "gaussian", 6, batch_size=3, progress=False)
    calls = []
    from hub_dfq.synth import api

    monkeypatch.setattr(api, "generate_folder", lambda *a, **k: calls.append(a))
    again = synthesize(model, "gaussian", 6, batch_size=3, progress=False)
    assert calls == [] and again["label"] == first["label"]
    assert hashlib.sha256(again[0]["image"].tobytes()).digest() == hashlib.sha256(first[0]["image"].tobytes()).digest()


def test_cli_synth(tmp_path, capsys):
    from hub_dfq.cli import main

    out = tmp_path / "o"
    args = ["synth", "default", "--method", "bns", "--n", "8", "--iters", "5", "--batch-size", "4", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    assert "8 bns images" in capsys.readouterr().out
    assert main(args) == 2
    assert "already holds a synthetic dataset" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert main(["synth", "default", "--method", "bns", "--n", "0", "--out", str(tmp_path / "z")]) == 2
    assert "positive" in capsys.readouterr().err


def test_push_to_hub_is_one_commit_identical_to_the_folder(model, tmp_path, hub):
    from hub_server import WRITE_TOKEN

    repo_id = hub.new_repo_id("synth")
    out = tmp_path / "o"
    synthesize(model, "gaussian", 8, batch_size=4, shard_size=4, out_dir=out, progress=False, push_to_hub=repo_id,
               token=WRITE_TOKEN)
    remote = {k: v for k, v in hub.list_files(repo_id, "dataset").items() if k != ".gitattributes"}
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert local.pop(".hub-dfq.json")  # hub-dfq's list of the files it wrote stays local
    assert remote == local
    assert len(hub.commits(repo_id, "dataset")) == 2  # the Hub's initial commit + ours
    assert f'load_dataset("{repo_id}"' in local["README.md"].decode()
    ds = datasets.load_dataset(repo_id, split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 8 and ds.features["label"].names == model.labels


def test_push_refuses_an_unfinished_folder(model, tmp_path):
    from hub_dfq.errors import PublishError
    from hub_dfq.synth.publish import push_dataset_folder

    config = SynthConfig(method="gaussian", num_images=8, batch_size=4, shard_size=4)
    generate_folder(model, config, tmp_path / "o", progress=False, stop_after_shards=1)
    with pytest.raises(PublishError, match="`resume=True`"):
        push_dataset_folder(tmp_path / "o", "tester/x")


@pytest.mark.slow
@pytest.mark.parametrize("depth", [20, 44])
def test_default_settings_on_the_shared_checkpoints(tmp_path, shared_dir, depth):
    """Default iterations and learning rate: BNS divergence falls >= 100x, BNS+I hits its targets."""
    model = hub_dfq.load_model(f"local-dir:{shared_dir}/models/cifar10-resnet{depth}")
    synthesize(model, "bns", 128, batch_size=64, out_dir=tmp_path / "bns", progress=False)
    div = manifest(tmp_path / "bns")["bn_divergence"]
    assert div["end"]["total"] <= div["start"]["total"] / 100, div
    synthesize(model, "bns+i", 100, batch_size=50, out_dir=tmp_path / "bnsi", progress=False)
    assert hub_dfq.evaluate_accuracy(model, hub_dfq.load_images(tmp_path / "bnsi"))["top1"] >= 95.0
