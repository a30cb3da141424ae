"""Per-image BN scores (issue 21): values, the dataset folder, filters, thresholds, bad input, the CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import datasets
import numpy as np
import pytest
from hub_server import WRITE_TOKEN
from PIL import Image
from torch import nn

import hub_dfq
from hub_dfq.audit.scores import auroc
from hub_dfq.errors import ConfigError, DatasetError, OutputExistsError, UnsupportedModelError
from hub_dfq.models.preprocess import Preprocess
from hub_dfq.models.vision_model import ModelSource, VisionModel

pytestmark = pytest.mark.usefixtures("one_thread")

FEATURES = datasets.Features({"img": datasets.Image()})


@pytest.fixture(scope="module")
def clean_rows() -> datasets.Dataset:
    """The embedded CIFAR-10 sample (the default model's test distribution), images as stored bytes."""
    return hub_dfq.load_images("default").dataset


def _png(array: np.ndarray) -> dict:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _noise(n: int, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    cells = [_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    return datasets.Dataset.from_dict({"img": cells}, features=FEATURES)


def test_real_images_score_lower_than_noise(model, clean_rows):
    real = hub_dfq.score_images(model, clean_rows.select(range(64)), progress=False)
    noise = hub_dfq.score_images(model, _noise(32), progress=False)
    assert real.n_images == 64 and real.indices == list(range(64))
    assert real.scores.shape == (64,) and real.layer_scores.shape == (64, len(real.model["bn_layers"]))
    assert np.all(np.isfinite(real.scores)) and np.all(real.scores > 0)
    assert np.median(noise.scores) > 3 * np.median(real.scores)
    assert auroc(real.scores.tolist(), noise.scores.tolist()) > 0.95
    # the score is the geometric mean of its per-layer parts
    assert np.allclose(real.scores, np.exp(np.log(real.layer_scores.astype(np.float64)).mean(1)), rtol=1e-5)


def test_scores_do_not_depend_on_the_batch_size(model, clean_rows):
    a = hub_dfq.score_images(model, clean_rows.select(range(20)), batch_size=7, progress=False)
    b = hub_dfq.score_images(model, clean_rows.select(range(20)), batch_size=20, progress=False)
    assert np.allclose(a.scores, b.scores, rtol=1e-5)


def test_folder_loads_with_datasets_and_keep_fraction_filters(model, clean_rows, tmp_path):
    out = tmp_path / "scored"
    result = hub_dfq.score_images(model, clean_rows.select(range(40)), keep_fraction=0.75, out_dir=out,
                                  shard_size=16, progress=False)
    assert result.selection["kept"] == 30 and result.selection["rejected"] == 10
    ds = datasets.load_dataset(str(out))
    assert set(ds) == {"train", "rejected"}
    assert ds["train"].num_rows == 30 and ds["rejected"].num_rows == 10
    assert {"img", "label", "index", "bn_score", "bn_layer_scores"} <= set(ds["train"].column_names)
    kept = ds["train"]
    assert kept["index"] == sorted(kept["index"])  # source order kept
    assert max(kept["bn_score"]) <= min(ds["rejected"]["bn_score"])
    by_row = dict(zip(result.indices, result.scores))
    assert all(math.isclose(s, by_row[i]) for i, s in zip(kept["index"], kept["bn_score"]))
    assert kept[0]["label"] == clean_rows[kept["index"][0]]["label"]
    assert isinstance(kept[0]["img"], Image.Image)
    assert len(list((out / "data").glob("train-*.parquet"))) == 2  # 30 rows, 16 per shard
    card = (out / "README.md").read_text()
    assert "geometric mean over the" in card and "histogram.png" in card and "least_typical.png" in card
    for name in ("histogram.png", "most_typical.png", "least_typical.png"):
        assert Image.open(out / name).size[0] > 50
    facts = json.loads((out / "scores.json").read_text())
    assert facts["n_images"] == 40 and facts["selection"]["kept"] == 30 and len(facts["model"]["bn_layers"]) == 19


def test_same_inputs_give_the_same_bytes(model, clean_rows, tmp_path):
    for name in ("a", "b"):
        hub_dfq.score_images(model, clean_rows.select(range(12)), max_score=1e9, out_dir=tmp_path / name,
                             progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_max_score_without_rejections_and_no_filter_write_one_split(model, clean_rows, tmp_path):
    result = hub_dfq.score_images(model, clean_rows.select(range(10)), out_dir=tmp_path / "all", progress=False)
    assert result.selection is None
    assert set(datasets.load_dataset(str(tmp_path / "all"))) == {"train"}
    low = float(np.sort(result.scores)[3])
    again = hub_dfq.score_images(model, clean_rows.select(range(10)), max_score=low, progress=False)
    assert again.selection["kept"] == 4 and again.kept_indices() == sorted(
        i for i, s in zip(result.indices, result.scores) if s <= low)


def test_unreadable_images_are_counted_listed_and_in_no_split(model, clean_rows, tmp_path):
    good = clean_rows.select(range(12))["img"]
    cells = good[:5] + [{"bytes": b"not an image", "path": None}] + good[5:] + [{"bytes": b"\x89PNG", "path": None}]
    rows = datasets.Dataset.from_dict({"img": cells}, features=FEATURES)
    result = hub_dfq.score_images(model, rows, out_dir=tmp_path / "s", progress=False)
    assert result.n_images == 12 and result.n_skipped == 2
    assert [s["index"] for s in result.skipped] == [5, 13] and 5 not in result.indices
    ds = datasets.load_dataset(str(tmp_path / "s"), split="train")
    assert ds.num_rows == 12 and 5 not in ds["index"] and 13 not in ds["index"]
    assert "row 5:" in (tmp_path / "s" / "README.md").read_text()
    assert json.loads((tmp_path / "s" / "scores.json").read_text())["n_skipped"] == 2


def test_thresholds_from_bns_images_and_from_a_trusted_sample(model, clean_rows, monkeypatch, tmp_path):
    monkeypatch.setenv("HUB_DFQ_CACHE", str(tmp_path / "cache"))
    data = clean_rows.select(range(30))
    bns = hub_dfq.score_images(model, data, fpr=0.1, calibration_images=4, calibration_iters=2, progress=False)
    t = bns.threshold
    assert t["calibration"] == "bns" and t["images"] == 4 and t["value"] > 0
    assert t["flagged"] == int((bns.scores > t["value"]).sum())
    assert bns.selection["rule"] == "fpr" and bns.selection["rejected"] == t["flagged"]
    trusted = clean_rows.select(range(500, 600))
    real = hub_dfq.score_images(model, data, fpr=0.1, calibration=trusted, calibration_images=100,
                                keep_fraction=1.0, progress=False)
    assert real.threshold["images"] == 100
    assert real.selection["rule"] == "keep_fraction" and real.selection["rejected"] == 0
    calibrate = hub_dfq.score_images(model, trusted, progress=False).scores
    assert real.threshold["value"] == pytest.approx(np.quantile(calibrate, 0.9))


@pytest.mark.parametrize("kwargs, message", [
    ({"keep_fraction": 0.0}, r"`keep_fraction` must be in \(0, 1\]"),
    ({"keep_fraction": 1.5}, r"`keep_fraction` must be in \(0, 1\]"),
    ({"keep_fraction": 0.5, "max_score": 1.0}, "either `keep_fraction` or `max_score`"),
    ({"fpr": 1.0}, r"`fpr` must be in \(0, 1\)"),
], ids=["keep-0", "keep-1.5", "both-filters", "fpr-1"])
def test_bad_settings_are_one_error_before_any_work(clean_rows, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        hub_dfq.score_images("no-such-model-is-loaded", clean_rows, **kwargs)


def test_model_without_batchnorm_is_named_and_told_what_works(clean_rows):
    module = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    no_bn = VisionModel(module, Preprocess((3, 32, 32), (0.5,) * 3, (0.25,) * 3), ["a", "b"],
                        ModelSource("tiny-no-bn", "timm", "tiny"))
    with pytest.raises(UnsupportedModelError, match="tiny-no-bn has no BatchNorm.*e.g. a ResNet"):
        hub_dfq.score_images(no_bn, clean_rows.select(range(4)), progress=False)


def test_all_unreadable_and_empty_are_errors(model):
    junk = datasets.Dataset.from_dict({"img": [{"bytes": b"junk", "path": None}] * 3}, features=FEATURES)
    with pytest.raises(DatasetError, match="none of its 3 images could be read"):
        hub_dfq.score_images(model, junk, progress=False)


def test_a_folder_with_foreign_files_is_refused_before_any_work(clean_rows, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="did not write"):
        hub_dfq.score_images("no-such-model-is-loaded", clean_rows, out_dir=tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_push_to_hub_uploads_the_folder(model, clean_rows, hub, tmp_path):
    repo_id = hub.new_repo_id()
    hub_dfq.score_images(model, clean_rows.select(range(8)), keep_fraction=0.5, out_dir=tmp_path / "s",
                         push_to_hub=repo_id, token=WRITE_TOKEN, progress=False)
    files = hub.list_files(repo_id, "dataset")
    assert {"README.md", "scores.json", "histogram.png"} <= set(files) and ".hub-dfq.json" not in files
    assert files["data/train-00000-of-00001.parquet"] == (tmp_path / "s/data/train-00000-of-00001.parquet").read_bytes()
    other = hub.new_repo_id()  # without out_dir: written to a temporary folder, pushed, removed
    hub_dfq.score_images(model, clean_rows.select(range(8)), push_to_hub=other, token=WRITE_TOKEN, progress=False)
    assert "data/train-00000-of-00001.parquet" in hub.list_files(other, "dataset")


def _files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_save_pretrained_method_writes_what_score_images_writes(model, clean_rows, tmp_path):
    result = hub_dfq.score_images(model, clean_rows.select(range(16)), keep_fraction=0.5, out_dir=tmp_path / "a",
                                  shard_size=8, progress=False)
    out = result.save_pretrained(tmp_path / "b", shard_size=8)
    assert out == tmp_path / "b" and _files(out) == _files(tmp_path / "a")
    with pytest.raises(OutputExistsError, match="overwrite"):
        result.save_pretrained(out)
    result.save_pretrained(out, overwrite=True, repo_id="me/scored")
    assert "me/scored" in (out / "README.md").read_text()
    assert datasets.load_dataset(str(out), split="rejected").num_rows == 8
    by_hand = dataclasses.replace(result, data=None)  # scores that do not hold their dataset: it is asked for
    with pytest.raises(ConfigError, match="data="):
        by_hand.save_pretrained(tmp_path / "c")
    assert _files(by_hand.save_pretrained(tmp_path / "c", shard_size=8, data=result.data)) == _files(tmp_path / "a")


def test_push_to_hub_method_uploads_the_saved_folder(model, clean_rows, hub, tmp_path):
    result = hub_dfq.score_images(model, clean_rows.select(range(8)), keep_fraction=0.5, progress=False)
    repo_id = hub.new_repo_id()
    url = result.push_to_hub(repo_id, token=WRITE_TOKEN)
    assert url.endswith(repo_id) and len(hub.commits(repo_id, "dataset")) == 2  # the initial commit + one upload
    pushed = {k: v for k, v in hub.list_files(repo_id, "dataset").items() if k != ".gitattributes"}
    saved = _files(result.save_pretrained(tmp_path / "s", repo_id=repo_id))
    assert pushed == {k: v for k, v in saved.items() if k != ".hub-dfq.json"}
    assert datasets.load_dataset(repo_id, split="train").num_rows == 4


# ---- CLI ------------------------------------------------------------------------------------------

def test_cli_score_writes_the_folder_and_exit_codes(tmp_path, capsys):
    from hub_dfq.cli import main

    out = tmp_path / "scored"
    rc = main(["score", "default", "default", "--limit", "24", "--keep-fraction", "0.5", "--out", str(out),
               "--json", str(tmp_path / "s.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "24 images of default scored" in printed and "kept 12" in printed and "least typical rows:" in printed
    assert datasets.load_dataset(str(out), split="train").num_rows == 12
    assert json.loads((tmp_path / "s.json").read_text())["selection"]["kept"] == 12
    capsys.readouterr()  # datasets' own progress output while loading the folder

    rc = main(["score", "default", "default", "--limit", "8", "--out", str(out)])  # exists: refused, kept
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    for bad in ("0", "1.5", "-0.2"):
        rc = main(["score", "default", "default", "--keep-fraction", bad])
        err = capsys.readouterr().err
        assert rc == 2 and "--keep-fraction must be in (0, 1]" in err and len(err.strip().splitlines()) == 1
    rc = main(["score", "default", "default", "--keep-fraction", "0.5", "--max-score", "1"])
    assert rc == 2 and "not allowed with argument" in capsys.readouterr().err


# ---- the audit's per-image view -------------------------------------------------------------------

def test_audit_report_shows_each_candidates_per_image_scores(model, clean_rows, tmp_path):
    clean = clean_rows.select(range(40))
    report = hub_dfq.audit(model, {"clean": clean, "noise": _noise(20)}, references="none", bootstrap=0,
                           out_dir=tmp_path / "a", progress=False)
    views = {c.dataset: c.image_scores for c in report.candidates}
    assert views["clean"]["n"] == 40 and views["noise"]["n"] == 20
    assert views["noise"]["quantiles"]["p50"] > 3 * views["clean"]["quantiles"]["p50"]
    # the audit's per-image scores are score_images' scores (one machinery)
    scores = hub_dfq.score_images(model, clean, progress=False)
    top = scores.order()[::-1][:3]
    assert [item["index"] for item in views["clean"]["most_atypical"][:3]] == [scores.indices[i] for i in top]
    assert views["clean"]["most_atypical"][0]["score"] == pytest.approx(float(scores.scores[top[0]]), rel=1e-9)
    text = (tmp_path / "a" / "audit.md").read_text()
    section = text[text.index("## Per-image scores"):]
    assert "| `noise` | 20 |" in section and f"{views['clean']['most_atypical'][0]['index']} (" in section
    assert Image.open(tmp_path / "a" / "audit_images.png").size[0] > 100
    payload = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert payload["candidates"][0]["image_scores"]["metric"] == "reverse_kl"
