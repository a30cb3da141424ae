"""`hub_dfq.quantize` end to end on the embedded ResNet-20: accuracy, methods, determinism, bad input."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import hub_dfq
from hub_dfq.errors import ConfigError, DatasetError
from hub_dfq.quant.distill import DistillConfig
from hub_dfq.quant.model import QuantizedModel
from hub_dfq.quant.reconstruct import ReconstructConfig

# Bit-level expectations (same seed, same weights) were recorded with one thread.
pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def test_2000(cifar_test_parquet):
    return hub_dfq.load_images(str(cifar_test_parquet), limit=2000)


@pytest.fixture(scope="module")
def fp_top1(model, test_2000):
    return hub_dfq.evaluate_accuracy(model, test_2000, progress=False)["top1"]


@pytest.fixture(scope="module")
def real_128(model, cifar_train_parquet):
    from hub_dfq.quant.data import calibration_tensor

    return calibration_tensor(model, str(cifar_train_parquet), size=128)[0]


def test_w8a8_bns_calibration_within_half_a_point(model, test_2000, fp_top1):
    qmodel = hub_dfq.quantize(model, weights=8, activations=8, calibration="bns", calibration_images=64,
                              synth_options={"iters": 40, "batch_size": 64})
    assert isinstance(qmodel, QuantizedModel)
    assert qmodel.calibration["kind"] == "synthetic" and qmodel.calibration["method"] == "bns"
    top1 = qmodel.evaluate(test_2000, progress=False)["top1"]
    assert top1 >= fp_top1 - 0.5, (top1, fp_top1)


def test_w4a4_reconstruct_beats_calibrate_on_a_small_budget(model, test_2000, real_128):
    common = dict(weights=4, activations=4, calibration=real_128, first_last_bits=None, residual_bits=None)
    calibrated = hub_dfq.quantize(model, algorithm="calibrate", **common)
    rebuilt = hub_dfq.quantize(model, algorithm="reconstruct", settings={"reconstruct": ReconstructConfig(iters=60)},
                               **common)
    a = calibrated.evaluate(test_2000, progress=False)["top1"]
    b = rebuilt.evaluate(test_2000, progress=False)["top1"]
    assert b > a + 0.5, (a, b)
    blocks = rebuilt.history["blocks"]
    assert len(blocks) == 11 and all(r["loss_after"] < r["loss_before"] for r in blocks[1:-1])
    # the returned model is the one reconstruction fitted: its logit error is the last block's loss
    with torch.no_grad():
        error = (rebuilt(real_128) - model.module(real_128)).square().sum(1).mean().item()
    assert error == pytest.approx(blocks[-1]["loss_after"], rel=1e-3)


def test_same_seed_same_quantized_weights(model, real_128):
    def run(seed):
        settings = {"reconstruct": ReconstructConfig(iters=4, batch_size=8)}
        return hub_dfq.quantize(model, weights=4, activations=4, calibration=real_128[:32], algorithm="reconstruct",
                                settings=settings, seed=seed).integer_state()

    first, second, other = run(3), run(3), run(4)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if k.endswith("scale"))


def test_reconstruct_learns_the_biases_only_when_asked_and_undoes_them_with_the_fit(model, real_128):
    def run(lr_bias, keep_start=False):
        settings = {"reconstruct": ReconstructConfig(iters=20, batch_size=8, lr_bias=lr_bias, keep_start=keep_start)}
        qmodel = hub_dfq.quantize(model, weights=4, activations=4, calibration=real_128[:32], algorithm="reconstruct",
                                  settings=settings)
        biases = {name: m.bias for name, m in qmodel.module.named_modules()
                  if hasattr(m, "weight_quantizer") and m.bias is not None}
        return qmodel, biases

    _, folded = run(0.0)
    _, learned = run(0.01)
    assert folded.keys() == learned.keys() and len(folded) >= 20
    assert all(not torch.equal(folded[k], learned[k]) for k in folded)
    assert [p.requires_grad for p in folded.values()] == [p.requires_grad for p in learned.values()]
    # 20 steps on 32 images end worse than GPTQ's start on every block: each block goes back to its start,
    # the biases it learned included
    kept, restored = run(1.0, keep_start=True)
    assert all(r.get("kept") == "start" for r in kept.history["blocks"])
    assert all(torch.equal(folded[k], restored[k]) for k in folded)
    with pytest.raises(ConfigError, match="learning rates must be >= 0"):
        ReconstructConfig(lr_bias=-1.0)


def test_distill_runs_and_freezes_integer_weights(model, real_128):
    qmodel = hub_dfq.quantize(model, weights=4, activations=8, calibration=real_128[:32], algorithm="distill",
                              settings={"distill": DistillConfig(iters=3, batch_size=8)})
    state = qmodel.integer_state()
    assert state["layer1.0.conv1.weight_int"].dtype == torch.int8
    # the default asymmetric grid: each channel's 16 levels [low, low + 15] contain zero
    integers = state["layer1.0.conv1.weight_int"].flatten(1).int()
    low = qmodel.module.get_submodule("layer1.0.conv1").weight_quantizer.low.int()[:, None]
    assert (low <= 0).all() and (integers >= low).all() and (integers <= low + 15).all()
    assert state["layer1.0.conv1.bias_int"].dtype == torch.int32
    assert len(qmodel.history["distill_loss"]) == 1


def test_a_calibration_tensor_is_used_whole_unless_a_size_is_given(model, real_128):
    data = torch.cat([real_128] * 3)  # more rows than the preset's 256
    assert hub_dfq.quantize(model, weights=8, activations=8, calibration=data).calibration["n"] == 384
    assert hub_dfq.quantize(model, weights=8, activations=8, calibration=data,
                            calibration_images=100).calibration["n"] == 100


def test_quantized_model_predicts_and_saves(model, tmp_path, real_128):
    qmodel = hub_dfq.quantize(model, weights=8, activations=8, calibration=real_128[:16])
    image = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    assert qmodel.predict([image])[0] in model.labels
    out = hub_dfq.save_pretrained(qmodel, tmp_path / "q")
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    with pytest.raises(hub_dfq.HubDfqError, match="already holds a quantized checkpoint"):
        hub_dfq.save_pretrained(qmodel, tmp_path / "q")


def _images(mode: str, size: int, n: int) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    shape = (size, size) if mode == "L" else (size, size, 3)
    images = [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode) for _ in range(n)]
    return datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))


@pytest.mark.parametrize("mode,size", [("L", 32), ("RGB", 48)], ids=["grayscale", "48px"])
def test_calibration_images_of_other_size_or_grayscale_are_converted(model, mode, size):
    qmodel = hub_dfq.quantize(model, weights=8, activations=8, calibration=_images(mode, size, 8))
    assert qmodel.calibration["n"] == 8


def test_old_argument_names_still_work_with_a_warning(model, real_128):
    new = hub_dfq.quantize(model, weights=4, activations=4, calibration=real_128[:16], calibration_images=8,
                           algorithm="reconstruct", settings={"reconstruct": ReconstructConfig(iters=2, batch_size=4)})
    with pytest.warns(FutureWarning, match="use `algorithm`"):
        old = hub_dfq.quantize(model, weights=4, activations=4, calibration=real_128[:16], calibration_size=8,
                               method="reconstruct", reconstruct_config=ReconstructConfig(iters=2, batch_size=4))
    assert (old.algorithm, old.method, old.calibration["n"]) == ("reconstruct", "reconstruct", 8)
    assert all(torch.equal(a, b) for a, b in zip(old.integer_state().values(), new.integer_state().values()))


def test_bad_input(model):
    with pytest.raises(ConfigError, match="2 to 8"):
        hub_dfq.quantize(model, weights=9, calibration="gaussian")
    with pytest.raises(ConfigError, match="2 to 8"):
        hub_dfq.quantize(model, activations=1, calibration="gaussian")
    with pytest.raises(ConfigError, match="unknown algorithm .qat.: use one of calibrate, gptq, reconstruct, distill"):
        hub_dfq.quantize(model, algorithm="qat", calibration="gaussian")
    with pytest.raises(ConfigError, match="unknown preset"):
        hub_dfq.quantize(model, preset="slow", calibration="gaussian")
    with pytest.raises(ConfigError, match="setting 'iters' of algorithm 'reconstruct' must be int, got 2.5"):
        hub_dfq.quantize(model, algorithm="reconstruct", settings={"reconstruct": {"iters": 2.5}},
                         calibration="gaussian")
    with pytest.raises(DatasetError, match="empty"):
        hub_dfq.quantize(model, calibration=_images("RGB", 32, 1).select([]))
    with pytest.raises(ConfigError, match="calibration tensor"):
        hub_dfq.quantize(model, calibration=torch.zeros(4, 3, 16, 16))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["reconstruct", "distill"])
def test_w4a4_fast_preset_on_bns_within_one_point_on_full_test_split(model, cifar_test_parquet, method):
    """The fast preset's data-free W4A4, the README's main job (see docs/quantization.md for the numbers)."""
    full = hub_dfq.load_images(str(cifar_test_parquet))
    fp = hub_dfq.evaluate_accuracy(model, full, progress=False)["top1"]
    qmodel = hub_dfq.quantize(model, weights=4, activations=4, calibration="bns", algorithm=method, preset="fast")
    assert qmodel.evaluate(full, progress=False)["top1"] >= fp - 1.0
