"""BN-statistics audits: streaming moments, scores, references, reports, the evaluate module, bad input."""

from __future__ import annotations

import io
import json
import math

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import hub_dfq
from hub_dfq.audit import core as audit_core
from hub_dfq.audit import measurement_path
from hub_dfq.audit import references as audit_refs
from hub_dfq.audit.moments import MomentAccumulator
from hub_dfq.audit.scores import auroc, bootstrap_estimate, similarity
from hub_dfq.bnstats import bn_layers_with_stats, capture_bn_inputs, gaussian_kl
from hub_dfq.errors import DatasetError, UnsupportedModelError
from hub_dfq.models.preprocess import Preprocess
from hub_dfq.models.vision_model import ModelSource, VisionModel

pytestmark = pytest.mark.usefixtures("one_thread")

FEATURES = datasets.Features({"img": datasets.Image()})


@pytest.fixture(scope="module")
def clean_rows() -> datasets.Dataset:
    """The embedded CIFAR-10 sample (the model's own test distribution), images as stored bytes."""
    return hub_dfq.load_images("default").dataset


def _png(image: Image.Image) -> dict:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _noisy(rows: datasets.Dataset, sigma: float, n: int, seed: int = 0) -> datasets.Dataset:
    """Pixel-space Gaussian noise of strength ``sigma`` (fraction of the 0..255 range)."""
    rng = np.random.default_rng(seed)
    cells = []
    for cell in rows.select(range(n))["img"]:
        pixels = np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB"), dtype=np.float64) / 255.0
        noisy = np.clip(pixels + rng.normal(0.0, sigma, pixels.shape), 0.0, 1.0)
        cells.append(_png(Image.fromarray((noisy * 255).round().astype(np.uint8))))
    return datasets.Dataset.from_dict({"img": cells}, features=FEATURES)


# ---- streaming moments ---------------------------------------------------------------------------

