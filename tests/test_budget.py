"""Budgets sized by the device: the measured speed, the ladder of counts, explicit time budgets, the CLI line."""

from __future__ import annotations

import json

import pytest

import hub_dfq
import hub_dfq.cache
from hub_dfq import budget
from hub_dfq.budget import DeviceSpeed, parse_duration
from hub_dfq.cli import main
from hub_dfq.errors import ConfigError
from hub_dfq.quant import api

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("value, seconds", [(900, 900.0), ("900", 900.0), ("90s", 90.0), ("15m", 900.0),
                                            ("15min", 900.0), ("1.5h", 5400.0), ("1h30m", 5400.0), (2.5, 2.5)])
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["soon", "", "-5", 0, "0m", "1d", True, float("nan")])
def test_parse_duration_rejects(value):
    with pytest.raises(ConfigError, match="time budget"):
        parse_duration(value)


@pytest.fixture
def slow_device(monkeypatch):
    """A device where one image's forward+backward pass takes 10 ms and one synthesis step of one image 25 ms (fixed
    speeds: plans do not depend on load)."""
    monkeypatch.setattr(api, "device_speed", lambda model: DeviceSpeed("test device", 0.01))
    monkeypatch.setattr(api, "synthesis_step_seconds", lambda model, config: 0.025)


def test_time_budget_shrinks_the_preset_to_fit(model, slow_device):
    # gptq on gaussian images: (2 observing + 6.5 GPTQ) passes per image plus the refine sweeps' fixed 4 x 70 passes;
    # 128 images need ~13.7 s at 10 ms
    from hub_dfq.quant.gptq import REFINE_PASSES_PER_SWEEP

    q = hub_dfq.quantize(model, weights=4, activations=8, calibration="gaussian", algorithm="gptq", time_budget="12s",
                         progress=False)
    plan = q.history["budget"]
    assert plan["scale"] == pytest.approx(2 ** -1.25) and plan["counts"] == {"images": 96}
    fixed = 4 * REFINE_PASSES_PER_SWEEP * 0.01
    assert plan["expected_seconds"] == pytest.approx(96 * 8.5 * 0.01 + fixed, abs=0.05)
    assert plan["expected_seconds"] <= 12
    assert q.calibration["n"] == 96  # the run used what it planned
    assert plan["speed"] == {"device": "test device", "seconds_per_image": 0.01}


def test_time_budget_keeps_explicit_counts_and_refuses_what_cannot_fit(model, slow_device):
    with pytest.raises(ConfigError, match=r"needs about \d+ s on test device, more than the 1 s given: give a time "
                                          r"budget of at least \d+ s"):
        hub_dfq.quantize(model, weights=4, activations=8, calibration="gaussian", algorithm="gptq",
                         calibration_images=256, time_budget=1, progress=False)
    with pytest.raises(ConfigError, match="not a duration"):
        hub_dfq.quantize(model, calibration="gaussian", time_budget="whenever")


def test_cifar_models_keep_the_written_counts_without_a_time_budget(model, slow_device):
    q = hub_dfq.quantize(model, weights=8, activations=8, calibration="gaussian", progress=False)
    assert "budget" not in q.history and q.calibration["n"] == 256


def test_range_only_runs_plan_a_quarter_of_the_preset(model, slow_device, monkeypatch):
    """An 8-bit run only calibrates ranges: it plans for a quarter of the preset's time (W8A8 is promised quickly)."""
    monkeypatch.setattr(api, "REFERENCE_GFLOPS", 0.0)  # plan as for a large model
    # the plan's target is what is checked: a few images (kept as given) spare the work the plan would size
    common = dict(calibration="gaussian", calibration_images=16, progress=False)
    ranges = hub_dfq.quantize(model, weights=8, activations=8, **common)
    rounded = hub_dfq.quantize(model, weights=4, activations=8, **common)
    assert ranges.algorithm == "calibrate" and rounded.algorithm == "gptq"  # auto
    assert ranges.history["budget"]["target_seconds"] == 150 and rounded.history["budget"]["target_seconds"] == 600


def test_reconstruct_cost_counts_its_steps_and_synthesis(model, slow_device):
    """Where synthesis and fitting steps are what costs, both shrink along the ladder (floors: 64 images, 50 steps)."""
    with pytest.raises(ConfigError, match=r"smallest budget \(images 64, synthesis steps 50, reconstruct steps 50\)"):
        hub_dfq.quantize(model, weights=4, activations=4, calibration="bns", time_budget="10s", progress=False)


