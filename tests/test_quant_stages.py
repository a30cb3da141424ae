"""The public stages (prepare -> calibrate -> apply -> freeze): a caller's own steps in between, and the same
bytes as `hub_dfq.quantize` where the path is the same."""

from __future__ import annotations

import pytest
import torch

import hub_dfq
from hub_dfq.errors import ArgumentTypeError, ConfigError
from hub_dfq.quant import stages
from hub_dfq.quant.config import QuantConfig, QuantScheme
from hub_dfq.quant.gptq import GPTQConfig
from hub_dfq.quant.modules import act_quantizers

pytestmark = pytest.mark.usefixtures("one_thread")

W4A8 = QuantConfig(default=QuantScheme(weights=4, activations=8))


@pytest.fixture(scope="module")
def images(model):
    from hub_dfq.quant.data import images_to_tensor

    return images_to_tensor(model, hub_dfq.load_images("default", limit=48))


@pytest.fixture(scope="module")
def expected(model, images):
    return hub_dfq.quantize(model, weights=4, activations=8, calibration=images, algorithm="gptq")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_stages_are_public_and_lazy():
    assert hub_dfq.prepare is stages.prepare and hub_dfq.freeze is stages.freeze
    assert {"prepare", "calibrate", "calibrating", "apply", "freeze", "PreparedModel"} <= set(hub_dfq.__all__)


def test_a_calibration_loop_of_ones_own_then_gptq_gives_quantizes_model(model, images, expected):
    prepared = hub_dfq.prepare(model, W4A8)
    assert prepared.stage == "prepared" and prepared.config == expected.config
    with hub_dfq.calibrating(prepared) as module:  # the caller's own data loop
        for start in range(0, len(images), 64):  # quantize's observing batch
            module(images[start:start + 64])
    hub_dfq.apply(prepared, "gptq", [images[:20], images[20:]])  # batches are joined: the same data
    qmodel = hub_dfq.freeze(prepared)
    assert _same(qmodel.integer_state(), expected.integer_state())
    with torch.no_grad():
        assert torch.equal(qmodel(images), expected(images))
    assert qmodel.algorithm == "gptq" and qmodel.algorithm_config == expected.algorithm_config
    assert qmodel.history["layers"] == expected.history["layers"]
    # a loop the stages cannot see is keyed by the calibrated graph, not taken for quantize's run
    assert qmodel.history["fingerprint"] != expected.history["fingerprint"]
    assert qmodel.calibration == {"kind": "custom"}


def test_the_stages_on_quantizes_data_record_its_fingerprint(model, images, expected):
    prepared = hub_dfq.calibrate(hub_dfq.prepare(model, W4A8), images, source={"kind": "tensor", "n": len(images)})
    qmodel = hub_dfq.freeze(hub_dfq.apply(prepared, "auto", images, settings=GPTQConfig()))
    assert qmodel.algorithm == "gptq"  # what "auto" picks for 4-bit weights and 8-bit inputs
    assert qmodel.history["fingerprint"] == expected.history["fingerprint"]
    assert _same(qmodel.integer_state(), expected.integer_state())


def test_a_step_of_ones_own_between_calibrate_and_apply_is_kept(model, images, expected):
    prepared = hub_dfq.calibrate(hub_dfq.prepare(model, W4A8), images)
    name, quantizer = act_quantizers(prepared.module)[1]
    low, high = quantizer.range()
    quantizer.set_range(low, high * 2)  # e.g. a range from the caller's own observer
    qmodel = hub_dfq.freeze(hub_dfq.apply(prepared, "gptq", images))
    grid = next(g for g in qmodel.activation_grids() if g.name == name)
    assert float(grid.scale) == pytest.approx(float(quantizer.scale))
    assert float(grid.scale) != pytest.approx(float(next(g for g in expected.activation_grids()
                                                         if g.name == name).scale))
    assert qmodel.history["fingerprint"] != expected.history["fingerprint"]  # another start, another run


def test_freezing_right_after_calibration_is_ranges_only(model, images):
    reference = hub_dfq.quantize(model, weights=8, activations=8, calibration=images, algorithm="calibrate")
    prepared = hub_dfq.calibrate(hub_dfq.prepare(model, QuantConfig(default=QuantScheme(weights=8, activations=8))),
                                 (images[i:i + 64] for i in range(0, len(images), 64)))
    qmodel = hub_dfq.freeze(prepared)
    assert qmodel.algorithm == "calibrate" and "fingerprint" not in qmodel.history
    assert qmodel.calibration == {"kind": "tensor", "n": len(images)}
    assert _same(qmodel.integer_state(), reference.integer_state())


def test_stages_out_of_order_say_what_to_do(model, images):
    with pytest.raises(ArgumentTypeError, match="load it with hub_dfq.load_model"):
        hub_dfq.prepare("default", W4A8)
    prepared = hub_dfq.prepare(model, W4A8)
    with pytest.raises(ConfigError, match=r"run hub_dfq.calibrate\(prepared, batches\) first"):
        hub_dfq.apply(prepared, "gptq", images)
    with pytest.raises(ConfigError, match="not set yet"):
        hub_dfq.freeze(prepared)
    with pytest.raises(ArgumentTypeError, match="takes the PreparedModel"):
        hub_dfq.calibrate(model, images)
    hub_dfq.calibrate(prepared, images[:16])
    with pytest.raises(ConfigError, match="unknown"):
        hub_dfq.apply(prepared, "nope", images)
    assert prepared.stage == "calibrated"  # a refused call changes nothing
    hub_dfq.apply(prepared, "calibrate", images[:16])
    with pytest.raises(ConfigError, match="'calibrate' already ran on it"):
        hub_dfq.calibrate(prepared, images[:16])
    hub_dfq.freeze(prepared)
    with pytest.raises(ConfigError, match="frozen into a QuantizedModel already"):
        hub_dfq.freeze(prepared)


def test_an_interrupted_calibration_loop_sets_no_ranges(model, images):
    prepared = hub_dfq.prepare(model, W4A8)
    with pytest.raises(KeyboardInterrupt), hub_dfq.calibrating(prepared) as module:
        module(images[:8])
        raise KeyboardInterrupt
    assert prepared.stage == "prepared"
    assert all(q.observer is None and q.mode != "observe" for _, q in act_quantizers(prepared.module))