def test_streaming_sums_equal_one_shot(model, clean_rows):
    data = hub_dfq.load_images(clean_rows, limit=200)
    x = torch.stack([model.preprocess(hub_dfq.data.decode_image(c)) for c in data.dataset["img"]])
    layers = bn_layers_with_stats(model.bn_layers)
    # one shot: every BN input of the whole set, reduced in float64
    with torch.inference_mode(), capture_bn_inputs(layers, detach=True) as slots:
        model.module(x)
        full = [s.to(torch.float64) for s in slots]
    # streaming, with forward batches that straddle the 64-image score batches
    acc = MomentAccumulator(layers, device=torch.device("cpu"), score_batch=64, bootstrap=0)
    with torch.inference_mode(), acc:
        for start, stop in ((0, 37), (37, 101), (101, 200)):
            model.module(x[start:stop])
            acc.step()
    acc.finish()
    assert acc.n_images == 200
    for moments, act in zip(acc.moments(), full):
        assert moments.count == act.numel() // act.shape[1]
        mean = act.mean(dim=(0, 2, 3))
        var = act.var(dim=(0, 2, 3), correction=0)
        torch.testing.assert_close(moments.mean, mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(moments.var, var, rtol=1e-5, atol=1e-7)
    # batch-level scores: full windows of 64 in data order; the last 8 images form no score
    scores = acc.batch_scores()
    assert len(scores) == 3
    window = [a[64:128] for a in full]
    expected = torch.stack([gaussian_kl(bn.running_mean.double(), bn.running_var.double(), w.mean(dim=(0, 2, 3)),
                                        w.var(dim=(0, 2, 3), correction=0)).mean()
                            for (_, bn), w in zip(layers, window)]).log().mean().exp().item()  # geometric mean
    assert scores[1] == pytest.approx(expected, rel=1e-5)


def test_streamed_dataset_matches_in_memory(model, clean_rows):
    in_memory = audit_core.measure_data(model, hub_dfq.load_images(clean_rows, limit=192), bootstrap=0)
    streamed = audit_core.measure_data(model, hub_dfq.load_images(clean_rows.to_iterable_dataset(), limit=192),
                                       bootstrap=0)
    assert streamed.n_images == in_memory.n_images == 192
    assert streamed.divergence == pytest.approx(in_memory.divergence, rel=1e-9)
    assert streamed.batch_scores == pytest.approx(in_memory.batch_scores, rel=1e-9)


# ---- scores --------------------------------------------------------------------------------------

def test_similarity_formula():
    assert similarity(0.01, far=10.0, near=0.01) == pytest.approx(1.0)
    assert similarity(10.0, far=10.0, near=0.01) == pytest.approx(0.0)
    assert similarity(0.1, far=10.0, near=0.01) == pytest.approx(2 / 3)
    assert similarity(100.0, far=10.0, near=0.01) == pytest.approx(-1 / 3)  # farther than noise
    # one-point form log10(far / d) / 3: 0 at noise, 1 three decades below it, a third per decade
    assert similarity(10.0, far=10.0, near=None) == pytest.approx(0.0)
    assert similarity(0.01, far=10.0, near=None) == pytest.approx(1.0)
    assert similarity(1.0, far=10.0, near=None) == pytest.approx(1 / 3)
    assert similarity(100.0, far=10.0, near=None) == pytest.approx(-1 / 3)
    assert similarity(1.0, far=None, near=None) is None


def test_auroc():
    assert auroc([0.1, 0.2, 0.3], [0.4, 0.5]) == 1.0
    assert auroc([0.4, 0.5], [0.1, 0.2, 0.3]) == 0.0
    assert auroc([0.1, 0.2], [0.2, 0.1]) == 0.5


def test_bootstrap_estimate_corrects_each_layer_and_floors_the_correction():
    # two layers of 4 channels; replicates' means jitter around 0.3 (layer 0) and 0.02 (layer 1)
    zeros, ones = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    running = [(zeros, ones), (zeros, ones)]
    gen = torch.Generator().manual_seed(0)
    reps = [(0.3 + 0.02 * torch.randn(400, 4, generator=gen, dtype=torch.float64), torch.ones(400, 4, dtype=torch.float64)),
            (0.02 + 0.02 * torch.randn(400, 4, generator=gen, dtype=torch.float64), torch.ones(400, 4, dtype=torch.float64))]
    d_star = torch.stack([gaussian_kl(zeros, ones, m, v).mean(-1) for m, v in reps])  # (layers, replicates)
    mean_star = d_star.mean(1)
    plugin = [float(mean_star[0]) - 0.002, float(mean_star[1]) * 0.5]  # layer 1: the bias is twice its value
    boot = bootstrap_estimate(reps, running, "kl", plugin_layers=plugin)
    # layer 0: 2 d - mean d*; layer 1: the correction would reach 0 and is floored at a quarter of d
    expected = math.sqrt((2 * plugin[0] - float(mean_star[0])) * 0.25 * plugin[1])
    assert boot.estimate == pytest.approx(expected, rel=1e-9)
    assert boot.plugin == pytest.approx(math.sqrt(plugin[0] * plugin[1]))
    assert 0 < boot.ci[0] <= boot.estimate <= boot.ci[1] and boot.ci[0] < boot.ci[1]
    assert bootstrap_estimate(reps, running, "kl", plugin_layers=[math.inf, 1.0]) is None
    assert bootstrap_estimate(None, running, "kl", plugin_layers=plugin) is None


def test_interval_contains_the_estimate_and_is_not_degenerate(model, clean_rows):
    # 40 images: less than one score batch. The former bootstrap over score batches had one unit here and
    # returned (d, d); over images the interval has a width and never touches 0.
    small = audit_core.measure_data(model, hub_dfq.load_images(clean_rows, limit=40))
    lo, hi = small.ci
    assert 0 < lo < small.divergence < hi
    assert hi / lo > 1.2
    assert small.divergence < small.divergence_plugin  # the sampling bias is positive and corrected
    bigger = audit_core.measure_data(model, hub_dfq.load_images(clean_rows, limit=320))
    assert bigger.ci[1] - bigger.ci[0] < hi - lo  # more images, a narrower interval
    assert bigger.ci[0] <= bigger.divergence <= bigger.ci[1]
    off = audit_core.measure_data(model, hub_dfq.load_images(clean_rows, limit=40), bootstrap=0)
    assert off.ci is None and off.divergence == off.divergence_plugin == small.divergence_plugin


def test_bootstrap_weights_depend_on_rows_not_forward_batches(model, clean_rows):
    data = hub_dfq.load_images(clean_rows, limit=100)
    x = torch.stack([model.preprocess(hub_dfq.data.decode_image(c)) for c in data.dataset["img"]])
    layers = bn_layers_with_stats(model.bn_layers)
    results = []
    for cuts in (((0, 100),), ((0, 13), (13, 70), (70, 100))):
        acc = MomentAccumulator(layers, device=torch.device("cpu"), bootstrap=50, seed=3)
        with torch.inference_mode(), acc:
            for start, stop in cuts:
                model.module(x[start:stop])
                acc.step()
        acc.finish()
        results.append(acc.bootstrap_moments())
    for (m1, v1), (m2, v2) in zip(*results):
        torch.testing.assert_close(m1, m2, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(v1, v2, rtol=1e-10, atol=1e-12)


def test_near_reference_over_budget_is_skipped_and_reported(model, clean_rows, tmp_path, monkeypatch):
    monkeypatch.setenv("HUB_DFQ_CACHE", str(tmp_path / "cache"))
    called = []
    monkeypatch.setattr(audit_refs, "synth_near_dataset", lambda *a, **k: called.append(1))
    macs = audit_refs.macs_per_image(model)
    assert 30e6 < macs < 60e6  # CIFAR ResNet-20: ~41 MMACs per 32 px image
    assert audit_refs.near_cost_gmacs(model, n=64, iters=200) == pytest.approx(3 * 64 * 200 * macs / 1e9)
    report = hub_dfq.audit(model, {"clean": clean_rows.select(range(64))}, references="auto", reference_budget_gmacs=1.0,
                           progress=False, out_dir=tmp_path / "report")
    assert not called
    near = report.references["near"]
    assert near["skipped"] and near["divergence"] is None and "budget" in near["error"]
    assert report.settings["normalisation"].startswith("one-point: similarity = log10(far / d) / 3")
    far = report.references["far"]["divergence"]
    assert report["clean"].similarity == pytest.approx(math.log10(far / report["clean"].divergence) / 3)
    assert "was skipped" in (tmp_path / "report" / "audit.md").read_text()


# ---- the audit ------------------------------------------------------------------------------------

def test_clean_data_scores_closer_than_noise_and_corruption(model, clean_rows, tmp_path):
    report = hub_dfq.audit(model, {"clean": clean_rows.select(range(256)), "noisy": _noisy(clean_rows, 0.3, 256)},
                           references="gaussian", progress=False, out_dir=tmp_path)
    clean, noisy = report["clean"], report["noisy"]
    far = report.references["far"]["divergence"]
    assert [c.dataset for c in report.ranking()] == ["clean", "noisy"]
    assert clean.divergence < noisy.divergence < far
    assert clean.divergence < 0.01 and far > 0.1  # measured: ~1e-3 vs ~0.34
    assert clean.ci[0] <= clean.divergence <= clean.ci[1]
    assert clean.ci[1] < noisy.ci[0]  # separated beyond sampling noise
    # one-point log scale (log10(far / d) / 3): measured ~0.86 vs ~0.03 (the former 1 - d / far read 0.997 vs 0.6)
    assert clean.similarity > 0.75 and noisy.similarity < 0.25
    assert len(clean.batch_scores) == 4
    assert max(clean.batch_scores) < min(noisy.batch_scores)
    assert set(clean.layers) == {n for n, _ in model.bn_layers}
    assert set(clean.layers_detail["bn1"]) == {"kl", "symmetric_kl", "reverse_kl", "w2"}


def test_report_files_exist_and_parse(model, clean_rows, tmp_path):
    report = hub_dfq.audit(model, {"clean": clean_rows.select(range(128))}, references="gaussian", progress=False)
    paths = report.save(tmp_path / "out")
    payload = json.loads((tmp_path / "out" / "audit.json").read_text())
    cand = payload["candidates"][0]
    for key in ("dataset", "n_images", "divergence", "similarity", "ci", "layers", "batch_scores", "n_skipped"):
        assert key in cand
    assert cand["dataset"] == "clean" and cand["n_images"] == 128 and len(cand["ci"]) == 2
    assert cand["divergence"] == report["clean"].divergence
    assert payload["ranking"] == ["clean"]
    assert payload["references"]["far"]["method"] == "gaussian"
    text = (tmp_path / "out" / "audit.md").read_text()
    assert "| 1 | `clean` | 128 | 0 |" in text and "## How to read it" in text and "log10(far / d) / 3" in text
    png = (tmp_path / "out" / "audit_layers.png").read_bytes()
    assert png.startswith(b"\x89PNG") and paths["plot"].endswith("audit_layers.png")
    from matplotlib import image as mpimg

    assert mpimg.imread(paths["plot"]).ndim == 3


def test_references_are_cached(model, clean_rows, tmp_path, monkeypatch):
    monkeypatch.setenv("HUB_DFQ_CACHE", str(tmp_path / "cache"))
    first = hub_dfq.audit(model, clean_rows.select(range(64)), references="gaussian", progress=False)
    assert first.references["far"]["cached"] is False
    assert len(list((tmp_path / "cache" / "audit").glob("*.json"))) == 1
    second = hub_dfq.audit(model, clean_rows.select(range(64)), references="gaussian", progress=False)
    assert second.references["far"]["cached"] is True
    assert second.references["far"]["divergence"] == first.references["far"]["divergence"]
    assert second.candidates[0].similarity == first.candidates[0].similarity


def test_near_reference_uses_synth_when_available(model, clean_rows, tmp_path, monkeypatch):
    monkeypatch.setenv("HUB_DFQ_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_synth(m, *, n, seed, steps, progress):
        calls.append((n, seed))
        return clean_rows.select(range(n))

    monkeypatch.setattr(audit_refs, "synth_near_dataset", fake_synth)
    report = hub_dfq.audit(model, clean_rows.select(range(64)), reference_images=64, progress=False)
    assert calls == [(64, 0)]
    assert report.references["near"]["method"] == "hub_dfq.synth bns"
    assert report.candidates[0].similarity == pytest.approx(1.0)  # same images as the near reference


def test_given_references_and_metrics(model, clean_rows):
    report = hub_dfq.audit(model, clean_rows.select(range(64)), references={"far": 1.0, "near": 1e-4},
                           metric="w2", bootstrap=0, progress=False)
    c = report.candidates[0]
    assert c.divergence == c.divergences["w2"] and c.ci is None
    assert c.similarity == pytest.approx(math.log(1.0 / c.divergence) / math.log(1.0 / 1e-4))


# ---- the evaluate module --------------------------------------------------------------------------

def test_evaluate_module_loads_offline_and_matches_api(model, clean_rows, monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    module = evaluate.load(measurement_path())
    rows = clean_rows.select(range(128))
    result = module.compute(images=rows["img"], model=model, reference_points="gaussian")
    report = hub_dfq.audit(model, rows, references="gaussian", progress=False)
    c = report.candidates[0]
    assert result["n_images"] == 128 and result["n_skipped"] == 0
    assert result["divergence"] == pytest.approx(c.divergence, rel=1e-12)
    assert result["similarity"] == pytest.approx(c.similarity, rel=1e-12)
    assert result["ci"] == pytest.approx(list(c.ci), rel=1e-12)
    assert result["layers"] == pytest.approx(c.layers, rel=1e-12)


# ---- bad input ------------------------------------------------------------------------------------

def test_model_without_batchnorm_is_rejected(clean_rows):
    module = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    no_bn = VisionModel(module, Preprocess((3, 32, 32), (0.5,) * 3, (0.25,) * 3), ["a", "b"],
                        ModelSource("tiny-no-bn", "timm", "tiny"))
    with pytest.raises(UnsupportedModelError, match="no BatchNorm layers.*audits .* need a model with BatchNorm"):
        hub_dfq.audit(no_bn, clean_rows.select(range(8)), progress=False)


def test_empty_dataset_is_an_error(model, clean_rows):
    with pytest.raises(DatasetError, match="empty"):
        hub_dfq.audit(model, clean_rows.select([]), references="none", progress=False)
    with pytest.raises(DatasetError, match="empty"):
        streamed_empty = clean_rows.select(range(4)).to_iterable_dataset().filter(lambda _: False)
        hub_dfq.audit(model, streamed_empty, references="none", progress=False)


def test_unreadable_and_odd_images_are_skipped_and_listed(model, clean_rows, tmp_path):
    good = [c for c in clean_rows.select(range(60))["img"]]
    jpeg = good[0]["bytes"]
    odd = [
        _png(Image.new("L", (32, 32), 128)),  # grayscale
        _png(Image.new("RGBA", (32, 32), (200, 10, 10, 100))),  # RGBA
        _png(Image.new("RGB", (47, 21), (0, 90, 200))),  # odd size
    ]
    broken = [{"bytes": b"not an image at all", "path": None}, {"bytes": jpeg[: len(jpeg) // 2], "path": None}]
    cells = good[:30] + broken[:1] + odd + good[30:] + broken[1:]
    rows = datasets.Dataset.from_dict({"img": cells}, features=FEATURES)  # no label column
    report = hub_dfq.audit(model, {"mixed": rows}, references="none", progress=False, out_dir=tmp_path)
    c = report["mixed"]
    assert c.n_images == 63 and c.n_skipped == 2
    assert [s["index"] for s in c.skipped] == [30, 64]
    assert c.divergence is not None and c.similarity is None
    text = (tmp_path / "audit.md").read_text()
    assert "2 unreadable image(s) skipped" in text and "row 30:" in text and "row 64:" in text
    payload = json.loads((tmp_path / "audit.json").read_text())
    assert payload["candidates"][0]["n_skipped"] == 2


def test_all_unreadable_is_an_error_as_in_evaluation(model):
    """A dataset of unreadable files is an error (as `eval` says), not an unranked row (issue #12)."""
    rows = datasets.Dataset.from_dict({"img": [{"bytes": b"junk", "path": None}] * 3}, features=FEATURES)
    with pytest.raises(DatasetError, match="none of its 3 images could be read"):
        hub_dfq.audit(model, {"junk": rows}, references="none", progress=False)


# ---- CLI ------------------------------------------------------------------------------------------

def test_cli_audit_writes_reports(tmp_path, capsys):
    from hub_dfq.cli import main

    out = tmp_path / "report"
    rc = main(["audit", "default", "default", "--limit", "128", "--references", "gaussian", "--out", str(out),
               "--json", str(tmp_path / "copy.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "rank" in printed and "default" in printed
    assert json.loads((out / "audit.json").read_text()) == json.loads((tmp_path / "copy.json").read_text())
    assert (out / "audit.md").exists() and (out / "audit_layers.png").exists()
    rc = main(["audit", "default", "default", "--limit", "64", "--out", str(out)])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err


def test_a_failed_near_reference_is_reported_not_hidden(model, clean_rows, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HUB_DFQ_CACHE", str(tmp_path / "cache"))

    def broken_synth(m, **kwargs):
        raise RuntimeError("synthesis exploded")

    monkeypatch.setattr(audit_refs, "synth_near_dataset", broken_synth)
    report = hub_dfq.audit(model, clean_rows.select(range(64)), reference_images=8, reference_iters=5,
                           progress=False, out_dir=tmp_path / "report")
    near = report.references["near"]
    assert near["failed"] and "synthesis exploded" in near["error"] and near["divergence"] is None
    assert report.references["far"]["divergence"] > 0
    assert report.settings["normalisation"].startswith("one-point") and "near reference failed" in \
        report.settings["normalisation"]
    markdown = (tmp_path / "report" / "audit.md").read_text()
    assert "**failed**" in markdown and "synthesis exploded" in markdown
    assert "synthesis exploded" in caplog.text


# ---- shared checkpoint and split ------------------------------------------------------------------

def test_shared_test_split_scores_closer_than_noise_and_strong_corruption(resnet20_dir, cifar_test_parquet):
    model = hub_dfq.load_model(f"local-dir:{resnet20_dir}")
    clean = hub_dfq.load_images(str(cifar_test_parquet), limit=512).dataset
    report = hub_dfq.audit(model, {"test split": clean, "noise 0.2": _noisy(clean, 0.2, 512, seed=1)},
                           references="gaussian", progress=False)
    far = report.references["far"]["divergence"]
    assert report.ranking()[0].dataset == "test split"
    assert report["test split"].divergence < 0.1 * report["noise 0.2"].divergence
    assert report["noise 0.2"].divergence < far


@pytest.mark.slow
def test_synth_near_reference_on_shared_resnet20(resnet20_dir, cifar_test_parquet, tmp_path, monkeypatch):
    """The real hub_dfq.synth BNS data as the near point: in-distribution data lands near it."""
    monkeypatch.setenv("HUB_DFQ_CACHE", str(tmp_path / "cache"))
    model = hub_dfq.load_model(f"local-dir:{resnet20_dir}")
    report = hub_dfq.audit(model, {"test": str(cifar_test_parquet)}, limit=2000, progress=False)
    near = report.references["near"]
    assert near["method"] == "hub_dfq.synth bns"
    assert near["divergence"] < report["test"].divergence < 0.01 * report.references["far"]["divergence"]
    assert 0.5 < report["test"].similarity < 1.0  # measured ~0.75: real data is not optimised for BN stats