def test_synthesis_is_planned_at_its_measured_speed(model, slow_device, capsys):
    """A synthesis step costs what the loop measured (25 ms here), not a fixed share of a forward+backward pass."""
    q = hub_dfq.quantize(model, weights=8, activations=8, calibration="bns", calibration_images=16,
                         synth_options={"iters": 4}, time_budget="1h", progress=False)
    plan = q.history["budget"]
    assert plan["counts"] == {"images": 16, "synthesis steps": 4}
    assert plan["expected_seconds"] == pytest.approx(16 * (2 * 0.01 + 4 * 0.025), abs=0.05)
    assert plan["speed"] == {"device": "test device", "seconds_per_image": 0.01, "synthesis_step": 0.025}
    described = budget.BudgetPlan(1.0, plan["counts"], 1.9, 3600, DeviceSpeed(**plan["speed"])).describe()
    assert described.endswith("(10.0 ms per image forward+backward, 25.0 ms per image synthesis step)")


def test_a_size_budget_plans_for_its_sensitivity_measurement(model, slow_device):
    """Measuring every layer's sensitivity is work no scale shrinks: the plan counts it before sizing the rest."""
    common = dict(weights=4, activations=8, calibration="gaussian", algorithm="gptq", calibration_images=16,
                  time_budget="1h", progress=False)
    plain = hub_dfq.quantize(model, **common).history["budget"]["expected_seconds"]
    sized = hub_dfq.quantize(model, size_budget="0.2x", **common)
    layers = len(hub_dfq.prepare(model).report.quantized)
    assert sized.history["budget"]["expected_seconds"] == pytest.approx(
        plain + api.SENSITIVITY_PASSES_PER_LAYER * layers * 0.01, abs=0.05)
    assert sized.history["allocation"]["bytes"] <= sized.history["allocation"]["budget"]


def test_synthesis_speed_is_measured_on_the_loop_once_and_listed_in_the_cache(model, tmp_path, monkeypatch):
    from hub_dfq.synth import speed
    from hub_dfq.synth.config import SynthConfig

    monkeypatch.setenv("HUB_DFQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(budget, "_SPEEDS", {})
    batches = []
    generate = speed.BatchGenerator.generate
    monkeypatch.setattr(speed.BatchGenerator, "generate",
                        lambda self, targets, *a, **k: batches.append((len(targets), self.config.iters))
                        or generate(self, targets, *a, **k))
    first = speed.synthesis_step_seconds(model, SynthConfig(method="bns"))
    assert 0 < first < 1 and batches == [(8, 4)]  # a small batch, one warm-up step and three timed ones
    monkeypatch.setattr(budget, "_SPEEDS", {})  # a new process reads the saved measurement
    assert speed.synthesis_step_seconds(model, SynthConfig(method="bns")) == first and len(batches) == 1
    speed.synthesis_step_seconds(model, SynthConfig(method="bns", loss="l2"))  # another loss is another loop
    assert len(batches) == 2
    descriptions = sorted(entry.description for entry in hub_dfq.cache.list_cache(["speed"]))
    assert len(descriptions) == 2 and all(d.startswith("bns synthesis speed of ") for d in descriptions)
    assert all("ms per image-step" in d for d in descriptions)


def test_device_speed_is_measured_once_and_listed_in_the_cache(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HUB_DFQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(budget, "_SPEEDS", {})
    first = budget.device_speed(model)
    assert first.seconds_per_image > 0 and first.device.startswith("cpu (1 threads)")
    monkeypatch.setattr(budget, "_SPEEDS", {})  # a new process reads the saved measurement
    calls = []
    monkeypatch.setattr(model.module, "forward", lambda *a: calls.append(a))
    assert budget.device_speed(model) == first and not calls
    entries = hub_dfq.cache.list_cache(["speed"])
    assert len(entries) == 1 and "ms per image" in entries[0].description
    assert len(hub_dfq.cache.clear_cache(["speed"])) == 1 and not (tmp_path / "cache" / "speed").exists() or \
        not any((tmp_path / "cache" / "speed").iterdir())


def test_cli_prints_the_budget_before_it_starts(slow_device, tmp_path, capsys):
    argv = ["quantize", "default", "--weights", "4", "--activations", "8", "--calibration", "gaussian",
            "--algorithm", "gptq", "--time-budget", "12s", "--eval", "none", "--json", str(tmp_path / "q.json")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "budget: images 96 (x0.42 of the written counts to fit 12 s); expected about 11 s on test device" \
        in captured.err
    assert "(expected about 11 s)" in captured.out
    assert json.loads((tmp_path / "q.json").read_text())["budget"]["counts"] == {"images": 96}
    assert main([*argv[:-4], "--time-budget", "1", "--calibration-images", "256", "--eval", "none"]) == 2
    assert "give a time budget of at least" in capsys.readouterr().err
