"""Registering a method from outside the package: it works through the API, the CLI, the cards and the caches.

Nothing in hub_dfq/ is touched: a toy synthesis method and a toy quantization algorithm are added with
the public registration functions, used everywhere a built-in is, and removed at the end.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import pytest
import torch

import hub_dfq
from hub_dfq.cli import main
from hub_dfq.errors import ConfigError, UnsupportedModelError
from hub_dfq.quant.registry import (
    PRESETS,
    QUANT_ALGORITHMS,
    Preset,
    QuantAlgorithm,
    register_algorithm,
)
from hub_dfq.synth.api import synthesize_folder
from hub_dfq.synth.registry import (
    SYNTH_METHODS,
    SynthMethod,
    methods_for,
    register_synth_method,
)

TOY_DESCRIPTION = "Inputs pulled towards the middle grey of the normalised box: a toy registered by a test."
TOY_ALGORITHM_DESCRIPTION = "a toy algorithm registered by a test: every weight step size shrunk by 1%"


def grey_loss(step):
    return step.x.square().mean()


@dataclass(frozen=True)
class ShrinkSettings:
    factor: float = 0.99
    seed: int = 0

    def to_dict(self):
        return asdict(self)


RUNS: list[str] = []
INTERRUPT_ONCE: list[bool] = []


def shrink(context):
    """Shrink every weight scale; saves a marker in the resume state first, so a rerun can pick it up."""
    saved = context.state.load("shrink") if context.state is not None else None
    RUNS.append("resumed" if saved else "fresh")
    if context.state is not None and saved is None:
        context.state.save("shrink", {"started": True})
        if INTERRUPT_ONCE:
            INTERRUPT_ONCE.pop()
            raise KeyboardInterrupt  # as if the process died right after saving
    with torch.no_grad():
        for module in context.module.modules():
            quantizer = getattr(module, "weight_quantizer", None)
            if quantizer is not None:
                quantizer.scale.mul_(context.settings.factor)
    return {"shrunk_by": context.settings.factor}


@pytest.fixture(autouse=True)
def toys():
    register_synth_method(SynthMethod("grey", summary="pull inputs to grey (a test's toy)", description=TOY_DESCRIPTION,
                                      loss=grey_loss, iters=3, lr=0.1))
    register_algorithm(QuantAlgorithm("shrink", summary="shrink the weight steps (a test's toy)",
                                      description=TOY_ALGORITHM_DESCRIPTION, run=shrink, settings=ShrinkSettings,
                                      resumable=True))
    RUNS.clear()
    INTERRUPT_ONCE.clear()
    yield
    SYNTH_METHODS.unregister("grey")
    QUANT_ALGORITHMS.unregister("shrink")


def test_a_registered_synthesis_method_runs_through_api_card_and_cache(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HUB_DFQ_CACHE", str(tmp_path / "cache"))
    assert "grey" in methods_for(has_bn=False)  # it needs no BatchNorm
    folder = synthesize_folder(model, "grey", 8, batch_size=8, progress=False)
    manifest = json.loads((folder / "generation.json").read_text())
    assert manifest["arguments"]["method"] == "grey" and manifest["arguments"]["iters"] == 3
    card = (folder / "README.md").read_text()
    assert TOY_DESCRIPTION in card and "method-grey" in card and manifest["fingerprint"] in card
    # the cache: the same call reuses the folder; a new version of the method gets a new entry
    before = (folder / manifest["shards"][0]["file"]).stat().st_mtime_ns
    assert synthesize_folder(model, "grey", 8, batch_size=8, progress=False) == folder
    assert (folder / manifest["shards"][0]["file"]).stat().st_mtime_ns == before
    register_synth_method(SynthMethod("grey", summary="v2", description=TOY_DESCRIPTION, loss=grey_loss, iters=3,
                                      lr=0.1, version=2), overwrite=True)
    assert synthesize_folder(model, "grey", 8, batch_size=8, progress=False) != folder


def test_a_registered_synthesis_method_is_a_cli_choice(tmp_path, capsys):
    assert main(["synth", "--help"]) == 0
    assert "grey" in capsys.readouterr().out
    out = tmp_path / "grey"
    assert main(["synth", "default", "--method", "grey", "--num-images", "4", "--out", str(out), "--no-progress"]) == 0
    assert "4 grey images" in capsys.readouterr().out
    assert TOY_DESCRIPTION in (out / "README.md").read_text()
    assert main(["list"]) == 0 and "grey" in capsys.readouterr().out


def test_a_method_that_needs_bn_is_refused_for_a_model_without_bn(model):
    register_synth_method(SynthMethod("grey-bn", summary="toy", description="toy", loss=grey_loss, needs_bn=True))
    try:
        no_bn = hub_dfq.VisionModel(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                                        torch.nn.LazyLinear(10)), model.preprocess, model.labels,
                                    model.source)
        with pytest.raises(UnsupportedModelError, match="methods that work for this model: gaussian, inception, grey$"):
            synthesize_folder(no_bn, "grey-bn", 4, progress=False)
    finally:
        SYNTH_METHODS.unregister("grey-bn")
    known = "gaussian, inception, bns, bns\\+p, bns\\+d, bns\\+i, grey"
    with pytest.raises(ConfigError, match=f"unknown method 'nope': use one of {known}"):
        synthesize_folder(model, "nope", 4)


def test_a_registered_algorithm_runs_through_api_card_and_resume_cache(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HUB_DFQ_CACHE", str(tmp_path / "cache"))
    data = torch.randn(8, 3, 32, 32)
    base = hub_dfq.quantize(model, weights=8, activations=8, calibration=data)
    toy = hub_dfq.quantize(model, weights=8, activations=8, calibration=data, algorithm="shrink")
    assert toy.algorithm == "shrink" and toy.algorithm_config == {"factor": 0.99, "seed": 0}
    assert toy.history["shrunk_by"] == 0.99
    first = toy.integer_layers()[0]
    assert torch.allclose(first.weight_scale, base.integer_layers()[0].weight_scale * 0.99)
    # settings from the caller (a dict) and the resume cache: an interrupted run resumes from its saved state
    INTERRUPT_ONCE.append(True)
    with pytest.raises(KeyboardInterrupt):
        hub_dfq.quantize(model, weights=8, activations=8, calibration=data, algorithm="shrink",
                         settings={"shrink": {"factor": 0.5}})
    assert any((tmp_path / "cache" / "quantize").iterdir())
    hub_dfq.quantize(model, weights=8, activations=8, calibration=data, algorithm="shrink",
                     settings={"shrink": {"factor": 0.5}})
    assert RUNS == ["fresh", "fresh", "resumed"]
    assert not any((tmp_path / "cache" / "quantize").iterdir())  # cleared once the model is complete
    folder = hub_dfq.save_pretrained(toy, tmp_path / "toy")
    card = (folder / "README.md").read_text()
    assert TOY_ALGORITHM_DESCRIPTION in card and toy.history["fingerprint"] in card
    reloaded = hub_dfq.from_pretrained(folder)
    assert reloaded.algorithm == "shrink" and torch.equal(reloaded(data), toy(data))
    with pytest.raises(ConfigError, match="unknown setting"):
        hub_dfq.quantize(model, calibration=data, algorithm="shrink", settings={"shrink": {"speed": 2}})


def test_a_registered_algorithm_is_a_cli_choice_and_reads_preset_settings(tmp_path, capsys):
    assert main(["quantize", "--help"]) == 0
    assert "shrink" in capsys.readouterr().out
    json_path = tmp_path / "summary.json"
    assert main(["quantize", "default", "--weights", "8", "--activations", "8", "--calibration", "gaussian",
                 "--calibration-images", "8", "--algorithm", "shrink", "--eval", "none", "--json", str(json_path)]) == 0
    assert json.loads(json_path.read_text())["algorithm"] == "shrink"
    PRESETS.register(PRESETS.get("fast").__class__("tiny", "a test's preset", 8, {}, {"shrink": {"factor": 0.9}}))
    try:
        qmodel = hub_dfq.quantize("default", weights=8, activations=8, calibration="gaussian", algorithm="shrink",
                                  preset="tiny", progress=False)
        assert qmodel.algorithm_config["factor"] == 0.9 and qmodel.calibration["n"] == 8
    finally:
        PRESETS.unregister("tiny")


def test_the_docs_tables_are_generated_from_the_registries():
    from pathlib import Path

    from hub_dfq.cli.registries import markdown

    toys = SYNTH_METHODS.unregister("grey"), QUANT_ALGORITHMS.unregister("shrink")  # not built-ins
    try:
        doc = (Path(__file__).resolve().parents[1] / "docs" / "extending.md").read_text()
        start = doc.index("-->\n", doc.index("<!-- generated by")) + 4
        assert doc[start:doc.index("<!-- end of generated tables -->")] == markdown().rstrip() + "\n", \
            "docs/extending.md is out of date: regenerate it with `hub-dfq list --markdown`"
    finally:
        register_synth_method(toys[0])
        register_algorithm(toys[1])


def test_presets_scale_along_the_ladder_with_floors():
    fast = PRESETS.get("fast")
    assert fast.scaled(1.0) is fast
    half = fast.scaled(0.5)
    assert half.calibration_images == 128 and half.synth["iters"] == 100
    assert half.algorithms["reconstruct"] == {"iters": 150, "batch_size": 32}
    tiny = fast.scaled(0.01)
    assert tiny.calibration_images == 64 and tiny.synth["iters"] == 50 and tiny.algorithms["reconstruct"]["iters"] == 50
    assert PRESETS.get("best").scaled(0.3).algorithms["distill"]["init"] == "reconstruct"
    assert PRESETS.get("best").seconds > fast.seconds


def test_a_preset_can_give_one_algorithm_fewer_images_and_more_synthesis_steps():
    best = PRESETS.get("best")
    gptq = best.for_algorithm("gptq")
    assert gptq.calibration_images < best.calibration_images and gptq.synth["iters"] > best.synth["iters"]
    assert gptq.synth["batch_size"] == best.synth["batch_size"] and gptq.algorithms == best.algorithms
    assert best.for_algorithm("reconstruct") is best and PRESETS.get("fast").for_algorithm("gptq").by_algorithm == {}
    with pytest.raises(ValueError, match="may set calibration_images and synth, not iters"):
        Preset("typo", summary="-", calibration_images=64, by_algorithm={"gptq": {"iters": 5}})
    # what quantize calibrates with: the algorithm's own split of the budget
    qmodel = hub_dfq.quantize("default", weights=4, activations=8, algorithm="gptq", preset="best",
                              calibration="gaussian", progress=False)
    assert qmodel.calibration["n"] == gptq.calibration_images
    assert qmodel.calibration["synth_options"]["iters"] == gptq.synth["iters"]


def test_quantize_plans_costly_models_for_the_device(monkeypatch):
    from hub_dfq.budget import DeviceSpeed
    from hub_dfq.models.vision_model import VisionModel
    from hub_dfq.quant import api

    monkeypatch.setattr(VisionModel, "gflops", lambda self: 2.0)  # as if the model were 8x the reference cost
    monkeypatch.setattr(api, "device_speed", lambda model: DeviceSpeed("slow device", 0.5))
    qmodel = hub_dfq.quantize("default", weights=8, activations=8, calibration="gaussian", progress=False)
    # a range-only run plans for a quarter of fast's 600 s; 2 passes per observed image at 0.5 s each:
    # 256 images need 256 s, the largest rung under 150 s has 128
    assert qmodel.calibration["n"] == 128
    assert qmodel.history["budget"]["expected_seconds"] <= 150
    assert qmodel.history["budget"]["counts"] == {"images": qmodel.calibration["n"]}


def test_synthesis_default_steps_shrink_for_costly_models_and_explicit_steps_are_kept(monkeypatch, tmp_path):
    from hub_dfq.models.vision_model import VisionModel

    monkeypatch.setattr(VisionModel, "gflops", lambda self: 1.0)  # 4x the reference cost
    hub_dfq.synthesize("default", "bns", 2, batch_size=2, out_dir=tmp_path / "a", progress=False)
    assert json.loads((tmp_path / "a" / "generation.json").read_text())["arguments"]["iters"] == 50
    hub_dfq.synthesize("default", "bns", 2, iters=3, batch_size=2, out_dir=tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / "generation.json").read_text())["arguments"]["iters"] == 3
