"""An interrupted reconstruct/distill run continues where it stopped and ends with the same model."""

from __future__ import annotations

import pytest
import torch

import hub_dfq
from hub_dfq.fingerprint import fingerprint
from hub_dfq.quant import distill as distill_module
from hub_dfq.quant import reconstruct as reconstruct_module
from hub_dfq.quant.distill import DistillConfig
from hub_dfq.quant.reconstruct import ReconstructConfig
from hub_dfq.quant.resume import RunState

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(model):
    from hub_dfq.quant.data import images_to_tensor

    return images_to_tensor(model, hub_dfq.load_images("default", limit=48))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HUB_DFQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reconstruction_resumes_after_the_last_finished_block(model, images, monkeypatch, own_cache):
    kwargs = dict(weights=4, activations=4, calibration=images, algorithm="reconstruct",
                  settings={"reconstruct": ReconstructConfig(iters=6, batch_size=8)})
    expected = hub_dfq.quantize(model, **kwargs)
    assert not list((own_cache / "quantize").iterdir())  # finished runs leave nothing behind

    fit, fitted = reconstruct_module._fit_block, []

    def interrupted(block, *args, **kw):
        if len(fitted) == 4:
            raise KeyboardInterrupt
        fitted.append(block.name)
        return fit(block, *args, **kw)

    monkeypatch.setattr(reconstruct_module, "_fit_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hub_dfq.quantize(model, **kwargs)
    monkeypatch.setattr(reconstruct_module, "_fit_block", lambda block, *a, **kw: fitted.append(block.name) or fit(block, *a, **kw))
    resumed = hub_dfq.quantize(model, **kwargs)
    blocks = [b["block"] for b in expected.history["blocks"]]
    assert fitted == blocks  # the first four once, then only the rest
    assert _same(resumed.integer_state(), expected.integer_state())
    assert resumed.history["blocks"] == expected.history["blocks"]


def test_distillation_resumes_from_its_last_save(model, images, monkeypatch):
    kwargs = dict(weights=4, activations=8, calibration=images, algorithm="distill",
                  settings={"distill": DistillConfig(iters=2 * distill_module.SAVE_EVERY + 10, batch_size=4)})
    expected = hub_dfq.quantize(model, **kwargs)

    loss, calls = distill_module._kd_loss, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == distill_module.SAVE_EVERY + 20:
            raise KeyboardInterrupt
        return loss(*args)

    monkeypatch.setattr(distill_module, "_kd_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hub_dfq.quantize(model, **kwargs)
    calls.clear()
    resumed = hub_dfq.quantize(model, **kwargs)
    assert len(calls) == kwargs["settings"]["distill"].iters - distill_module.SAVE_EVERY
    assert _same(resumed.integer_state(), expected.integer_state())
    assert resumed.history["distill_loss"] == expected.history["distill_loss"]


def test_other_inputs_do_not_pick_up_saved_progress(model, images):
    base = dict(model=model.module, config={"w": 4}, data=images, seed=0)
    key = lambda **parts: fingerprint("quantize", version=1, **parts)  # noqa: E731
    assert key(**base) == key(**dict(base, data=images.clone()))
    assert key(**base) != key(**dict(base, seed=1))
    assert key(**base) != key(**dict(base, data=images[:-1]))
    assert key(**base) != fingerprint("quantize", version=2, **base)  # a new algorithm version never resumes old state


def test_an_unreadable_state_starts_over(tmp_path):
    state = RunState(tmp_path / "run")
    state.save("distill", {"steps_done": 3})
    assert state.load("distill") == {"steps_done": 3}
    (tmp_path / "run" / "distill.pt").write_bytes(b"torn")
    assert state.load("distill") is None
    state.clear()
    assert not (tmp_path / "run").exists()
